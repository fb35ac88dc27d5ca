"""Replica side of a cycle: read the export's manifest, patch DEST, commit.

``sync(reader, dest)`` applies one cycle:

1. moves first (no data): every moved object is lifted out to the stage
   directory (deepest base path first), then dropped at its new path
   (shallowest first) -- chains and swaps work, children of a moved directory
   follow it;
2. deletes (into the cycle's trash, emptied after the commit);
3. directories, then files: a file with a trusted old copy (catalog row whose
   inode, size and mtime still match) is compared block by block -- coarse
   signatures first, fine ones only inside coarse blocks that differ -- and only
   changed ranges are read through the mount and written in place; shifted
   data goes through content-defined chunks into a staged copy; new files are
   written to the stage and renamed into place; small files come in packs;
4. hard links, symlinks, then metadata (owner, mode, xattrs, times; directories
   deepest first);
5. ``syncfs`` of DEST, then the catalog records the cycle as committed.

Every path from the manifest is validated (paths.check_rel) before anything is
touched, and every write goes through directory fds opened component by
component with O_NOFOLLOW: a symlink inside DEST is never followed.

Thread-safety: ``sync`` runs in one thread; only range reads fan out to the
reader's pool, writing with pwrite to fds this thread owns.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import shutil
import stat as statmod
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple

import blockdiff
from blockdiff import framing

from . import platform
from .errors import (CycleMismatchError, DestinationError, DiskFullError, LockedError, ManifestError,
                     RecoveryNeededError, UnsafePathError, WarningList)
from .manifest import Entry, read_lines
from .paths import (STATE_DIR, basename, depth, is_under, join, open_dir_nofollow, parent, show)
from .replica_catalog import FileRow, ReplicaCatalog

log = logging.getLogger(__name__)

CDC_MIN_SIZE = 1024 * 1024   # below this, shifted data is simply refetched where it differs
O_FILE = os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class SyncStats:
    cycle: int = 0
    base: int = 0
    files_changed: int = 0
    files_deleted: int = 0
    files_renamed: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_transferred: int = 0
    bytes_written: int = 0
    files_unchanged: int = 0
    already_committed: bool = False
    duration_s: float = 0.0


def state_dir(dest: bytes) -> bytes:
    return join(dest, STATE_DIR)


@contextmanager
def replica_lock(dest: bytes) -> Iterator[None]:
    sd = state_dir(dest)
    os.makedirs(sd, exist_ok=True)
    fd = os.open(join(sd, b"lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"another discrep run is writing to {os.fsdecode(dest)}",
                              hint="wait for it, or stop it; two cycles never run at once on one DEST") from None
        yield
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _Dirs:
    """Directory fds below DEST, opened without following symlinks, cached."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.cache: Dict[bytes, int] = {}
        self.dirty: Set[bytes] = set()

    def get(self, rel: bytes, create: bool = False) -> int:
        fd = self.cache.get(rel)
        if fd is None:
            if rel:
                pfd = self.get(parent(rel), create)
                name = basename(rel)
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | O_FILE, dir_fd=pfd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o700, dir_fd=pfd)
                    self.dirty.add(parent(rel))
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | O_FILE, dir_fd=pfd)
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    if not create:
                        raise ManifestError(f"{show(rel)} is not a directory on the replica") from None
                    raise _NotDir(rel) from None
            else:
                fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.root_fd)
            if len(self.cache) > 512:
                self.clear()
            self.cache[rel] = fd
        return fd

    def clear(self) -> None:
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()

    def fsync_dirty(self) -> None:
        for rel in sorted(self.dirty):
            try:
                os.fsync(self.get(rel))
            except (FileNotFoundError, ManifestError):
                pass


class _NotDir(Exception):
    def __init__(self, rel: bytes):
        self.rel = rel


def _lstat(dirs: _Dirs, rel: bytes) -> Optional[os.stat_result]:
    try:
        return os.stat(basename(rel), dir_fd=dirs.get(parent(rel)), follow_symlinks=False)
    except FileNotFoundError:
        return None
    except ManifestError:
        return None


class Applier:
    """Applies one cycle's manifest to DEST (see module doc)."""

    def __init__(self, reader, dest: bytes, catalog: ReplicaCatalog, header: dict, entries: List[Entry],
                 warnings: WarningList, progress=None):
        self.reader = reader
        self.dest = dest
        self.cat = catalog
        self.header = header
        self.entries = entries
        self.warnings = warnings
        self.progress = progress
        self.cycle = int(header["cycle"])
        self.stats = SyncStats(cycle=self.cycle, base=int(header.get("base", 0)))
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dirs = _Dirs(self.root_fd)
        sd = state_dir(dest)
        self.stage_rel = STATE_DIR + b"/stage"
        self.trash_rel = STATE_DIR + b"/trash"
        for d in (self.stage_rel, self.trash_rel):
            p = join(dest, d)
            if os.path.lexists(p):
                shutil.rmtree(p)
            os.makedirs(p, 0o700)
        self.stage_fd = os.open(join(dest, self.stage_rel), os.O_RDONLY | os.O_DIRECTORY | O_FILE)
        self.trash_fd = os.open(join(dest, self.trash_rel), os.O_RDONLY | os.O_DIRECTORY | O_FILE)
        self._n = 0
        self.moves: List[Tuple[bytes, bytes]] = []   # (base, new) that were applied
        self.deleted: List[bytes] = []
        self.rows: List[Tuple] = []
        self.origin: Dict[bytes, bytes] = {}         # new path -> base path of a move
        self._packs: Dict[int, bytes] = {}
        self.euid = os.geteuid()
        self.dir_paths = {e.path for e in entries if e.op == "dir"}

    def close(self) -> None:
        self.dirs.clear()
        for fd in (self.stage_fd, self.trash_fd, self.root_fd):
            os.close(fd)

    def _tmpname(self, tag: str) -> bytes:
        self._n += 1
        return b"%s%d" % (tag.encode(), self._n)

    # -- primitives ----------------------------------------------------
    def trash(self, rel: bytes) -> None:
        """Move ``rel`` (any type) into the cycle's trash."""
        pfd = self.dirs.get(parent(rel))
        os.rename(basename(rel), self._tmpname("t"), src_dir_fd=pfd, dst_dir_fd=self.trash_fd)
        self.dirs.dirty.add(parent(rel))
        self.dirs.clear()

    def ensure_parent(self, rel: bytes) -> int:
        """fd of rel's parent, creating missing directories.

        A non-directory in the way (a symlink inside DEST, say) is replaced only
        when this cycle's manifest says that path is now a directory; otherwise
        the path is refused and nothing is written through it.
        """
        while True:
            try:
                return self.dirs.get(parent(rel), create=True)
            except _NotDir as nd:
                if nd.rel not in self.dir_paths:
                    raise UnsafePathError(f"refusing to write {show(rel)}: {show(nd.rel)} on the replica is "
                                          f"not a directory (a symlink?) and the manifest does not replace it")
                self.trash(nd.rel)

    def install(self, tmp: bytes, rel: bytes) -> None:
        """Rename staged ``tmp`` over ``rel`` (a directory in the way goes to the trash)."""
        pfd = self.ensure_parent(rel)
        st = _lstat(self.dirs, rel)
        if st is not None and statmod.S_ISDIR(st.st_mode):
            self.trash(rel)
            pfd = self.ensure_parent(rel)
        os.rename(tmp, basename(rel), src_dir_fd=self.stage_fd, dst_dir_fd=pfd)
        self.dirs.dirty.add(parent(rel))

    def base_of(self, rel: bytes) -> bytes:
        q = rel
        while q:
            if q in self.origin:
                return self.origin[q] + rel[len(q):]
            q = parent(q)
        return rel

    # -- phases --------------------------------------------------------
    def run(self) -> SyncStats:
        t0 = time.monotonic()
        ents = self.entries
        moves = [e for e in ents if e.op == "move"]
        deletes = [e for e in ents if e.op == "delete"]
        ups = [e for e in ents if e.is_upsert]
        full = bool(self.header.get("full"))
        # 1. moves: lift out, deepest base first; then drop in, shallowest new path first
        lifted: List[Tuple[Entry, bytes]] = []
        for e in sorted(moves, key=lambda m: -depth(m.old)):
            if _lstat(self.dirs, e.old) is None:
                self.warnings.add(show(e.old), "moved on the source but missing on the replica; fetched whole")
                continue
            tmp = self._tmpname("m")
            os.rename(basename(e.old), tmp, src_dir_fd=self.dirs.get(parent(e.old)), dst_dir_fd=self.stage_fd)
            self.dirs.dirty.add(parent(e.old))
            self.dirs.clear()
            lifted.append((e, tmp))
        for e, tmp in sorted(lifted, key=lambda x: depth(x[0].path)):
            if _lstat(self.dirs, e.path) is not None:
                self.trash(e.path)
            self.install(tmp, e.path)
            self.dirs.clear()
            self.moves.append((e.old, e.path))
            self.origin[e.path] = e.old
            self.stats.files_renamed += 1
        # 2. deletes
        for e in sorted(deletes, key=lambda d: -depth(d.path)):
            if _lstat(self.dirs, e.path) is not None:
                self.trash(e.path)
                self.stats.files_deleted += 1
            self.deleted.append(e.path)
        if full:
            self._remove_extraneous({e.path for e in ups})
        # 3. directories
        dir_ents = [e for e in ups if e.op == "dir"]
        for e in sorted(dir_ents, key=lambda d: depth(d.path)):
            st = _lstat(self.dirs, e.path)
            if st is not None and not statmod.S_ISDIR(st.st_mode):
                self.trash(e.path)
                st = None
            if st is None:
                pfd = self.ensure_parent(e.path)
                os.mkdir(basename(e.path), 0o700, dir_fd=pfd)
                self.dirs.dirty.add(parent(e.path))
                self.stats.dirs += 1
        # 4. files (primaries), symlinks, hard links
        files = [e for e in ups if e.op == "file"]
        done = 0
        for e in files:
            if e.link is None:
                self._file(e)
            done += 1
            if self.progress:
                self.progress(done, len(files), self.reader.bytes_read)
        for e in ups:
            if e.op == "symlink":
                self._symlink(e)
        for e in files:
            if e.link is not None:
                self._hardlink(e)
        # 5. metadata: files and links first, directories deepest first
        for e in ups:
            if e.op == "symlink":
                self._meta(e)
        for e in sorted(dir_ents, key=lambda d: -depth(d.path)):
            self._meta(e)
        if isinstance(self.header.get("root"), dict):   # the top directory itself, last
            self._apply_meta_fd(Entry(dict(self.header["root"], op="dir", path="_")), self.root_fd)
        self.dirs.fsync_dirty()
        syncfs(self.root_fd)
        self.stats.duration_s = time.monotonic() - t0
        return self.stats

    def _remove_extraneous(self, keep: Set[bytes]) -> None:
        """Full cycle: anything in DEST that the snapshot does not have goes to the trash."""
        stack = [b""]
        while stack:
            d = stack.pop()
            try:
                names = os.listdir(self.dirs.get(d))
            except (FileNotFoundError, ManifestError):
                continue
            for n in names:
                name = os.fsencode(n)
                rel = name if not d else d + b"/" + name
                if not d and rel == STATE_DIR:
                    continue
                if rel not in keep:
                    self.trash(rel)
                    self.stats.files_deleted += 1
                else:
                    st = _lstat(self.dirs, rel)
                    if st is not None and statmod.S_ISDIR(st.st_mode):
                        stack.append(rel)

    # -- regular files -------------------------------------------------
    def _trusted_old(self, e: Entry, st: Optional[os.stat_result]) -> Optional[FileRow]:
        if st is None or not statmod.S_ISREG(st.st_mode):
            return None
        row = self.cat.get(self.base_of(e.path))
        if row is None or row.kind != "file" or row.sig is None:
            return None
        if (row.ino, row.size, row.mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            return None
        return row

    def _pack(self, k: int) -> bytes:
        data = self._packs.get(k)
        if data is None:
            self._packs.clear()  # packs are consumed in order: keep one
            data = framing.unpack(self.reader.read_all(b".discrep/pack/%d" % k))
            self._packs[k] = data
        return data

    def _file(self, e: Entry) -> None:
        st = _lstat(self.dirs, e.path)
        old = self._trusted_old(e, st)
        old_sig = blockdiff.Signature.from_bytes(old.sig) if old else None
        if e.h is not None and old_sig is not None and old_sig.whole_digest() == e.h and old.size == e.size:
            self._unchanged(e, old_sig)
            return
        if e.size == 0 and old_sig is not None and old.size == 0:
            self._unchanged(e, old_sig)
            return
        self.stats.files_changed += 1
        if e.pack is not None:
            k, off = e.pack
            blob = self._pack(k)
            data = blob[off:off + e.size]
            sig = blockdiff.sign_bytes(data)
            if len(data) != e.size or sig.whole_digest() != e.h:
                raise ManifestError(f"pack {k} does not hold the bytes the manifest announces for {show(e.path)}")
            self._write_new(e, lambda fd: os.pwrite(fd, data, 0) if data else 0, sig)
            return
        if old_sig is None or e.size == 0:
            self._fetch_whole(e)
            return
        self._patch(e, old_sig, st)

    def _unchanged(self, e: Entry, sig) -> None:
        self.stats.files_unchanged += 1
        fd = os.open(basename(e.path), os.O_RDONLY | os.O_NONBLOCK | O_FILE, dir_fd=self.dirs.get(parent(e.path)))
        try:
            self._apply_meta_fd(e, fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.rows.append((e.path, "file", e.size, e.mtime_ns, st.st_ino, sig.to_bytes()))

    def _write_new(self, e: Entry, fill, sig) -> None:
        """Create the file in the stage, fill it, apply metadata, fsync, rename into place."""
        tmp = self._tmpname("f")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_FILE, 0o600, dir_fd=self.stage_fd)
        try:
            os.ftruncate(fd, e.size)
            n = fill(fd)
            self.stats.bytes_written += n or 0
            if sig is None:
                sig = blockdiff.sign_fd(fd, e.size)
            elif isinstance(sig, _LazySig):
                sig = sig.get()
            self._apply_meta_fd(e, fd)
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=self.stage_fd)
            raise
        os.close(fd)
        self.install(tmp, e.path)
        self.rows.append((e.path, "file", e.size, e.mtime_ns, ino, sig.to_bytes()))

    def _data_rel(self, e: Entry) -> bytes:
        return b".discrep/data/%d" % e.idx

    def _fetch_whole(self, e: Entry) -> None:
        ranges = e.extents if e.extents is not None else ([(0, e.size)] if e.size else [])
        bs = blockdiff.FINE_SIZE
        aligned = all(o % bs == 0 for o, _ in ranges)
        nblocks = -(-e.size // bs)
        fine = bytearray(blockdiff.zero_block_digest(bs) * nblocks)

        def on_data(off: int, data: bytes) -> None:
            d = blockdiff.fine_digests(data, bs)
            i = off // bs
            fine[i * 8:i * 8 + len(d)] = d

        def fill(fd: int) -> int:
            return self.reader.copy_ranges(self._data_rel(e), ranges, fd, on_data if aligned else None)
        lazy = None
        if aligned and all((o + ln) % bs == 0 or o + ln == e.size for o, ln in ranges):
            lazy = _LazySig(e.size, fine)  # digests arrive with the data: no reread of what we wrote
        self._write_new(e, fill, lazy)

    def _patch(self, e: Entry, old_sig, st) -> None:
        rel = b".discrep/sig/%d" % e.idx
        hdr = blockdiff.SigHeader.from_bytes(self.reader.pread(rel, blockdiff.HEADER_SIZE, 0))
        if hdr.file_size != e.size or hdr.block_size != old_sig.block_size or hdr.factor != old_sig.factor:
            raise ManifestError(f"signature of {show(e.path)} does not match its manifest entry")
        c_off, c_len = hdr.coarse_range()
        coarse = self.reader.pread(rel, c_len, c_off)
        diff_c = blockdiff.differing_coarse(old_sig, hdr, coarse)
        if not diff_c:
            self.stats.files_changed -= 1
            self._unchanged(e, old_sig)
            return
        if e.size != old_sig.file_size and e.size >= CDC_MIN_SIZE and len(diff_c) * 2 > hdr.n_coarse:
            self._cdc(e, st)
            return
        reqs = [(rel,) + tuple(hdr.fine_range(ci)) for ci in diff_c]
        slices = self.reader.preads(reqs)
        blocks: List[int] = []
        fine = bytearray(old_sig.fine[:hdr.n_blocks * 8])
        if len(fine) < hdr.n_blocks * 8:
            fine.extend(b"\0" * (hdr.n_blocks * 8 - len(fine)))
        for ci, sl in zip(diff_c, slices):
            blocks += blockdiff.differing_fine(old_sig, hdr, ci, sl)
            start = ci * hdr.factor * 8
            fine[start:start + len(sl)] = sl
        ranges = blockdiff.blocks_to_ranges(blocks, hdr.block_size, e.size)
        holes: List[Tuple[int, int]] = []
        if e.extents is not None:
            ranges, holes = _split_by_extents(ranges, e.extents)
        fd = os.open(basename(e.path), os.O_RDWR | O_FILE, dir_fd=self.dirs.get(parent(e.path)))
        try:
            if e.size < old_sig.file_size:
                os.ftruncate(fd, e.size)
            n = self.reader.copy_ranges(self._data_rel(e), ranges, fd)
            for off, ln in holes:
                try:
                    platform.punch_hole(fd, off, ln)
                except Exception:
                    os.pwrite(fd, bytes(ln), off)
            if e.size > old_sig.file_size:
                os.ftruncate(fd, e.size)
            self.stats.bytes_written += n
            self._apply_meta_fd(e, fd)
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        new_sig = blockdiff.Signature(e.size, hdr.block_size, hdr.factor, bytes(fine),
                                      blockdiff.coarse_digests(bytes(fine), hdr.factor))
        self.rows.append((e.path, "file", e.size, e.mtime_ns, ino, new_sig.to_bytes()))

    def _cdc(self, e: Entry, st) -> None:
        new_chunks = blockdiff.ChunkList.from_bytes(self.reader.read_all(b".discrep/cdc/%d" % e.idx))
        if new_chunks.total != e.size:
            raise ManifestError(f"chunk list of {show(e.path)} does not match its size")
        ofd = os.open(basename(e.path), os.O_RDONLY | O_FILE, dir_fd=self.dirs.get(parent(e.path)))
        try:
            old_chunks = blockdiff.chunk_fd(ofd, st.st_size)
            ops = blockdiff.plan(old_chunks, new_chunks)
            need = blockdiff.fetch_ranges(ops)
            fetched = dict(zip((o for o, _ in need),
                               self.reader.preads([(self._data_rel(e), o, ln) for o, ln in need])))

            def fill(fd: int) -> int:
                return blockdiff.build_from_plan(fd, ofd, ops, fetched)
            self._write_new(e, fill, None)
        finally:
            os.close(ofd)

    # -- other types ---------------------------------------------------
    def _symlink(self, e: Entry) -> None:
        st = _lstat(self.dirs, e.path)
        if st is not None and statmod.S_ISLNK(st.st_mode):
            if os.readlink(basename(e.path), dir_fd=self.dirs.get(parent(e.path))) == e.target:
                return
        tmp = self._tmpname("l")
        os.symlink(e.target, tmp, dir_fd=self.stage_fd)
        self.install(tmp, e.path)
        self.stats.symlinks += 1

    def _hardlink(self, e: Entry) -> None:
        st = _lstat(self.dirs, e.path)
        pst = _lstat(self.dirs, e.link)
        if pst is None or not statmod.S_ISREG(pst.st_mode):
            raise ManifestError(f"hard link {show(e.path)} points to {show(e.link)}, which is not a file")
        tmp = self._tmpname("h")
        if st is None or (st.st_ino, st.st_dev) != (pst.st_ino, pst.st_dev):
            os.link(basename(e.link), tmp, src_dir_fd=self.dirs.get(parent(e.link)), dst_dir_fd=self.stage_fd,
                    follow_symlinks=False)
            self.install(tmp, e.path)
            self.stats.files_changed += 1
        prim = next((r for r in reversed(self.rows) if r[0] == e.link), None)
        self.rows.append((e.path, "file", e.size, e.mtime_ns, pst.st_ino, prim[5] if prim else None))

    # -- metadata ------------------------------------------------------
    def _apply_meta_fd(self, e: Entry, fd: int) -> None:
        if self.euid == 0:
            os.fchown(fd, e.uid, e.gid)
        os.fchmod(fd, e.mode)
        self._xattrs_fd(e, fd)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _xattrs_fd(self, e: Entry, fd: int) -> None:
        try:
            have = set(os.listxattr(fd))
        except OSError:
            have = set()
        for name in have - set(e.xattrs):
            if name.startswith("system.") and name not in ("system.posix_acl_access", "system.posix_acl_default"):
                continue
            try:
                os.removexattr(fd, name)
            except OSError:
                pass
        for name, val in e.xattrs.items():
            try:
                if name in have and os.getxattr(fd, name) == val:
                    continue
                os.setxattr(fd, name, val)
            except OSError as err:
                self.warnings.add(show(e.path), f"xattr {name} not set: {err.strerror}")

    def _meta(self, e: Entry) -> None:
        pfd = self.dirs.get(parent(e.path))
        name = basename(e.path)
        if e.op == "symlink":
            if self.euid == 0:
                os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
            return
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | O_FILE, dir_fd=pfd)
        try:
            self._apply_meta_fd(e, fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.rows.append((e.path, "dir", 0, e.mtime_ns, ino, None))

    def symlink_rows(self) -> None:
        for e in self.entries:
            if e.op == "symlink":
                self.rows.append((e.path, "symlink", 0, e.mtime_ns, 0, None))


class _LazySig:
    def __init__(self, size: int, fine: bytearray):
        self.size = size
        self.fine = fine

    def get(self):
        f = bytes(self.fine)
        return blockdiff.Signature(self.size, blockdiff.FINE_SIZE, blockdiff.COARSE_FACTOR, f,
                                   blockdiff.coarse_digests(f, blockdiff.COARSE_FACTOR))


def _split_by_extents(ranges, extents):
    """Split changed ranges into (parts inside data extents, parts inside holes)."""
    data, holes = [], []
    for off, ln in ranges:
        end = off + ln
        pos = off
        for eo, el in extents:
            ee = eo + el
            if ee <= pos or eo >= end:
                continue
            if eo > pos:
                holes.append((pos, eo - pos))
            s, t = max(pos, eo), min(end, ee)
            data.append((s, t - s))
            pos = t
        if pos < end:
            holes.append((pos, end - pos))
    return data, holes


def sync(reader, dest: bytes, *, warnings: Optional[WarningList] = None, progress=None) -> SyncStats:
    """Apply the cycle exported through ``reader`` to replica directory ``dest``."""
    warnings = warnings if warnings is not None else WarningList()
    t0 = time.monotonic()
    if not os.path.isdir(dest):
        raise DestinationError(f"replica directory {os.fsdecode(dest)} does not exist",
                               hint="create it, or let 'discrep replicate' create it")
    if not os.access(dest, os.W_OK):
        raise DestinationError(f"replica directory {os.fsdecode(dest)} is not writable")
    with replica_lock(dest):
        cat = ReplicaCatalog(os.fsdecode(state_dir(dest)))
        try:
            return _sync(reader, dest, cat, warnings, progress, t0)
        finally:
            cat.close()


def _sync(reader, dest, cat, warnings, progress, t0) -> SyncStats:
    try:
        header = json.loads(reader.read_all(b".discrep/cycle"))
        cycle, base = int(header["cycle"]), int(header["base"])
    except (ValueError, KeyError, TypeError):
        raise ManifestError("the export's .discrep/cycle is not a valid cycle description") from None
    applying = cat.applying()
    if applying is not None:
        raise RecoveryNeededError(f"{os.fsdecode(dest)} holds interrupted cycle {applying}",
                                  hint=f"run 'discrep recover {os.fsdecode(dest)}' first")
    last = cat.last_committed()
    if cycle == last:
        st = SyncStats(cycle=cycle, base=base, already_committed=True,
                       bytes_transferred=reader.bytes_read, duration_s=time.monotonic() - t0)
        return st
    if not header.get("full") and base != last:
        raise CycleMismatchError(
            f"the export is cycle {cycle} built on cycle {base}, but {os.fsdecode(dest)} is at cycle {last}",
            hint="run 'discrep replicate' (it rebuilds against the replica), or 'discrep reset SRC' for a "
                 "full comparison")
    mhead, raw = read_lines(reader.read_all(b".discrep/manifest"))
    if int(mhead.get("cycle", -1)) != cycle:
        raise ManifestError("manifest and cycle description disagree")
    entries = [Entry(r) for r in raw]      # everything validated before anything is touched
    cat.begin(cycle, base, int(header.get("created_ns", 0)))
    ap = Applier(reader, dest, cat, header, entries, warnings, progress)
    try:
        try:
            stats = ap.run()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFullError(f"replica filesystem full while applying cycle {cycle}") from None
            raise
        ap.symlink_rows()
        rows = ap.rows
        stats.bytes_transferred = reader.bytes_read
        stats.duration_s = time.monotonic() - t0
        cat.commit(cycle, full=bool(header.get("full")), moves=ap.moves, deletes=ap.deleted, rows=rows,
                   stats=asdict(stats))
    except BaseException:
        ap.close()
        raise
    ap.close()
    for d in (b"stage", b"trash"):
        shutil.rmtree(join(state_dir(dest), d), ignore_errors=True)
    return stats

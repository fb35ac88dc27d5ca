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

import errno
import json
import logging
import os
import shutil
import sqlite3
import stat as statmod
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple


from discrep.core import locks
from discrep.core.errors import (CycleMismatchError, DestinationError, DiskFullError, ManifestError, UnsafePathError, WarningList)
from discrep.replica.history import KEEP, UndoLog, encode_meta, rollback
from discrep.protocol.manifest import Entry, read_lines
from discrep.core.paths import STATE_DIR, basename, depth, enc, join, parent, show, state_dir
from discrep.replica.dirs import DirFds, NotADir, syncfs
from discrep.replica.files import O_FILE, FileOps
from discrep.replica.stream import StreamOps
from discrep.replica.catalog import ReplicaCatalog
from discrep.replica.options import ReplicaOptions
from discrep.replica.owners import OwnerMap
from discrep.replica.reader import Reader, StreamedCycle
from discrep.protocol import layout
from discrep.core.xattrs import read_xattrs, set_xattrs_fd

log = logging.getLogger(__name__)



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
    history_records: int = 0
    history_bytes: int = 0
    duration_s: float = 0.0
    streamed: bool = False       # applied while the source was still building it (run_stream)
    worker_segments: int = 0     # of those, manifest segments a second process applied (fresh_worker)


def result_fields(stats: SyncStats) -> dict:
    """The replica's figures in a cycle result (--json): one place for local and remote cycles."""
    return {"files_changed": stats.files_changed, "files_unchanged": stats.files_unchanged,
            "files_deleted": stats.files_deleted, "files_renamed": stats.files_renamed,
            "dirs_created": stats.dirs, "symlinks": stats.symlinks,
            "bytes_transferred": stats.bytes_transferred, "bytes_written": stats.bytes_written,
            "history_bytes": stats.history_bytes, "streamed": stats.streamed,
            "worker_segments": stats.worker_segments}


def holds_only_state(dest) -> bool:
    """DEST has nothing in it but discrep's own ``.discrep`` (str or bytes path)."""
    return all(os.fsencode(n) == STATE_DIR for n in os.listdir(dest))


@contextmanager
def replica_lock(dest: bytes) -> Iterator[None]:
    with locks.holding(join(state_dir(dest), b"lock"), f"another discrep run is writing to {os.fsdecode(dest)}",
                       hint="wait for it, or stop it; two cycles never run at once on one DEST"):
        yield


class Applier(StreamOps, FileOps):
    """Applies one cycle's manifest to DEST (see module doc)."""

    def __init__(self, reader, dest: bytes, catalog: ReplicaCatalog, header: dict, entries: List[Entry],
                 warnings: WarningList, progress=None, fresh: bool = False):
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
        self.dirs = DirFds(self.root_fd)
        self.stage_rel = STATE_DIR + b"/stage"
        p = join(dest, self.stage_rel)
        if os.path.lexists(p):
            shutil.rmtree(p)
        os.makedirs(p, 0o700)
        self.stage_fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | O_FILE)
        self.log = UndoLog(dest, self.cycle)
        self.dirs.on_mkdir = self._log_mkdir
        self._n = 0
        self.moves: List[Tuple[bytes, bytes]] = []   # (base, new) that were applied
        self.deleted: List[bytes] = []
        self.rows: List[Tuple] = []
        self.origin: Dict[bytes, bytes] = {}         # new path -> base path of a move
        self.created: Set[bytes] = set()             # made by this cycle: undo removes them whole
        self.dropped: Set[bytes] = set()             # older objects moved in by this cycle
        self._dm_done: Set[bytes] = set()
        self._dir_times: Dict[bytes, Tuple[int, int]] = {}   # directories whose entries this cycle changed
        self._installs: List[Tuple[int, bytes, bytes]] = []
        self._packs: Dict[int, bytes] = {}
        self._pack_next: Dict[int, object] = {}      # pack k -> future of its read-ahead
        self._pack_cur = -1
        self._data_override: Dict[int, bytes] = {}   # file idx -> where to read it instead of .discrep/data/
        self.packs_known: Callable[[], int] = lambda: 0   # a streamed cycle: packs written so far
        self.pack_rel = layout.PACK_REL          # where pack k is read (a streamed cycle: elsewhere)
        self.n_packs = 1 + max((e.pack[0] for e in entries if e.op == "file" and e.pack is not None), default=-1)
        # read ahead to the next pack only when every packed file is needed (a first copy)
        self.prefetch_packs = bool(header.get("full")) and \
            catalog.is_empty()
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.euid = os.geteuid()
        self.egid = os.getegid()
        self.dir_paths = {e.path for e in entries if e.op == "dir"}
        # a first copy into an empty DEST: one "fresh" undo record (undo = empty DEST again) stands
        # for every create, and files are written in place, without a stage and a rename each
        self.fresh = fresh
        self.owners = OwnerMap(False)                # a streamed cycle: the cycle's owner map (set by sync)
        self.use_worker = True                       # a streamed first copy may use a second process
        self._foreign_packs: Set[int] = set()        # packs the worker reads (never read ahead here)

    def close(self) -> None:
        self.dirs.clear()
        self.log.close()
        for fd in (self.stage_fd, self.root_fd):
            os.close(fd)

    def _tmpname(self, tag: str) -> bytes:
        self._n += 1
        return b"%s%d" % (tag.encode(), self._n)

    # -- primitives: every change to DEST is preceded by a durable undo record -----
    def _was_created(self, rel: bytes) -> bool:
        """``rel`` itself was made new by this cycle (undo removes it).  Exact path only: an older
        object moved into a new directory still needs its own records."""
        return rel in self.created or (self.fresh and rel != b"")

    def _dirmeta(self, d: bytes) -> None:
        """Before the first change of entries in directory ``d``: remember its times."""
        if d in self._dm_done or self._was_created(d):
            return
        self._dm_done.add(d)
        st = os.fstat(self.dirs.get(d))
        self._dir_times[d] = (st.st_atime_ns, st.st_mtime_ns)
        self.log.add({"op": "dirmeta", "path": enc(d), "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns})

    def _log_fresh(self) -> None:
        """Before anything is written by a first copy into an empty DEST: its undo = empty DEST."""
        self.log.add({"op": "fresh"})
        self.log.barrier()

    def _log_mkdir(self, rel: bytes) -> None:
        if self.fresh:
            self.created.add(rel)
            return
        self._dirmeta(parent(rel))
        self.log.add({"op": "mkdir", "path": enc(rel)})
        self.log.barrier()
        self.created.add(rel)

    def _log_meta(self, rel: bytes, fd: Optional[int] = None) -> None:
        """Remember the metadata of an existing entry before changing it (no-op for new ones)."""
        if self._was_created(rel):
            return
        if fd is None:
            st = os.stat(basename(rel), dir_fd=self.dirs.get(parent(rel)), follow_symlinks=False) if rel \
                else os.fstat(self.root_fd)
            xa = {}
        else:
            st = os.fstat(fd)
            xa = read_xattrs(fd)
        self.log.add({"op": "meta", "path": enc(rel), "old": encode_meta(st, xa)})

    def lift(self, rel: bytes, tag: str = "t") -> bytes:
        """Move ``rel`` (any type) into this cycle's history keep/; returns its name there."""
        pfd = self.dirs.get(parent(rel))
        self._dirmeta(parent(rel))
        name = self.log.keep_name(tag)
        self.log.add({"op": "rename", "src": enc(rel), "dst": KEEP + os.fsdecode(name)})
        self.log.barrier()
        os.rename(basename(rel), name, src_dir_fd=pfd, dst_dir_fd=self.log.keep_fd)
        self.dirs.dirty.add(parent(rel))
        self.dirs.clear()
        return name

    def trash(self, rel: bytes) -> None:
        """Remove ``rel``: it is kept in the history as the reverse delta of this cycle."""
        self.lift(rel, "t")

    def drop(self, name: bytes, rel: bytes) -> None:
        """Put lifted entry ``name`` (in keep/) at ``rel``."""
        pfd = self.ensure_parent(rel)
        if self.dirs.lstat(rel) is not None:
            self.trash(rel)
            pfd = self.ensure_parent(rel)
        self._dirmeta(parent(rel))
        self.log.add({"op": "rename", "src": KEEP + os.fsdecode(name), "dst": enc(rel)})
        self.log.barrier()
        os.rename(name, basename(rel), src_dir_fd=self.log.keep_fd, dst_dir_fd=pfd)
        self.dropped.add(rel)
        self.dirs.dirty.add(parent(rel))

    def ensure_parent(self, rel: bytes) -> int:
        """fd of rel's parent, creating missing directories.

        A non-directory in the way (a symlink inside DEST, say) is replaced only
        when this cycle's manifest says that path is now a directory; otherwise
        the path is refused and nothing is written through it.
        """
        while True:
            try:
                return self.dirs.get(parent(rel), create=True)
            except NotADir as nd:
                if nd.rel not in self.dir_paths:
                    raise UnsafePathError(f"refusing to write {show(rel)}: {show(nd.rel)} on the replica is "
                                          f"not a directory (a symlink?) and the manifest does not replace it")
                self.trash(nd.rel)

    def install(self, tmp: bytes, rel: bytes) -> None:
        """Queue staged ``tmp`` to be renamed over ``rel``; installs are group-committed."""
        self._installs.append((self.stage_fd, tmp, rel))
        if len(self._installs) >= 256:
            self.flush_installs()

    def flush_installs(self) -> None:
        """Log every queued install (create / replace keeping the old one), one barrier, then rename."""
        plan = []
        creates: List[str] = []
        for src_fd, tmp, rel in self._installs:
            pfd = self.ensure_parent(rel)
            # in a directory this cycle made, only this cycle's own installs can exist
            st = None if (parent(rel) in self.created and rel not in self.created and rel not in self.dropped) \
                else self.dirs.lstat(rel)
            if st is not None and statmod.S_ISDIR(st.st_mode):
                self.trash(rel)
                st = None
            self._dirmeta(parent(rel))
            kept = None
            if st is None:
                creates.append(enc(rel))
            elif not self._was_created(rel):
                kept = self.log.keep_name("r")
                self.log.add({"op": "replace", "path": enc(rel), "kept": KEEP + os.fsdecode(kept)})
            plan.append((src_fd, tmp, rel, kept, st is None))
        self._installs = []
        if creates:
            self.log.add({"op": "create", "paths": creates})
        self.log.barrier()
        for src_fd, tmp, rel, kept, new in plan:
            pfd = self.dirs.get(parent(rel))
            if kept is not None:
                os.link(basename(rel), kept, src_dir_fd=pfd, dst_dir_fd=self.log.keep_fd, follow_symlinks=False)
            os.rename(tmp, basename(rel), src_dir_fd=src_fd, dst_dir_fd=pfd)
            self.dirs.dirty.add(parent(rel))
            if new:
                self.created.add(rel)

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
        if self.fresh:
            self._log_fresh()
        # 1. moves: lift out, deepest base first; then drop in, shallowest new path first
        lifted: List[Tuple[Entry, bytes]] = []
        for e in sorted(moves, key=lambda m: -depth(m.old)):
            if self.dirs.lstat(e.old) is None:
                self.warnings.add(show(e.old), "moved on the source but missing on the replica; fetched whole")
                continue
            lifted.append((e, self.lift(e.old, "m")))
        for e, name in sorted(lifted, key=lambda x: depth(x[0].path)):
            self.drop(name, e.path)
            self.dirs.clear()
            self.moves.append((e.old, e.path))
            self.origin[e.path] = e.old
            self.stats.files_renamed += 1
        # 2. deletes
        for e in sorted(deletes, key=lambda d: -depth(d.path)):
            if self.dirs.lstat(e.path) is not None:
                self.trash(e.path)
                self.stats.files_deleted += 1
            self.deleted.append(e.path)
        if full:
            self._remove_extraneous({e.path for e in ups})
        # 3. directories
        dir_ents = sorted((e for e in ups if e.op == "dir"), key=lambda d: depth(d.path))
        todo = []
        for e in dir_ents:
            st = self.dirs.lstat(e.path)
            if st is not None and not statmod.S_ISDIR(st.st_mode):
                self.trash(e.path)
                st = None
            if st is None:
                todo.append(e.path)
        for rel in todo:             # one barrier for all new directories
            if parent(rel) not in self.created:
                self._dirmeta(parent(rel))
            if not self.fresh:
                self.log.add({"op": "mkdir", "path": enc(rel)})
            self.created.add(rel)
        if not self.fresh:
            self.log.barrier()
        for rel in todo:
            pfd = self.ensure_parent(rel)
            os.mkdir(basename(rel), 0o700, dir_fd=pfd)
            self.dirs.dirty.add(parent(rel))
            self.stats.dirs += 1
        # 4. files (primaries), symlinks, hard links
        files = [e for e in ups if e.op == "file"]
        total_bytes = sum(e.size for e in files if e.link is None)
        done = done_bytes = 0
        for e in files:
            if e.link is None:
                self._file(e)
                done_bytes += e.size
            done += 1
            if self.progress:
                self.progress(done, len(files), self.reader.bytes_read, done_bytes, total_bytes)
        for e in ups:
            if e.op == "symlink":
                self._symlink(e)
        self.flush_installs()        # primaries must be in place before links to them
        for e in files:
            if e.link is not None:
                self._hardlink(e)
        self.flush_installs()
        self._metadata_phase(ups, dir_ents)
        self.stats.duration_s = time.monotonic() - t0
        return self.stats

    def _metadata_phase(self, ups: List[Entry], dir_ents: List[Entry]) -> None:
        """5. metadata: links, then directories deepest first, then the top directory; syncfs."""
        meta_ents = [e for e in ups if e.op == "symlink"] + sorted(dir_ents, key=lambda d: -depth(d.path))
        for e in meta_ents:
            self._log_meta(e.path)
        root_meta = self.header.get("root")
        if isinstance(root_meta, dict):
            self._log_meta(b"", self.root_fd)
        self.log.barrier()
        for e in meta_ents:
            self._meta(e)
        # a directory whose entries changed here (files replaced by rename) while the source's
        # directory did not change keeps its old times
        for d, (at, mt) in self._dir_times.items():
            if d and d not in self.dir_paths:
                try:
                    os.utime(self.dirs.get(d), ns=(at, mt))
                except (FileNotFoundError, ManifestError):
                    pass
        if isinstance(root_meta, dict):
            self._apply_meta_fd(Entry(dict(root_meta, op="dir", path="_")), self.root_fd)
        self.dirs.fsync_dirty()
        syncfs(self.root_fd)
        self.stats.history_records = self.log.records

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
                    st = self.dirs.lstat(rel)
                    if st is not None and statmod.S_ISDIR(st.st_mode):
                        stack.append(rel)

    # -- other types ---------------------------------------------------
    def _symlink(self, e: Entry) -> None:
        st = self.dirs.lstat(e.path)
        if st is not None and statmod.S_ISLNK(st.st_mode):
            if os.readlink(basename(e.path), dir_fd=self.dirs.get(parent(e.path))) == e.target:
                return
        tmp = self._tmpname("l")
        os.symlink(e.target, tmp, dir_fd=self.stage_fd)
        self.install(tmp, e.path)
        self.stats.symlinks += 1

    def _hardlink(self, e: Entry) -> None:
        st = self.dirs.lstat(e.path)
        pst = self.dirs.lstat(e.link)
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
    def _apply_meta_fd(self, e: Entry, fd: int, fresh: bool = False, mode_set: bool = False) -> None:
        """Owner, mode, xattrs, times (last).  ``fresh``: a file this cycle just created (owned by
        us, no xattrs yet), so unneeded calls are skipped; ``mode_set``: it was created with its mode."""
        if self.euid == 0 and not (fresh and e.uid == self.euid and e.gid == self.egid):
            os.fchown(fd, e.uid, e.gid)   # (clears set-id bits: the mode comes after)
        if not mode_set:
            os.fchmod(fd, e.mode)
        if not fresh or e.xattrs:
            self._xattrs_fd(e, fd)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _xattrs_fd(self, e: Entry, fd: int) -> None:
        for name, why in set_xattrs_fd(fd, e.xattrs):
            self.warnings.add(show(e.path), f"xattr {name} not set: {why}")

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


def sync(reader: Reader, dest: bytes, options: Optional[ReplicaOptions] = None, *,
         warnings: Optional[WarningList] = None, progress=None,
         stream: Optional[StreamedCycle] = None) -> SyncStats:
    """Apply the cycle exported through ``reader`` to replica directory ``dest``.

    ``stream``: a cycle still being built (``reader.StreamedCycle``); a first copy into an
    empty DEST is applied while it streams."""
    opts = options or ReplicaOptions()
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
            st = _sync(reader, dest, cat, warnings, progress, t0, opts.numeric_ids, opts.force, stream)
            if not st.already_committed:
                apply_retention(dest, cat, opts.keep_last, opts.keep_within_s)
            return st
        finally:
            cat.close()


def recover_locked(dest: bytes, cat: ReplicaCatalog) -> Optional[Tuple[int, int]]:
    """Roll an interrupted cycle back to the last committed one: (cycle, records undone) or None."""
    n = cat.applying()
    if n is None:
        return None
    log.warning("rolling back interrupted cycle %d of %s", n, os.fsdecode(dest))
    undone = rollback(dest, n)
    cat.abandon(n)
    shutil.rmtree(join(state_dir(dest), b"stage"), ignore_errors=True)
    return n, undone


def recover(dest: bytes) -> Optional[Tuple[int, int]]:
    if not os.path.exists(join(state_dir(dest), b"replica.db")):
        raise DestinationError(f"{os.fsdecode(dest)} is not a discrep replica")
    with replica_lock(dest):
        cat = ReplicaCatalog(os.fsdecode(state_dir(dest)))
        try:
            return recover_locked(dest, cat)
        finally:
            cat.close()


def apply_retention(dest: bytes, cat: ReplicaCatalog, keep_last: int, keep_within_s: Optional[float]) -> List[int]:
    """Prune history no kept recovery point needs (the newest cycle is always kept)."""
    from discrep.replica.history import prune
    hist = cat.history()
    committed = [h.cycle for h in hist]
    if not committed:
        return []
    keep = set(committed[-max(1, keep_last):])
    if keep_within_s is not None:
        now = time.time_ns()
        keep |= {h.cycle for h in hist if now - h.committed_ns <= keep_within_s * 1e9}
    return prune(dest, committed, keep)


def _sync(reader, dest, cat, warnings, progress, t0, numeric_ids: bool = False, force: bool = False,
          stream=None) -> SyncStats:
    try:
        header = dict(stream.header) if stream is not None else json.loads(reader.read_all(layout.CYCLE_REL))
        cycle, base = int(header["cycle"]), int(header["base"])
    except (ValueError, KeyError, TypeError):
        raise ManifestError("the export's .discrep/cycle is not a valid cycle description") from None
    recover_locked(dest, cat)   # an interrupted earlier run: back to the last committed cycle first
    last = cat.last_committed()
    sid, mine = header.get("source_id"), cat.get_meta("source_id")
    if sid and mine and sid != mine and not force:
        raise DestinationError(f"{os.fsdecode(dest)} is a replica of another source tree",
                               hint="use the right DEST, or --force to make this one a replica of the new "
                                    "source (what differs is kept in its history)")
    if cycle == last:
        st = SyncStats(cycle=cycle, base=base, already_committed=True,
                       bytes_transferred=reader.bytes_read, duration_s=time.monotonic() - t0)
        return st
    if not header.get("full") and base != last:
        raise CycleMismatchError(
            f"the export is cycle {cycle} built on cycle {base}, but {os.fsdecode(dest)} is at cycle {last}",
            hint="run 'discrep replicate' (it rebuilds against the replica), or 'discrep reset SRC' for a "
                 "full comparison")
    owners = OwnerMap(numeric_ids)
    fresh = bool(header.get("full")) and last == 0 and holds_only_state(dest)
    streamed = stream is not None and fresh
    entries: List[Entry] = []
    if stream is not None and not streamed:    # not a first copy into an empty DEST: whole manifest first
        for ents, _packs in stream.segments():
            entries.extend(ents)
        stream.finish()
    elif stream is None:
        mhead, raw = read_lines(reader.read_all(layout.MANIFEST_REL))
        if int(mhead.get("cycle", -1)) != cycle:
            raise ManifestError("manifest and cycle description disagree")
        entries = [Entry(r) for r in raw]      # everything validated before anything is touched
    if not streamed:
        reader.know_files({e.idx: e.path for e in entries if e.op == "file"})
        owners.map_entries(entries)
    if not numeric_ids and isinstance(header.get("root"), dict):
        r = Entry(dict(header["root"], op="dir", path="_"))
        owners.map_entry(r)
        header["root"] = dict(header["root"], uid=r.uid, gid=r.gid)
    cat.begin(cycle, base, int(header.get("created_ns", 0)))
    ap = Applier(reader, dest, cat, header, entries, warnings, progress, fresh=fresh)
    try:
        if streamed:
            ap.pack_rel = stream.pack_rel
            ap.packs_known = lambda: stream.packs_known
            ap.owners = owners
            stats = ap.run_stream(stream, owners.map_entries)
        else:
            stats = ap.run()
        ap.symlink_rows()
        stats.bytes_transferred = reader.bytes_read
        stats.duration_s = time.monotonic() - t0
        cat.commit(cycle, full=bool(header.get("full")), moves=ap.moves, deletes=ap.deleted, rows=ap.rows,
                   stats=asdict(stats))
        if sid:
            cat.set_meta("source_id", str(sid))
    except BaseException as exc:
        ap.close()
        cat.unstage()
        try:  # leave the replica at its last committed cycle, now rather than at the next run
            recover_locked(dest, cat)
        except Exception as e2:
            log.error("rollback of cycle %d failed (%s); run 'discrep recover %s'", cycle, e2, os.fsdecode(dest))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or \
                (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)):
            raise DiskFullError(f"replica filesystem full while applying cycle {cycle}; rolled back to cycle "
                                f"{last}") from None
        raise
    ap.close()
    shutil.rmtree(join(state_dir(dest), b"stage"), ignore_errors=True)
    return stats

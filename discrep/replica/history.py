"""The replica's history store: write-ahead undo records, rollback, restore, retention.

Each cycle N that changes DEST keeps ``DEST/.discrep/history/<N>/``:

* ``undo.log`` -- records, each ``u32 length, u32 crc32, JSON payload``, written
  *before* the change they describe and made durable by ``barrier()``
  (fdatasync) before that change happens.  Changes are batched so one barrier
  covers many records (fsync costs ~0.1 ms on these disks).
* ``blocks``   -- old blocks of files patched in place: ``blockdiff.framing``
  frames (zstd where it shrinks), located and checksummed by their record.
* ``keep/``    -- whole old objects: deleted or displaced entries, old versions
  of replaced files (hard links: no data copied), lifted-out moved entries.

Record kinds (paths relative to DEST; ``K:`` prefix = ``keep/`` of this cycle):
``rename {src,dst}``, ``mkdir {path}``, ``create {paths}``, ``replace {path,kept}``,
``patch {path,old_size,ranges,blob}``, ``meta {path,old}``, ``dirmeta {path,mtime_ns}``.

Undoing them newest first brings DEST back to the cycle before, content and
metadata (directory mtimes included): that is ``recover`` after a crash, and,
applied to a clone of the replica, ``restore --cycle K``.  A record whose
checksum fails is reported (HistoryCorruptError), never used; a record cut off
at the end of the log was never acted upon (its barrier never returned) and
is ignored.

The history lives in DEST's checked state directory (``core.statedir.StateDir``): every function
here takes ``state``, the path of that directory as the StateDir reaches it (``/proc/<pid>/fd/<n>``).
What a record says is validated like input before it is used: a plain path must pass
``core.paths.check_rel`` and is reached from DEST's root fd one directory at a time without
following a symlink (``replica.dirs.DirFds``), a ``K:`` name is one component; anything else is
HistoryCorruptError and nothing outside DEST is ever touched.  Every write to the log is complete
(short writes looped over, space reserved first) and durable before the change it protects.

Thread-safety: one UndoLog per cycle, used by the applying thread only.
"""
from __future__ import annotations

import base64
import errno
import json
import logging
import os
import shutil
import stat as statmod
import struct
import tempfile
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import xxhash
from blockdiff import framing

from discrep.core import platform
from discrep.core.errors import HistoryCorruptError, ManifestError, UnsafePathError, UsageError
from discrep.core.paths import STATE_DIR, basename, check_rel, join, parent
from discrep.core.writes import pwrite_all
from discrep.core.xattrs import set_xattrs_fd
from discrep.replica.dirs import DirFds, reserve, syncfs

log = logging.getLogger(__name__)

HIST = STATE_DIR + b"/history"
_HDR = struct.Struct("<II")
KEEP = "K:"
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def hist_dir(state: bytes, cycle: int) -> bytes:
    """History dir of ``cycle`` in the checked state dir ``state`` (a StateDir's path)."""
    return join(state, b"history/%d" % cycle)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (a short write is continued; one that writes nothing is ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no space left for the history record")
        view = view[n:]


class UndoLog:
    """Append-only, write-ahead undo records of one cycle (``state``: the StateDir's path)."""

    def __init__(self, state: bytes, cycle: int):
        self.dir = hist_dir(state, cycle)
        if os.path.lexists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(join(self.dir, b"keep"), 0o700)
        self.fd = os.open(join(self.dir, b"undo.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.loff = 0
        self.bfd = os.open(join(self.dir, b"blocks"), os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.boff = 0
        self.dirty = False
        self.records = 0
        self.n = 0
        platform.fsync_dir(os.fsdecode(self.dir))
        platform.fsync_dir(os.fsdecode(parent(self.dir)))
        self.keep_fd = os.open(join(self.dir, b"keep"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in (self.fd, self.bfd, self.keep_fd):
            os.close(fd)

    def keep_name(self, tag: str) -> bytes:
        self.n += 1
        return b"%s%d" % (tag.encode(), self.n)

    def add(self, rec: Dict, blob: Optional[bytes] = None) -> None:
        """Append a record (and its old blocks): all of it, with its space allocated, or OSError
        (ENOSPC on a full disk) before the change it describes can happen."""
        self.dirty = True
        if blob is not None:
            frame = framing.pack(blob)
            reserve(self.bfd, self.boff, len(frame))
            write_all(self.bfd, frame)
            rec["blob"] = [self.boff, len(frame), xxhash.xxh64_hexdigest(frame)]
            self.boff += len(frame)
        payload = json.dumps(rec, separators=(",", ":")).encode()
        data = _HDR.pack(len(payload), zlib.crc32(payload)) + payload
        reserve(self.fd, self.loff, len(data))
        write_all(self.fd, data)
        self.loff += len(data)
        self.records += 1

    def barrier(self) -> None:
        """Make every record added so far durable (before the changes they describe)."""
        if self.dirty:
            os.fdatasync(self.bfd)
            os.fdatasync(self.fd)
            self.dirty = False
            _maybe_crash()


_crash_countdown: Optional[int] = None


def _maybe_crash() -> None:
    """Fault injection for tests: DISCREP_CRASH_AFTER_BARRIERS=N kills this process (SIGKILL) right
    after the N-th durable barrier, i.e. between a write-ahead record and the change it describes."""
    global _crash_countdown
    if _crash_countdown is None:
        v = os.environ.get("DISCREP_CRASH_AFTER_BARRIERS")
        _crash_countdown = int(v) if v and v.isdigit() else -1
    if _crash_countdown > 0:
        _crash_countdown -= 1
        if _crash_countdown == 0:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


def read_log(d: bytes) -> List[Dict]:
    """Records of a history dir, verified.  A torn tail is dropped; corruption raises."""
    try:
        with open(join(d, b"undo.log"), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out, pos = [], 0
    while pos < len(data):
        if pos + _HDR.size > len(data):
            break  # torn header: never acted upon
        ln, crc = _HDR.unpack_from(data, pos)
        end = pos + _HDR.size + ln
        if end > len(data):
            break  # torn record
        payload = data[pos + _HDR.size:end]
        if zlib.crc32(payload) != crc:
            raise HistoryCorruptError(f"history record at byte {pos} of {os.fsdecode(d)}/undo.log fails its "
                                      f"checksum; it was not used",
                                      hint="the replica may hold a mix of two cycles: check it with "
                                           "'discrep verify', or re-replicate with --force into an empty DEST")
        try:
            out.append(json.loads(payload))
        except ValueError:
            raise HistoryCorruptError(f"history record at byte {pos} of {os.fsdecode(d)} is not JSON") from None
        pos = end
    return out


def _blob(d: bytes, rec: Dict) -> bytes:
    off, ln, h = rec["blob"]
    with open(join(d, b"blocks"), "rb") as f:
        f.seek(off)
        frame = f.read(ln)
    if len(frame) != ln or xxhash.xxh64_hexdigest(frame) != h:
        raise HistoryCorruptError(f"old blocks of {rec.get('path')!r} in {os.fsdecode(d)} fail their checksum")
    return framing.unpack(frame)


def encode_meta(st: os.stat_result, xattrs: Dict[str, bytes]) -> Dict:
    return {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns,
            "atime_ns": st.st_atime_ns,
            "xattrs": {k: base64.b64encode(v).decode() for k, v in xattrs.items()}}


class _Target:
    """Where undo records are applied: DEST itself (recover) or a restored copy (restore).

    ``root_fd``: the tree the records' plain paths refer to; ``hist``: the cycle's history dir
    (keep/ and blocks); ``scratch``: restore mode, where keep/ entries are materialised."""

    def __init__(self, root_fd: int, hist: bytes, scratch: Optional[bytes]):
        self.root_fd = root_fd
        self.hist = hist
        self.scratch = scratch
        self.dirs = DirFds(root_fd)
        self.keep_fd = os.open(scratch if scratch is not None else join(hist, b"keep"), O_DIR)

    def close(self) -> None:
        self.dirs.clear()
        os.close(self.keep_fd)

    def locate(self, p: object, create: bool = False) -> Optional[Tuple[int, bytes]]:
        """(directory fd, name) of record path ``p``, validated; None when its directory is gone."""
        if not isinstance(p, str):
            raise HistoryCorruptError(f"history record has a path that is not a string: {p!r}")
        b = os.fsencode(p)
        if p.startswith(KEEP):
            name = b[len(KEEP):]
            if not name or b"/" in name or name in (b".", b"..") or b"\0" in name:
                raise HistoryCorruptError(f"history record names a bad keep entry {p!r}")
            return self.keep_fd, name
        if not b:
            return self.root_fd, b"."        # the tree's top directory itself (its metadata)
        try:
            check_rel(b)
        except UnsafePathError as e:
            raise HistoryCorruptError(f"history record names an unsafe path: {e}", hint=_PLANTED) from None
        try:
            return self.dirs.get(parent(b), create), basename(b)
        except (FileNotFoundError, ManifestError):
            return None
        except NotADirectoryError:
            return None

    def obtain(self, p: object) -> Optional[Tuple[int, bytes]]:
        """(fd, name) of a keep entry, cloned out of DEST's history in restore mode when needed."""
        loc = self.locate(p)
        if loc is None or _exists(*loc) or self.scratch is None or not str(p).startswith(KEEP):
            return loc if loc is not None and _exists(*loc) else None
        src = join(self.hist, b"keep/" + loc[1])
        if not os.path.lexists(src):
            return None
        _clone_tree(src, join(self.scratch, loc[1]))
        return loc


_PLANTED = "the replica's state was tampered with or damaged: nothing was changed by that record"


def _exists(fd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _clone_tree(src: bytes, dst: bytes) -> None:
    st = os.lstat(src)
    if statmod.S_ISDIR(st.st_mode):
        os.mkdir(dst, 0o700)
        for n in os.listdir(src):
            _clone_tree(join(src, n), join(dst, n))
        platform.copy_metadata(src, dst, st)
    elif statmod.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
        platform.copy_metadata(src, dst, st)
    else:
        platform.clone_file(src, dst)
        platform.copy_metadata(src, dst, st)


def _set_meta(dfd: int, name: bytes, m: Dict) -> None:
    if statmod.S_ISLNK(m["mode"]):
        os.chown(name, m["uid"], m["gid"], dir_fd=dfd, follow_symlinks=False)
        os.utime(name, ns=(m["atime_ns"], m["mtime_ns"]), dir_fd=dfd, follow_symlinks=False)
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, m["uid"], m["gid"])
        os.fchmod(fd, statmod.S_IMODE(m["mode"]))
        want = {k: base64.b64decode(v) for k, v in m.get("xattrs", {}).items()}
        failed = set_xattrs_fd(fd, want)      # the names the replica manages (core.xattrs.replicated)
        if failed:
            raise OSError(errno.EIO, f"xattr {failed[0][0]} of {os.fsdecode(name)} not restored: {failed[0][1]}")
        os.utime(fd, ns=(m["atime_ns"], m["mtime_ns"]))
    finally:
        os.close(fd)


def _remove(dfd: int, name: bytes) -> None:
    """Remove ``name`` in ``dfd`` (a directory with all below it; no symlink followed)."""
    if name == b".":
        raise HistoryCorruptError("a history record would remove the top directory", hint=_PLANTED)
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if statmod.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)


def _patch(target: _Target, rec: Dict) -> None:
    loc = target.locate(rec["path"])
    if loc is None:
        raise HistoryCorruptError(f"the file {rec['path']!r} of a patch record is not in DEST")
    data = _blob(target.hist, rec)
    fd = os.open(loc[1], os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=loc[0])
    try:
        if not statmod.S_ISREG(os.fstat(fd).st_mode):
            raise HistoryCorruptError(f"{rec['path']!r} of a patch record is not a regular file")
        pos = 0
        for off, ln in rec["ranges"]:
            pwrite_all(fd, data[pos:pos + ln], off)
            pos += ln
        os.ftruncate(fd, rec["old_size"])
        for off, ln in rec.get("holes", []):
            try:
                platform.punch_hole(fd, off, ln)
            except OSError:
                pass
    finally:
        os.close(fd)


def _undo_one(rec: Dict, target: _Target) -> int:
    """Undo one record; the number of changes it made (0: it never happened)."""
    op, n = rec.get("op"), 0
    if op == "rename":
        dst = target.obtain(rec["dst"])
        src = target.locate(rec["src"], create=dst is not None)
        if dst is not None and src is not None and not _exists(*src):
            os.rename(dst[1], src[1], src_dir_fd=dst[0], dst_dir_fd=src[0])
            n = 1
    elif op == "replace":
        kept = target.obtain(rec["kept"])
        if kept is not None:
            loc = target.locate(rec["path"], create=True)
            if loc is None:
                raise HistoryCorruptError(f"the directory of {rec['path']!r} is not in DEST")
            os.rename(kept[1], loc[1], src_dir_fd=kept[0], dst_dir_fd=loc[0])
            n = 1
    elif op in ("create", "mkdir"):
        for q in reversed(rec.get("paths") or [rec["path"]]):
            loc = target.locate(q)
            if loc is not None and _exists(*loc):
                _remove(*loc)
                n += 1
    elif op == "patch":
        _patch(target, rec)
        n = 1
    elif op == "meta":
        loc = target.locate(rec["path"])
        if loc is not None and _exists(*loc):
            _set_meta(loc[0], loc[1], rec["old"])
            n = 1
    elif op == "fresh":          # the cycle was a first copy into an empty DEST: empty it again
        for name in os.listdir(target.root_fd):
            if os.fsencode(name) != STATE_DIR:
                _remove(target.root_fd, os.fsencode(name))
                n += 1
    elif op == "dirmeta":
        loc = target.locate(rec["path"])
        if loc is not None and _exists(*loc) and \
                statmod.S_ISDIR(os.stat(loc[1], dir_fd=loc[0], follow_symlinks=False).st_mode):
            os.utime(loc[1], ns=(rec["atime_ns"], rec["mtime_ns"]), dir_fd=loc[0], follow_symlinks=False)
    else:
        raise HistoryCorruptError(f"unknown history record {op!r}")
    return n


def undo(records: List[Dict], target: _Target) -> int:
    """Apply records newest first.  Idempotent: a change that never happened is skipped.  A
    record that is not what discrep writes raises HistoryCorruptError before it changes anything."""
    n = 0
    for rec in reversed(records):
        try:
            n += _undo_one(rec, target)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HistoryCorruptError(f"malformed history record {str(rec)[:200]}: {e!r}", hint=_PLANTED) from None
        finally:
            target.dirs.clear()     # a rename may have moved a cached directory
    return n


def rollback(dest: bytes, state: bytes, cycle: int) -> int:
    """Undo an interrupted cycle in place; DEST returns to the cycle before.  ``state``: the path
    of DEST's checked state dir (StateDir.path)."""
    d = hist_dir(state, cycle)
    recs = read_log(d)
    root_fd = os.open(dest, O_DIR)
    try:
        if os.path.isdir(join(d, b"keep")):
            target = _Target(root_fd, d, None)
            try:
                n = undo(recs, target)
            finally:
                target.close()
        elif recs:
            raise HistoryCorruptError(f"history of cycle {cycle} has records but no keep/ directory")
        else:
            n = 0
        syncfs(root_fd)
    finally:
        os.close(root_fd)
    shutil.rmtree(d, ignore_errors=True)
    return n


def size_of(d: bytes) -> int:
    total = 0
    for root, dirs, files in os.walk(d):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_blocks * 512 if st.st_nlink == 1 else 0  # hard links share the replica's blocks
    return total


def available(state: bytes) -> List[int]:
    """Cycles with a history dir in the checked state dir ``state``."""
    hd = join(state, b"history")
    try:
        return sorted(int(n) for n in os.listdir(hd) if n.isdigit())
    except FileNotFoundError:
        return []


def restore(dest: bytes, state: bytes, cycle: int, committed: List[int], to: bytes, subpath: Optional[bytes],
            clone_tree: Callable[[bytes, bytes], None]) -> None:
    """Materialise committed cycle ``cycle`` of DEST into ``to`` (a new directory)."""
    if cycle not in committed:
        raise UsageError(f"cycle {cycle} is not a committed recovery point of {os.fsdecode(dest)}",
                         hint="see 'discrep history DEST'")
    later = [c for c in committed if c > cycle]
    have = set(available(state))
    missing = [c for c in later if c not in have]
    if missing:
        raise UsageError(f"cycle {cycle} can no longer be restored: history of cycle(s) "
                         f"{', '.join(map(str, missing))} was pruned")
    to = to.rstrip(b"/")
    if os.path.lexists(to) and (not os.path.isdir(to) or os.path.islink(to) or os.listdir(to)):
        raise UsageError(f"restore target {os.fsdecode(to)} exists and is not an empty directory")
    tmp = os.fsencode(tempfile.mkdtemp(prefix=".discrep-restore.", dir=os.path.dirname(os.fsdecode(to)) or "."))
    work = to if subpath is None else join(tmp, b"tree")
    if os.path.isdir(to) and subpath is None:
        os.rmdir(to)
    try:
        clone_tree(dest, work)
        wfd = os.open(work, O_DIR)
        try:
            for c in reversed(later):
                sc = join(tmp, b"%d" % c)
                os.mkdir(sc, 0o700)
                target = _Target(wfd, hist_dir(state, c), sc)
                try:
                    undo(read_log(hist_dir(state, c)), target)
                finally:
                    target.close()
            if subpath is not None:
                _move_out(wfd, subpath, to, cycle)
        finally:
            os.close(wfd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_out(wfd: int, subpath: bytes, to: bytes, cycle: int) -> None:
    """Move ``subpath`` of the restored tree into ``to``, never through a symlink in either."""
    src_dirs = DirFds(wfd)
    try:
        try:
            sfd = src_dirs.get(parent(subpath))
        except (FileNotFoundError, ManifestError):
            sfd = -1
        if sfd < 0 or not _exists(sfd, basename(subpath)):
            raise UsageError(f"{os.fsdecode(subpath)} did not exist in cycle {cycle} (a symlink on the way "
                             f"is not followed)")
        os.makedirs(to, 0o700, exist_ok=True)
        tfd = os.open(to, O_DIR)
        dst_dirs = DirFds(tfd)
        try:
            os.rename(basename(subpath), basename(subpath), src_dir_fd=sfd,
                      dst_dir_fd=dst_dirs.get(parent(subpath), create=True))
        finally:
            dst_dirs.clear()
            os.close(tfd)
    finally:
        src_dirs.clear()


def prune(state: bytes, committed: List[int], keep_cycles: Iterable[int]) -> List[int]:
    """Drop history no kept recovery point needs; returns the cycles whose history went."""
    keep = sorted(set(keep_cycles))
    if not keep:
        return []
    oldest = keep[0]
    gone = []
    for c in available(state):
        if c <= oldest and c in committed:
            shutil.rmtree(hist_dir(state, c), ignore_errors=True)
            gone.append(c)
    return gone


def clone_replica(src: bytes, dst: bytes) -> None:
    """Copy replica tree ``src`` (without its .discrep) to new dir ``dst``: reflinks where the
    filesystem allows, holes kept, hard links kept, metadata exact (directories last)."""
    from discrep.core.walk import walk
    os.mkdir(dst, 0o700)
    links: Dict[Tuple[int, int], bytes] = {}
    dirs: List[Tuple[bytes, os.stat_result]] = []
    for rel, st in walk(src):
        s_, d_ = join(src, rel), join(dst, rel)
        if statmod.S_ISDIR(st.st_mode):
            os.mkdir(d_, 0o700)
            dirs.append((rel, st))
        elif statmod.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s_), d_)
            platform.copy_metadata(s_, d_, st)
        elif statmod.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], d_)
                continue
            platform.clone_file(s_, d_)
            platform.copy_metadata(s_, d_, st)
            if st.st_nlink > 1:
                links[key] = d_
    for rel, st in reversed(dirs):
        platform.copy_metadata(join(src, rel), join(dst, rel), st)
    platform.copy_metadata(src, dst, os.lstat(src))


def walk_back(dest: bytes, state: bytes, committed: List[int], work: bytes,
              clone_tree: Callable[[bytes, bytes], None], visit: Callable[[int, bytes], None]) -> List[int]:
    """Visit every restorable recovery point, newest first, on a scratch copy of DEST: ``clone_tree``
    makes the new directory ``work`` from DEST, ``visit(cycle, work)`` sees it as the newest committed
    cycle, then each cycle's history is undone on it (as ``restore`` does) and ``visit`` sees the
    cycle before, until the oldest committed cycle or one whose later history was pruned.  Returns
    the cycles visited."""
    if not committed:
        return []
    have = set(available(state))
    points = sorted(committed, reverse=True)
    clone_tree(dest, work)
    scratch = work + b".keep"
    os.mkdir(scratch, 0o700)
    seen = [points[0]]
    wfd = os.open(work, O_DIR)
    try:
        visit(points[0], work)
        for c, before in zip(points, points[1:]):
            if c not in have:
                break
            sc = join(scratch, b"%d" % c)
            os.mkdir(sc, 0o700)
            target = _Target(wfd, hist_dir(state, c), sc)
            try:
                undo(read_log(hist_dir(state, c)), target)
            finally:
                target.close()
            visit(before, work)
            seen.append(before)
    finally:
        os.close(wfd)
        shutil.rmtree(scratch, ignore_errors=True)
    return seen

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

Thread-safety: one UndoLog per cycle, used by the applying thread only.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import stat as statmod
import struct
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import xxhash
from blockdiff import framing

from discrep.core import platform
from discrep.core.errors import HistoryCorruptError, UsageError
from discrep.core.paths import STATE_DIR, join, parent
from discrep.core.xattrs import read_xattrs
from discrep.replica.dirs import syncfs

log = logging.getLogger(__name__)

HIST = STATE_DIR + b"/history"
_HDR = struct.Struct("<II")
KEEP = "K:"


def hist_dir(dest: bytes, cycle: int) -> bytes:
    return join(dest, HIST + b"/%d" % cycle)


class UndoLog:
    """Append-only, write-ahead undo records of one cycle."""

    def __init__(self, dest: bytes, cycle: int):
        self.dir = hist_dir(dest, cycle)
        if os.path.lexists(self.dir):
            shutil.rmtree(self.dir)
        os.makedirs(join(self.dir, b"keep"), 0o700)
        self.fd = os.open(join(self.dir, b"undo.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
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
        if blob is not None:
            frame = framing.pack(blob)
            os.write(self.bfd, frame)
            rec["blob"] = [self.boff, len(frame), xxhash.xxh64_hexdigest(frame)]
            self.boff += len(frame)
        payload = json.dumps(rec, separators=(",", ":")).encode()
        os.write(self.fd, _HDR.pack(len(payload), zlib.crc32(payload)) + payload)
        self.dirty = True
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
    """Where undo records are applied: DEST itself (recover) or a restored copy (restore)."""

    def __init__(self, root: bytes, hist: bytes, scratch: Optional[bytes]):
        self.root = root          # tree the records' plain paths refer to
        self.hist = hist          # the cycle's history dir in DEST (keep/ and blocks)
        self.scratch = scratch    # restore mode: where keep/ entries are materialised

    def path(self, p: str) -> bytes:
        b = os.fsencode(p)
        if p.startswith(KEEP):
            name = b[len(KEEP):]
            if self.scratch is None:
                return join(self.hist, b"keep/" + name)
            return join(self.scratch, name)
        return join(self.root, b)

    def obtain(self, p: str) -> Optional[bytes]:
        """Path of a keep entry, cloned out of DEST's history in restore mode when needed."""
        target = self.path(p)
        if os.path.lexists(target) or self.scratch is None or not p.startswith(KEEP):
            return target if os.path.lexists(target) else None
        src = join(self.hist, b"keep/" + os.fsencode(p)[len(KEEP):])
        if not os.path.lexists(src):
            return None
        _clone_tree(src, target)
        return target


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


def _set_meta(path: bytes, m: Dict) -> None:
    if statmod.S_ISLNK(m["mode"]):
        os.chown(path, m["uid"], m["gid"], follow_symlinks=False)
        os.utime(path, ns=(m["atime_ns"], m["mtime_ns"]), follow_symlinks=False)
        return
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, m["uid"], m["gid"])
        os.fchmod(fd, statmod.S_IMODE(m["mode"]))
        want = {k: base64.b64decode(v) for k, v in m.get("xattrs", {}).items()}
        have = read_xattrs(fd)
        for k in have:
            if k not in want and not k.startswith("security."):
                try:
                    os.removexattr(fd, k)
                except OSError:
                    pass
        for k, v in want.items():
            if have.get(k) != v:
                os.setxattr(fd, k, v)
        os.utime(fd, ns=(m["atime_ns"], m["mtime_ns"]))
    finally:
        os.close(fd)


def _remove(path: bytes) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def undo(records: List[Dict], target: _Target) -> int:
    """Apply records newest first.  Idempotent: a change that never happened is skipped."""
    n = 0
    for rec in reversed(records):
        op = rec.get("op")
        if op == "rename":
            src, dst = target.path(rec["src"]), target.obtain(rec["dst"])
            if dst is not None and not os.path.lexists(src):
                os.makedirs(parent(src), exist_ok=True)
                os.rename(dst, src)
                n += 1
        elif op == "replace":
            kept = target.obtain(rec["kept"])
            if kept is not None:
                os.rename(kept, target.path(rec["path"]))
                n += 1
        elif op in ("create", "mkdir"):
            for q in reversed(rec.get("paths") or [rec["path"]]):
                p = target.path(q)
                if os.path.lexists(p):
                    _remove(p)
                    n += 1
        elif op == "patch":
            p = target.path(rec["path"])
            data = _blob(target.hist, rec)
            fd = os.open(p, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                pos = 0
                for off, ln in rec["ranges"]:
                    os.pwrite(fd, data[pos:pos + ln], off)
                    pos += ln
                os.ftruncate(fd, rec["old_size"])
                for off, ln in rec.get("holes", []):
                    try:
                        platform.punch_hole(fd, off, ln)
                    except OSError:
                        pass
            finally:
                os.close(fd)
            n += 1
        elif op == "meta":
            p = target.path(rec["path"])
            if os.path.lexists(p):
                _set_meta(p, rec["old"])
                n += 1
        elif op == "fresh":          # the cycle was a first copy into an empty DEST: empty it again
            for name in os.listdir(target.root):
                if os.fsencode(name) != STATE_DIR:
                    _remove(join(target.root, os.fsencode(name)))
                    n += 1
        elif op == "dirmeta":
            p = target.path(rec["path"])
            if os.path.isdir(p):
                os.utime(p, ns=(rec["atime_ns"], rec["mtime_ns"]), follow_symlinks=False)
        else:
            raise HistoryCorruptError(f"unknown history record {op!r}")
    return n


def rollback(dest: bytes, cycle: int) -> int:
    """Undo an interrupted cycle in place; DEST returns to the cycle before."""
    d = hist_dir(dest, cycle)
    recs = read_log(d)
    n = undo(recs, _Target(dest, d, None))
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syncfs(fd)
    finally:
        os.close(fd)
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


def available(dest: bytes) -> List[int]:
    hd = join(dest, HIST)
    try:
        return sorted(int(n) for n in os.listdir(hd) if n.isdigit())
    except FileNotFoundError:
        return []


def restore(dest: bytes, cycle: int, committed: List[int], to: bytes, subpath: Optional[bytes],
            clone_tree: Callable[[bytes, bytes], None]) -> None:
    """Materialise committed cycle ``cycle`` of DEST into ``to`` (a new directory)."""
    if cycle not in committed:
        raise UsageError(f"cycle {cycle} is not a committed recovery point of {os.fsdecode(dest)}",
                         hint="see 'discrep history DEST'")
    later = [c for c in committed if c > cycle]
    have = set(available(dest))
    missing = [c for c in later if c not in have]
    if missing:
        raise UsageError(f"cycle {cycle} can no longer be restored: history of cycle(s) "
                         f"{', '.join(map(str, missing))} was pruned")
    if os.path.lexists(to) and (not os.path.isdir(to) or os.listdir(to)):
        raise UsageError(f"restore target {os.fsdecode(to)} exists and is not an empty directory")
    work = to if subpath is None else to.rstrip(b"/") + b".discrep-restore-tree"
    scratch_root = to.rstrip(b"/") + b".discrep-restore-scratch"
    if os.path.isdir(to) and subpath is None:
        os.rmdir(to)
    clone_tree(dest, work)
    try:
        for c in reversed(later):
            sc = join(scratch_root, b"%d" % c)
            os.makedirs(sc)
            d = hist_dir(dest, c)
            undo(read_log(d), _Target(work, d, sc))
        if subpath is not None:
            src = join(work, subpath)
            if not os.path.lexists(src):
                raise UsageError(f"{os.fsdecode(subpath)} did not exist in cycle {cycle}")
            dst = join(to, subpath)
            os.makedirs(parent(dst) or to, exist_ok=True)
            os.rename(src, dst)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
        if subpath is not None:
            shutil.rmtree(work, ignore_errors=True)


def prune(dest: bytes, committed: List[int], keep_cycles: Iterable[int]) -> List[int]:
    """Drop history no kept recovery point needs; returns the cycles whose history went."""
    keep = sorted(set(keep_cycles))
    if not keep:
        return []
    oldest = keep[0]
    gone = []
    for c in available(dest):
        if c <= oldest and c in committed:
            shutil.rmtree(hist_dir(dest, c), ignore_errors=True)
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

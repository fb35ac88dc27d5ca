"""A second applying process for a streamed first copy (replica side).

A first copy of many small files is bound by per-file work in Python (create, write, set
times, sign), and one Python process uses one core.  While a streamed cycle arrives,
``replica.Applier.run_stream`` hands some manifest segments to this worker (a child
process, ``python -m discrep.replica.worker``), which reads the segment and the packs it
names straight from the source's cycle directory (the sshfs mount), creates its
directories and writes its packed files in place -- with the same ``PackedWriter`` the
Applier uses for its own segments -- and returns the catalog rows.  Every other entry of the segment
(symlinks, empty, large, sparse and hard-linked files, deletes; directories too, after it
made them) goes back to the parent, which applies or records it as for its own segments.
Only a first copy into an empty DEST uses it: its undo is "empty DEST again", so the worker
writes no undo records, and nothing older can be in the way.

Protocol (``multiprocessing.connection`` over a socketpair, pickled tuples):

    parent -> (n, lo, hi)            apply segment n; its packs are lo .. hi-1
    worker -> ("done", n, rows, others, bytes_read, dirty_dirs, warnings)
    worker -> ("error", n, class name, errno, message)     then it exits
    parent -> None (or EOF)          exit

The worker dies with its parent (PR_SET_PDEATHSIG), so a killed replica never leaves it
writing into a DEST that recovery is emptying.

Thread-safety: in the worker, one thread receives tasks and starts pack reads (a small
pool), the main thread applies; in the parent, ``FreshWorker`` is used by one thread.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import signal
import socket
import stat as statmod
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import blockdiff

from discrep.core.errors import ManifestError, UnsafePathError
from discrep.protocol.manifest import Entry
from discrep.core.paths import basename, check_rel, dec, parent, show
from discrep.protocol import layout
from discrep.replica.dirs import DirFds, NotADir
from discrep.replica.owners import OwnerMap
from discrep.core.xattrs import set_xattrs_fd

log = logging.getLogger(__name__)

O_FILE = os.O_NOFOLLOW | os.O_CLOEXEC
MAX_QUEUED = 3          # tasks a worker holds at once (one applying, the next ones with their packs being read)


class FreshWorker:
    """The parent's handle on one worker process (see module doc)."""

    def __init__(self, dest: bytes, cycle_dir: bytes, numeric_ids: bool):
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "discrep.replica.worker", str(theirs.fileno()), os.fsdecode(dest),
                 os.fsdecode(cycle_dir), "1" if numeric_ids else "0"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.outstanding: Set[int] = set()

    def submit(self, n: int, lo: int, hi: int) -> None:
        self.conn.send((n, lo, hi))
        self.outstanding.add(n)

    def results(self, block: bool) -> List[Tuple]:
        """Finished segments' results (all of them, waiting if ``block``); raises a worker's error."""
        out = []
        while self.outstanding and (block or self.conn.poll()):
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                rc = self.proc.poll()
                raise OSError(errno.EIO, f"the applying worker process ended unexpectedly (status {rc})") from None
            if msg[0] == "error":
                self.outstanding.clear()
                raise _rebuild(msg[2], msg[3], msg[4])
            self.outstanding.discard(msg[1])
            out.append(msg)
        return out

    def close(self) -> None:
        """Stop the worker (waits for it: nothing of it may still write afterwards)."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


def _rebuild(kind: str, err: Optional[int], msg: str) -> BaseException:
    from discrep.core import errors
    if err is not None:
        return OSError(err, msg)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.Error):
        return cls(msg)
    return errors.ManifestError(f"the applying worker failed: {kind}: {msg}")


# ---------------------------------------------------------------- the packed-file hot path

_SHAPE = frozenset(("path", "mode", "uid", "gid", "user", "group", "mtime_ns", "op", "size", "idx", "h", "pack"))


def mkdir_in(pfd: int, rel: bytes) -> None:
    """Make directory ``rel`` (in parent fd ``pfd``) for a first copy; already there as a
    directory is fine (the other process made it as a parent of a file it wrote)."""
    name = basename(rel)
    try:
        os.mkdir(name, 0o700, dir_fd=pfd)
    except FileExistsError:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if not statmod.S_ISDIR(st.st_mode):
            raise ManifestError(f"{show(rel)} appears twice in the manifest") from None


class PackedWriter:
    """Writes a packed file of a first copy into an empty DEST, in place: checks its bytes against
    the manifest's digest, creates it with its mode, sets owner, xattrs and times.  ``write`` takes
    the common raw entry (no xattrs, no link, not empty) with the checks of ``manifest.Entry``
    inline and owners mapped through a cache -- the hot loop of a first copy; ``write_entry`` takes
    any validated packed Entry.  Used by the worker and by the Applier (``parent_fd(rel)``: the
    fd of rel's parent directory, made if missing)."""

    def __init__(self, parent_fd: Callable[[bytes], int], dirty: Set[bytes], owners: OwnerMap):
        self.parent_fd = parent_fd
        self.dirty = dirty
        self.owners = owners
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.euid, self.egid = os.geteuid(), os.getegid()

    def write(self, r: Dict[str, Any], blob_of) -> Optional[Tuple]:
        """The catalog row of raw entry ``r`` after writing it, or None when ``r`` is not of the
        common shape (the caller applies it the general way).  ``blob_of(k)``: pack k's bytes."""
        if len(r) != 12 or r.keys() != _SHAPE or r["op"] != "file":
            return None
        path, mode, uid, gid, mt, size, pk, h = (r["path"], r["mode"], r["uid"], r["gid"], r["mtime_ns"],
                                                 r["size"], r["pack"], r["h"])
        if not (type(path) is str and type(mode) is int and 0 <= mode < 0o10000 and type(uid) is int
                and 0 <= uid < 1 << 32 and type(gid) is int and 0 <= gid < 1 << 32 and type(mt) is int
                and -(1 << 63) <= mt < 1 << 63 and type(size) is int and 0 < size < 1 << 63
                and type(pk) is list and len(pk) == 2 and type(pk[0]) is int and type(pk[1]) is int
                and pk[0] >= 0 and pk[1] >= 0 and type(h) is str and len(h) == 32 and type(r["idx"]) is int):
            return None         # the general path says what is wrong
        try:
            want = bytes.fromhex(h)
        except ValueError:
            return None
        uid, gid = self.owners.ids(r["user"], r["group"], uid, gid)
        return self._put(check_rel(dec(path)), pk[0], pk[1], size, want, mode, uid, gid, mt, blob_of)

    def write_entry(self, e: Entry, blob_of, warns: List[Tuple[bytes, str]]) -> Tuple:
        """``write`` for a validated packed Entry whose owners are mapped already; xattrs that
        cannot be set go to ``warns`` as (path, message)."""
        k, off = e.pack
        return self._put(e.path, k, off, e.size, e.h, e.mode, e.uid, e.gid, e.mtime_ns, blob_of, e.xattrs, warns)

    def _put(self, rel: bytes, k: int, off: int, size: int, want: Optional[bytes], mode: int, uid: int,
             gid: int, mt: int, blob_of, xattrs: Optional[Dict[str, bytes]] = None,
             warns: Optional[List[Tuple[bytes, str]]] = None) -> Tuple:
        data = blob_of(k)[off:off + size]
        whole, sig = blockdiff.sign_small(data)
        if len(data) != size or whole != want:
            raise ManifestError(f"pack {k} does not hold the bytes the manifest announces for {show(rel)}")
        pfd = self.parent_fd(rel)
        par, name = parent(rel), basename(rel)
        fmode = mode & 0o777
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_FILE, fmode, dir_fd=pfd)
        try:
            if os.pwrite(fd, data, 0) != size:
                raise OSError(errno.EIO, f"short write to {show(rel)}")
            if self.euid == 0 and not (uid == self.euid and gid == self.egid):
                os.fchown(fd, uid, gid)     # (clears set-id bits: the mode comes after)
            if (fmode & ~self.umask) != mode:
                os.fchmod(fd, mode)
            if xattrs:
                for xn, why in set_xattrs_fd(fd, xattrs):
                    warns.append((rel, f"xattr {xn} not set: {why}"))
            os.utime(fd, ns=(mt, mt))
            ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=pfd)
            raise
        os.close(fd)
        self.dirty.add(par)
        return (rel, "file", size, mt, ino, sig)


# ---------------------------------------------------------------- the worker process

class _Apply:
    def __init__(self, dest: bytes, cycle_dir: bytes, numeric_ids: bool):
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dirs = DirFds(self.root_fd, shared=True)
        self.cycle_dir = cycle_dir
        self.writer = PackedWriter(self.parent_fd, self.dirs.dirty, OwnerMap(numeric_ids))
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="discrep-worker-read")
        self.packs: Dict[int, Future] = {}
        self.bytes_read = 0

    def parent_fd(self, rel: bytes) -> int:
        """fd of rel's parent, made if missing; a non-directory in the way is refused (in an empty
        DEST only this cycle's own entries can be there: the manifest names a path twice)."""
        try:
            return self.dirs.get(parent(rel), create=True)
        except NotADir as nd:
            raise UnsafePathError(f"refusing to write {show(rel)}: {show(nd.rel)} on the replica is not a "
                                  f"directory") from None

    def _read(self, name: bytes) -> bytes:
        fd = os.open(self.cycle_dir + b"/" + name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            parts = []
            off = 0
            while True:
                b = os.pread(fd, 1 << 20, off)
                if not b:
                    break
                parts.append(b)
                off += len(b)
        finally:
            os.close(fd)
        self.bytes_read += off
        return b"".join(parts)

    def want_packs(self, lo: int, hi: int) -> None:
        from blockdiff import framing
        for k in range(lo, hi):
            if k not in self.packs:
                self.packs[k] = self.pool.submit(lambda k=k: framing.unpack(self._read(layout.PACK_FILE % k)))

    def segment(self, n: int, lo: int, hi: int) -> Tuple:
        from discrep.protocol.manifest import read_segment
        self.want_packs(lo, hi)
        self.bytes_read = 0
        raw = read_segment(self._read(layout.SEGMENT_FILE % n), n)
        rows: List[Tuple] = []
        others: List[Dict[str, Any]] = []
        dirty = self.dirs.dirty
        dirty.clear()
        warns: List[Tuple[bytes, str]] = []
        blobs: Dict[int, bytes] = {}

        def blob_of(k: int) -> bytes:
            blob = blobs.get(k)
            if blob is None:
                if not lo <= k < hi:
                    raise ManifestError(f"segment {n} refers to pack {k}, which it does not own")
                blob = blobs[k] = self.packs.pop(k).result()
            return blob
        write = self.writer.write
        for r in raw:
            row = write(r, blob_of)
            if row is not None:
                rows.append(row)
                continue
            op = r.get("op")
            if op == "dir":
                e = Entry(r)
                mkdir_in(self.parent_fd(e.path), e.path)
                dirty.add(parent(e.path))
                others.append(r)
            elif op != "file" or r.get("pack") is None or r.get("link") is not None or not r.get("size"):
                others.append(r)
            else:
                e = Entry(r)
                self.writer.owners.map_entry(e)
                rows.append(self.writer.write_entry(e, blob_of, warns))
        for k in range(lo, hi):          # packs no entry named (none, normally)
            self.packs.pop(k, None)
        return rows, others, self.bytes_read, set(dirty), warns


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(argv: List[str]) -> int:
    _die_with_parent()
    conn = Connection(int(argv[0]))
    if os.getppid() == 1:
        return 1
    tasks: "queue.Queue[Optional[Tuple[int, int, int]]]" = queue.Queue()
    ap = _Apply(os.fsencode(argv[1]), os.fsencode(argv[2]), argv[3] == "1")

    def receive() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None:
                tasks.put(None)
                return
            ap.want_packs(msg[1], msg[2])    # read ahead while the previous task applies
            tasks.put(msg)
    threading.Thread(target=receive, daemon=True, name="discrep-worker-recv").start()
    while True:
        task = tasks.get()
        if task is None:
            return 0
        n, lo, hi = task
        try:
            res = ap.segment(n, lo, hi)
        except BaseException as e:
            conn.send(("error", n, type(e).__name__, e.errno if isinstance(e, OSError) else None,
                       e.strerror or str(e) if isinstance(e, OSError) else str(e)))
            return 2
        conn.send(("done", n) + res)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

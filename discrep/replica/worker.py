"""A second applying process for a streamed first copy (replica side).

A first copy of many small files is bound by per-file work in Python (create, write, set
times, sign), and one Python process uses one core.  While a streamed cycle arrives,
``replica.stream`` hands some manifest segments to this worker (a child process,
``python -m discrep.replica.worker``), which reads the segment and the packs it names
straight from the source's cycle directory (the sshfs mount), creates its directories and
writes its packed files in place -- with the same ``packed.PackedWriter`` the parent uses for
its own segments -- and returns the catalog rows.  Every other entry of the segment
(symlinks, empty, large, sparse and hard-linked files, deletes; directories too, after it
made them) goes back to the parent, which applies or records it as for its own segments.
Only a first copy into an empty DEST uses it: its undo is "empty DEST again", so the worker
writes no undo records, and nothing older can be in the way.

Protocol (``multiprocessing.connection`` over a socketpair, pickled tuples):

    parent -> (n, lo, hi)            apply segment n; its packs are lo .. hi-1
    worker -> ("done", n, (rows, others, bytes_read, dirty_dirs, warnings))     a SegmentDone
    worker -> ("error", n, class name, errno, message)     then it exits
    parent -> None (or EOF)          exit

The worker dies with its parent (PR_SET_PDEATHSIG), so a killed replica never leaves it
writing into a DEST that recovery is emptying.

Thread-safety: in the worker, one thread receives tasks and starts pack reads (a small
pool), the main thread applies; in the parent, ``FreshWorker`` is used by one thread.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

from discrep.core import errors
from discrep.core.platform import load_libc
from discrep.core.errors import ManifestError, UnsafePathError
from discrep.core.paths import parent, show
from discrep.protocol import layout
from discrep.protocol.manifest import (FRAME_SLACK, MAX_PACK_BYTES, MAX_SEGMENT_BYTES, Entry, read_segment,
                                       unpack_frame)
from discrep.replica.catalog import CatalogRow
from discrep.replica.dirs import DirFds, NotADir
from discrep.replica.owners import OwnerMap
from discrep.replica.packed import PackedWriter, Warns, mkdir_in

log = logging.getLogger(__name__)

READ_PIECE = 1 << 20    # bytes of one read of a segment or pack
MAX_QUEUED = 3          # tasks a worker holds at once (one applying, the next ones with their packs being read)


class SegmentDone(NamedTuple):
    """What the worker did with one segment."""
    rows: List[CatalogRow]            # packed files it wrote
    others: List[Dict[str, Any]]      # raw entries for the parent to apply or record
    bytes_read: int                   # from the source's cycle directory
    dirty: Set[bytes]                 # directories it changed
    warnings: Warns


class FreshWorker:
    """The parent's handle on one worker process (see module doc)."""

    def __init__(self, dest: bytes, cycle_dir: bytes, numeric_ids: bool, nosuid: bool = False):
        ours, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "discrep.replica.worker", str(theirs.fileno()), os.fsdecode(dest),
                 os.fsdecode(cycle_dir), "1" if numeric_ids else "0",
                 "1" if nosuid else "0"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.outstanding: Set[int] = set()

    def submit(self, n: int, lo: int, hi: int) -> None:
        self.conn.send((n, lo, hi))
        self.outstanding.add(n)

    def results(self, block: bool) -> List[SegmentDone]:
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
            out.append(SegmentDone(*msg[2]))
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
    if err is not None:
        return OSError(err, msg)
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.Error):
        return cls(msg)
    return errors.ManifestError(f"the applying worker failed: {kind}: {msg}")


# ---------------------------------------------------------------- the worker process

class SegmentApplier:
    """The worker's side: applies the packed files of the segments it is handed."""

    def __init__(self, dest: bytes, cycle_dir: bytes, numeric_ids: bool, nosuid: bool = False):
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dirs = DirFds(self.root_fd, shared=True)
        self.cycle_dir = cycle_dir
        self.owners = OwnerMap(numeric_ids)
        self.writer = PackedWriter(self.parent_fd, self.dirs.dirty, self.owners, nosuid=nosuid)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="discrep-worker-read")
        self.packs: Dict[int, "Future[bytes]"] = {}
        self.bytes_read = 0

    def parent_fd(self, rel: bytes) -> int:
        """fd of rel's parent, made if missing; a non-directory in the way is refused (in an empty
        DEST only this cycle's own entries can be there: the manifest names a path twice)."""
        try:
            return self.dirs.get(parent(rel), create=True)
        except NotADir as nd:
            raise UnsafePathError(f"refusing to write {show(rel)}: {show(nd.rel)} on the replica is not a "
                                  f"directory") from None

    def _read(self, name: bytes, max_size: int) -> bytes:
        """The whole file ``name`` of the cycle directory: ManifestError if it holds more than
        ``max_size`` bytes (never more than ``max_size`` + 1 bytes are read)."""
        fd = os.open(self.cycle_dir + b"/" + name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            parts = []
            off = 0
            while off <= max_size:
                b = os.pread(fd, min(READ_PIECE, max_size + 1 - off), off)
                if not b:
                    break
                parts.append(b)
                off += len(b)
        finally:
            os.close(fd)
        self.bytes_read += off
        if off > max_size:
            raise ManifestError(f"{show(name)} of the streamed cycle is larger than {max_size} bytes")
        return b"".join(parts)

    def want_packs(self, lo: int, hi: int) -> None:
        for k in range(lo, hi):
            if k not in self.packs:
                self.packs[k] = self.pool.submit(self._pack, k)

    def _pack(self, k: int) -> bytes:
        return unpack_frame(self._read(layout.PACK_FILE % k, MAX_PACK_BYTES + FRAME_SLACK), MAX_PACK_BYTES, f"pack {k}")

    def segment(self, n: int, lo: int, hi: int) -> SegmentDone:
        self.want_packs(lo, hi)
        self.bytes_read = 0
        raw = read_segment(self._read(layout.SEGMENT_FILE % n, MAX_SEGMENT_BYTES + FRAME_SLACK), n)
        rows: List[CatalogRow] = []
        others: List[Dict[str, Any]] = []
        self.dirs.dirty.clear()
        warns: Warns = []
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
            elif not self._general(r, blob_of, rows, warns):
                others.append(r)
        for k in range(lo, hi):          # packs no entry named (none, normally)
            self.packs.pop(k, None)
        return SegmentDone(rows, others, self.bytes_read, set(self.dirs.dirty), warns)

    def _general(self, r: Dict[str, Any], blob_of, rows: List[CatalogRow], warns: Warns) -> bool:
        """An entry of uncommon shape: a packed file is written (True); a directory is made, and
        it and everything else go back to the parent (False)."""
        op = r.get("op")
        if op == "dir":
            e = Entry(r)
            mkdir_in(self.parent_fd(e.path), e.path)
            self.dirs.dirty.add(parent(e.path))
            return False
        if op != "file" or r.get("pack") is None or r.get("link") is not None or not r.get("size"):
            return False
        e = Entry(r)
        self.owners.map_entry(e)
        rows.append(self.writer.write_entry(e, blob_of, warns))
        return True


def _die_with_parent() -> None:
    try:
        libc = load_libc()
        libc.prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(argv: List[str]) -> int:
    _die_with_parent()
    conn = Connection(int(argv[0]))
    if os.getppid() == 1:
        return 1
    tasks: "queue.Queue[Optional[Tuple[int, int, int]]]" = queue.Queue()
    ap = SegmentApplier(os.fsencode(argv[1]), os.fsencode(argv[2]), argv[3] == "1", argv[4:5] == ["1"])

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
        conn.send(("done", n, tuple(res)))   # a plain tuple: this module is __main__ here


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

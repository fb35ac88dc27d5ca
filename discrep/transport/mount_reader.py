"""Reading a cycle's export: through a mounted filesystem (local FUSE, sshfs).

``MountReader(mountpoint)`` reads the export's files and counts every byte that
crosses the mount (``bytes_read``: what the cycle cost on the wire, signatures
included).  ``copy_ranges`` reads many ranges in parallel (a thread pool: over
sshfs many requests are in flight on one connection, so round trips overlap)
and writes each range into a local fd as it arrives.  ``stalled_for`` says how long the
oldest read or open still in the kernel has waited (a stopped source or sshfs; see
``run.remote.StallWatch``).

MountReader and the SFTP reader of the SSH transport satisfy the replica's
``replica.reader.Reader`` protocol (structurally: the transport does not import the
replica).

Thread-safety: all methods may be called from several threads; the fd cache
and the byte counter are guarded by a lock.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from discrep.core.beneath import EscapeError, open_beneath
from discrep.core.errors import ManifestError, TransportError
from discrep.core.paths import show
from discrep.core.writes import pwrite_all
from discrep.protocol import layout
from discrep.protocol.manifest import MAX_MANIFEST_BYTES

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
READ_ALL_MAX = MAX_MANIFEST_BYTES   # the largest whole file read_all returns unless told a bound
LOST_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ECONNRESET)
LOST_HINT = "the replica stays at its last committed cycle; run again"
RANDOM_ACCESS = layout.RANDOM_ACCESS_PREFIXES


def split_ranges(ranges: Iterable[Tuple[int, int]], chunk: int) -> List[Tuple[int, int]]:
    """(offset, length) ranges cut at multiples of ``chunk``: pieces a reader fetches one by one."""
    pieces: List[Tuple[int, int]] = []
    for off, ln in ranges:
        end = off + ln
        while off < end:
            n = min(chunk - (off % chunk), end - off)
            pieces.append((off, n))
            off += n
    return pieces


class MountReader:
    """Reads an export through the mount at ``mountpoint`` (see module doc)."""

    cycle_dir: Optional[bytes] = None   # no streamed cycle's directory to read directly (see DirectDataReader)

    def __init__(self, mountpoint: str, *, workers: int = 8, base: bytes = b""):
        self.mountpoint = os.fsencode(mountpoint)
        self.base = base.strip(b"/")        # every read is below mountpoint/base, opened beneath the mount
        try:
            self.root_fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise TransportError(f"cannot open the export at {show(self.mountpoint)}: {e.strerror}",
                                 hint=LOST_HINT) from None
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._fds: Dict[bytes, int] = {}
        self._waiting: Dict[int, float] = {}     # reads and opens in the kernel now: token -> since
        self._tokens = itertools.count()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="discrep-read")

    def know_files(self, paths: Dict[int, bytes], live: Iterable[int] = ()) -> None:
        """The cycle's validated file paths by manifest idx (a reader may read some data directly);
        ``live``: the idx of files the source lets us read live (see remote.DirectDataReader)."""

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            if self.root_fd >= 0:
                os.close(self.root_fd)
                self.root_fd = -1

    def stalled_for(self) -> float:
        """Seconds the oldest read or open still in the kernel has waited (0.0 when none is): a
        source, export or sshfs that stopped answering shows here even while the SSH connection
        itself answers its keepalives (``run.remote`` aborts the mount after ``--timeout``)."""
        with self._lock:
            return time.monotonic() - min(self._waiting.values()) if self._waiting else 0.0

    @contextmanager
    def _in_kernel(self) -> Iterator[None]:
        token = next(self._tokens)
        with self._lock:
            self._waiting[token] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                del self._waiting[token]

    def add_bytes_read(self, n: int) -> None:
        """Count ``n`` bytes read from the export (here, or by another process on our behalf)."""
        with self._lock:
            self.bytes_read += n

    def _open(self, rel: bytes) -> int:
        """Open export file ``rel`` (subclasses may read some files from elsewhere)."""
        return self.open_below(self.base, rel)

    def open_below(self, base: bytes, rel: bytes) -> int:
        """Open ``base/rel`` strictly beneath the mount (no '..', no symlink: core.beneath)."""
        try:
            with self._in_kernel():
                return open_beneath(self.root_fd, base + b"/" + rel if base else rel)
        except EscapeError:
            raise ManifestError(f"the source named a path outside its export: {show(base + b'/' + rel)}") from None
        except FileNotFoundError:
            raise ManifestError(f"the export has no {show(rel)}") from None
        except OSError as e:
            if e.errno in LOST_ERRNOS:
                raise TransportError(f"the export went away while opening {show(rel)}: {e.strerror}",
                                     hint=LOST_HINT) from None
            raise TransportError(f"cannot open {show(rel)} on the export: {e.strerror}") from None

    def _fd(self, rel: bytes) -> int:
        """A cached fd of ``rel`` (at most ~64 open)."""
        with self._lock:
            fd = self._fds.get(rel)
            if fd is not None:
                return fd
        fd = self._open(rel)
        if rel.startswith(RANDOM_ACCESS):
            # scattered small reads: no read-ahead (over sshfs it would pull most of the file)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
        with self._lock:
            if rel in self._fds:
                os.close(fd)
                return self._fds[rel]
            if len(self._fds) > 64:
                for k in list(self._fds)[:32]:
                    os.close(self._fds.pop(k))
            self._fds[rel] = fd
            return fd

    def read_all(self, rel: bytes, max_size: int = READ_ALL_MAX) -> bytes:
        """The whole file ``rel``; ManifestError if it holds more than ``max_size`` bytes."""
        data = self._read(self._fd(rel), 0, None, max_size)
        if len(data) > max_size:
            raise ManifestError(f"export file {show(rel)} is larger than {max_size} bytes")
        return data

    def _read(self, fd: int, offset: int, size: Optional[int], limit: Optional[int] = None) -> bytes:
        """``size`` bytes from ``offset`` (None: up to the end, but at most ``limit`` + 1), fewer only at
        the end; counted."""
        parts: List[bytes] = []
        got = 0
        while size is None or got < size:
            want = size - got if size is not None else CHUNK if limit is None else min(CHUNK, limit + 1 - got)
            if want <= 0:
                break
            b = self._pread(fd, want, offset + got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        self.add_bytes_read(got)
        return b"".join(parts)

    def _pread(self, fd: int, size: int, off: int) -> bytes:
        try:
            with self._in_kernel():
                return os.pread(fd, size, off)
        except OSError as e:
            if e.errno in LOST_ERRNOS:
                raise TransportError(f"the export went away while reading: {e.strerror}", hint=LOST_HINT) from None
            raise

    def pread(self, rel: bytes, size: int, offset: int) -> bytes:
        return self._read(self._fd(rel), offset, size)

    def preads(self, reqs: Sequence[Tuple[bytes, int, int]]) -> List[bytes]:
        """Many (rel, offset, length) reads in parallel; results in request order."""
        return list(self.pool.map(lambda r: self.pread(r[0], r[2], r[1]), reqs))

    def copy_ranges(self, rel: bytes, ranges: Iterable[Tuple[int, int]], out_fd: int,
                    on_data: Optional[Callable[[int, bytes], None]] = None) -> int:
        """Copy byte ranges of export file ``rel`` into ``out_fd`` at the same offsets."""
        pieces = split_ranges(ranges, CHUNK)

        def one(piece: Tuple[int, int]) -> int:
            off, n = piece
            data = self.pread(rel, n, off)
            if len(data) != n:
                raise ManifestError(f"export file {os.fsdecode(rel)} is shorter than the manifest says")
            pwrite_all(out_fd, data, off)
            if on_data is not None:
                on_data(off, data)
            return n
        return sum(self.pool.map(one, pieces))

"""Reading a cycle's export through paramiko SFTP (no sshfs, no FUSE needed on the replica).

``SftpReader(sftp, root)`` offers the methods of ``mount_reader.MountReader`` (the
replica's ``replica.reader.Reader`` protocol: read_all, pread, preads, copy_ranges,
bytes_read, add_bytes_read, know_files, close) over an SFTP session
that runs on the cycle's single paramiko connection.  Every call pipelines its
requests: ``SFTPFile.readv`` sends all the (<= 32 KiB) read requests of a batch
before waiting, so many ranges cost about one round trip plus the bytes.

paramiko's SFTPClient does not tolerate synchronous requests (open, stat) from
several threads at once, so one lock serializes the calls; throughput comes
from the pipeline inside each call, not from threads.

Thread-safety: all methods may be called from several threads (one lock).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from discrep.transport.mount_reader import READ_ALL_MAX, split_ranges
from discrep.core.errors import ManifestError, TransportError

log = logging.getLogger(__name__)

PIECE = 1024 * 1024        # readv chunk: results are written to the fd as each arrives
MAX_INFLIGHT = 256         # 32 KiB requests in flight per readv (8 MiB)


def _lost(e: BaseException) -> TransportError:
    return TransportError(f"the SFTP connection to the export was lost: {e or type(e).__name__}",
                          hint="the replica stays at its last committed cycle; run again")


class SftpReader:
    """Reads an export over SFTP below ``root`` (see module doc)."""

    cycle_dir: Optional[bytes] = None   # nothing another process could read directly

    def __init__(self, sftp, root: str, owns_sftp: bool = True):
        self.sftp = sftp
        self.owns_sftp = owns_sftp          # close() closes the SFTP session too (else its owner does)
        self.root = root.rstrip("/")
        self.bytes_read = 0
        self._lock = threading.RLock()
        self._files: Dict[bytes, Tuple[object, int]] = {}
        # callers may fan out through reader.pool (as with MountReader); calls still serialize on the lock
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="discrep-sftp")

    def know_files(self, paths: Dict[int, bytes], live: Iterable[int] = ()) -> None:
        """The cycle's file paths by manifest idx: every read goes through the export here."""

    def add_bytes_read(self, n: int) -> None:
        """Count ``n`` bytes read from the export."""
        with self._lock:
            self.bytes_read += n

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        with self._lock:
            for f, _ in self._files.values():
                try:
                    f.close()
                except Exception:  # the connection may be gone
                    pass
            self._files.clear()
            if self.owns_sftp:
                try:
                    self.sftp.close()
                except Exception:
                    pass

    def _path(self, rel: bytes) -> str:
        return self.root + "/" + os.fsdecode(rel)

    def _file(self, rel: bytes):
        ent = self._files.get(rel)
        if ent is not None:
            return ent
        import paramiko
        try:
            f = self.sftp.open(self._path(rel), "rb")
            size = f.stat().st_size
        except IOError as e:
            if getattr(e, "errno", None) == errno.ENOENT:
                raise ManifestError(f"the export has no {os.fsdecode(rel)}") from None
            if isinstance(e, (socket.error, EOFError)) or getattr(e, "errno", None) is None:
                raise _lost(e) from None
            raise TransportError(f"cannot open {os.fsdecode(rel)} on the export: {e}") from None
        except (paramiko.SSHException, EOFError) as e:
            raise _lost(e) from None
        if len(self._files) > 64:
            for k in list(self._files)[:32]:
                try:
                    self._files.pop(k)[0].close()
                except Exception:
                    pass
        self._files[rel] = (f, size)
        return f, size

    def _readv(self, rel: bytes, chunks: List[Tuple[int, int]]):
        """Yield the bytes of each (offset, length) chunk in order (clipped at EOF)."""
        import paramiko
        f, size = self._file(rel)
        clipped = []
        for off, ln in chunks:
            ln = max(0, min(ln, size - off))
            clipped.append((off, ln))
        want = [(o, n) for o, n in clipped if n > 0]
        try:
            it = f.readv(want, max_concurrent_prefetch_requests=MAX_INFLIGHT) if want else iter(())
            for off, n in clipped:
                if n == 0:
                    yield b""
                    continue
                data = next(it)
                yield data
        except StopIteration:
            raise TransportError(f"short read of {os.fsdecode(rel)} from the export") from None
        except (paramiko.SSHException, EOFError, socket.error) as e:
            raise _lost(e) from None
        except IOError as e:
            raise TransportError(f"cannot read {os.fsdecode(rel)} from the export: {e}") from None

    def read_all(self, rel: bytes, max_size: int = READ_ALL_MAX) -> bytes:
        """The whole file ``rel``; ManifestError if it holds more than ``max_size`` bytes."""
        with self._lock:
            _, size = self._file(rel)
            if size > max_size:
                raise ManifestError(f"export file {os.fsdecode(rel)} is larger than {max_size} bytes")
            chunks = [(o, min(PIECE, size - o)) for o in range(0, size, PIECE)]
            data = b"".join(self._readv(rel, chunks))
            self.add_bytes_read(len(data))
            return data

    def pread(self, rel: bytes, size: int, offset: int) -> bytes:
        with self._lock:
            chunks = [(o, min(PIECE, offset + size - o)) for o in range(offset, offset + size, PIECE)]
            data = b"".join(self._readv(rel, chunks))
            self.add_bytes_read(len(data))
            return data

    def preads(self, reqs: Sequence[Tuple[bytes, int, int]]) -> List[bytes]:
        """Many (rel, offset, length) reads, pipelined per file; results in request order."""
        out: List[Optional[bytes]] = [None] * len(reqs)
        by_file: Dict[bytes, List[int]] = {}
        for i, (rel, _o, _n) in enumerate(reqs):
            by_file.setdefault(rel, []).append(i)
        with self._lock:
            for rel, idxs in by_file.items():
                for i, data in zip(idxs, self._readv(rel, [(reqs[i][1], reqs[i][2]) for i in idxs])):
                    out[i] = data
                    self.add_bytes_read(len(data))
        return out  # type: ignore[return-value]

    def copy_ranges(self, rel: bytes, ranges: Iterable[Tuple[int, int]], out_fd: int,
                    on_data: Optional[Callable[[int, bytes], None]] = None) -> int:
        """Copy byte ranges of export file ``rel`` into ``out_fd`` at the same offsets (one pipeline)."""
        pieces = split_ranges(ranges, PIECE)
        total = 0
        with self._lock:
            for (off, n), data in zip(pieces, self._readv(rel, pieces)):
                if len(data) != n:
                    raise ManifestError(f"export file {os.fsdecode(rel)} is shorter than the manifest says")
                os.pwrite(out_fd, data, off)
                if on_data is not None:
                    on_data(off, data)
                self.add_bytes_read(n)
                total += n
        return total

"""What the replica needs from the transport: the ``Reader`` and ``StreamedCycle`` protocols.

The replica reads a cycle's export only through a ``Reader``: ``transport.MountReader``
(a local FUSE mount, an sshfs mount; ``run.remote.DirectDataReader`` builds on it) and
``transport.SftpReader`` satisfy it structurally -- the replica never imports the transport.
Paths are export-relative bytes (``protocol.layout`` names them).  A streamed first copy
also takes a ``StreamedCycle`` (``run.remote.CycleStream``): the cycle as the source builds it.

Thread-safety: a Reader's reads may be called from several threads (the replica fans out
through ``pool``); a StreamedCycle is used by the applying thread only.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

from discrep.protocol.manifest import MAX_MANIFEST_BYTES, Entry

Ranges = Iterable[Tuple[int, int]]


class Reader(Protocol):
    """Reads of one cycle's export (see module doc)."""

    @property
    def pool(self) -> Executor:
        """Threads the replica may run its own reads in (pack read-ahead, range batches)."""

    @property
    def cycle_dir(self) -> Optional[bytes]:
        """A local directory holding a streamed cycle's segments and packs, which a second
        applying process may read directly; None when there is none."""

    @property
    def bytes_read(self) -> int:
        """Bytes read from the export so far (what the cycle cost on the wire)."""

    def read_all(self, rel: bytes, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        """The whole export file ``rel``; ManifestError if it holds more than ``max_size`` bytes
        (by default the largest manifest, 1 GiB)."""

    def pread(self, rel: bytes, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes of ``rel`` at ``offset`` (short only at its end)."""

    def preads(self, reqs: Sequence[Tuple[bytes, int, int]]) -> List[bytes]:
        """Many (rel, offset, length) reads; results in request order."""

    def copy_ranges(self, rel: bytes, ranges: Ranges, out_fd: int,
                    on_data: Optional[Callable[[int, bytes], None]] = None) -> int:
        """Copy byte ranges of ``rel`` into ``out_fd`` at the same offsets (``on_data(offset,
        bytes)`` sees each piece); the number of bytes copied."""

    def add_bytes_read(self, n: int) -> None:
        """Count ``n`` bytes read from the export on this reader's behalf (by another process)."""

    def know_files(self, paths: Dict[int, bytes], live: Iterable[int] = ()) -> None:
        """The cycle's validated file paths by manifest idx (a reader may read some data
        directly); ``live``: the idx of files the source lets the replica read live."""

    def close(self) -> None:
        """Release the reader's fds, threads and connection."""


class StreamedCycle(Protocol):
    """A cycle the source still builds, segment by segment (see module doc)."""

    @property
    def header(self) -> Dict[str, Any]:
        """The cycle description."""

    @property
    def totals(self) -> Dict[str, Any]:
        """{"files": n, "bytes": n} when the source counted them first (for progress); else {}."""

    @property
    def pack_rel(self) -> bytes:
        """Where pack k is read (``pack_rel % k``)."""

    @property
    def packs_known(self) -> int:
        """Packs the source has written so far (runs ahead of the segments applied)."""

    def announced(self) -> Iterator[Tuple[int, int]]:
        """(segment number, packs written so far) as segments are announced, until the cycle is built."""

    def raw(self, n: int) -> Iterator[Dict[str, Any]]:
        """Segment ``n``'s raw entry dicts (not validated yet)."""

    def segments(self) -> Iterator[Tuple[List[Entry], int]]:
        """Every segment's validated entries, with the packs written so far."""

    def finish(self) -> None:
        """Every segment consumed and the cycle built."""

    def verify(self) -> Tuple[List[Entry], List[bytes]]:
        """Have the source check the files it let the replica read live: (entries to read
        again from ``redo_rel(idx)``, paths to drop from this cycle)."""

    def redo_rel(self, idx: int) -> bytes:
        """Where the source put its copy of file ``idx`` that changed while it was read."""

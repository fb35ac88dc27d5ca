"""Content-defined chunking (FastCDC) and copy/fetch planning for shifted data.

Role: when data was inserted or removed (offsets shift), fixed blocks all
differ; content-defined chunk boundaries move with the content, so the
replica can copy most chunks from its old copy and fetch only the few new
ones.  Chunk boundaries come from ``pyfastcdc.FastCDC`` (normalized chunking
level 1, seed 0: deterministic); each chunk's digest is ``xxh3_64`` of its
data, little-endian.

``chunk_fd`` streams the file in large preads and yields exactly the same
boundaries as chunking the whole content at once: a chunk starting at ``p``
is only accepted while at least ``max_size`` bytes from ``p`` are buffered
(or the buffer reaches EOF), because FastCDC's cut decision looks at no more
than ``max_size`` bytes.

Serialized ``ChunkList`` (little-endian): ``b"DRCD"``, u8 version, u32 min,
u32 avg, u32 max, u64 count, then ``count`` u32 lengths, then ``count`` 8-byte
digests.

Threading: pure functions; a ``FastCDC`` object is created per call, so
concurrent calls on different fds are safe.  ``ChunkList`` is immutable.
"""
from __future__ import annotations

import itertools
import logging
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import pyfastcdc
import xxhash

from .errors import ChunkListFormatError, ShortReadError

log = logging.getLogger(__name__)

__all__ = [
    "CDC_MIN", "CDC_AVG", "CDC_MAX", "CDC_MAGIC", "CDC_VERSION", "CHUNK_DIGEST",
    "ChunkList", "Op", "chunk_fd", "chunk_bytes", "plan", "fetch_ranges",
]

CDC_MIN = 8192
CDC_AVG = 32768
CDC_MAX = 131072
CDC_MAGIC = b"DRCD"
CDC_VERSION = 1
CHUNK_DIGEST = 8
#: bytes read per pread in ``chunk_fd``
CDC_READ_SPAN = 8 << 20

_HEADER = struct.Struct("<4sBIIIQ")
CDC_HEADER_SIZE = _HEADER.size  # 25
_h64 = xxhash.xxh3_64_intdigest

Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class ChunkList:
    """Lengths and digests of the content-defined chunks of a file.

    ``min_size``/``avg``/``max_size`` record the chunker parameters (they go
    into the serialized header); they default to the module constants.
    """

    lengths: Tuple[int, ...]
    digests: bytes
    min_size: int = CDC_MIN
    avg: int = CDC_AVG
    max_size: int = CDC_MAX

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, tuple):
            object.__setattr__(self, "lengths", tuple(self.lengths))
        if len(self.digests) != len(self.lengths) * CHUNK_DIGEST:
            raise ChunkListFormatError(
                f"chunk digests length {len(self.digests)} != {len(self.lengths)} * {CHUNK_DIGEST}")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        """Sum of chunk lengths (the file size)."""
        return sum(self.lengths)

    def offsets(self) -> Tuple[int, ...]:
        """Start offset of every chunk."""
        return tuple(itertools.accumulate(self.lengths, initial=0))[:-1]

    def digest_ints(self) -> Tuple[int, ...]:
        return struct.unpack(f"<{len(self.lengths)}Q", self.digests)

    def to_bytes(self) -> bytes:
        n = len(self.lengths)
        return b"".join((
            _HEADER.pack(CDC_MAGIC, CDC_VERSION, self.min_size, self.avg, self.max_size, n),
            struct.pack(f"<{n}I", *self.lengths),
            self.digests,
        ))

    @classmethod
    def from_bytes(cls, b: Buffer) -> "ChunkList":
        """Strictly parse a serialized chunk list (``ChunkListFormatError`` on any defect)."""
        mv = memoryview(b).cast("B")
        if len(mv) < CDC_HEADER_SIZE:
            raise ChunkListFormatError(f"chunk list truncated: {len(mv)} < {CDC_HEADER_SIZE} header bytes")
        magic, version, mn, avg, mx, n = _HEADER.unpack_from(mv, 0)
        if magic != CDC_MAGIC:
            raise ChunkListFormatError(f"bad chunk list magic {bytes(magic)!r}, expected {CDC_MAGIC!r}")
        if version != CDC_VERSION:
            raise ChunkListFormatError(f"unsupported chunk list version {version} (know {CDC_VERSION})")
        if not (1 <= mn <= avg <= mx):
            raise ChunkListFormatError(f"inconsistent chunk sizes min={mn} avg={avg} max={mx}")
        expect = CDC_HEADER_SIZE + n * (4 + CHUNK_DIGEST)
        if len(mv) != expect:
            raise ChunkListFormatError(
                f"chunk list length {len(mv)} != {expect} expected for {n} chunks")
        lengths = struct.unpack_from(f"<{n}I", mv, CDC_HEADER_SIZE)
        if n and (min(lengths) < 1 or max(lengths) > mx):
            bad = next(i for i, x in enumerate(lengths) if not 1 <= x <= mx)
            raise ChunkListFormatError(f"chunk {bad} length {lengths[bad]} outside [1, {mx}]")
        digests = bytes(mv[CDC_HEADER_SIZE + 4 * n:])
        return cls(lengths, digests, mn, avg, mx)


def _chunker(avg: int, min_size: Optional[int], max_size: Optional[int]) -> "pyfastcdc.FastCDC":
    return pyfastcdc.FastCDC(avg, min_size=min_size, max_size=max_size, normalized_chunking=1, seed=0)


def chunk_bytes(data: Buffer, *, avg: int = CDC_AVG, min_size: int = CDC_MIN,
                max_size: int = CDC_MAX) -> ChunkList:
    """Chunk an in-memory buffer."""
    cdc = _chunker(avg, min_size, max_size)
    mv = memoryview(data).cast("B")
    lengths: List[int] = []
    ints: List[int] = []
    if len(mv):
        for c in cdc.cut_buf(mv):
            lengths.append(c.length)
            ints.append(_h64(c.data))
    return ChunkList(tuple(lengths), struct.pack(f"<{len(ints)}Q", *ints), min_size, avg, max_size)


def chunk_fd(fd: int, size: Optional[int] = None, *, avg: int = CDC_AVG, min_size: int = CDC_MIN,
             max_size: int = CDC_MAX, read_size: int = CDC_READ_SPAN) -> ChunkList:
    """Chunk the first ``size`` bytes (default: fstat size) of ``fd``, streaming.

    Memory is bounded by ``read_size + max_size``; the boundaries equal those
    of ``chunk_bytes`` on the same content.  ``read_size`` is raised to at
    least ``2 * max_size``.  Raises ``ShortReadError`` if the file is short.
    """
    cdc = _chunker(avg, min_size, max_size)
    max_size = cdc.max_size
    if size is None:
        size = os.fstat(fd).st_size
    read_size = max(read_size, 2 * max_size)
    cap = min(read_size + max_size, max(size, 1))
    buf = bytearray(cap)
    mv = memoryview(buf)
    lengths: List[int] = []
    ints: List[int] = []
    base = 0  # file offset of buf[0]
    have = 0  # valid bytes in buf
    while base < size:
        while have < cap and base + have < size:
            want = min(cap - have, size - base - have)
            r = os.preadv(fd, [mv[have:have + want]], base + have)
            if r == 0:
                raise ShortReadError(f"fd {fd}: unexpected end of file at offset {base + have} (size {size})")
            have += r
        eof = base + have >= size
        consumed = 0
        for c in cdc.cut_buf(mv[:have]):
            if not eof and have - c.offset < max_size:
                break  # cut could depend on bytes not yet buffered
            lengths.append(c.length)
            ints.append(_h64(c.data))
            consumed = c.offset + c.length
        if eof:
            break
        if consumed == 0:  # cannot happen with cap >= 2*max_size; guard against livelock
            raise AssertionError("chunk_fd made no progress")
        tail = have - consumed
        buf[:tail] = buf[consumed:have]
        base += consumed
        have = tail
    return ChunkList(tuple(lengths), struct.pack(f"<{len(ints)}Q", *ints), min_size, avg, max_size)


class Op(NamedTuple):
    """One step of rebuilding the new file.

    ``kind`` is ``'copy'`` (take ``length`` bytes at ``old_offset`` of the old
    file) or ``'fetch'`` (bytes must come from the source; ``old_offset`` is -1).
    """

    kind: str
    new_offset: int
    length: int
    old_offset: int


def plan(old: ChunkList, new: ChunkList) -> List[Op]:
    """Ops that rebuild ``new`` from ``old`` plus fetched data.

    A chunk of ``new`` is copied from any old chunk with the same digest and
    length, else fetched.  Adjacent ops of the same kind are merged when their
    offsets are contiguous (copy: in both files; fetch: in the new file).
    """
    index: Dict[Tuple[int, int], int] = {}
    for d, ln, off in zip(old.digest_ints(), old.lengths, old.offsets()):
        index.setdefault((d, ln), off)
    ops: List[Op] = []
    pos = 0
    for d, ln in zip(new.digest_ints(), new.lengths):
        src = index.get((d, ln))
        if src is None:
            if ops and ops[-1].kind == "fetch":
                last = ops[-1]
                ops[-1] = Op("fetch", last.new_offset, last.length + ln, -1)
            else:
                ops.append(Op("fetch", pos, ln, -1))
        else:
            if ops and ops[-1].kind == "copy" and ops[-1].old_offset + ops[-1].length == src:
                last = ops[-1]
                ops[-1] = Op("copy", last.new_offset, last.length + ln, last.old_offset)
            else:
                ops.append(Op("copy", pos, ln, src))
        pos += ln
    return ops


def fetch_ranges(ops: List[Op]) -> List[Tuple[int, int]]:
    """``(new_offset, length)`` of the fetch ops: what to request from the source."""
    return [(op.new_offset, op.length) for op in ops if op.kind == "fetch"]

"""Two-level content-defined chunk index: super-chunks first, chunk entries on demand.

Role: a shifted file (bytes inserted or removed) changes every fixed block but
only a few content-defined chunks.  Sending the whole chunk list still costs
~12 bytes per chunk (40 KB for 100 MiB at 32 KiB chunks).  Grouping chunks into
*super-chunks* whose boundaries are themselves content-defined (a chunk whose
digest has its low ``SUPER_BITS`` bits zero ends a super-chunk, or after
``SUPER_MAX`` chunks) makes them resynchronise after an edit the same way
chunks do.  The replica reads the small super table, compares it with the
super-chunks of its old copy, and reads chunk entries only of the super-chunks
that differ.

Serialized index (little-endian): header ``b"DRCX"``, u8 version, u32 avg,
u64 n_chunks, u64 n_supers, u64 file_size; then ``n_supers`` entries
``(u32 first_chunk, u32 n_chunks, u64 offset, 16-byte digest)``; then
``n_chunks`` entries ``(u32 length, 8-byte digest)``.  ``IndexHeader`` tells
where each part lies so a reader can pread only what it needs.

Threading: pure functions on immutable values.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import xxhash

from .cdc import ChunkList, Op
from .errors import ChunkListFormatError

MAGIC = b"DRCX"
VERSION = 1
SUPER_BITS = 5          # ~32 chunks per super-chunk on average
SUPER_MAX = 256
_HDR = struct.Struct("<4sBIQQQ")
_SUP = struct.Struct("<IIQ16s")
_CHK = struct.Struct("<I8s")
HEADER_SIZE = _HDR.size
SUPER_SIZE = _SUP.size
CHUNK_SIZE = _CHK.size


@dataclass(frozen=True)
class Super:
    first: int
    count: int
    offset: int
    digest: bytes


def supers_of(cl: ChunkList) -> List[Super]:
    """Super-chunks of a chunk list (boundaries from the chunk digests' low bits)."""
    out: List[Super] = []
    mask = (1 << SUPER_BITS) - 1
    digs = cl.digests
    first, off, run_off = 0, 0, 0
    n = len(cl.lengths)
    for i, (d, ln) in enumerate(zip(cl.digest_ints(), cl.lengths)):
        off += ln
        if (d & mask) == 0 or i - first + 1 >= SUPER_MAX or i == n - 1:
            body = digs[first * 8:(i + 1) * 8] + struct.pack(f"<{i - first + 1}I", *cl.lengths[first:i + 1])
            out.append(Super(first, i - first + 1, run_off, xxhash.xxh3_128_digest(body)))
            first, run_off = i + 1, off
    return out


def index_bytes(cl: ChunkList) -> bytes:
    sup = supers_of(cl)
    parts = [_HDR.pack(MAGIC, VERSION, cl.avg, len(cl.lengths), len(sup), cl.total)]
    parts += [_SUP.pack(s.first, s.count, s.offset, s.digest) for s in sup]
    digs = cl.digests
    parts += [_CHK.pack(ln, digs[i * 8:i * 8 + 8]) for i, ln in enumerate(cl.lengths)]
    return b"".join(parts)


@dataclass(frozen=True)
class IndexHeader:
    avg: int
    n_chunks: int
    n_supers: int
    file_size: int

    @classmethod
    def from_bytes(cls, b: bytes) -> "IndexHeader":
        if len(b) < HEADER_SIZE:
            raise ChunkListFormatError("chunk index header is short")
        magic, ver, avg, nc, ns, size = _HDR.unpack_from(b, 0)
        if magic != MAGIC or ver != VERSION:
            raise ChunkListFormatError("not a discrep chunk index")
        if ns > nc or (nc == 0) != (size == 0) or nc > size:
            raise ChunkListFormatError("inconsistent chunk index header")
        return cls(avg, nc, ns, size)

    def supers_range(self) -> Tuple[int, int]:
        return HEADER_SIZE, self.n_supers * SUPER_SIZE

    def chunks_range(self, first: int, count: int) -> Tuple[int, int]:
        return HEADER_SIZE + self.n_supers * SUPER_SIZE + first * CHUNK_SIZE, count * CHUNK_SIZE


def parse_supers(h: IndexHeader, b: bytes) -> List[Super]:
    if len(b) != h.n_supers * SUPER_SIZE:
        raise ChunkListFormatError("super table has the wrong size")
    out = [Super(*_SUP.unpack_from(b, i * SUPER_SIZE)) for i in range(h.n_supers)]
    nxt = 0
    for s in out:
        if s.first != nxt or s.count == 0:
            raise ChunkListFormatError("super table does not cover the chunks in order")
        nxt += s.count
    if nxt != h.n_chunks:
        raise ChunkListFormatError("super table does not cover every chunk")
    return out


def parse_chunks(b: bytes) -> List[Tuple[int, bytes]]:
    if len(b) % CHUNK_SIZE:
        raise ChunkListFormatError("chunk entries have the wrong size")
    return [_CHK.unpack_from(b, i) for i in range(0, len(b), CHUNK_SIZE)]


def differing_supers(old: ChunkList, new_supers: Sequence[Super]) -> List[int]:
    """Indices of new super-chunks the old copy does not hold whole."""
    have = {s.digest for s in supers_of(old)}
    return [i for i, s in enumerate(new_supers) if s.digest not in have]


def plan_two_level(old: ChunkList, new_supers: Sequence[Super], file_size: int,
                   fetched_chunks: Dict[int, List[Tuple[int, bytes]]]) -> List[Op]:
    """Ops rebuilding the new file: whole super-chunks copied from the old copy where it has
    them, and for the differing ones (``fetched_chunks[i]`` = their chunk entries) chunk by
    chunk: copy when the old copy has that chunk, else fetch."""
    old_sup = {}
    old_offs = old.offsets()
    for s in supers_of(old):
        old_sup.setdefault(s.digest, (s.offset, sum(old.lengths[s.first:s.first + s.count])))
    chunk_at: Dict[Tuple[bytes, int], int] = {}
    digs = old.digests
    for i, (ln, off) in enumerate(zip(old.lengths, old_offs)):
        chunk_at.setdefault((digs[i * 8:i * 8 + 8], ln), off)
    ops: List[Op] = []

    def add(kind: str, new_off: int, ln: int, old_off: int) -> None:
        if ops and ops[-1].kind == kind and ops[-1].new_offset + ops[-1].length == new_off and \
                (kind == "fetch" or ops[-1].old_offset + ops[-1].length == old_off):
            last = ops[-1]
            ops[-1] = Op(kind, last.new_offset, last.length + ln, last.old_offset)
        else:
            ops.append(Op(kind, new_off, ln, old_off if kind == "copy" else -1))

    pos = 0
    for i, s in enumerate(new_supers):
        if s.offset != pos:
            raise ChunkListFormatError("super-chunk offsets are not contiguous")
        if i in fetched_chunks:
            entries = fetched_chunks[i]
            if len(entries) != s.count:
                raise ChunkListFormatError("chunk entries do not match their super-chunk")
            for ln, d in entries:
                src = chunk_at.get((d, ln))
                add("fetch" if src is None else "copy", pos, ln, -1 if src is None else src)
                pos += ln
        else:
            hit = old_sup.get(s.digest)
            if hit is None:
                raise ChunkListFormatError("a super-chunk was neither fetched nor found in the old copy")
            add("copy", pos, hit[1], hit[0])
            pos += hit[1]
    if pos != file_size:
        raise ChunkListFormatError(f"chunk index covers {pos} bytes, the file has {file_size}")
    return ops

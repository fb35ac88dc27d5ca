"""Two-level block signatures of a file and their comparison.

Role: the source signs a file (fine 64-bit digests per ``block_size`` block,
plus one 128-bit coarse digest per ``factor`` fine blocks); the replica
compares with the signature of its old copy, first coarse, then only the fine
digests inside differing coarse blocks, and fetches only changed blocks.

Digests:

* fine digest of a block = ``xxh3_64_intdigest(block)`` packed little-endian
  (8 bytes); a short last block is hashed as is.
* coarse digest of coarse block ``i`` = ``xxh3_128_digest`` of the concatenated
  fine digests of fine blocks ``i*factor .. i*factor+factor-1`` (so coarse
  digests derive from stored fine digests without rereading data).

Serialized form (little-endian): a fixed ``HEADER_SIZE`` header
(``b"DRSG"``, u8 version, u32 block_size, u32 factor, u64 file_size,
u64 n_blocks, u64 n_coarse), then all coarse digests, then all fine digests.
``SigHeader.coarse_range`` / ``fine_range`` give byte ranges for partial preads.

Threading: everything here is pure or works on caller-owned fds with
``pread`` only (plus ``data_extents``' offset-restoring probe); signing
different files from several threads is safe.  ``Signature`` and
``SigHeader`` are immutable values.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import ClassVar, Iterable, List, Optional, Tuple, Union

import xxhash

from .errors import ShortReadError, SignatureFormatError
from .sparse import data_extents

log = logging.getLogger(__name__)

__all__ = [
    "FINE_SIZE", "COARSE_FACTOR", "FINE_DIGEST", "COARSE_DIGEST", "MAGIC", "VERSION",
    "HEADER_SIZE", "READ_SPAN", "Signature", "SigHeader",
    "fine_digests", "coarse_digests", "zero_block_digest",
    "sign_fd", "sign_bytes", "sign_path",
    "changed_blocks", "differing_coarse", "differing_fine", "blocks_to_ranges",
]

FINE_SIZE = 4096
COARSE_FACTOR = 256
FINE_DIGEST = 8
COARSE_DIGEST = 16
MAGIC = b"DRSG"
VERSION = 1
#: bytes read per pread while signing
READ_SPAN = 8 << 20
#: sanity limit for block_size / factor found in serialized headers
_MAX_BLOCK_SIZE = 1 << 30
_MAX_FACTOR = 1 << 24

_HEADER = struct.Struct("<4sBIIQQQ")
HEADER_SIZE = _HEADER.size  # 37

_h64 = xxhash.xxh3_64_intdigest
_Q = struct.Struct("<Q")
_QQ = struct.Struct("<QQ")
_h128 = xxhash.xxh3_128_digest

Buffer = Union[bytes, bytearray, memoryview]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_geometry(block_size: int, factor: int, exc: type = ValueError) -> None:
    if not (1 <= block_size <= _MAX_BLOCK_SIZE):
        raise exc(f"block_size {block_size} out of range [1, {_MAX_BLOCK_SIZE}]")
    if not (1 <= factor <= _MAX_FACTOR):
        raise exc(f"factor {factor} out of range [1, {_MAX_FACTOR}]")


# ---------------------------------------------------------------- digests


def fine_digests(buf: Buffer, block_size: int = FINE_SIZE) -> bytes:
    """Fine digests (8 bytes each) of consecutive ``block_size`` blocks of ``buf``."""
    if type(buf) is bytes and 0 < len(buf) <= 2 * block_size:   # one or two blocks: the common small file
        if len(buf) <= block_size:
            return _Q.pack(_h64(buf))
        mv = memoryview(buf)
        return _QQ.pack(_h64(mv[:block_size]), _h64(mv[block_size:]))
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n == 0:
        return b""
    ints = [_h64(mv[i:i + block_size]) for i in range(0, n, block_size)]
    return struct.pack(f"<{len(ints)}Q", *ints)


def coarse_digests(fine: Buffer, factor: int = COARSE_FACTOR) -> bytes:
    """Coarse digests (16 bytes each) derived from concatenated fine digests."""
    mv = memoryview(fine).cast("B")
    if len(mv) % FINE_DIGEST:
        raise ValueError(f"fine digest buffer length {len(mv)} is not a multiple of {FINE_DIGEST}")
    step = factor * FINE_DIGEST
    return b"".join([_h128(mv[i:i + step]) for i in range(0, len(mv), step)])


_zero_cache: dict = {}


def zero_block_digest(block_size: int = FINE_SIZE) -> bytes:
    """Fine digest of a block of ``block_size`` zero bytes (what holes hash to)."""
    d = _zero_cache.get(block_size)
    if d is None:
        d = struct.pack("<Q", _h64(bytes(block_size)))
        _zero_cache[block_size] = d
    return d


# ---------------------------------------------------------------- header


@dataclass(frozen=True)
class SigHeader:
    """Parsed fixed-size header of a serialized signature."""

    block_size: int
    factor: int
    file_size: int
    n_blocks: int
    n_coarse: int
    version: int = VERSION

    HEADER_SIZE: ClassVar[int] = HEADER_SIZE

    @classmethod
    def from_bytes(cls, b: Buffer) -> "SigHeader":
        """Parse and validate the header at the start of ``b`` (extra bytes ignored)."""
        mv = memoryview(b).cast("B")
        if len(mv) < HEADER_SIZE:
            raise SignatureFormatError(f"signature header truncated: {len(mv)} < {HEADER_SIZE} bytes")
        magic, version, block_size, factor, file_size, n_blocks, n_coarse = _HEADER.unpack_from(mv, 0)
        if magic != MAGIC:
            raise SignatureFormatError(f"bad signature magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise SignatureFormatError(f"unsupported signature version {version} (know {VERSION})")
        _check_geometry(block_size, factor, SignatureFormatError)
        if n_blocks != _ceil_div(file_size, block_size):
            raise SignatureFormatError(
                f"signature n_blocks {n_blocks} inconsistent with file_size {file_size} "
                f"and block_size {block_size}")
        if n_coarse != _ceil_div(n_blocks, factor):
            raise SignatureFormatError(
                f"signature n_coarse {n_coarse} inconsistent with n_blocks {n_blocks} and factor {factor}")
        return cls(block_size, factor, file_size, n_blocks, n_coarse, version)

    def to_bytes(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.block_size, self.factor,
                            self.file_size, self.n_blocks, self.n_coarse)

    @property
    def total_size(self) -> int:
        """Length of the whole serialized signature."""
        return HEADER_SIZE + self.n_coarse * COARSE_DIGEST + self.n_blocks * FINE_DIGEST

    def coarse_range(self) -> Tuple[int, int]:
        """``(offset, length)`` of all coarse digests in the serialized form."""
        return HEADER_SIZE, self.n_coarse * COARSE_DIGEST

    def fine_range(self, coarse_index: int) -> Tuple[int, int]:
        """``(offset, length)`` of the fine digests of one coarse block (last may be short)."""
        if not (0 <= coarse_index < self.n_coarse):
            raise IndexError(f"coarse index {coarse_index} out of range [0, {self.n_coarse})")
        first = coarse_index * self.factor
        count = min(self.factor, self.n_blocks - first)
        base = HEADER_SIZE + self.n_coarse * COARSE_DIGEST
        return base + first * FINE_DIGEST, count * FINE_DIGEST


# ---------------------------------------------------------------- signature


@dataclass(frozen=True)
class Signature:
    """Fine + coarse digests of one file's content."""

    file_size: int
    block_size: int
    factor: int
    fine: bytes
    coarse: bytes

    def __post_init__(self) -> None:
        _check_geometry(self.block_size, self.factor, SignatureFormatError)
        n = _ceil_div(self.file_size, self.block_size)
        if self.file_size < 0 or len(self.fine) != n * FINE_DIGEST:
            raise SignatureFormatError(
                f"fine digests length {len(self.fine)} != {n} blocks * {FINE_DIGEST} "
                f"for file_size {self.file_size}")
        if len(self.coarse) != _ceil_div(n, self.factor) * COARSE_DIGEST:
            raise SignatureFormatError(
                f"coarse digests length {len(self.coarse)} inconsistent with {n} blocks, "
                f"factor {self.factor}")

    @property
    def n_blocks(self) -> int:
        return len(self.fine) // FINE_DIGEST

    @property
    def n_coarse(self) -> int:
        return len(self.coarse) // COARSE_DIGEST

    def header(self) -> SigHeader:
        return SigHeader(self.block_size, self.factor, self.file_size, self.n_blocks, self.n_coarse)

    def to_bytes(self) -> bytes:
        return b"".join((self.header().to_bytes(), self.coarse, self.fine))

    @classmethod
    def from_bytes(cls, b: Buffer) -> "Signature":
        """Parse a whole serialized signature; checks lengths and that coarse matches fine."""
        mv = memoryview(b).cast("B")
        hdr = SigHeader.from_bytes(mv)
        if len(mv) != hdr.total_size:
            raise SignatureFormatError(
                f"signature length {len(mv)} != {hdr.total_size} expected from its header")
        c_off, c_len = hdr.coarse_range()
        coarse = bytes(mv[c_off:c_off + c_len])
        fine = bytes(mv[c_off + c_len:])
        if coarse_digests(fine, hdr.factor) != coarse:
            raise SignatureFormatError("signature coarse digests do not match its fine digests (corrupt)")
        return cls(hdr.file_size, hdr.block_size, hdr.factor, fine, coarse)

    def whole_digest(self) -> bytes:
        """xxh3_128 of the fine digests: a cheap identity of the content."""
        return _h128(self.fine)

    def fine_digest(self, index: int) -> bytes:
        return self.fine[index * FINE_DIGEST:(index + 1) * FINE_DIGEST]


def _make(file_size: int, block_size: int, factor: int, fine: bytes) -> Signature:
    return Signature(file_size, block_size, factor, fine, coarse_digests(fine, factor))


# ---------------------------------------------------------------- signing


def sign_bytes(data: Buffer, block_size: int = FINE_SIZE, factor: int = COARSE_FACTOR) -> Signature:
    """Signature of an in-memory buffer."""
    _check_geometry(block_size, factor)
    mv = memoryview(data).cast("B")
    return _make(len(mv), block_size, factor, fine_digests(mv, block_size))


def sign_small(data: Buffer) -> Tuple[bytes, bytes]:
    """(whole digest, serialized signature) of a buffer of at most one coarse block, without
    building a Signature: ``sign_bytes(data)`` gives the same bytes (the replica signs every
    small file it writes; this is its fast path)."""
    n_bytes = len(data)
    if n_bytes > FINE_SIZE * COARSE_FACTOR:
        sig = sign_bytes(data)
        return sig.whole_digest(), sig.to_bytes()
    fine = fine_digests(data, FINE_SIZE)
    n = len(fine) // FINE_DIGEST
    whole = _h128(fine)
    coarse = whole if n else b""
    return whole, b"".join((_HEADER.pack(MAGIC, VERSION, FINE_SIZE, COARSE_FACTOR, n_bytes, n, 1 if n else 0),
                            coarse, fine))


def _read_exact_into(fd: int, mv: memoryview, offset: int) -> None:
    got = 0
    n = len(mv)
    while got < n:
        r = os.preadv(fd, [mv[got:]], offset + got)
        if r == 0:
            raise ShortReadError(
                f"fd {fd}: unexpected end of file at offset {offset + got} (expected {n - got} more bytes)")
        got += r


def _hash_span(fd: int, offset: int, length: int, block_size: int, buf: bytearray) -> List[bytes]:
    """Fine digests of ``[offset, offset+length)`` read in ``len(buf)``-sized preads."""
    mv = memoryview(buf)
    span = len(buf)
    out: List[bytes] = []
    end = offset + length
    pos = offset
    while pos < end:
        n = min(span, end - pos)
        view = mv[:n]
        _read_exact_into(fd, view, pos)
        ints = [_h64(view[i:i + block_size]) for i in range(0, n, block_size)]
        out.append(struct.pack(f"<{len(ints)}Q", *ints))
        pos += n
    return out


def _block_spans(extents: Iterable[Tuple[int, int]], block_size: int, n_blocks: int) -> List[Tuple[int, int]]:
    """Data extents -> merged ``[first_block, end_block)`` spans that must be read."""
    spans: List[Tuple[int, int]] = []
    for off, ln in extents:
        if ln <= 0:
            continue
        b0 = off // block_size
        b1 = min(_ceil_div(off + ln, block_size), n_blocks)
        if b0 >= b1:
            continue
        if spans and b0 <= spans[-1][1]:
            if b1 > spans[-1][1]:
                spans[-1] = (spans[-1][0], b1)
        else:
            spans.append((b0, b1))
    return spans


def sign_fd(fd: int, size: Optional[int] = None, block_size: int = FINE_SIZE,
            factor: int = COARSE_FACTOR, *, skip_holes: bool = True) -> Signature:
    """Sign the first ``size`` bytes (default: fstat size) of an open fd.

    Reads with ``os.preadv`` in ``READ_SPAN`` spans.  With ``skip_holes``, blocks
    lying entirely inside holes (per SEEK_DATA/SEEK_HOLE) get the zero-block
    digest without being read.  Raises ``ShortReadError`` if the file is
    shorter than ``size``.
    """
    _check_geometry(block_size, factor)
    if size is None:
        size = os.fstat(fd).st_size
    if size < 0:
        raise ValueError(f"negative size {size}")
    n_blocks = _ceil_div(size, block_size)
    if n_blocks == 0:
        return _make(0, block_size, factor, b"")
    extents = data_extents(fd, size) if skip_holes else [(0, size)]
    spans = _block_spans(extents, block_size, n_blocks)
    span_bytes = max(block_size, (READ_SPAN // block_size) * block_size)
    buf = bytearray(min(span_bytes, n_blocks * block_size))
    zero = zero_block_digest(block_size)
    parts: List[bytes] = []
    cur = 0
    read_blocks = 0
    for b0, b1 in spans:
        if b0 > cur:
            parts.append(zero * (b0 - cur))
        start = b0 * block_size
        parts.extend(_hash_span(fd, start, min(b1 * block_size, size) - start, block_size, buf))
        read_blocks += b1 - b0
        cur = b1
    if cur < n_blocks:  # trailing hole; the last block may be short
        tail = size - (n_blocks - 1) * block_size
        if tail == block_size:
            parts.append(zero * (n_blocks - cur))
        else:
            parts.append(zero * (n_blocks - 1 - cur))
            parts.append(zero_block_digest(tail))
    if read_blocks < n_blocks:
        log.debug("sign_fd fd=%d size=%d: skipped %d hole blocks of %d",
                  fd, size, n_blocks - read_blocks, n_blocks)
    return _make(size, block_size, factor, b"".join(parts))


def sign_path(path: Union[str, bytes, os.PathLike], size: Optional[int] = None,
              block_size: int = FINE_SIZE, factor: int = COARSE_FACTOR, *,
              skip_holes: bool = True) -> Signature:
    """Open ``path`` read-only and ``sign_fd`` it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return sign_fd(fd, size, block_size, factor, skip_holes=skip_holes)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- comparison


def _differ_in(old_fine: bytes, new_fine: Buffer, first: int, count: int) -> List[int]:
    """Absolute indices ``first..first+count-1`` whose digests differ between the two."""
    o = old_fine
    n = bytes(new_fine)
    n_old = len(o) // FINE_DIGEST
    D = FINE_DIGEST
    out: List[int] = []
    a0 = first * D
    common = max(0, min(count, n_old - first))
    if common and o[a0:a0 + common * D] != n[a0:a0 + common * D]:
        out = [first + k for k in range(common)
               if o[a0 + k * D:a0 + (k + 1) * D] != n[a0 + k * D:a0 + (k + 1) * D]]
    out.extend(range(first + common, first + count))
    return out


def changed_blocks(old: Optional[Signature], new: Signature) -> List[int]:
    """Fine indices of ``new`` whose content differs from ``old`` (sorted).

    Coarse digests are compared first; fine digests only inside differing
    coarse blocks.  ``old is None`` or a different block size means every
    block; blocks beyond ``old``'s length always differ.
    """
    if old is None or old.block_size != new.block_size:
        return list(range(new.n_blocks))
    if old.factor != new.factor:  # coarse not comparable: fine only
        return _differ_in(old.fine, new.fine, 0, new.n_blocks)
    out: List[int] = []
    for ci in differing_coarse(old, new.header(), new.coarse):
        first = ci * new.factor
        count = min(new.factor, new.n_blocks - first)
        out.extend(_differ_in(old.fine, new.fine, first, count))
    return out


def differing_coarse(old: Optional[Signature], header: SigHeader, coarse: Buffer) -> List[int]:
    """Indices of the coarse blocks of the new signature that differ from ``old``.

    ``coarse`` is the bytes at ``header.coarse_range()`` of the new serialized
    signature.
    """
    mv = bytes(coarse)
    if len(mv) != header.n_coarse * COARSE_DIGEST:
        raise SignatureFormatError(
            f"coarse digests length {len(mv)} != {header.n_coarse} * {COARSE_DIGEST} from header")
    if old is None or old.block_size != header.block_size or old.factor != header.factor:
        return list(range(header.n_coarse))
    if old.n_coarse == header.n_coarse and old.coarse == mv:
        return []
    o = old.coarse
    C = COARSE_DIGEST
    common = min(old.n_coarse, header.n_coarse)
    out = [i for i in range(common) if o[i * C:(i + 1) * C] != mv[i * C:(i + 1) * C]]
    out.extend(range(common, header.n_coarse))
    return out


def differing_fine(old: Optional[Signature], header: SigHeader, coarse_index: int,
                   fine_slice: Buffer) -> List[int]:
    """Absolute fine indices inside ``coarse_index`` that differ from ``old``.

    ``fine_slice`` is the bytes at ``header.fine_range(coarse_index)``.
    """
    _, length = header.fine_range(coarse_index)
    mv = bytes(fine_slice)
    if len(mv) != length:
        raise SignatureFormatError(
            f"fine digests slice for coarse block {coarse_index} has {len(mv)} bytes, expected {length}")
    first = coarse_index * header.factor
    count = length // FINE_DIGEST
    if old is None or old.block_size != header.block_size:
        return list(range(first, first + count))
    # Align the slice to absolute positions by comparing against old's window.
    o = old.fine
    D = FINE_DIGEST
    n_old = len(o) // D
    common = max(0, min(count, n_old - first))
    a0 = first * D
    out: List[int] = []
    if common and o[a0:a0 + common * D] != mv[:common * D]:
        out = [first + k for k in range(common) if o[a0 + k * D:a0 + (k + 1) * D] != mv[k * D:(k + 1) * D]]
    out.extend(range(first + common, first + count))
    return out


def blocks_to_ranges(indices: Iterable[int], block_size: int, file_size: int,
                     max_gap_blocks: int = 0) -> List[Tuple[int, int]]:
    """Merge block indices into ``(offset, length)`` byte ranges clipped to ``file_size``.

    Blocks separated by at most ``max_gap_blocks`` unchanged blocks are merged
    into one range (fewer, larger reads).  Blocks starting at or past
    ``file_size`` are dropped.
    """
    if block_size <= 0:
        raise ValueError(f"block_size {block_size} must be positive")
    if max_gap_blocks < 0:
        raise ValueError(f"max_gap_blocks {max_gap_blocks} must be >= 0")
    n_blocks = _ceil_div(file_size, block_size)
    ranges: List[Tuple[int, int]] = []
    start = end = -1  # current run [start, end) in blocks
    for i in sorted(set(indices)):
        if i < 0:
            raise ValueError(f"negative block index {i}")
        if i >= n_blocks:
            break
        if start >= 0 and i - end <= max_gap_blocks:
            end = i + 1
            continue
        if start >= 0:
            ranges.append((start * block_size, min(end * block_size, file_size) - start * block_size))
        start, end = i, i + 1
    if start >= 0:
        ranges.append((start * block_size, min(end * block_size, file_size) - start * block_size))
    return ranges

"""Changed-block tracking on the source: which ranges of a file may differ from the base cycle.

When the base cycle's snapshot still holds the file (btrfs: every file of the
kept read-only snapshot; reflink: files captured by that cycle), FIEMAP shows
the extents both versions still share (reflink/snapshot CoW: shared = never
written since).  Ranges that are shared, or a hole in both, are unchanged
without being read.  ``candidates`` returns the rest, block aligned; the
export then hashes only those blocks (``.discrep/cbt/<idx>``), and the replica,
whose copy is the base cycle's content, compares just them.

Serialized (little-endian): ``b"DRCB"``, u8 version, u64 base_cycle,
u64 file_size, u32 block_size, u32 n_ranges, then n_ranges (u64 offset,
u64 length), then one 8-byte fine digest per block of those ranges, in order.

Threading: pure functions; fds are opened and closed per call.
"""
from __future__ import annotations

import os
import struct
from typing import List, Optional, Tuple

import blockdiff

from discrep.core import platform
from discrep.core.errors import ManifestError

MAGIC = b"DRCB"
_HDR = struct.Struct("<4sBQQII")
_RNG = struct.Struct("<QQ")
Range = Tuple[int, int]


def _merge(rs: List[Range]) -> List[Range]:
    out: List[Range] = []
    for o, ln in sorted(rs):
        if ln <= 0:
            continue
        if out and o <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], o + ln) - out[-1][0])
        else:
            out.append((o, ln))
    return out


def _complement(rs: List[Range], size: int) -> List[Range]:
    out, pos = [], 0
    for o, ln in _merge(rs):
        if o > pos:
            out.append((pos, o - pos))
        pos = max(pos, o + ln)
    if pos < size:
        out.append((pos, size - pos))
    return out


def _intersect(a: List[Range], b: List[Range]) -> List[Range]:
    out, i, j = [], 0, 0
    a, b = _merge(a), _merge(b)
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo))
        if a[i][0] + a[i][1] <= b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def candidates(old_path: bytes, new_path: bytes, bs: int = blockdiff.FINE_SIZE) -> Optional[List[Range]]:
    """Block-aligned ranges of the new file that may differ from the old one; None if unprovable."""
    try:
        ofd = os.open(old_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        nfd = os.open(new_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            osz, nsz = os.fstat(ofd).st_size, os.fstat(nfd).st_size
            try:
                shared = platform.shared_ranges(ofd, nfd)
            except (platform.NotSupported, OSError):
                return None
            holes = _intersect(_complement(blockdiff.data_extents(ofd, osz), osz),
                               _complement(blockdiff.data_extents(nfd, nsz), nsz))
        finally:
            os.close(nfd)
    finally:
        os.close(ofd)
    same = _merge(shared + holes)
    # the block holding the old end, and everything past it, always counts as changed when sizes differ
    if osz != nsz:
        cut = (min(osz, nsz) // bs) * bs
        same = _intersect(same, [(0, cut)])
    out = []
    for o, ln in _complement(same, nsz):
        a, z = (o // bs) * bs, min(-(-(o + ln) // bs) * bs, nsz)
        out.append((a, z - a))
    return _merge(out)


def build(path: bytes, base: int, ranges: List[Range], bs: int = blockdiff.FINE_SIZE) -> bytes:
    """The cbt answer: header, ranges, and fine digests of their blocks (holes hashed without reading)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = _merge(blockdiff.data_extents(fd, size))
        zero = blockdiff.zero_block_digest(bs)
        digs = []
        for o, ln in ranges:
            pos = o
            for d_o, d_ln in _intersect([(o, ln)], data):
                a = max((d_o // bs) * bs, pos)
                if a > pos:
                    digs.append(zero * ((a - pos) // bs))
                z = min(-(-(d_o + d_ln) // bs) * bs, o + ln)
                digs.append(blockdiff.fine_digests(os.pread(fd, z - a, a), bs))
                pos = z
            if pos < o + ln:
                digs.append(zero * (-(-(o + ln - pos) // bs)))
    finally:
        os.close(fd)
    body = b"".join(digs)
    return _HDR.pack(MAGIC, 1, base, size, bs, len(ranges)) + b"".join(_RNG.pack(o, ln) for o, ln in ranges) + body


def parse(b: bytes) -> Tuple[int, int, int, List[Range], bytes]:
    """(base, size, block_size, ranges, digests); strict."""
    if len(b) < _HDR.size:
        raise ManifestError("changed-block answer is short")
    magic, ver, base, size, bs, n = _HDR.unpack_from(b, 0)
    if magic != MAGIC or ver != 1 or bs <= 0:
        raise ManifestError("not a changed-block answer")
    pos = _HDR.size
    rs = [_RNG.unpack_from(b, pos + i * _RNG.size) for i in range(n)]
    pos += n * _RNG.size
    nblocks = sum(-(-ln // bs) for _o, ln in rs)
    digs = b[pos:]
    if len(digs) != nblocks * 8 or any(o % bs or o + ln > size for o, ln in rs):
        raise ManifestError("changed-block answer is inconsistent")
    return base, size, bs, rs, digs

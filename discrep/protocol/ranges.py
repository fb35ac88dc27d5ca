"""Batched range requests encoded in a file name: ``.discrep/z/<idx>.<token>``.

The replica cannot write to the read-only export, so a request travels in the
name it looks up: ``token`` is the base64url (no padding) of varints
``(gap_blocks, length_blocks)*`` in units of ``BLOCK`` (4 KiB), each gap counted
from the end of the previous range.  The export answers with one
``blockdiff.framing`` frame (zstd where it shrinks) of the ranges' bytes
concatenated (the last range clipped to the file size).  One lookup + one read
fetches up to ``MAX_RANGES`` ranges: no round trip per block, and compressible
data crosses the wire compressed.

Threading: pure functions.
"""
from __future__ import annotations

import base64
from typing import List, Tuple

from discrep.core.errors import ManifestError

BLOCK = 4096
MAX_RANGES = 48          # keeps the name well under NAME_MAX (255)
MAX_BYTES = 8 << 20      # raw bytes per request
NAME_MAX = 240


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode(ranges: List[Tuple[int, int]]) -> str:
    """Block-aligned (offset, length) ranges -> token.  Lengths round up to whole blocks."""
    buf = bytearray()
    pos = 0
    for off, ln in ranges:
        if off % BLOCK or off < pos or ln <= 0:
            raise ValueError(f"range ({off}, {ln}) is not block aligned and ascending")
        nb = -(-ln // BLOCK)
        buf += _varint((off - pos) // BLOCK) + _varint(nb)
        pos = off + nb * BLOCK
    return base64.urlsafe_b64encode(bytes(buf)).rstrip(b"=").decode()


def decode(token: str, file_size: int) -> List[Tuple[int, int]]:
    """Token -> ranges clipped to ``file_size``; refuses malformed or oversized requests."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (ValueError, TypeError):
        raise ManifestError("bad range request") from None
    vals, cur, shift = [], 0, 0
    for b in raw:
        cur |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            vals.append(cur)
            cur, shift = 0, 0
        elif shift > 63:
            raise ManifestError("bad range request")
    if shift or not vals or len(vals) % 2 or len(vals) // 2 > MAX_RANGES:
        raise ManifestError("bad range request")
    out, pos, total = [], 0, 0
    for i in range(0, len(vals), 2):
        off = pos + vals[i] * BLOCK
        end = min(off + vals[i + 1] * BLOCK, file_size)
        if vals[i + 1] == 0 or off >= file_size:
            raise ManifestError("range request outside the file")
        out.append((off, end - off))
        total += end - off
        pos = off + vals[i + 1] * BLOCK
    if total > MAX_BYTES + BLOCK * MAX_RANGES:
        raise ManifestError("range request too large")
    return out


def batches(ranges: List[Tuple[int, int]]) -> List[List[Tuple[int, int]]]:
    """Split ranges (ascending, aligned) into requests within the count, size and name limits;
    a range larger than MAX_BYTES is cut into pieces."""
    pieces: List[Tuple[int, int]] = []
    for off, ln in ranges:
        while ln > MAX_BYTES:
            pieces.append((off, MAX_BYTES))
            off, ln = off + MAX_BYTES, ln - MAX_BYTES
        pieces.append((off, ln))
    out: List[List[Tuple[int, int]]] = []
    cur: List[Tuple[int, int]] = []
    size = 0
    for p in pieces:
        if cur and (len(cur) >= MAX_RANGES or size + p[1] > MAX_BYTES or len(encode(cur + [p])) > NAME_MAX):
            out.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p[1]
    if cur:
        out.append(cur)
    return out

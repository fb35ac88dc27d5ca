"""Byte ranges of one file from the export: batched, compressed range requests; holes.

``fetch_ranges`` asks the export for the (aligned, merged) ranges of a file in a few
``protocol.ranges`` batches -- each one file name the export answers with the compressed
bytes -- read in parallel through the reader's pool, and cuts the answers back into the
ranges wanted.  ``split_by_extents`` separates changed ranges of a sparse file into data and
holes; ``LazySig`` is a new file's signature built from digests taken as its data arrived
(its memory grows with the data, never with a declared size); ``windows`` cuts a whole fetch
into bounded pieces.

Thread-safety: pure functions and values; the reads fan out to the reader's pool.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import blockdiff

from discrep.core.errors import ManifestError
from discrep.core.paths import show
from discrep.protocol import layout
from discrep.protocol import ranges as rq
from discrep.protocol.manifest import FRAME_SLACK, Entry, unpack_frame
from discrep.replica.reader import Reader

Range = Tuple[int, int]
GROW_BLOCKS = 1 << 16       # digests added to a LazySig at a time (512 KiB)


def fetch_ranges(reader: Reader, e: Entry, want: List[Range]) -> Dict[int, bytes]:
    """Byte ranges of file ``e``: {offset: bytes} for each wanted (offset, length)."""
    if not want:
        return {}
    groups = rq.batches(_aligned(want, e.size))
    reqs = [(layout.range_request(e.idx, rq.encode(g)), sum(min(ln, e.size - off) for off, ln in g)) for g in groups]
    what = f"the answer to a range request of {show(e.path)}"
    blobs = list(reader.pool.map(
        lambda r: unpack_frame(reader.read_all(r[0], r[1] + FRAME_SLACK), r[1], what), reqs))
    return _cut(e, want, _pieces(e, groups, blobs))


def _aligned(want: List[Range], size: int) -> List[Range]:
    """``want`` widened to whole ``ranges.BLOCK`` blocks (not past ``size``), sorted and merged."""
    bs = rq.BLOCK
    aligned: List[Range] = []
    for off, ln in sorted(want):
        a, z = off - off % bs, min(-(-(off + ln) // bs) * bs, size)
        if aligned and a <= aligned[-1][0] + aligned[-1][1]:
            s0 = aligned[-1][0]
            aligned[-1] = (s0, max(aligned[-1][0] + aligned[-1][1], z) - s0)
        else:
            aligned.append((a, z - a))
    return aligned


def _pieces(e: Entry, groups: Sequence[Sequence[Range]], blobs: List[bytes]) -> List[Tuple[int, bytes]]:
    """(offset, bytes) of every contiguous run of ranges asked for, from each batch's answer: a range
    larger than one batch was cut into pieces (ranges.batches), which are joined again here."""
    runs: List[Tuple[int, int, List[bytes]]] = []     # (offset, length, pieces)
    for g, blob in zip(groups, blobs):
        pos = 0
        for off, ln in g:
            ln = min(ln, e.size - off)
            piece = blob[pos:pos + ln]
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], runs[-1][1] + len(piece), runs[-1][2] + [piece])
            else:
                runs.append((off, len(piece), [piece]))
            pos += ln
        if pos != len(blob):
            raise ManifestError(f"range answer for {show(e.path)} has the wrong size")
    return [(off, b"".join(pieces) if len(pieces) > 1 else pieces[0]) for off, _ln, pieces in runs]


def _cut(e: Entry, want: List[Range], have: List[Tuple[int, bytes]]) -> Dict[int, bytes]:
    out: Dict[int, bytes] = {}
    j = 0
    for off, ln in sorted(want):
        while have[j][0] + len(have[j][1]) <= off:
            j += 1
        a, data = have[j]
        piece = data[off - a:off - a + ln]
        if len(piece) != ln:
            raise ManifestError(f"range answer for {show(e.path)} is short")
        out[off] = piece
    return out


def split_by_extents(ranges: List[Range], extents: List[Range]) -> Tuple[List[Range], List[Range]]:
    """Split changed ranges into (parts inside data extents, parts inside holes)."""
    data: List[Range] = []
    holes: List[Range] = []
    for off, ln in ranges:
        end = off + ln
        pos = off
        for eo, el in extents:
            ee = eo + el
            if ee <= pos or eo >= end:
                continue
            if eo > pos:
                holes.append((pos, eo - pos))
            s, t = max(pos, eo), min(end, ee)
            data.append((s, t - s))
            pos = t
        if pos < end:
            holes.append((pos, end - pos))
    return data, holes


class LazySig:
    """A new file's signature from its fine digests, taken as the data arrived (no reread).

    The digest array is never sized by what the manifest declares: ``reserve(end)`` grows it
    (with the digest of a zero block) just before the data up to ``end`` is asked for, so its
    memory follows the data the source actually sends; ``get`` fills the rest (holes of a
    sparse file, at most ``size`` / 512 bytes: the caller bounds ``size``)."""

    def __init__(self, size: int, fine: Optional[bytearray] = None):
        self.size = size
        self.fine = fine if fine is not None else bytearray()
        self.tail_seen = False              # the last (partial) block arrived as data

    def reserve(self, end: int) -> None:
        """Room for the digests of every block below byte ``end`` (applying thread, between reads)."""
        bs = blockdiff.FINE_SIZE
        want = -(-min(end, self.size) // bs) * 8
        zero = blockdiff.zero_block_digest(bs)
        while len(self.fine) < want:
            self.fine.extend(zero * min((want - len(self.fine)) // 8, GROW_BLOCKS))

    def on_data(self, off: int, data: bytes) -> None:
        """Digests of ``data`` at ``off`` (a multiple of the block size), inside what was reserved."""
        bs = blockdiff.FINE_SIZE
        d = blockdiff.fine_digests(data, bs)
        i = off // bs
        if i * 8 + len(d) > len(self.fine):
            raise ValueError("data arrived beyond the reserved digests")
        self.fine[i * 8:i * 8 + len(d)] = d
        if off + len(data) == self.size:
            self.tail_seen = True

    def get(self) -> "blockdiff.Signature":
        bs = blockdiff.FINE_SIZE
        self.reserve(self.size)
        if self.size % bs and not self.tail_seen:     # a hole at the end: a short zero block
            self.fine[-8:] = blockdiff.zero_block_digest(self.size % bs)
        f = bytes(self.fine)
        return blockdiff.Signature(self.size, bs, blockdiff.COARSE_FACTOR, f,
                                   blockdiff.coarse_digests(f, blockdiff.COARSE_FACTOR))


def windows(ranges: Sequence[Range], limit: int) -> Iterator[List[Range]]:
    """``ranges`` in consecutive groups of at most ``limit`` bytes (a range larger than that is cut):
    a file is copied window by window, so nothing is sized by its declared length up front."""
    group: List[Range] = []
    room = limit
    for off, ln in ranges:
        while ln > 0:
            n = min(ln, room)
            group.append((off, n))
            off, ln, room = off + n, ln - n, room - n
            if room == 0:
                yield group
                group, room = [], limit
    if group:
        yield group

"""Two-level chunk index and batched range requests (tier: unit)."""
from __future__ import annotations

import random

import pytest

import blockdiff
from blockdiff import cdc_index as ci
from discrep.protocol import ranges
from discrep.core.errors import ManifestError

pytestmark = pytest.mark.unit


def rebuild(ops, old: bytes, new: bytes) -> bytes:
    out = bytearray()
    for op in ops:
        out += new[op.new_offset:op.new_offset + op.length] if op.kind == "fetch" \
            else old[op.old_offset:op.old_offset + op.length]
    return bytes(out)


def two_level(old: bytes, new: bytes):
    old_cl, new_cl = blockdiff.chunk_bytes(old), blockdiff.chunk_bytes(new)
    idx = ci.index_bytes(new_cl)
    h = ci.IndexHeader.from_bytes(idx)
    o, ln = h.supers_range()
    sups = ci.parse_supers(h, idx[o:o + ln])
    diff = ci.differing_supers(old_cl, sups)
    got = {}
    for i in diff:
        o2, l2 = h.chunks_range(sups[i].first, sups[i].count)
        got[i] = ci.parse_chunks(idx[o2:o2 + l2])
    return ci.plan_two_level(old_cl, sups, len(new), got), diff, sups


@pytest.mark.parametrize("edit", ["insert_front", "delete_middle", "append", "same"])
def test_two_level_plan_rebuilds_and_fetches_little(edit):
    old = random.Random(11).randbytes(8 << 20)
    new = {"insert_front": b"X" + old, "delete_middle": old[:3 << 20] + old[(3 << 20) + 777:],
           "append": old + b"tail" * 1000, "same": old}[edit]
    ops, diff, sups = two_level(old, new)
    assert rebuild(ops, old, new) == new
    fetched = sum(op.length for op in ops if op.kind == "fetch")
    assert fetched <= 2 * blockdiff.CDC_MAX + 4000
    assert len(diff) <= 2 and (edit != "same" or not diff)


PINNED_COUNTS = [23, 14, 24, 43]
PINNED_FIRST_DIGEST = "016490ed5e2a3b69c0a6a4ec39ed724c"


def test_super_boundaries_known_answer():
    data = random.Random(1234).randbytes(4 << 20)
    sups = ci.supers_of(blockdiff.chunk_bytes(data))
    # pinned: super-chunk layout of a fixed pseudo-random input
    assert [s.count for s in sups][:8] == PINNED_COUNTS
    assert sups[0].digest.hex() == PINNED_FIRST_DIGEST


def test_index_parsing_is_strict():
    idx = ci.index_bytes(blockdiff.chunk_bytes(random.Random(2).randbytes(1 << 20)))
    with pytest.raises(blockdiff.ChunkListFormatError):
        ci.IndexHeader.from_bytes(b"XXXX" + idx[4:])
    h = ci.IndexHeader.from_bytes(idx)
    o, ln = h.supers_range()
    with pytest.raises(blockdiff.ChunkListFormatError):
        ci.parse_supers(h, idx[o:o + ln - 1])


def test_range_token_round_trip_and_limits():
    rs = [(0, 4096), (8192, 100), (1 << 20, 3 * 4096)]
    tok = ranges.encode(rs)
    assert ranges.decode(tok, 10 << 20) == [(0, 4096), (8192, 4096), (1 << 20, 3 * 4096)]
    assert ranges.decode(ranges.encode([(0, 4096), (8192, 4096)]), 8192 + 50) == [(0, 4096), (8192, 50)]
    with pytest.raises(ManifestError):
        ranges.decode(tok, 4096)              # a range beyond the end of the file
    with pytest.raises(ManifestError):
        ranges.decode("!!!", 1 << 20)
    with pytest.raises(ValueError):
        ranges.encode([(1, 10)])


def test_batches_respect_limits():
    rs = [(i * 8192, 4096) for i in range(500)] + [(10 << 30, 20 << 20)]
    groups = ranges.batches(rs)
    flat = [r for g in groups for r in g]
    assert sum(ln for _, ln in flat) == sum(ln for _, ln in rs)
    for g in groups:
        assert len(g) <= ranges.MAX_RANGES
        assert sum(ln for _, ln in g) <= ranges.MAX_BYTES
        assert len(ranges.encode(g)) <= ranges.NAME_MAX

"""Tests of blockdiff.cdc (content-defined chunking and copy/fetch plans)."""
from __future__ import annotations

import os
import random
import struct

import pytest
import xxhash

from blockdiff.cdc import (CDC_AVG, CDC_MAX, CDC_MIN, ChunkList, Op, chunk_bytes, chunk_fd, fetch_ranges,
                           plan)
from blockdiff.errors import BlockdiffError, ChunkListFormatError

KAT_LENGTHS = [
    26146, 43913, 50518, 40985, 25042, 60563, 39150, 46484, 11267, 34290, 38887, 33808, 23692,
    34750, 16908, 55583, 67739, 44121, 71314, 56384, 30724, 37690, 40889, 54561, 50623, 12545,
]


def _kat_buf() -> bytes:
    return random.Random(1234).randbytes(1 << 20)


@pytest.mark.unit
def test_known_answer_chunk_lengths():
    buf = _kat_buf()
    cl = chunk_bytes(buf)
    assert list(cl.lengths) == KAT_LENGTHS
    assert cl.total == len(buf)
    # digests are xxh3_64 LE of each chunk's data, computed independently here
    offs = [0]
    for ln in KAT_LENGTHS[:-1]:
        offs.append(offs[-1] + ln)
    assert list(cl.offsets()) == offs
    assert cl.digests == b"".join(
        xxhash.xxh3_64_intdigest(buf[o:o + ln]).to_bytes(8, "little") for o, ln in zip(offs, KAT_LENGTHS))


@pytest.mark.unit
def test_boundaries_match_pure_python_fastcdc():
    """The pure-Python reference FastCDC of pyfastcdc cuts at the same places."""
    from pyfastcdc.py.fastcdc import FastCDC as PyFastCDC

    buf = _kat_buf()[:300_000]
    ref = [c.length for c in PyFastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX).cut_buf(buf)]
    assert list(chunk_bytes(buf).lengths) == ref


@pytest.mark.unit
def test_chunk_sizes_respect_limits():
    buf = random.Random(3).randbytes(3 << 20)
    cl = chunk_bytes(buf)
    assert all(CDC_MIN <= ln <= CDC_MAX for ln in cl.lengths[:-1])
    assert 1 <= cl.lengths[-1] <= CDC_MAX
    zeros = chunk_bytes(bytes(1 << 20))  # no cut points: all max-size chunks
    assert set(zeros.lengths[:-1]) == {CDC_MAX}
    assert chunk_bytes(b"").lengths == ()
    assert chunk_bytes(b"abc").lengths == (3,)


@pytest.mark.unit
def test_serialization_round_trip_and_layout():
    cl = chunk_bytes(_kat_buf())
    blob = cl.to_bytes()
    n = len(KAT_LENGTHS)
    assert blob[:4] == b"DRCD" and blob[4] == 1
    assert struct.unpack_from("<IIIQ", blob, 5) == (CDC_MIN, CDC_AVG, CDC_MAX, n)
    assert list(struct.unpack_from(f"<{n}I", blob, 25)) == KAT_LENGTHS
    assert blob[25 + 4 * n:] == cl.digests
    assert ChunkList.from_bytes(blob) == cl
    empty = ChunkList((), b"")
    assert ChunkList.from_bytes(empty.to_bytes()) == empty


@pytest.mark.unit
def test_from_bytes_is_strict():
    good = chunk_bytes(_kat_buf()).to_bytes()
    n = len(KAT_LENGTHS)
    bad = {
        "empty": b"",
        "short": good[:10],
        "magic": b"DRSG" + good[4:],
        "version": good[:4] + b"\x07" + good[5:],
        "min>avg": good[:5] + struct.pack("<III", 65536, 32768, 131072) + good[17:],
        "count too big": good[:17] + struct.pack("<Q", n + 1) + good[25:],
        "truncated": good[:-1],
        "trailing": good + b"\0",
        "zero length chunk": good[:25] + struct.pack("<I", 0) + good[29:],
        "chunk > max": good[:25] + struct.pack("<I", CDC_MAX + 1) + good[29:],
    }
    for name, b in bad.items():
        with pytest.raises(ChunkListFormatError):
            ChunkList.from_bytes(b)
            pytest.fail(f"accepted corrupt chunk list: {name}")
    assert issubclass(ChunkListFormatError, BlockdiffError)
    with pytest.raises(ChunkListFormatError):
        ChunkList((1, 2), b"\0" * 8)


@pytest.mark.unit
def test_insertion_at_front_changes_few_chunks():
    old = random.Random(42).randbytes(4 << 20)
    new = b"inserted-bytes-" * 7 + old
    a, b = chunk_bytes(old), chunk_bytes(new)
    old_keys = {(a.digests[j * 8:j * 8 + 8], ln) for j, ln in enumerate(a.lengths)}
    new_only = [i for i, ln in enumerate(b.lengths) if (b.digests[i * 8:i * 8 + 8], ln) not in old_keys]
    assert len(b.lengths) > 50
    assert 1 <= len(new_only) <= 2, new_only
    ops = plan(a, b)
    fetched = sum(op.length for op in ops if op.kind == "fetch")
    assert fetched <= 2 * CDC_MAX
    assert sum(op.length for op in ops) == len(new)


@pytest.mark.unit
def test_plan_ops_and_merging():
    old = random.Random(11).randbytes(2 << 20)
    a = chunk_bytes(old)
    # identical: one merged copy op
    assert plan(a, a) == [Op("copy", 0, len(old), 0)]
    # nothing in common: one merged fetch op
    other = chunk_bytes(random.Random(12).randbytes(1 << 20))
    assert plan(a, other) == [Op("fetch", 0, 1 << 20, -1)]
    # middle replaced: copy, fetch, copy with correct offsets
    new = old[:500_000] + os.urandom(100_000) + old[600_000:]
    ops = plan(a, chunk_bytes(new))
    kinds = [op.kind for op in ops]
    assert kinds == ["copy", "fetch", "copy"]
    pos = 0
    for op in ops:
        assert op.new_offset == pos
        if op.kind == "copy":
            assert old[op.old_offset:op.old_offset + op.length] == new[pos:pos + op.length]
        pos += op.length
    assert pos == len(new)
    assert fetch_ranges(ops) == [(ops[1].new_offset, ops[1].length)]


@pytest.mark.unit
def test_plan_copies_reordered_chunks():
    a_part = random.Random(21).randbytes(600_000)
    b_part = random.Random(22).randbytes(600_000)
    old = a_part + b_part
    new = b_part + a_part
    ops = plan(chunk_bytes(old), chunk_bytes(new))
    fetched = sum(op.length for op in ops if op.kind == "fetch")
    assert fetched <= 4 * CDC_MAX  # only chunks around the two seams
    for op in ops:
        if op.kind == "copy":
            src = old[op.old_offset:op.old_offset + op.length]
            assert src == new[op.new_offset:op.new_offset + op.length]


@pytest.mark.fs
@pytest.mark.parametrize("size", [0, 100, 2 * CDC_MAX - 1, 3 * CDC_MAX + 7, (5 << 20) + 12345])
@pytest.mark.parametrize("read_size", [2 * CDC_MAX, 2 * CDC_MAX + 4097, 1 << 20])
def test_chunk_fd_streaming_equals_whole_buffer(tmp_path, size, read_size):
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        streamed = chunk_fd(fd, read_size=read_size)
    finally:
        os.close(fd)
    assert streamed == chunk_bytes(data)


@pytest.mark.fs
def test_chunk_fd_low_entropy_and_size_limit(tmp_path):
    # long zero runs give max-size cuts exactly at buffer-relevant distances
    data = bytes(700_000) + random.Random(1).randbytes(500_000) + bytes(300_001)
    p = tmp_path / "z"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert chunk_fd(fd, read_size=2 * CDC_MAX) == chunk_bytes(data)
        assert chunk_fd(fd, 400_000, read_size=2 * CDC_MAX) == chunk_bytes(data[:400_000])
    finally:
        os.close(fd)

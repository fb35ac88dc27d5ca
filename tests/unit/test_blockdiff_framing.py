"""Tests of blockdiff.framing (one-byte-flag zstd frames)."""
from __future__ import annotations

import os

import pyzstd
import pytest

from blockdiff.errors import BlockdiffError, FrameError
from blockdiff.framing import pack, pack_stream, unpack, unpack_stream


@pytest.mark.unit
def test_compressible_data_is_zstd_framed():
    data = b"hello world " * 1000
    f = pack(data)
    assert f[0] == 1
    assert len(f) < len(data) // 10
    assert pyzstd.decompress(f[1:]) == data  # payload is plain zstd
    assert unpack(f) == data


@pytest.mark.unit
def test_incompressible_and_small_data_are_raw():
    rnd = os.urandom(10_000)
    assert pack(rnd) == b"\x00" + rnd
    small = b"a" * 63  # compressible but below the 64-byte threshold
    assert pack(small) == b"\x00" + small
    assert pack(b"") == b"\x00"
    assert unpack(b"\x00") == b""
    assert pack(b"a" * 64)[0] == 1


@pytest.mark.unit
@pytest.mark.parametrize("data", [b"", b"x", b"ab" * 40, bytes(1 << 20), os.urandom(5000)])
@pytest.mark.parametrize("level", [1, 3, 19])
def test_round_trip(data, level):
    assert unpack(pack(data, level)) == data
    assert unpack(pack(memoryview(bytearray(data)), level)) == data


@pytest.mark.unit
def test_unpack_is_strict():
    good = pack(b"abc" * 1000)
    bad = {
        "empty": b"",
        "unknown flag": b"\x02" + good[1:],
        "flag ff": b"\xff",
        "truncated zstd": good[:-4],
        "zstd header only": good[:5],
        "garbage zstd": b"\x01" + b"not zstd at all",
        "trailing bytes": good + b"junk",
        "empty zstd payload": b"\x01",
    }
    for name, f in bad.items():
        with pytest.raises(FrameError):
            unpack(f)
            pytest.fail(f"accepted bad frame: {name}")
    assert issubclass(FrameError, BlockdiffError)


@pytest.mark.unit
def test_unpack_max_size():
    data = bytes(100_000)
    assert unpack(pack(data), max_size=100_000) == data
    with pytest.raises(FrameError):
        unpack(pack(data), max_size=99_999)
    with pytest.raises(FrameError):
        unpack(pack(os.urandom(100)), max_size=99)


@pytest.mark.unit
def test_stream_helpers():
    items = [b"a" * 500, os.urandom(50), b""]
    assert list(unpack_stream(pack_stream(items))) == items

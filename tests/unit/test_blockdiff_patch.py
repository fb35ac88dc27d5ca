"""Tests of blockdiff.patch (range writes and rebuilding a file from a CDC plan)."""
from __future__ import annotations

import os
import random

import pytest

from blockdiff import patch as patchmod
from blockdiff.cdc import Op, chunk_bytes, plan
from blockdiff.errors import BlockdiffError, PatchError
from blockdiff.patch import apply_ranges, build_from_plan
from blockdiff.signature import blocks_to_ranges, changed_blocks, sign_bytes


def _fd(path, flags=os.O_RDWR | os.O_CREAT):
    return os.open(path, flags, 0o644)


@pytest.mark.fs
def test_apply_ranges_from_changed_blocks_reproduces_new(tmp_path):
    rng = random.Random(3)
    old = bytearray(rng.randbytes(300_000))
    new = bytearray(old)
    for _ in range(5):
        off = rng.randrange(len(new) - 9000)
        new[off:off + 9000] = rng.randbytes(9000)
    new += b"tail" * 100  # growth
    new = bytes(new)
    ranges = blocks_to_ranges(changed_blocks(sign_bytes(old), sign_bytes(new)), 4096, len(new), 1)
    assert sum(ln for _, ln in ranges) < len(new) // 2
    p = tmp_path / "replica"
    p.write_bytes(old)
    fd = _fd(p)
    try:
        n = apply_ranges(fd, ((off, new[off:off + ln]) for off, ln in ranges))
        os.ftruncate(fd, len(new))
    finally:
        os.close(fd)
    assert n == sum(ln for _, ln in ranges)
    assert p.read_bytes() == new


@pytest.mark.fs
def test_apply_ranges_accepts_memoryview_and_rejects_negative(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    fd = _fd(p)
    try:
        assert apply_ranges(fd, [(2, memoryview(b"ab")), (12, bytearray(b"Z"))]) == 3
        with pytest.raises(PatchError):
            apply_ranges(fd, [(-1, b"x")])
    finally:
        os.close(fd)
    assert p.read_bytes() == b"01ab456789\0\0Z"


def _rebuild(tmp_path, old: bytes, new: bytes, name="out") -> bytes:
    ops = plan(chunk_bytes(old), chunk_bytes(new))
    fetched = {op.new_offset: new[op.new_offset:op.new_offset + op.length]
               for op in ops if op.kind == "fetch"}
    (tmp_path / "old").write_bytes(old)
    out = tmp_path / name
    out.write_bytes(b"stale content that is longer than needed" * 100_000)  # must be truncated
    ofd = os.open(tmp_path / "old", os.O_RDONLY)
    wfd = _fd(out)
    try:
        n = build_from_plan(wfd, ofd, ops, fetched)
    finally:
        os.close(ofd)
        os.close(wfd)
    assert n == len(new)
    return out.read_bytes()


@pytest.mark.fs
@pytest.mark.parametrize("use_cfr", [True, False])
def test_build_from_plan_byte_exact(tmp_path, monkeypatch, use_cfr):
    if not use_cfr:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    rng = random.Random(8)
    old = rng.randbytes(3 << 20)
    new = (b"HEADER" + old[:1_000_000] + rng.randbytes(70_000) + old[1_200_000:2_500_000]
           + old[:300_000] + b"end")
    assert _rebuild(tmp_path, old, new) == new


@pytest.mark.fs
def test_build_from_plan_copy_file_range_fallback(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    monkeypatch.setattr(os, "copy_file_range", broken, raising=False)
    old = random.Random(1).randbytes(1 << 20)
    new = old[100:] + b"x"
    assert _rebuild(tmp_path, old, new) == new


@pytest.mark.fs
def test_build_from_plan_empty_new(tmp_path):
    assert _rebuild(tmp_path, b"abc" * 1000, b"") == b""


@pytest.mark.fs
def test_build_from_plan_errors(tmp_path):
    (tmp_path / "old").write_bytes(b"a" * 100)
    ofd = os.open(tmp_path / "old", os.O_RDONLY)
    wfd = _fd(tmp_path / "out")
    try:
        cases = [
            ([Op("fetch", 0, 10, -1)], {0: b"short"}),            # wrong fetched length
            ([Op("fetch", 0, 10, -1)], {}),                       # missing fetched data
            ([Op("copy", 0, 10, 95)], {}),                        # old file too short
            ([Op("copy", 5, 10, 0)], {}),                         # gap at start
            ([Op("copy", 0, 10, 0), Op("copy", 5, 5, 0)], {}),    # overlap
            ([Op("move", 0, 10, 0)], {}),                         # unknown kind
            ([Op("copy", 0, 0, 0)], {}),                          # empty op
        ]
        for ops, fetched in cases:
            with pytest.raises(PatchError):
                build_from_plan(wfd, ofd, ops, fetched)
                pytest.fail(f"accepted bad plan {ops}")
    finally:
        os.close(ofd)
        os.close(wfd)
    assert issubclass(PatchError, BlockdiffError)


@pytest.mark.fs
def test_rw_copy_short_old_raises(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(patchmod, "COPY_PIECE", 7)
    (tmp_path / "old").write_bytes(b"0123456789")
    ofd = os.open(tmp_path / "old", os.O_RDONLY)
    wfd = _fd(tmp_path / "out")
    try:
        assert build_from_plan(wfd, ofd, [Op("copy", 0, 10, 0)], {}) == 10
        with pytest.raises(PatchError):
            build_from_plan(wfd, ofd, [Op("copy", 0, 11, 0)], {})
    finally:
        os.close(ofd)
        os.close(wfd)
    assert (tmp_path / "out").read_bytes()[:10] == b"0123456789"

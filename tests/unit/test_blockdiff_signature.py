"""Tests of blockdiff.signature and blockdiff.sparse."""
from __future__ import annotations

import os
import random
import struct
import time

import pytest
import xxhash

from blockdiff import signature as sigmod
from blockdiff.errors import BlockdiffError, ShortReadError, SignatureFormatError
from blockdiff.signature import (COARSE_DIGEST, FINE_DIGEST, FINE_SIZE, HEADER_SIZE, SigHeader, Signature,
                                 blocks_to_ranges, changed_blocks, coarse_digests, differing_coarse,
                                 differing_fine, fine_digests, sign_bytes, sign_fd, sign_path,
                                 zero_block_digest)
from blockdiff.sparse import data_extents, is_sparse

# ---------------------------------------------------------------- known answers

KAT_INPUT = bytes(range(256)) * 40  # 10240 bytes: 2 full blocks + 2048-byte tail
KAT_SIG_HEX = (
    "445253470100100000020000000028000000000000030000000000000002000000000000005d8822688c1c32ae"
    "7a9a178a91609715efb7eaefc4109bc5e846a12e2eadccdd51918707377c4beb51918707377c4beb00bd96ff71"
    "0442dd"
)
ZERO_4K_HEX = "ba89c648e16fd793"


def _ref_fine(data: bytes, bs: int) -> bytes:
    """Independent reference: one block at a time, digest packed explicitly."""
    out = b""
    for i in range(0, len(data), bs):
        out += xxhash.xxh3_64(data[i:i + bs]).intdigest().to_bytes(8, "little")
    return out


def _ref_coarse(fine: bytes, factor: int) -> bytes:
    step = factor * 8
    return b"".join(xxhash.xxh3_128(fine[i:i + step]).digest() for i in range(0, len(fine), step))


@pytest.mark.unit
def test_known_answer_signature_bytes():
    s = sign_bytes(KAT_INPUT, 4096, 2)
    assert s.to_bytes().hex() == KAT_SIG_HEX


@pytest.mark.unit
def test_known_answer_matches_independent_construction():
    fine = _ref_fine(KAT_INPUT, 4096)
    coarse = _ref_coarse(fine, 2)
    header = b"DRSG" + bytes([1]) + struct.pack("<IIQQQ", 4096, 2, len(KAT_INPUT), 3, 2)
    assert len(header) == HEADER_SIZE == 37
    assert header + coarse + fine == bytes.fromhex(KAT_SIG_HEX)


@pytest.mark.unit
def test_known_answer_zero_block_digest():
    assert zero_block_digest().hex() == ZERO_4K_HEX
    assert zero_block_digest(4096) == xxhash.xxh3_64_intdigest(bytes(4096)).to_bytes(8, "little")
    assert zero_block_digest(100) != zero_block_digest(4096)


# ---------------------------------------------------------------- digests / round trip


@pytest.mark.unit
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 5 * 4096 + 17])
@pytest.mark.parametrize("factor", [1, 2, 3, 256])
def test_sign_bytes_matches_reference(size, factor):
    data = random.Random(size).randbytes(size)
    s = sign_bytes(data, 4096, factor)
    assert s.fine == _ref_fine(data, 4096)
    assert s.coarse == _ref_coarse(s.fine, factor)
    assert s.n_blocks == -(-size // 4096)
    assert s.n_coarse == -(-s.n_blocks // factor)
    assert Signature.from_bytes(s.to_bytes()) == s
    assert s.whole_digest() == xxhash.xxh3_128_digest(s.fine)


@pytest.mark.unit
def test_fine_and_coarse_helpers():
    data = os.urandom(10 * 1000)
    assert fine_digests(data, 1000) == _ref_fine(data, 1000)
    for n in (1, 999, 1000, 1001):   # the one-block fast path and its edges, bytes and not
        assert fine_digests(data[:n], 1000) == _ref_fine(data[:n], 1000) == fine_digests(bytearray(data[:n]), 1000)
    assert fine_digests(b"") == b""
    f = fine_digests(data, 1000)
    assert coarse_digests(f, 4) == _ref_coarse(f, 4)
    with pytest.raises(ValueError):
        coarse_digests(b"1234567", 4)


@pytest.mark.unit
def test_whole_digest_distinguishes_content():
    a = sign_bytes(b"x" * 5000)
    b = sign_bytes(b"x" * 4999 + b"y")
    c = sign_bytes(b"x" * 4999)
    assert len({a.whole_digest(), b.whole_digest(), c.whole_digest()}) == 3


# ---------------------------------------------------------------- strict parsing


def _corrupt(b: bytes, pos: int, value: int) -> bytes:
    return b[:pos] + bytes([value]) + b[pos + 1:]


@pytest.mark.unit
def test_from_bytes_rejects_corrupt_input():
    good = bytes.fromhex(KAT_SIG_HEX)
    bad_inputs = {
        "empty": b"",
        "short header": good[:20],
        "magic": b"XRSG" + good[4:],
        "version": _corrupt(good, 4, 2),
        "block_size 0": good[:5] + struct.pack("<I", 0) + good[9:],
        "factor 0": good[:9] + struct.pack("<I", 0) + good[13:],
        "file_size inconsistent": good[:13] + struct.pack("<Q", 100000) + good[21:],
        "n_blocks inconsistent": good[:21] + struct.pack("<Q", 4) + good[29:],
        "n_coarse inconsistent": good[:29] + struct.pack("<Q", 3) + good[37:],
        "truncated body": good[:-1],
        "trailing byte": good + b"\0",
        "coarse flipped": _corrupt(good, HEADER_SIZE, good[HEADER_SIZE] ^ 1),
        "fine flipped": _corrupt(good, len(good) - 1, good[-1] ^ 0x80),
    }
    for name, b in bad_inputs.items():
        with pytest.raises(SignatureFormatError):
            Signature.from_bytes(b)
            pytest.fail(f"accepted corrupt input: {name}")
    assert issubclass(SignatureFormatError, BlockdiffError)


@pytest.mark.unit
def test_signature_constructor_validates_lengths():
    with pytest.raises(SignatureFormatError):
        Signature(8192, 4096, 256, b"\0" * 8, b"\0" * 16)
    with pytest.raises(SignatureFormatError):
        Signature(8192, 4096, 256, b"\0" * 16, b"")


@pytest.mark.unit
def test_header_ranges_allow_partial_reads():
    data = random.Random(7).randbytes(10 * 4096 + 100)  # 11 blocks, factor 4 -> 3 coarse
    s = sign_bytes(data, 4096, 4)
    blob = s.to_bytes()
    h = SigHeader.from_bytes(blob[:HEADER_SIZE])
    assert (h.block_size, h.factor, h.file_size, h.n_blocks, h.n_coarse) == (4096, 4, len(data), 11, 3)
    assert h.total_size == len(blob)
    off, ln = h.coarse_range()
    assert (off, ln) == (HEADER_SIZE, 3 * COARSE_DIGEST)
    assert blob[off:off + ln] == s.coarse
    lens = []
    for ci in range(3):
        off, ln = h.fine_range(ci)
        assert blob[off:off + ln] == s.fine[ci * 4 * 8:ci * 4 * 8 + ln]
        lens.append(ln)
    assert lens == [32, 32, 24]  # last coarse block is short
    with pytest.raises(IndexError):
        h.fine_range(3)
    with pytest.raises(SignatureFormatError):
        SigHeader.from_bytes(b"DRSG")


# ---------------------------------------------------------------- comparison


def _overwrite(data: bytearray, rng: random.Random, n: int, bs: int) -> set:
    """Random overwrites; returns the set of block indices whose content changed."""
    orig = bytes(data)
    for _ in range(n):
        off = rng.randrange(len(data))
        ln = rng.randint(1, 3 * bs)
        data[off:off + ln] = rng.randbytes(len(data[off:off + ln]))
    return {i // bs for i in range(0, len(data), bs) if orig[i:i + bs] != data[i:i + bs]}


@pytest.mark.unit
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_changed_blocks_finds_exactly_random_overwrites(seed):
    rng = random.Random(seed)
    bs, factor = 512, 8
    old = bytearray(rng.randbytes(200 * bs + 77))
    new = bytearray(old)
    expected = _overwrite(new, rng, 6, bs)
    assert expected  # the test must exercise something
    s_old = sign_bytes(old, bs, factor)
    s_new = sign_bytes(new, bs, factor)
    assert changed_blocks(s_old, s_new) == sorted(expected)
    # two-level partial-read path gives the same answer
    blob = s_new.to_bytes()
    h = SigHeader.from_bytes(blob[:HEADER_SIZE])
    c_off, c_len = h.coarse_range()
    found = []
    dc = differing_coarse(s_old, h, blob[c_off:c_off + c_len])
    assert dc == sorted({i // factor for i in expected})
    for ci in dc:
        f_off, f_len = h.fine_range(ci)
        found.extend(differing_fine(s_old, h, ci, blob[f_off:f_off + f_len]))
    assert found == sorted(expected)


@pytest.mark.unit
def test_changed_blocks_edge_cases():
    a = os.urandom(10 * 4096)
    s = sign_bytes(a)
    assert changed_blocks(s, s) == []
    assert changed_blocks(None, s) == list(range(10))
    assert changed_blocks(sign_bytes(a, 2048), s) == list(range(10))
    # growth: blocks beyond old's end differ, the partial old last block differs
    grown = sign_bytes(a + b"z" * 5000)
    assert changed_blocks(s, grown) == [10, 11]
    shorter = sign_bytes(a[:4096 * 3 + 5])
    assert changed_blocks(sign_bytes(a[:4096 * 3]), shorter) == [3]
    # truncation to a partial block: the short last block differs
    assert changed_blocks(s, sign_bytes(a[:4096 * 2 + 100])) == [2]
    # different factor still compares fine digests correctly
    assert changed_blocks(sign_bytes(a, 4096, 3), sign_bytes(a[:4096] + b"q" + a[4097:], 4096, 2)) == [1]


@pytest.mark.unit
def test_differing_validates_slice_lengths():
    s = sign_bytes(os.urandom(9 * 4096), 4096, 4)
    h = SigHeader.from_bytes(s.to_bytes())
    with pytest.raises(SignatureFormatError):
        differing_coarse(s, h, s.coarse[:-1])
    with pytest.raises(SignatureFormatError):
        differing_fine(s, h, 0, s.fine[:16])
    assert differing_fine(None, h, 2, s.fine[64:72]) == [8]
    assert differing_coarse(None, h, s.coarse) == [0, 1, 2]


@pytest.mark.unit
def test_blocks_to_ranges():
    assert blocks_to_ranges([], 4096, 10 ** 6) == []
    assert blocks_to_ranges([3, 1, 2, 7], 100, 10_000) == [(100, 300), (700, 100)]
    assert blocks_to_ranges([1, 3, 7], 100, 10_000, max_gap_blocks=1) == [(100, 300), (700, 100)]
    assert blocks_to_ranges([1, 3, 7], 100, 10_000, max_gap_blocks=3) == [(100, 700)]
    # clipped to file size, blocks past the end dropped
    assert blocks_to_ranges([8, 9, 10, 11], 100, 950) == [(800, 150)]
    assert blocks_to_ranges([2, 2, 2], 100, 250) == [(200, 50)]


# ---------------------------------------------------------------- fd signing


@pytest.mark.fs
def test_sign_fd_and_path_equal_sign_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(sigmod, "READ_SPAN", 3 * 4096)  # force several preads
    data = random.Random(5).randbytes(40 * 4096 + 123)
    p = tmp_path / "f"
    p.write_bytes(data)
    ref = sign_bytes(data, 4096, 4)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert sign_fd(fd, None, 4096, 4) == ref
        assert sign_fd(fd, None, 4096, 4, skip_holes=False) == ref
        assert sign_fd(fd, 4096 * 2, 4096, 4) == sign_bytes(data[:8192], 4096, 4)
        with pytest.raises(ShortReadError):
            sign_fd(fd, len(data) + 1, 4096, 4)
    finally:
        os.close(fd)
    assert sign_path(p, block_size=4096, factor=4) == ref
    assert sign_path(p) == sign_bytes(data)
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    assert sign_path(empty) == sign_bytes(b"")


class _CountingPreadv:
    def __init__(self):
        self.bytes = 0
        self.real = os.preadv

    def __call__(self, fd, buffers, offset, *a):
        self.bytes += sum(memoryview(b).nbytes for b in buffers)
        return self.real(fd, buffers, offset, *a)


def _make_sparse(path, size, writes):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _holes_supported(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return sum(ln for _, ln in data_extents(fd, size)) < size
    finally:
        os.close(fd)


@pytest.mark.fs
def test_sign_fd_sparse_does_not_read_holes(tmp_path, monkeypatch):
    size = 64 << 20
    payload = random.Random(9).randbytes(10000)
    off = 20 * (1 << 20) + 1234  # unaligned: straddles blocks
    p = tmp_path / "sparse"
    _make_sparse(p, size, [(off, payload)])
    if not _holes_supported(p):
        pytest.skip("filesystem of tmp_path does not report holes")
    assert is_sparse(os.stat(p))
    full = bytearray(size)
    full[off:off + len(payload)] = payload
    ref = sign_bytes(full)
    counter = _CountingPreadv()
    monkeypatch.setattr(os, "preadv", counter)
    fd = os.open(p, os.O_RDONLY)
    try:
        t = time.perf_counter()
        s = sign_fd(fd)
        dt = time.perf_counter() - t
        pos_after = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    assert s == ref
    assert counter.bytes <= 1 << 20, f"read {counter.bytes} bytes of a 64 MiB sparse file"
    assert dt < 0.5, f"signing a mostly-hole file took {dt:.3f}s"
    assert pos_after == 0  # hole probing restored the file offset


@pytest.mark.fs
def test_sign_fd_trailing_hole_with_short_last_block(tmp_path):
    size = 10 * 4096 + 100  # last block short and inside a hole
    p = tmp_path / "s"
    _make_sparse(p, size, [(0, b"a" * 5000)])
    full = b"a" * 5000 + bytes(size - 5000)
    assert sign_path(p, block_size=4096, factor=4) == sign_bytes(full, 4096, 4)
    assert sign_path(p, block_size=4096, factor=4, skip_holes=False) == sign_bytes(full, 4096, 4)


@pytest.mark.fs
def test_data_extents(tmp_path):
    p = tmp_path / "x"
    _make_sparse(p, 8 << 20, [(1 << 20, b"d" * 4096), (6 << 20, b"e" * 10)])
    fd = os.open(p, os.O_RDONLY)
    try:
        ext = data_extents(fd, 8 << 20)
        assert data_extents(fd, 0) == []
    finally:
        os.close(fd)
    covered = sum(ln for _, ln in ext)
    if covered == 8 << 20:
        pytest.skip("no hole support")
    # every written byte is inside an extent; extents sorted, disjoint, within size
    for pos in (1 << 20, (1 << 20) + 4095, 6 << 20, (6 << 20) + 9):
        assert any(o <= pos < o + ln for o, ln in ext)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(ext, ext[1:]))
    assert all(0 <= o and o + ln <= 8 << 20 for o, ln in ext)
    assert not any(o <= (3 << 20) < o + ln for o, ln in ext)


@pytest.mark.unit
def test_data_extents_unsupported_fd_is_dense():
    r, w = os.pipe()
    try:
        assert data_extents(r, 1000) == [(0, 1000)]
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.unit
def test_fine_size_constants():
    assert (FINE_SIZE, sigmod.COARSE_FACTOR, FINE_DIGEST, COARSE_DIGEST) == (4096, 256, 8, 16)


@pytest.mark.unit
@pytest.mark.parametrize("size", [0, 1, FINE_SIZE - 1, FINE_SIZE, FINE_SIZE + 1, 100_000, 1 << 20, (1 << 20) + 1])
def test_sign_small_is_sign_bytes(size):
    """The replica's fast path for small files produces exactly sign_bytes' serialization."""
    data = random.Random(size).randbytes(size)
    whole, raw = sigmod.sign_small(data)
    ref = sigmod.sign_bytes(data)
    assert raw == ref.to_bytes()
    assert whole == ref.whole_digest() == xxhash.xxh3_128_digest(ref.fine)
    assert Signature.from_bytes(raw) == ref

"""What the source sends is bounded (issue 13 item 7): manifests, manifest segments, packs and
range answers are decompressed with a cap, and anything malformed is a ManifestError -- quickly,
and without allocating what a zstd bomb declares (tier: unit)."""
from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import pyzstd

hypothesis = pytest.importorskip("hypothesis")     # the test extra should list it (pyproject.toml)
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies

from blockdiff import framing
from discrep.core.errors import ManifestError
from discrep.protocol import manifest as mf

pytestmark = pytest.mark.unit

BOMB_RAW = 256 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return pyzstd.compress(b"\n" * BOMB_RAW, 1)      # ~8 KiB that expands to 256 MiB


def _bounded(fn) -> None:
    """``fn`` raises ManifestError within 2 s and never holds more than 80 MiB."""
    tracemalloc.start()
    t = time.monotonic()
    try:
        with pytest.raises(ManifestError):
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t < 2
    assert peak < 80 << 20, peak


def test_a_segment_bomb_is_refused(bomb: bytes) -> None:
    assert len(bomb) < 64 << 10
    _bounded(lambda: list(mf.read_segment(bomb, 3)))


def test_a_manifest_bomb_is_refused(bomb: bytes) -> None:
    _bounded(lambda: mf.read_lines(bomb, 64 << 20))


def test_a_pack_or_range_bomb_is_refused(bomb: bytes) -> None:
    frame = bytes([framing.FLAG_ZSTD]) + bomb
    _bounded(lambda: mf.unpack_frame(frame, mf.MAX_PACK_BYTES, "pack 0"))
    _bounded(lambda: mf.unpack_frame(framing.pack(b"x" * 10000), 9999, "a range answer"))


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x01", b"\x01\x28\xb5\x2f\xfd", b"\xff" * 10])
def test_short_or_empty_answers_are_manifest_errors(data: bytes) -> None:
    if data != b"\x00":        # (an empty raw frame is a valid empty answer)
        with pytest.raises(ManifestError):
            mf.unpack_frame(data, 100, "a range answer")
    with pytest.raises(ManifestError):
        list(mf.read_segment(data, 1))
    with pytest.raises(ManifestError):
        mf.read_lines(data)


def _manifest(entries) -> bytes:
    head = json.dumps({"discrep_manifest": mf.VERSION})
    return pyzstd.compress(("\n".join([head] + [json.dumps(e) for e in entries]) + "\n").encode())


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=400), st.integers(0, 3))
def test_arbitrary_bytes_never_raise_anything_but_manifest_error(data: bytes, n: int) -> None:
    for fn in (lambda: list(mf.read_segment(data, n, 1 << 20)), lambda: list(mf.read_lines(data, 1 << 20)[1]),
               lambda: mf.unpack_frame(data, 1 << 20, "x")):
        try:
            fn()
        except ManifestError:
            pass


@settings(max_examples=200, deadline=2000)
@given(st.integers(0, 400), st.integers(0, 255), st.integers(1, 5000))
def test_mutated_frames_are_refused_or_bounded(pos: int, byte: int, cap: int) -> None:
    good = _manifest([{"op": "file", "path": f"f{i}", "size": i} for i in range(50)])
    bad = bytearray(good)
    bad[pos % len(bad)] = byte
    for data in (bytes(bad), good[:pos % len(good)]):
        try:
            raw = mf.decompress_bounded(data, cap, "x")
            assert len(raw) <= cap
        except ManifestError:
            pass
        try:
            assert len(mf.unpack_frame(b"\x01" + data, cap, "x")) <= cap
        except ManifestError:
            pass


def test_declared_sizes_over_the_cap_are_refused() -> None:
    ok = {"op": "file", "path": "f", "mode": 0o644, "mtime_ns": 0, "uid": 0, "gid": 0,
          "size": mf.MAX_FILE_SIZE, "idx": 0}
    assert mf.Entry(ok).size == mf.MAX_FILE_SIZE
    with pytest.raises(ManifestError):
        mf.Entry({**ok, "size": mf.MAX_FILE_SIZE + 1})

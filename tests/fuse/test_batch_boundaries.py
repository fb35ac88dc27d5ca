"""Changes larger than every internal batch (range requests 8 MiB, packs 8 MiB, small-file limit
64 KiB, manifest segments), at and around each boundary: growth, rewrite, truncation.  Every
cycle must succeed and the replica equal the source (independent check), and the next cycle too.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse

MiB = 1 << 20
RANGE_MAX = 8 * MiB          # protocol.ranges.MAX_BYTES
SMALL_MAX = 64 * 1024        # files up to this size travel in packs


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def replicate(src: Path, dst: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "discrep", "replicate", "--json", str(src), str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def check(src: Path, dst: Path) -> None:
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def _rand(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


@pytest.mark.parametrize("span", [RANGE_MAX - 4096, RANGE_MAX, 2 * RANGE_MAX + 12345])
def test_contiguous_rewrite_larger_than_a_range_batch(work_dir: Path, span: int):
    rng = random.Random(span)
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    f = src / "image"
    f.write_bytes(_rand(rng, 3 * RANGE_MAX))
    replicate(src, dst)
    with open(f, "r+b") as fh:            # one contiguous in-place change of `span` bytes
        fh.seek(4096 * 3 + 17)
        fh.write(_rand(rng, span))
    replicate(src, dst)
    check(src, dst)
    with open(f, "ab") as fh:             # the next cycle works too (a failed one would wedge)
        fh.write(b"tail")
    replicate(src, dst)
    check(src, dst)


@pytest.mark.parametrize("grow", [RANGE_MAX - 1, 2 * RANGE_MAX + 4095])
def test_append_and_truncate_across_a_range_batch(work_dir: Path, grow: int):
    rng = random.Random(grow)
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    f = src / "log"
    f.write_bytes(_rand(rng, MiB))
    replicate(src, dst)
    with open(f, "ab") as fh:
        fh.write(_rand(rng, grow))
    replicate(src, dst)
    check(src, dst)
    os.truncate(f, MiB // 2 + 1)
    replicate(src, dst)
    check(src, dst)


@pytest.mark.parametrize("size", [SMALL_MAX, SMALL_MAX + 1])
def test_files_at_the_packed_size_limit_change_across_it(work_dir: Path, size: int):
    rng = random.Random(size)
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d").mkdir(parents=True)
    # enough small files to fill more than one 8 MiB pack
    for i in range(140):
        (src / "d" / f"f{i:03d}").write_bytes(_rand(rng, size))
    replicate(src, dst)
    check(src, dst)
    for i in range(0, 140, 3):
        p = src / "d" / f"f{i:03d}"
        p.write_bytes(_rand(rng, size + (1 if i % 2 else -1)))     # crosses the limit both ways
    replicate(src, dst)
    check(src, dst)

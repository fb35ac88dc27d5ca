"""The replica's disk fills up mid-cycle (tier: root; a small loop-mounted ext4 as DEST).

The cycle must fail with exit code 18 and leave the replica at its last committed
cycle (independent rsync check); after space is made, the next run completes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.root, pytest.mark.fuse]
DISCREP = [sys.executable, "-m", "discrep"]


def run(*args, check=True):
    p = subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_disk_full_mid_cycle_rolls_back(loopfs, work_dir: Path):
    mnt = loopfs("ext4", 48)
    src, dst = work_dir / "src", mnt / "replica"
    src.mkdir()
    (src / "a").mkdir()
    for i in range(50):
        (src / "a" / f"f{i}").write_bytes(os.urandom(20_000))
    (src / "base.bin").write_bytes(os.urandom(8 << 20))
    run("replicate", str(src), str(dst))
    cycle1 = work_dir / "cycle1"
    subprocess.run(["cp", "-a", str(src), str(cycle1)], check=True)
    shutil.rmtree(cycle1 / ".discrep")
    subprocess.run(["touch", "-h", "-r", str(src), str(cycle1)], check=True)
    # cycle 2: small changes first (sorted before the big file), then more than the disk holds
    with open(src / "base.bin", "r+b") as f:
        f.write(b"Z" * 100_000)
    for i in range(0, 50, 5):
        (src / "a" / f"f{i}").write_bytes(os.urandom(20_000))
    os.rename(src / "a" / "f1", src / "a" / "moved")
    (src / "zz_huge.bin").write_bytes(os.urandom(60 << 20))
    p = run("replicate", str(src), str(dst), check=False)
    assert p.returncode == 18, p.stderr
    assert "full" in p.stderr
    assert helpers.tree_equal(cycle1, dst) == [], "the replica is not its last committed cycle"
    h = run("history", str(dst)).stdout
    assert "interrupted" not in h
    # make room: the huge file goes away on the source; the next run completes
    os.unlink(src / "zz_huge.bin")
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []


def test_history_write_that_does_not_fit_rolls_back_and_keeps_point_1(loopfs, work_dir: Path):
    """The old blocks of an in-place patch do not fit: exit 18 before the file is patched, DEST is
    cycle 1, recover has nothing to do, point 1 restores; once space is freed the cycle completes."""
    mnt = loopfs("ext4", 100)
    src, dst = work_dir / "src", mnt / "replica"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(32 << 20))
    (src / "small.txt").write_bytes(b"v1\n")
    run("replicate", str(src), str(dst))
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    filler.write_bytes(b"\1" * max(0, st.f_bavail * st.f_frsize - (6 << 20)))   # ~6 MiB left
    cycle1 = work_dir / "cycle1"
    subprocess.run(["cp", "-a", str(src), str(cycle1)], check=True)
    shutil.rmtree(cycle1 / ".discrep")
    subprocess.run(["touch", "-h", "-r", str(src), str(cycle1)], check=True)
    with open(src / "big.bin", "r+b") as f:       # 4 MiB of every 8 MiB: 16 MiB of old blocks
        for off in range(0, 32 << 20, 8 << 20):
            f.seek(off)
            f.write(os.urandom(4 << 20))
    (src / "small.txt").write_bytes(b"v2 and more\n")
    p = run("replicate", str(src), str(dst), check=False)
    assert p.returncode == 18, p.stderr
    assert "full" in p.stderr
    assert helpers.tree_equal(cycle1, dst) == [], "the replica is not its last committed cycle"
    assert run("recover", str(dst), check=False).returncode == 0
    restored = work_dir / "restored"
    r = run("restore", str(dst), "--cycle", "1", "--to", str(restored), check=False)
    assert r.returncode == 0, r.stderr
    assert helpers.tree_equal(cycle1, restored) == []
    filler.unlink()
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []

"""Snapshot providers end to end on loop-mounted btrfs and XFS images (tier: root).

btrfs: the source is a subvolume, ``--snapshot auto`` must pick a read-only
subvolume snapshot.  XFS (reflink=1): ``auto`` must pick reflink clones.  ext4:
``auto`` falls back to the verified copy.  Each replica is checked independently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.root, pytest.mark.fuse]

DISCREP = [sys.executable, "-m", "discrep"]


def replicate(src: Path, dst: Path, *extra: str) -> dict:
    p = subprocess.run(DISCREP + ["replicate", "--json", *extra, str(src), str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def churn(src: Path) -> None:
    with open(src / helpers.SAMPLE_BIG, "r+b") as f:
        f.seek(2_000_000)
        f.write(b"changed!" * 512)
    os.rename(src / "dir_a", src / "dir_moved")
    (src / "fresh.txt").write_text("new file\n")
    os.unlink(src / helpers.SAMPLE_EMPTY_FILE)
    os.chmod(src / helpers.SAMPLE_EMPTY_DIR, 0o700)


def run_cycles(src: Path, dst: Path, expect_provider: str) -> None:
    helpers.make_sample_tree(src)
    r1 = replicate(src, dst)
    assert r1["snapshot"] == expect_provider
    assert helpers.tree_equal(src, dst) == []
    churn(src)
    r2 = replicate(src, dst)
    assert r2["snapshot"] == expect_provider
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []
    assert r2["bytes_transferred"] < 1 << 20, r2
    # only the newest snapshot is kept on the source; older ones are released
    snaps = sorted(os.listdir(src / ".discrep" / "snapshots"))
    assert snaps in ([], ["2"]), snaps


def test_btrfs_subvolume_snapshots(loopfs, work_dir: Path):
    helpers.require_tool("btrfs")
    mnt = loopfs("btrfs", 400)
    src = mnt / "vol"
    helpers.run(["btrfs", "subvolume", "create", str(src)])
    run_cycles(src, work_dir / "dst", "btrfs")
    # the kept snapshot is a read-only subvolume
    snap = src / ".discrep" / "snapshots" / "2"
    with pytest.raises(OSError):
        (snap / "x").write_text("no")


def test_xfs_reflink_snapshots(loopfs, work_dir: Path):
    mnt = loopfs("xfs", 400)
    src = mnt / "src"
    run_cycles(src, work_dir / "dst", "reflink")


def test_ext4_falls_back_to_copy(loopfs, work_dir: Path):
    mnt = loopfs("ext4", 200)
    src = mnt / "src"
    helpers.make_sample_tree(src)
    r1 = replicate(src, work_dir / "dst")
    assert r1["snapshot"] == "copy"
    assert helpers.tree_equal(src, work_dir / "dst") == []


def test_explicit_btrfs_on_xfs_is_refused(loopfs, work_dir: Path):
    mnt = loopfs("xfs", 300)
    src = mnt / "src"
    src.mkdir()
    p = subprocess.run(DISCREP + ["replicate", "--snapshot", "btrfs", str(src), str(work_dir / "d")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "btrfs subvolume" in p.stderr


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_changed_block_tracking(loopfs, work_dir: Path, fstype: str):
    """Where snapshots share extents (reflink on XFS, subvolume snapshots on btrfs), the source
    tells which blocks may have changed: a cycle reads ~only the changed bytes, and stays exact."""
    import random
    mnt = loopfs(fstype, 600)
    src = mnt / "vol"
    if fstype == "btrfs":
        helpers.run(["btrfs", "subvolume", "create", str(src)])
    else:
        src.mkdir()
    size = 96 << 20
    (src / "big.img").write_bytes(os.urandom(size))
    with open(src / "sparse.img", "wb") as f:
        f.truncate(256 << 20)
    dst = work_dir / "dst"
    replicate(src, dst)
    rnd = random.Random(fstype)
    for rnd_i in range(3):
        fd = os.open(src / "big.img", os.O_WRONLY)
        for _ in range(40):
            os.pwrite(fd, os.urandom(4096), rnd.randrange(0, size // 4096) * 4096)
        os.close(fd)
        fd = os.open(src / "sparse.img", os.O_WRONLY)
        os.pwrite(fd, os.urandom(4096), rnd.randrange(0, 65536) * 4096)
        os.close(fd)
        r = replicate(src, dst)
        assert helpers.tree_equal(src, dst) == [], f"round {rnd_i}"
        cdir = src / ".discrep" / "cycles" / str(r["cycle"])
        assert sorted(p.name for p in cdir.glob("cbt-*.json")), "changed-block tracking was not used"
        # 41 changed blocks of 4 KiB; everything else (signatures, manifest) stays small
        assert r["bytes_transferred"] < 41 * 4096 + 48 * 1024, r

"""The source's disk fills up during the copy snapshot of a cycle (issue 14 item 8; tier: root,
fuse; SRC on a small tmpfs, filled from outside the tree).

The cycle must fail with the documented exit code (20) and a message saying the source disk is
full -- not a corrupt catalog, not a cycle committed with holes and warnings; the replica is not
touched (rsync -aHAXnci against a copy of cycle 1), the partial snapshot does not keep the space,
and once space is freed the next run completes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.root, pytest.mark.fuse]
DISCREP = [sys.executable, "-m", "discrep"]


def run(*args):
    return subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_source_disk_full_during_copy_snapshot(work_dir: Path):
    helpers.require_root()
    helpers.require_fuse()
    fs = work_dir / "srcfs"
    fs.mkdir()
    helpers.run(["mount", "-t", "tmpfs", "-o", "size=80m", "discrep-test-srcfs", str(fs)])
    try:
        src, dst, before = fs / "src", work_dir / "dst", work_dir / "before"
        src.mkdir()
        for i in range(8):
            (src / f"small{i}").write_bytes(os.urandom(2 << 20))
        (src / "big").write_bytes(os.urandom(14 << 20))
        p = run("replicate", "--snapshot", "copy", str(src), str(dst))
        assert p.returncode == 0, p.stderr
        helpers.run(["cp", "-a", str(src), str(before)])
        helpers.run(["rm", "-rf", str(before / ".discrep")])
        helpers.run(["touch", "-h", "-r", str(src), str(before)])
        # cycle 2 changes more than the source's disk has left for its snapshot copy
        free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        (fs / "filler").write_bytes(b"\1" * (free - (6 << 20)))     # outside the tree
        with open(src / "big", "r+b") as f:
            f.write(os.urandom(1 << 20))
        (src / "small3").write_bytes(os.urandom(2 << 20))
        used = _used(fs)
        p = run("replicate", "--snapshot", "copy", str(src), str(dst))
        assert p.returncode == 20, f"exit {p.returncode}: {p.stderr}"
        err = p.stderr.lower()
        assert "source" in err and "full" in err, p.stderr
        assert "damaged" not in err and "corrupt" not in err, p.stderr
        assert helpers.tree_equal(before, dst) == [], "the replica changed"
        assert helpers.python_tree_diff(before, dst) == []
        h = run("history", str(dst))
        assert h.returncode == 0 and " 2 " not in h.stdout.replace("\n", " \n"), h.stdout
        assert _used(fs) <= used + (1 << 20), "the failed cycle's partial snapshot still holds the space"
        # free space: the next run completes
        os.unlink(fs / "filler")
        p = run("replicate", "--snapshot", "copy", str(src), str(dst))
        assert p.returncode == 0, p.stderr
        assert helpers.tree_equal(src, dst) == []
        assert helpers.python_tree_diff(src, dst) == []
    finally:
        helpers.unmount(str(fs), "tmpfs")

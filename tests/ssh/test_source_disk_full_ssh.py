"""The source's disk fills during the copy snapshot of an SSH cycle (issue 14 item 8; tier: ssh,
root): the agent's SourceDiskFullError reaches the replica as such -- exit 20, a message saying
the source disk is full --, the replica is not touched, nothing is left on either host, and the
next run after freeing space completes.  (The local variant: tests/root/test_source_disk_full.py.)"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import helpers
from conftest import Sshd, replicate
from test_faults_network import _agents_of, _leftovers

pytestmark = [pytest.mark.ssh, pytest.mark.fuse, pytest.mark.root]


def test_source_disk_full_over_ssh(sshd: Sshd, work_dir: Path) -> None:
    helpers.require_root()
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    fs = work_dir / "srcfs"
    fs.mkdir()
    helpers.run(["mount", "-t", "tmpfs", "-o", "size=80m", "discrep-test-srcfs", str(fs)])
    try:
        src, dst, before = fs / "src", work_dir / "dst", work_dir / "before"
        src.mkdir()
        for i in range(8):
            (src / f"small{i}").write_bytes(os.urandom(2 << 20))
        (src / "big").write_bytes(os.urandom(14 << 20))
        p = replicate(sshd, str(src), str(dst), "--snapshot", "copy")
        assert p.returncode == 0, p.stderr
        helpers.run(["cp", "-a", str(src), str(before)])
        helpers.run(["rm", "-rf", str(before / ".discrep")])
        helpers.run(["touch", "-h", "-r", str(src), str(before)])
        # cycle 2: a changed large file (a copy snapshot copies it; a source that reads it live
        # does not) and 12 MB of new small files (always copied into the cycle's packs), with
        # 6 MiB left on the source's disk
        with open(src / "big", "r+b") as f:
            f.write(os.urandom(1 << 20))
        (src / "new").mkdir()
        for i in range(400):
            (src / "new" / f"n{i}").write_bytes(os.urandom(30_000))
        st = os.statvfs(fs)
        (fs / "filler").write_bytes(b"\1" * (st.f_bavail * st.f_frsize - (6 << 20)))
        p = replicate(sshd, str(src), str(dst), "--snapshot", "copy")
        assert p.returncode == 20, f"exit {p.returncode}: {p.stderr}"
        err = p.stderr.lower()
        assert "source" in err and "full" in err and "damaged" not in err, p.stderr
        assert helpers.tree_equal(before, dst) == [], "the replica changed"
        assert _leftovers(sshd) == []
        assert _agents_of(src) == []
        os.unlink(fs / "filler")
        p = replicate(sshd, str(src), str(dst), "--snapshot", "copy")
        assert p.returncode == 0, p.stderr
        assert helpers.tree_equal(src, dst) == []
    finally:
        helpers.unmount(str(fs), "tmpfs")

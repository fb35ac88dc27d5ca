"""Snapshot hooks of a remote source (tier: ssh): the agent runs only the hooks configured on the
source host in SRC/.discrep/hooks.toml; the replica cannot send a command to run."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import helpers
from conftest import Sshd, discrep_cmd, replicate

pytestmark = pytest.mark.ssh


def test_remote_hooks_come_from_the_source_host(sshd: Sshd, work_dir: Path) -> None:
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 << 20))          # large: a streamed first copy would defer it
    (src / "small.txt").write_text("one")
    marks = work_dir / "marks"
    os.mkdir(src / ".discrep", 0o700)
    hooks = src / ".discrep" / "hooks.toml"
    hooks.write_text(f'pre_snapshot = "echo pre >> {marks}"\npost_snapshot = "echo post >> {marks}"\n')
    hooks.chmod(0o600)
    for n in (1, 2):
        r = replicate(sshd, str(src), str(dst))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["consistency"] == "app"
        assert marks.read_text().split() == ["pre", "post"] * n
        assert helpers.tree_equal(src, dst) == []
        (src / "small.txt").write_text("two")
    # a command from the replica's side is refused for a remote source, nothing runs
    r = replicate(sshd, str(src), str(dst), "--pre-snapshot", f"echo replica >> {marks}")
    assert r.returncode == 3 and "hooks.toml" in r.stderr, r.stderr
    assert "replica" not in marks.read_text()
    h = subprocess.run(discrep_cmd("history", "--json", str(dst)), capture_output=True, text=True, timeout=60)
    assert [c["consistency"] for c in json.loads(h.stdout.strip().splitlines()[-1])["cycles"]] == ["app", "app"]

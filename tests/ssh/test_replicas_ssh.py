"""Two replicas of one remote source over SSH, cycled in turn (tier: ssh).

Each replica sends its id in the agent's ``cycle`` and ``ack`` commands; the source keeps a
position per id, so after the first (full) cycle each one's cycle is read from the journal and
holds exactly the changes since its own last cycle.  Replicas are checked with rsync and a
Python walk, never with discrep's catalog.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from conftest import Sshd, replicate
from discrep.replica.catalog import ReplicaCatalog

pytestmark = pytest.mark.ssh

_spec = importlib.util.spec_from_file_location(
    "ws", Path(__file__).parent.parent / "fs" / "test_watcher_inotify.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _ok(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _replica_id(dst: Path) -> str:
    cat = ReplicaCatalog(str(dst / ".discrep"))
    try:
        return cat.replica_id()
    finally:
        cat.close()


def test_two_remote_replicas_in_turn(sshd: Sshd, work_dir: Path) -> None:
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    src = work_dir / "src"
    src.mkdir()
    S.fill(src, nfiles=12)
    dests = {"a": (work_dir / "a", "sshfs"), "b": (work_dir / "b", "sftp")}
    p = S.start_watcher(src, "inotify")
    try:
        S.sync_point(src)
        last = {}
        for name, (dst, transport) in dests.items():
            r = _ok(replicate(sshd, str(src), str(dst), "--transport", transport))
            assert r["base"] == 0, r
            last[name] = r["cycle"]
        seen = {n: 0 for n in dests}
        for k, name in enumerate(["a", "b", "b", "a"]):
            (src / f"new{k}").write_bytes(os.urandom(2000))
            os.rename(src / "d1" / f"f{k}", src / "d1" / f"moved{k}")
            os.unlink(src / "d2" / f"f{k}")
            for n in seen:
                seen[n] += 1
            S.sync_point(src)
            dst, transport = dests[name]
            r = _ok(replicate(sshd, str(src), str(dst), "--transport", transport))
            assert r["change_source"] == "journal" and r["base"] == last[name], r
            assert r["files_changed"] == seen[name] + 1, (seen, r)       # the creates and the sync marker
            assert r["files_renamed"] == seen[name] and r["files_deleted"] == seen[name], (seen, r)
            last[name], seen[name] = r["cycle"], 0
            assert helpers.tree_equal(src, dst) == []
            assert helpers.python_tree_diff(src, dst) == []
        out = subprocess.run([sys.executable, "-m", "discrep", "replicas", "--json", str(src)],
                             capture_output=True, text=True, timeout=60)
        listed = {r["id"]: r["acked_cycle"] for r in json.loads(out.stdout.strip().splitlines()[-1])["replicas"]}
        assert listed == {_replica_id(dst): last[n] for n, (dst, _t) in dests.items()}
    finally:
        S.stop_watcher(p)

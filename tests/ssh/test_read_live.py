"""Incremental remote cycles read large files live (no copy first) and never commit a torn file.

With the copy provider, the agent does not copy a changed large file into the snapshot: the
export serves the live file, held open (``--read-live`` / ``read_live``).  Before it commits,
the replica asks the agent whether any file it read live changed meanwhile (``verify``); if one
did, the cycle is rolled back and run again with the changed files copied (a verified copy), so
the committed cycle is a point-in-time state of every file.  Checked with the rsync oracle, not
discrep's catalog: a file written while the replica read it must land whole, as it is after
the write.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, client_env, replicate

pytestmark = pytest.mark.ssh

N, SIZE, AT = 48, 1 << 20, 512 << 10      # files, their size, where each changes


def _replicate_v(sshd: Sshd, src: Path, dst: Path) -> subprocess.CompletedProcess:
    return subprocess.run([REMOTE_DISCREP, "-v", "replicate", "--json", "-F", str(sshd.client_config),
                           "--remote-discrep", REMOTE_DISCREP, f"{ALIAS}:{src}", str(dst)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          env=client_env(sshd))


def _ok(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _setup(src: Path, dst: Path, sshd: Sshd) -> random.Random:
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    rng = random.Random(17)
    src.mkdir()
    for i in range(N):
        (src / f"f{i:02d}").write_bytes(rng.randbytes(SIZE))
    _ok(replicate(sshd, str(src), str(dst)))
    for i in range(N):      # every file changes a little: each is patched from the live file
        with open(src / f"f{i:02d}", "r+b") as f:
            f.seek(AT)
            f.write(rng.randbytes(4096))
    return rng


def test_unchanged_live_files_commit_in_one_pass(sshd: Sshd, work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    _setup(src, dst, sshd)
    r = _replicate_v(sshd, src, dst)
    res = _ok(r)
    assert res["cycle"] == 2 and res["files_changed"] == N, res
    assert f"{N} file(s) read live" in r.stderr, r.stderr       # not copied on the source first
    assert "running the cycle again" not in r.stderr
    assert helpers.tree_equal(src, dst) == []


def test_a_file_written_while_read_live_is_not_committed_torn(sshd: Sshd, work_dir: Path) -> None:
    """f00 is written again once the replica has patched it (the cycle is still reading the others):
    the check before the commit sees it, the cycle is rolled back and run again, and the replica
    ends up with f00 as it is after that write.  Without the check it would commit f00's bytes from
    before the write, described by a stat the file no longer has."""
    src, dst = work_dir / "src", work_dir / "dst"
    rng = _setup(src, dst, sshd)
    want = (src / "f00").read_bytes()[AT:AT + 4096]
    late = rng.randbytes(4096)
    fired = threading.Event()

    def meddle() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with open(dst / "f00", "rb") as f:
                    f.seek(AT)
                    if f.read(4096) == want:
                        break
            except OSError:
                pass
            time.sleep(0.0005)
        else:
            return
        with open(src / "f00", "r+b") as f:
            f.write(late)
        fired.set()
    t = threading.Thread(target=meddle, daemon=True)
    t.start()
    r = _replicate_v(sshd, src, dst)
    t.join(5)
    assert fired.is_set(), f"the replica never patched f00: {r.stderr}"
    res = _ok(r)
    assert (dst / "f00").read_bytes()[:4096] == late, "f00 was committed as it was before the write"
    assert "running the cycle again" in r.stderr, r.stderr
    assert res["files_changed"] >= 1, res
    assert helpers.tree_equal(src, dst) == []
    res = _ok(replicate(sshd, str(src), str(dst)))     # nothing left over for the next cycle
    assert res["files_changed"] == 0, res
    assert helpers.tree_equal(src, dst) == []
    assert not any(p.is_symlink() for p in dst.rglob("*"))
    assert os.stat(dst / "f00").st_mtime_ns == os.stat(src / "f00").st_mtime_ns

"""A process of the cycle stops answering (SIGSTOP) during an SSH cycle (issue 14, fault tier).

The source agent (with its export child) or the replica's sshfs is stopped mid-cycle while the
link trickles (tests/netfault.py), with ``--timeout 5``: the run exits 11 within the timeout and
a margin, DEST equals a whole committed cycle (rsync -aHAXnci oracle), and once the stopped
processes are continued (or killed) in ``finally`` no process, mount or temp directory is left on
either side; the next run completes.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, client_env, descendants, discrep_cmd
from test_faults_network import _agents_of, _config_through, _leftovers

from netfault import Forwarder

pytestmark = [pytest.mark.ssh, pytest.mark.fuse]
TIMEOUT = 5


def _cmdline(pid: int) -> List[bytes]:
    """The process's argv; [b""] when it is gone or has none (a kernel thread, a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return [b""]


def _agent_tree(src: Path) -> List[int]:
    """The ``discrep agent`` serving ``src`` and its children (the export)."""
    pids: List[int] = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            cmd = _cmdline(int(d.name))
            if b"agent" in cmd and str(src).encode() in cmd:
                pids.append(int(d.name))
    return pids + [c for p in pids for c in descendants(p)]


def _sshfs_of(replicate_pid: int) -> List[int]:
    return [p for p in descendants(replicate_pid) if os.path.basename(_cmdline(p)[0]) == b"sshfs"]


def _wait_for(find: Callable[[], List[int]], p: subprocess.Popen, limit: float = 120) -> List[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and p.poll() is None:
        found = find()
        if found:
            return found
        time.sleep(0.05)
    return []


class Run:
    """``discrep replicate`` with its output in files: a child it leaves behind (holding pipes) can
    never hang the test."""

    def __init__(self, cfg: Path, sshd: Sshd, src: Path, dst: Path, log_dir: Path, *extra: str):
        self.out = open(log_dir / "out", "w+")
        self.err = open(log_dir / "err", "w+")
        self.p = subprocess.Popen(discrep_cmd("replicate", "--json", "-F", str(cfg), "--remote-discrep",
                                              REMOTE_DISCREP, *extra, f"{ALIAS}:{src}", str(dst)),
                                  stdout=self.out, stderr=self.err, env=client_env(sshd))
        self.pid = self.p.pid

    def wait(self, timeout: float) -> Tuple[int, str]:
        """(exit code, stderr); TimeoutExpired when it still runs."""
        try:
            rc = self.p.wait(timeout)
        finally:
            self.err.seek(0)
            err = self.err.read()
        return rc, err

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
        self.out.close()
        self.err.close()


def _tree(rng: random.Random, src: Path) -> None:
    src.mkdir()
    (src / "img").write_bytes(rng.randbytes(32 << 20))
    (src / "note").write_bytes(b"v1\n")


def _change(rng: random.Random, src: Path) -> None:
    with open(src / "img", "r+b") as f:          # many scattered changes: a long incremental
        for i in range(0, 32 << 20, 64 << 10):
            f.seek(i)
            f.write(rng.randbytes(4096))
    (src / "note").write_bytes(b"v2\n")


@pytest.mark.parametrize("victim", ["agent", "sshfs"])
def test_stopped_process_mid_cycle(sshd: Sshd, work_dir: Path, victim: str) -> None:
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    rng = random.Random(11)
    src, dst, before = work_dir / "src", work_dir / "dst", work_dir / "before"
    _tree(rng, src)
    fwd = Forwarder(sshd.port)
    stopped: List[int] = []
    runs: List[Run] = []

    def replicate(*extra: str) -> Run:
        d = work_dir / f"run{len(runs)}"
        d.mkdir()
        runs.append(Run(cfg, sshd, src, dst, d, *extra))
        return runs[-1]
    try:
        cfg = _config_through(sshd, fwd, work_dir)
        rc, err = replicate().wait(300)
        assert rc == 0, err
        helpers.run(["cp", "-a", str(src), str(before)])
        _change(rng, src)
        fwd.trickle(2 << 20)
        fwd.reset_counts()
        r = replicate("--timeout", str(TIMEOUT))
        deadline = time.monotonic() + 120
        while fwd.bytes_down < (1 << 20) and r.p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        targets = _wait_for(lambda: _agent_tree(src) if victim == "agent" else _sshfs_of(r.pid), r.p)
        assert targets, f"no {victim} process found while the cycle ran"
        for pid in targets:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        t = time.monotonic()
        try:
            rc, err = r.wait(TIMEOUT * 3 + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the cycle still ran {TIMEOUT * 3 + 30}s after the {victim} stopped")
        assert rc == 11, f"exit {rc} after {time.monotonic() - t:.1f}s: {err}"
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stopped.clear()
        fwd.trickle(None)
        # DEST is a whole committed cycle: the last one, or the new one when only the ack was lost
        assert helpers.tree_equal(before, dst) == [] or helpers.tree_equal(src, dst) == [], \
            "DEST is not a whole committed cycle"
        assert _leftovers(sshd) == []
        assert _agents_of(src) == [], "the source agent did not end"
        assert not any(os.path.basename(_cmdline(p)[0]) == b"sshfs" and str(src).encode() in b" ".join(_cmdline(p))
                       for p in map(int, filter(str.isdigit, os.listdir("/proc")))), "sshfs left running"
        rc, err = replicate().wait(300)
        assert rc == 0, err
        assert helpers.tree_equal(src, dst) == []
        assert helpers.python_tree_diff(src, dst) == []
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        for run in runs:
            run.kill()
        fwd.close()

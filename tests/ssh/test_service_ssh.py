"""``discrep daemon`` with a job that pulls over SSH from the test's own sshd (127.0.0.1): cycles run,
the replica matches (independent rsync and Python checks), and SIGTERM leaves no sshfs or export
mount, no ssh client, no remote agent."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, mounts_under
from daemon_proc import DaemonProc, committed, cmdline, descendants, free_port, sample, scrape, wait_for

pytestmark = pytest.mark.ssh


def test_daemon_pulls_over_ssh_and_stops_clean(work_dir: Path, sshd: Sshd):
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"remote " * 1000)
    (src / "g").write_bytes(b"g")
    port = free_port()
    cfg = work_dir / "jobs.toml"
    job = {"source": f"{ALIAS}:{src}", "dest": str(dst), "every": "1s", "rpo": "10m",
           "ssh_config": str(sshd.client_config), "remote_discrep": REMOTE_DISCREP}
    cfg.write_text(f'metrics_listen = "127.0.0.1:{port}"\n[jobs.remote]\n'
                   + "".join(f"{k} = {json.dumps(v)}\n" for k, v in job.items()))
    d = DaemonProc(work_dir, cfg)
    try:
        assert d.wait_notify("READY=1"), d.log_text()
        assert wait_for(lambda: committed(dst) >= 1, 60), d.log_text()
        (src / "d" / "f").write_bytes(b"changed " * 2000)
        (src / "new").write_bytes(b"new")
        assert wait_for(lambda: helpers.tree_equal(src, dst) == [], 60, step=0.5), \
            f"{d.log_text()}\nsshd exit code {sshd.proc.poll()}, log:\n{sshd.log.read_text()[-3000:]}"
        assert helpers.python_tree_diff(src, dst) == []
        # the cycle that brought the change is booked once its process has ended (after the commit)
        assert wait_for(lambda: sample(scrape(port), "discrep_cycles_total", job="remote", result="ok") >= 2, 30)
        m = scrape(port)
        assert sample(m, "discrep_bytes_transferred_total", job="remote") > 0
        assert sample(m, "discrep_rpo_seconds", job="remote") == 600
        assert not any(k[0] == "discrep_watcher_up" for k in m)          # no local root: no watcher
        assert wait_for(lambda: any(" run " in c for _s, c in d.seen.values()), 10)
    finally:
        code, took, _out = d.stop()
        d.close()
    assert code == 0, d.log_text()
    assert took < 10, f"stop took {took:.1f}s"
    assert d.left == []
    assert mounts_under(work_dir) == []

    def remote_agents() -> list:
        return [c for c in map(cmdline, descendants(sshd.proc.pid)) if " agent" in c]
    assert wait_for(lambda: remote_agents() == [], 15), remote_agents()
    assert wait_for(lambda: mounts_under(sshd.base) == [], 15), mounts_under(sshd.base)   # the export too
    time.sleep(0.2)
    assert mounts_under(work_dir) == []

"""Continuous mode (``replicate --every``): cycles, journal trigger, lock, backoff, status, signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import helpers
from daemon_proc import DISCREP, committed
from discrep.run import daemon
from discrep.core.errors import LockedError, SourceError, WarningList
from discrep.replica.catalog import ReplicaCatalog
from discrep.run.options import CycleOptions



def _wait(cond, timeout=30.0):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_every_runs_cycles_locks_and_stops(work_dir):
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"one")
    p = subprocess.Popen([DISCREP, "replicate", "--json", "--every", "0.5", str(src), str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: committed(dst) >= 1), p.stderr.read1() if p.poll() is not None else ""
        # a second daemon on the same DEST is refused with a clear message
        q = subprocess.run([DISCREP, "replicate", "--every", "1", str(src), str(dst)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        assert q.returncode == LockedError.exit_code
        assert b"already runs on" in q.stderr
        (src / "a" / "g").write_bytes(b"two")
        n = committed(dst)
        assert _wait(lambda: committed(dst) >= n + 1)
        assert _wait(lambda: committed(dst) >= n + 2)   # the one after the change is surely done
        assert helpers.tree_equal(src, dst) == []
        def status() -> dict:
            st = subprocess.run([DISCREP, "status", "--json", str(dst)], stdout=subprocess.PIPE, timeout=30)
            return json.loads(st.stdout.splitlines()[-1])["replica"]
        # the figures of a cycle are recorded just after its commit: status may show the commit
        # first (the catalog row's own stats), then the recorded figures
        seen = []

        def recorded() -> bool:
            seen.append(status())
            return "change_source" in (seen[-1]["last_cycle_stats"] or {})
        assert _wait(recorded)
        rep = seen[-1]
        assert rep["daemon"] == "running" and rep["last_cycle"] >= 2
        assert rep["lag_s"] is not None and 0 <= rep["lag_s"] < 30
        assert rep["last_cycle_stats"]["change_source"] in ("scan", "journal")
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    res = json.loads(out.splitlines()[-1])
    assert res["cycles"] >= 3 and res["stopped"].startswith("signal")
    assert not daemon.daemon_running(str(dst))
    c = ReplicaCatalog(str(dst / ".discrep"))
    try:
        assert c.applying() is None
    finally:
        c.close()


def test_journal_entries_trigger_a_cycle_sooner(work_dir):
    import importlib.util
    spec = importlib.util.spec_from_file_location("ws", Path(__file__).with_name("test_watcher_inotify.py"))
    S = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(S)
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    w = S.start_watcher(src, "inotify")
    stop = threading.Event()
    a = CycleOptions(str(src), str(dst), every=60.0)
    res = {}
    t = threading.Thread(target=lambda: res.update(daemon.run_every(a, WarningList(), None, stop=stop)))
    t.start()
    try:
        assert _wait(lambda: committed(dst) >= 1)
        (src / "g").write_bytes(b"new")
        t0 = time.monotonic()
        assert _wait(lambda: committed(dst) >= 2, timeout=10), "no early cycle"
        assert time.monotonic() - t0 < 10
        (src / "h").write_bytes(b"newer")
        assert _wait(lambda: committed(dst) >= 3, timeout=10)
        c = ReplicaCatalog(str(dst / ".discrep"))
        try:
            stats = json.loads(c.get_meta("last_cycle_stats"))
        finally:
            c.close()
        assert stats["change_source"] == "journal"
        assert _wait(lambda: helpers.tree_equal(src, dst) == [], timeout=10)
    finally:
        stop.set()
        t.join(30)
        S.stop_watcher(w)
    assert res["cycles"] >= 3


def test_failures_are_recorded_and_retried_with_backoff(work_dir, monkeypatch):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    calls = []

    def boom(*args, **kw):
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise SourceError(f"simulated failure {len(calls)}")
        stop.set()
        return {"cycle": 1, "base": 0, "change_source": "scan", "files_changed": 0}

    monkeypatch.setattr(daemon, "replicate_local", boom)
    monkeypatch.setattr(daemon, "BACKOFF_MIN", 0.1)
    stop = threading.Event()
    a = CycleOptions(str(src), str(dst), every=100.0)
    res = daemon.run_every(a, WarningList(), None, stop=stop, max_cycles=1)
    assert res["failures"] == 3 and res["cycles"] == 1
    gaps = [b - a_ for a_, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.39   # exponential
    c = ReplicaCatalog(str(dst / ".discrep"))
    try:
        assert "simulated failure 3" in c.get_meta("last_error")
        assert int(c.get_meta("last_error_ns")) > 0
        assert json.loads(c.get_meta("last_cycle_stats"))["cycle"] == 1
    finally:
        c.close()
    assert not daemon.daemon_running(str(dst))


def test_daemon_lock_is_exclusive(work_dir):
    dst = work_dir / "dst"
    fd = daemon._lock(str(dst))
    try:
        with pytest.raises(LockedError, match="already runs"):
            daemon._lock(str(dst))
        assert daemon.daemon_running(str(dst))
    finally:
        os.close(fd)
    assert not daemon.daemon_running(str(dst))

"""``discrep daemon`` (the service) end to end: the real CLI in a subprocess, real FUSE cycles, real
watchers; replicas checked with the independent rsync and Python comparisons of tests/helpers.py;
metrics scraped over HTTP and parsed with prometheus_client's parser; ``status -c --json``;
SIGHUP reload; SIGTERM within 10 s leaving no mount, watcher, cycle or agent process behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

import helpers
from daemon_proc import DISCREP, DaemonProc, committed, free_port, sample, scrape, wait_for
from discrep.core import locks
from discrep.replica.catalog import ReplicaCatalog

pytestmark = pytest.mark.fs


def write_config(path: Path, port: int, jobs: Dict[str, Dict[str, str]], max_concurrent: int = 2) -> None:
    lines = [f'metrics_listen = "127.0.0.1:{port}"', f"max_concurrent = {max_concurrent}"]
    for name, keys in jobs.items():
        lines.append(f"[jobs.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    path.write_text("\n".join(lines) + "\n")


def assert_identical(src: Path, dst: Path, d: Optional[DaemonProc] = None, timeout: float = 30.0) -> None:
    """The replica matches the (no longer changing) source within ``timeout``: a change the watcher
    had not journaled when a cycle read its cut comes with the next cycle."""
    if not wait_for(lambda: helpers.tree_equal(src, dst) == [], timeout, step=0.5) and d is not None:
        pytest.fail(f"{dst} differs from {src}: {helpers.tree_equal(src, dst)}\n{d.diagnose()}")
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def parent(pid: int) -> int:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return int(data[data.rindex(b")") + 2:].split()[1])


def no_mounts_under(path: Path) -> list:
    prefix = os.path.realpath(path) + "/"
    return [m for m, _t, _s in helpers.mounts() if (m + "/").startswith(prefix)]


@pytest.mark.fuse
def test_daemon_jobs_metrics_status_reload_stop(work_dir: Path):
    helpers.require_fuse()
    a, b, c = work_dir / "a", work_dir / "b", work_dir / "c"
    ra, rb, rc = work_dir / "ra", work_dir / "rb", work_dir / "rc"
    helpers.make_sample_tree(a)
    (b / "d").mkdir(parents=True)
    (b / "d" / "f").write_bytes(b"b" * 5000)
    (c / "x").mkdir(parents=True)
    (c / "x" / "y").write_bytes(b"c" * 3000)
    port = free_port()
    cfg = work_dir / "jobs.toml"
    jobs = {"a": {"source": str(a), "dest": str(ra), "every": "1s", "rpo": "1h"},
            "b": {"source": str(b), "dest": str(rb), "every": "1s"}}
    write_config(cfg, port, jobs)
    d = DaemonProc(work_dir, cfg)
    try:
        assert d.wait_notify("READY=1"), d.log_text()
        assert wait_for(lambda: committed(ra) >= 1 and committed(rb) >= 1, 40), d.log_text()
        # the trees change while the daemon runs
        with open(a / helpers.SAMPLE_BIG, "r+b") as f:
            f.seek(100_000)
            f.write(b"changed" * 1000)
        (a / "new.txt").write_bytes(b"new file\n")
        os.unlink(a / "top.txt")
        for i in range(3):
            (b / "d" / f"n{i}").write_bytes(b"%d" % i * 100)
        assert_identical(a, ra, d)          # (the trees differed: so a cycle after the change is done)
        assert_identical(b, rb, d)
        assert a.joinpath(".discrep", "watcher.lock").exists() and locks.held(str(a / ".discrep" / "watcher.lock"))

        # the cycle that brought the change is booked once its process has ended (after the commit)
        assert wait_for(lambda: all(d.state_doc()["jobs"][j]["cycles"]["ok"] >= 2 for j in ("a", "b")), 30)
        for _ in range(50):            # the metrics count what the state file records (no cycle ends meanwhile)
            before = d.state_doc()["jobs"]
            m = scrape(port)
            if d.state_doc()["jobs"] == before:
                break
        now = time.time()
        for job in ("a", "b"):
            assert sample(m, "discrep_cycles_total", job=job, result="ok") == before[job]["cycles"]["ok"] >= 2
        assert sample(m, "discrep_cycles_total", job="a", result="error") == 0, d.log_text()
        assert now - 30 < sample(m, "discrep_last_success_timestamp_seconds", job="a") <= now
        assert now - 30 < sample(m, "discrep_last_success_timestamp_seconds", job="b") <= now
        assert sample(m, "discrep_bytes_transferred_total", job="a") > 3 << 20      # the first copy read 3 MiB
        assert sample(m, "discrep_bytes_written_total", job="a") > 3 << 20
        assert sample(m, "discrep_files_changed_total", job="b") >= 4              # f, then n0..n2
        assert 0 <= sample(m, "discrep_lag_seconds", job="a") < 30
        assert sample(m, "discrep_last_cycle_duration_seconds", job="a") > 0
        assert sample(m, "discrep_history_bytes", job="a") > 0                   # the overwritten blocks
        assert sample(m, "discrep_rpo_seconds", job="a") == 3600
        assert sample(m, "discrep_rpo_seconds", job="b") is None                 # no rpo configured
        assert sample(m, "discrep_watcher_up", root=str(a)) == 1
        assert sample(m, "discrep_journal_pending_entries", root=str(b)) is not None

        rc_, st = d.status()
        assert rc_ == 0, st["problems"]
        assert st["daemon"] == "running" and set(st["jobs"]) == {"a", "b"}
        ja = st["jobs"]["a"]
        assert ja["rpo_breached"] is False and ja["lag_s"] < 30 and now - 30 < ja["last_success"] <= time.time()
        assert ja["last_result"]["cycle"] >= 2 and ja["last_error"] is None and ja["cycles"]["ok"] >= 2
        jb = st["jobs"]["b"]
        assert jb["rpo_breached"] is None and (jb["running"] or jb["next_run"] is not None)
        # each 'discrep run' child recorded its figures in the replica catalog, as continuous mode does
        cat = ReplicaCatalog(str(ra / ".discrep"))
        try:
            rec = json.loads(cat.get_meta("last_cycle_stats"))
        finally:
            cat.close()
        assert rec["cycle"] >= 2 and rec["change_source"] in ("scan", "journal") and rec["finished_ns"] > 0

        # a watcher that dies is restarted
        wpid = d.state_doc()["watchers"][str(b)]
        os.kill(wpid, signal.SIGKILL)
        assert wait_for(lambda: d.state_doc()["watchers"].get(str(b)) not in (None, wpid)
                        and locks.held(str(b / ".discrep" / "watcher.lock")), 20), d.log_text()

        # a bad jobs file on SIGHUP: logged, the old jobs keep running
        cfg.write_text(cfg.read_text() + "\n[jobs.broken]\nsource = 5\n")
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: "keeping the 2 job(s) loaded before" in d.log_text(), 10), d.log_text()
        n = committed(ra)
        assert wait_for(lambda: committed(ra) > n, 20), d.log_text()

        # SIGHUP with a good file: job c added, job b removed
        write_config(cfg, port, {"a": jobs["a"], "c": {"source": str(c), "dest": str(rc), "every": "1s"}})
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: committed(rc) >= 1, 30), d.log_text()
        (c / "x" / "z").write_bytes(b"more")
        assert_identical(c, rc, d)
        assert wait_for(lambda: sample(scrape(port), "discrep_cycles_total", job="c", result="ok") >= 2, 30)
        # job b is dropped once a cycle it was running at the reload ends (slow on a loaded machine)
        assert wait_for(lambda: sample(scrape(port), "discrep_cycles_total", job="b", result="ok") is None, 30), \
            d.log_text()
        m = scrape(port)
        # the reloads dropped no running cycle of a (which ran throughout)
        assert sample(m, "discrep_cycles_total", job="a", result="error") == 0, d.log_text()
        assert "interrupted" not in d.log_text()
        assert wait_for(lambda: not locks.held(str(b / ".discrep" / "watcher.lock")), 10)
        assert sample(scrape(port), "discrep_watcher_up", root=str(b)) is None
        assert set(d.state_doc()["jobs"]) == {"a", "c"}
        assert wait_for(lambda: any(" run " in cmd for _s, cmd in d.seen.values()))
    finally:
        code, took, out = d.stop()
        d.close()
    assert code == 0, d.log_text()
    assert took < 10, f"stop took {took:.1f}s"
    assert any("STOPPING=1" in msg for msg in d.messages)
    assert any("RELOADING=1" in msg for msg in d.messages)
    assert d.left == []
    assert any(" watch " in cmd for _s, cmd in d.seen.values())       # the tracker did see the children
    assert no_mounts_under(work_dir) == []
    assert not any(locks.held(str(p / ".discrep" / n)) for p in (a, c) for n in ("watcher.lock",))
    assert not locks.held(str(ra / ".discrep" / "daemon.lock"))
    assert "daemon stopped" in out
    for dst in (ra, rc):
        cat = ReplicaCatalog(str(dst / ".discrep"))
        try:
            assert cat.applying() is None
        finally:
            cat.close()
    assert_identical(a, ra)


def test_failing_job_backs_off_and_is_reported(work_dir: Path):
    """A job whose source is missing: errors counted with backoff, the watcher down, the error in the
    state file, in status -c (exit 1) and in the replica catalog; the daemon itself keeps running.
    With max_concurrent = 1 the two failing jobs never run at once."""
    port = free_port()
    cfg = work_dir / "jobs.toml"
    gone, dst = work_dir / "gone", work_dir / "dst"
    write_config(cfg, port, {"bad": {"source": str(gone), "dest": str(dst), "every": "1s", "rpo": "1s"},
                             "bad2": {"source": str(work_dir / "gone2"), "dest": str(work_dir / "dst2"),
                                      "every": "1s"}}, max_concurrent=1)
    d = DaemonProc(work_dir, cfg)
    both_seen = []

    def watch_concurrency() -> bool:
        jobs = d.state_doc()["jobs"]
        running = [n for n, j in jobs.items() if j.get("running")]
        assert len(running) <= 1, f"max_concurrent = 1, but running: {running}"
        both_seen.extend(running)
        return False
    try:
        assert d.wait_notify("READY=1"), d.log_text()
        wait_for(watch_concurrency, 4.0, step=0.02)
        assert set(both_seen) == {"bad", "bad2"}
        def failures() -> int:
            return d.state_doc()["jobs"].get("bad", {}).get("consecutive_failures", 0)
        assert wait_for(lambda: failures() >= 2, 30), d.log_text()
        j = d.state_doc()["jobs"]["bad"]
        n = j["consecutive_failures"]
        if not j["running"]:      # the retry waits 1 s, 2 s, 4 s ... after the n-th failure in a row
            assert 2 ** (n - 1) - 0.1 <= j["next_run"] - j["last_error_time"] <= 2 ** (n - 1) + 1, j
        m = scrape(port)
        assert sample(m, "discrep_consecutive_failures", job="bad") >= 2
        assert sample(m, "discrep_cycles_total", job="bad", result="error") >= 2
        assert sample(m, "discrep_cycles_total", job="bad", result="ok") == 0
        assert sample(m, "discrep_last_success_timestamp_seconds", job="bad") == 0
        assert sample(m, "discrep_watcher_up", root=str(gone)) == 0
        assert sample(m, "discrep_lag_seconds", job="bad") >= 1
        rc_, st = d.status()
        assert rc_ == 1
        j = st["jobs"]["bad"]
        assert j["consecutive_failures"] >= 2 and str(gone) in j["last_error"] and j["last_success"] is None
        assert j["rpo_breached"] is True
        assert any("RPO breached" in p for p in st["problems"]) and any("failed cycle" in p for p in st["problems"])
        rep = subprocess.run([DISCREP, "status", "--json", str(dst)], stdout=subprocess.PIPE, text=True, timeout=60)
        assert str(gone) in json.loads(rep.stdout.splitlines()[-1])["replica"]["last_error"]
        assert d.proc.poll() is None
        # the same DEST cannot be given to a continuous replicate meanwhile
        (work_dir / "other").mkdir()
        q = subprocess.run([DISCREP, "replicate", "--every", "1", str(work_dir / "other"), str(dst)],
                           stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        assert q.returncode == 13 and "already runs" in q.stderr
        # a second daemon on the same state directory is refused
        q = subprocess.run([DISCREP, "daemon", "-c", str(cfg), "--state-dir", str(d.state)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        assert q.returncode == 13 and "state directory" in q.stderr
    finally:
        code, took, _out = d.stop()
        d.close()
    assert code == 0 and took < 10
    assert d.left == []
    assert oct(os.stat(d.state).st_mode & 0o777) == "0o700"
    doc = json.loads((d.state / "state.json").read_text())
    assert doc["jobs"]["bad"]["cycles"]["error"] >= 2


def test_bad_jobs_file_at_start_is_an_error(work_dir: Path):
    cfg = work_dir / "jobs.toml"
    cfg.write_text("[jobs.a]\nsource = '/x'\n")
    p = subprocess.run([DISCREP, "daemon", "-c", str(cfg), "--state-dir", str(work_dir / "st")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode == 3 and "missing key 'dest'" in p.stderr


@pytest.mark.fuse
def test_killed_cycle_is_an_error_and_leaves_no_mount(work_dir: Path):
    """SIGKILL of a running cycle process (a crash): the daemon books an error, unmounts the export the
    dead cycle left, records the error in the replica catalog and goes on; the next cycle rolls back."""
    helpers.require_fuse()
    src, dst = work_dir / "s", work_dir / "r"
    helpers.make_sample_tree(src)
    port = free_port()
    cfg = work_dir / "jobs.toml"
    write_config(cfg, port, {"j": {"source": str(src), "dest": str(dst), "every": "1s"}})
    d = DaemonProc(work_dir, cfg)
    try:
        assert d.wait_notify("READY=1"), d.log_text()
        assert wait_for(lambda: committed(dst) >= 1, 40), d.log_text()
        killed = None
        for _ in range(200):
            (src / "churn").write_bytes(os.urandom(200_000))
            # the daemon's own child, not the export process a cycle may fork
            live = [pid for pid, (_s, cmd) in list(d.seen.items()) if " run " in cmd and parent(pid) == d.proc.pid]
            mounted = [m for m, t, _s in helpers.mounts() if "discrep-export-" in m and str(d.state) in m]
            if live and mounted:
                os.kill(live[-1], signal.SIGKILL)
                killed = live[-1]
                break
            time.sleep(0.05)
        assert killed, "never caught a cycle with its export mounted"
        assert wait_for(lambda: "killed by signal 9" in d.log_text(), 20), d.log_text()
        # the dead export's mount goes (fusermount3's auto-unmount, or the daemon unmounts it)
        assert wait_for(lambda: not [m for m, _t, _s in helpers.mounts() if str(d.state) in m], 10)
        (src / "after").write_bytes(b"after the kill")
        assert_identical(src, dst, d)
        m = scrape(port)
        assert sample(m, "discrep_cycles_total", job="j", result="error") >= 1
        assert sample(m, "discrep_consecutive_failures", job="j") == 0
    finally:
        code, took, _out = d.stop()
        d.close()
    assert code == 0 and took < 10
    assert d.left == []
    assert no_mounts_under(work_dir) == []


def test_discrep_run_records_its_result_and_error(work_dir: Path):
    """`discrep run JOB` records into the replica catalog as continuous mode does (status DEST shows it)."""
    cfg = work_dir / "jobs.toml"
    dst = work_dir / "dst"
    (dst / ".discrep").mkdir(parents=True)
    cfg.write_text(f"[jobs.j]\nsource = '{work_dir / 'missing'}'\ndest = '{dst}'\nevery = '1m'\n")
    p = subprocess.run([DISCREP, "run", "-c", str(cfg), "--json", "j"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    assert p.returncode != 0 and json.loads(p.stdout.splitlines()[-1])["error"]
    cat = ReplicaCatalog(str(dst / ".discrep"))
    try:
        assert "missing" in cat.get_meta("last_error") and int(cat.get_meta("last_error_ns")) > 0
    finally:
        cat.close()


@pytest.mark.root
def test_clean_tmpdir_unmounts_and_removes_only_empty_dirs(work_dir: Path):
    """What a killed cycle left in its temporary directory: mounts are unmounted, empty directories
    removed; a directory that still holds a file is kept (never a recursive delete)."""
    from discrep.run.children import clean_tmpdir, mounts_under
    helpers.require_root()
    t = work_dir / "cycle-1"
    (t / "discrep-export-x").mkdir(parents=True)
    (t / "keep").mkdir()
    (t / "keep" / "file").write_bytes(b"x")
    helpers.run(["mount", "-t", "tmpfs", "tmpfs", str(t / "discrep-export-x")])
    (t / "discrep-export-x" / "inside").write_bytes(b"on the mount")
    assert mounts_under(str(t)) == [str(t / "discrep-export-x")]
    assert clean_tmpdir(str(t)) == []
    assert mounts_under(str(t)) == [] and not (t / "discrep-export-x").exists()
    assert (t / "keep" / "file").exists()
    (t / "keep" / "file").unlink()
    assert clean_tmpdir(str(t)) == [] and not t.exists()

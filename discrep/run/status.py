"""``discrep status PATH``: the state of a source (watcher, journal) and/or a replica.

Source (``PATH/.discrep/journal.db``): is a watcher running (its flock), which
backend, since when, the journal's last seq, entries beyond the last
acknowledged cut, and the open gap if any (then the next cycle scans); ``caught_up`` when a
watcher runs and no gap is open (``discrep watch`` closes its own gaps with a background scan).

Replica (``PATH/.discrep/replica.db``): last committed cycle, its source
(snapshot) time and commit time, lag = now - source time, the last cycle's
figures (meta ``last_cycle_stats`` written by continuous mode, else the cycle
row's stats), the last error (meta ``last_error``/``last_error_ns``), an
interrupted cycle, and whether a continuous daemon holds ``daemon.lock``.

Jobs (``discrep status -c FILE``, ``jobs_status``): per job of the jobs file what ``discrep daemon``
recorded in its state file (``jobstate``: last success, last result and figures, last error, next
run) with the replica's newest recovery point, the lag against it and whether the job's ``rpo`` is
breached.  Problems worth a look (RPO breached, a failing job, no daemon) are listed in ``problems``.

Read-only; thread-safety: runs in the caller's thread.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

from discrep.core.errors import Error, UsageError
from discrep.run.config import Job
from discrep.run.jobstate import JobState


def source_status(root: str) -> Dict[str, Any]:
    from discrep.journal.store import Journal
    from discrep.source.build import watcher_alive
    from discrep.source.cycles import acked_cycle as acked_record
    sd = os.path.join(root, ".discrep")
    j = Journal(sd)
    try:
        alive = watcher_alive(os.fsencode(root))
        last = j.last_seq()
        a = acked_record(os.fsencode(root))
        acked_cut, acked_cycle = (a.cut_seq, a.cycle) if a else (0, 0)
        started = j.get("watcher_started_ns") or ""
        out = {
            "watcher": "running" if alive else "stopped",
            "backend": (j.get("watcher_backend") or None) if alive else None,
            "last_backend": j.get("watcher_backend") or None,
            "watcher_pid": (int(j.get("watcher_pid") or 0) or None) if alive else None,
            "watcher_since_s": round(time.time() - int(started) / 1e9, 1) if alive and started else None,
            "journal_last_seq": last,
            "acked_cycle": acked_cycle,
            "pending_entries": j.count(acked_cut),
            "gap": j.gap(),
        }
        # caught up: the watcher runs and no gap is open, so a cycle reads the journal and never walks
        out["caught_up"] = bool(alive and out["gap"] is None)
        out["next_change_source"] = "journal" if (out["caught_up"] and acked_cycle > 0) else "scan"
        return out
    finally:
        j.close()


def replica_status(dest: str) -> Dict[str, Any]:
    from discrep.run.daemon import daemon_running
    from discrep.replica.catalog import ReplicaCatalog
    cat = ReplicaCatalog(os.path.join(dest, ".discrep"))
    try:
        hist = cat.history()
        applying = cat.applying()
        stats_meta = cat.get_meta("last_cycle_stats")
        err = cat.get_meta("last_error") or None
        err_ns = int(cat.get_meta("last_error_ns") or 0) or None
    finally:
        cat.close()
    now = time.time_ns()
    out: Dict[str, Any] = {"last_cycle": 0, "source_time_ns": None, "committed_ns": None, "lag_s": None,
                           "last_cycle_stats": None, "last_error": err, "last_error_ns": err_ns,
                           "last_error_age_s": None if err_ns is None else round((now - err_ns) / 1e9, 1),
                           "interrupted_cycle": applying, "daemon": "running" if daemon_running(dest) else "stopped"}
    if hist:
        c, src_ns, com_ns, st = hist[-1]
        out.update(last_cycle=c, source_time_ns=src_ns or None, committed_ns=com_ns or None,
                   lag_s=round((now - src_ns) / 1e9, 3) if src_ns else None,
                   since_commit_s=round((now - com_ns) / 1e9, 3) if com_ns else None)
        stats = st
        if stats_meta:
            try:
                m = json.loads(stats_meta)
                if m.get("cycle") == c:
                    stats = m
            except ValueError:
                pass
        out["last_cycle_stats"] = stats
        out["last_consistency"] = _consistency(st)
        apps = [h.cycle for h in hist if _consistency(h.stats) == "app"]
        out["last_app_consistent_cycle"] = apps[-1] if apps else None
    return out


def _consistency(stats: Dict[str, Any]) -> str:
    """A recovery point's kind: "app" (pre_snapshot hook succeeded), "crash-fallback" (it failed and
    a crash-consistent point was taken) or "crash" (no hook)."""
    c = stats.get("consistency") if isinstance(stats, dict) else None
    return c if c in ("app", "crash-fallback") else "crash"


def path_status(path: str) -> Dict[str, Any]:
    """The state of PATH as a source and/or a replica (``UsageError`` if it is neither)."""
    given, path = path, os.path.abspath(path)
    sd = os.path.join(path, ".discrep")
    is_src = os.path.exists(os.path.join(sd, "journal.db"))
    is_rep = os.path.exists(os.path.join(sd, "replica.db"))
    if not os.path.isdir(path):
        raise UsageError(f"{given} is not a directory")
    if not (is_src or is_rep):
        raise UsageError(f"{given} is neither a discrep source nor a replica (no .discrep/journal.db or "
                         f"replica.db)", hint="run 'discrep watch' or 'discrep replicate' first")
    out: Dict[str, Any] = {"path": path}
    if is_src:
        out["source"] = source_status(path)
    if is_rep:
        out["replica"] = replica_status(path)
    return out


def _job_status(job: Job, st: JobState, now: float) -> Dict[str, Any]:
    dest = os.path.abspath(job.options.dest)
    rep: Optional[Dict[str, Any]] = None
    if os.path.exists(os.path.join(dest, ".discrep", "replica.db")):
        try:
            rep = replica_status(dest)
        except Error as e:
            rep = {"error": str(e)}
    src_ns = (rep or {}).get("source_time_ns")
    ref = src_ns / 1e9 if src_ns else (st.source_time or st.first_seen or None)
    now = max(now, time.time())
    lag = round(max(0.0, now - ref), 3) if ref else None
    breached = None if job.rpo_s is None or lag is None else lag > job.rpo_s
    return {
        "source": job.options.src, "dest": job.options.dest,
        "every_s": job.every_s, "schedule": job.schedule, "rpo_s": job.rpo_s,
        "last_cycle": (rep or {}).get("last_cycle", 0), "lag_s": lag, "rpo_breached": breached,
        "last_success": st.last_success,
        "last_success_age_s": None if st.last_success is None else round(now - st.last_success, 1),
        "last_status": st.last_status, "last_result": st.last_result,
        "last_error": st.last_error, "last_error_time": st.last_error_time,
        "consecutive_failures": st.consecutive_failures, "cycles": st.cycles,
        "running": st.running, "next_run": st.next_run,
        "next_run_in_s": None if st.next_run is None else round(st.next_run - now, 1),
        "interrupted_cycle": (rep or {}).get("interrupted_cycle"),
        "last_consistency": (rep or {}).get("last_consistency"),
        "last_app_consistent_cycle": (rep or {}).get("last_app_consistent_cycle"),
    }


def jobs_status(config_path: str, state_dir: str) -> Dict[str, Any]:
    """Every job of the jobs file with what the daemon recorded (see the module doc)."""
    from discrep.core import locks
    from discrep.run.config import load
    from discrep.run.jobstate import load as load_state
    cfg = load(config_path)
    state = load_state(state_dir)
    daemon = locks.held(os.path.join(state_dir, "daemon.lock"))
    now = time.time()
    jobs = {n: _job_status(j, state["jobs"].get(n) or JobState(), now) for n, j in sorted(cfg.jobs.items())}
    problems: List[str] = []
    if not daemon:
        problems.append(f"no daemon runs with state directory {state_dir} ('discrep daemon -c {cfg.path}', "
                        f"or systemctl start discrep)")
    for n, j in jobs.items():
        if j["rpo_breached"]:
            problems.append(f"job {n}: RPO breached: the newest recovery point is {j['lag_s']:.0f}s old, "
                            f"rpo is {j['rpo_s']:.0f}s")
        if j["consecutive_failures"]:
            problems.append(f"job {n}: {j['consecutive_failures']} failed cycle(s) in a row: {j['last_error']}")
    return {"config": cfg.path, "state_dir": os.path.abspath(state_dir),
            "daemon": "running" if daemon else "stopped", "daemon_pid": state.get("daemon_pid") if daemon else None,
            "jobs": jobs, "problems": problems}

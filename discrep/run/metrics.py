"""Prometheus metrics of ``discrep daemon`` (prometheus_client, an own ``CollectorRegistry``).

Per job (label ``job``, the name in the jobs file):

* ``discrep_last_success_timestamp_seconds`` -- when the last good cycle ended (0: never)
* ``discrep_last_cycle_duration_seconds``    -- how long the last finished cycle took
* ``discrep_cycles_total{result="ok|warning|error"}`` -- finished cycles by result
* ``discrep_bytes_transferred_total``        -- bytes read through the export by good cycles
* ``discrep_bytes_written_total``            -- bytes written into the replica by good cycles
* ``discrep_files_changed_total``            -- files changed by good cycles
* ``discrep_lag_seconds``                    -- age of the newest recovery point: now minus the
  source (snapshot) time of the replica's last committed cycle; for a job that never succeeded,
  the time since the daemon first knew it (computed when scraped)
* ``discrep_history_bytes``                  -- disk space of DEST/.discrep/history (like du)
* ``discrep_rpo_seconds``                    -- the job's configured ``rpo`` (absent without one)
* ``discrep_job_running``, ``discrep_consecutive_failures``, ``discrep_next_run_timestamp_seconds``

Per local source root (label ``root``): ``discrep_journal_pending_entries`` (journal entries
beyond the last acknowledged cycle) and ``discrep_watcher_up`` (1 while a watcher holds the
root's watcher lock).  Plus ``discrep_daemon_start_time_seconds`` and the process collector's
``process_*``.  ``METRICS`` lists every family name (the dashboard and the alert rules may use
only these; tests/unit/test_monitoring.py checks that).

Thread-safety: prometheus_client's metrics are thread-safe; the daemon's main thread updates them
and the HTTP server thread reads them.  The lag references are kept under ``_lock``.
"""
from __future__ import annotations

import math
import os
import stat
import threading
import time
from typing import Any, Dict, Optional, Tuple

from prometheus_client import (CollectorRegistry, Counter, Gauge, ProcessCollector, disable_created_metrics,
                               start_http_server)

JOB_GAUGES = {
    "discrep_last_success_timestamp_seconds": "Unix time the last successful cycle ended (0: never)",
    "discrep_last_cycle_duration_seconds": "Duration of the last finished cycle",
    "discrep_lag_seconds": "Age of the newest recovery point (now - source time of the last committed cycle)",
    "discrep_history_bytes": "Disk space used by DEST/.discrep/history",
    "discrep_rpo_seconds": "The job's configured recovery point objective (rpo)",
    "discrep_job_running": "1 while a cycle of the job runs",
    "discrep_consecutive_failures": "Failed cycles since the last success",
    "discrep_next_run_timestamp_seconds": "Unix time the next cycle is due",
}
JOB_COUNTERS = {
    "discrep_bytes_transferred_total": "Bytes read through the export by successful cycles",
    "discrep_bytes_written_total": "Bytes written into the replica by successful cycles",
    "discrep_files_changed_total": "Files changed in the replica by successful cycles",
}
RESULT_FIELDS = {"discrep_bytes_transferred_total": "bytes_transferred",
                 "discrep_bytes_written_total": "bytes_written",
                 "discrep_files_changed_total": "files_changed"}
ROOT_GAUGES = {
    "discrep_journal_pending_entries": "Journal entries beyond the last acknowledged cycle",
    "discrep_watcher_up": "1 while a watcher journals changes under the source root",
}
CYCLES = "discrep_cycles_total"
START = "discrep_daemon_start_time_seconds"
RESULTS = ("ok", "warning", "error")
METRICS: Tuple[str, ...] = tuple(sorted([*JOB_GAUGES, *JOB_COUNTERS, *ROOT_GAUGES, CYCLES, START]))


class Metrics:
    """The daemon's metrics in their own registry; ``serve`` exposes them over HTTP."""

    def __init__(self) -> None:
        disable_created_metrics()      # no *_created series: process-wide, and the daemon wants none
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.gauges: Dict[str, Gauge] = {n: Gauge(n, h, ["job"], registry=r) for n, h in JOB_GAUGES.items()}
        # prometheus_client appends _total to a counter's samples itself
        self.counters: Dict[str, Counter] = {n: Counter(n[:-len("_total")], h, ["job"], registry=r)
                                             for n, h in JOB_COUNTERS.items()}
        self.cycles = Counter(CYCLES[:-len("_total")], "Finished cycles by result (ok, warning, error)",
                              ["job", "result"], registry=r)
        self.roots: Dict[str, Gauge] = {n: Gauge(n, h, ["root"], registry=r) for n, h in ROOT_GAUGES.items()}
        Gauge(START, "Unix time the daemon started", registry=r).set(time.time())
        self._lock = threading.Lock()
        self._lag_ref: Dict[str, float] = {}
        self._server: Optional[Any] = None

    # -- jobs -------------------------------------------------------------------------------------
    def add_job(self, job: str, rpo_s: Optional[float], first_seen: float) -> None:
        """Create the job's series (counters at 0, so a first error shows as an increase)."""
        for r in RESULTS:
            self.cycles.labels(job, r).inc(0)
        for c in self.counters.values():
            c.labels(job).inc(0)
        with self._lock:
            self._lag_ref.setdefault(job, first_seen)
        self.gauges["discrep_lag_seconds"].labels(job).set_function(lambda: self._lag(job))
        for n in ("discrep_last_success_timestamp_seconds", "discrep_job_running", "discrep_consecutive_failures"):
            self.gauges[n].labels(job)
        self.set_rpo(job, rpo_s)

    def set_rpo(self, job: str, rpo_s: Optional[float]) -> None:
        g = self.gauges["discrep_rpo_seconds"]
        if rpo_s is None:
            _remove(g, job)
        else:
            g.labels(job).set(rpo_s)

    def remove_job(self, job: str) -> None:
        for g in self.gauges.values():
            _remove(g, job)
        for c in self.counters.values():
            _remove(c, job)
        for r in RESULTS:
            _remove(self.cycles, job, r)
        with self._lock:
            self._lag_ref.pop(job, None)

    def _lag(self, job: str) -> float:
        with self._lock:
            ref = self._lag_ref.get(job)
        return math.nan if ref is None else max(0.0, time.time() - ref)

    def set_state(self, job: str, *, last_success: Optional[float], lag_ref: Optional[float],
                  failures: int, running: bool, next_run: Optional[float]) -> None:
        """The job's current state (after start-up, a cycle's start or end)."""
        self.gauges["discrep_last_success_timestamp_seconds"].labels(job).set(last_success or 0)
        if lag_ref is not None:
            with self._lock:
                self._lag_ref[job] = lag_ref
        self.gauges["discrep_consecutive_failures"].labels(job).set(failures)
        self.gauges["discrep_job_running"].labels(job).set(1 if running else 0)
        if next_run is not None:
            self.gauges["discrep_next_run_timestamp_seconds"].labels(job).set(next_run)

    def cycle_done(self, job: str, result: str, figures: Dict[str, Any], duration_s: float) -> None:
        """Count a finished cycle (``result`` ok, warning or error) and add its figures."""
        self.cycles.labels(job, result).inc()
        self.gauges["discrep_last_cycle_duration_seconds"].labels(job).set(duration_s)
        if result != "error":
            for name, key in RESULT_FIELDS.items():
                v = figures.get(key)
                if isinstance(v, (int, float)) and v > 0:
                    self.counters[name].labels(job).inc(v)

    def set_history_bytes(self, job: str, n: int) -> None:
        self.gauges["discrep_history_bytes"].labels(job).set(n)

    # -- source roots -----------------------------------------------------------------------------
    def set_root(self, root: str, *, watcher_up: bool, pending: Optional[int]) -> None:
        self.roots["discrep_watcher_up"].labels(root).set(1 if watcher_up else 0)
        if pending is not None:
            self.roots["discrep_journal_pending_entries"].labels(root).set(pending)

    def remove_root(self, root: str) -> None:
        for g in self.roots.values():
            _remove(g, root)

    # -- HTTP -------------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> None:
        """Serve /metrics on host:port in a daemon thread (prometheus_client's own server)."""
        self.close()
        self._server, _thread = start_http_server(port, host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def history_bytes(dest: str) -> int:
    """Disk space (allocated blocks, like du) of ``DEST/.discrep/history``; 0 when there is none."""
    total = 0
    todo = [os.path.join(dest, ".discrep", "history")]
    while todo:
        try:
            it = os.scandir(todo.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    todo.append(e.path)
    return total

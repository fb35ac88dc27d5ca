"""``discrep daemon``: every job of the jobs file on its schedule, as one long-running service.

* Schedule: a job with ``every`` runs that long after its last cycle started (the first time at
  once); a job with a cron ``schedule`` at its next slot (a slot missed while the daemon was down
  runs at start).  A local-source job with ``every`` also runs sooner when its journal has entries
  beyond the acknowledged cut (quiet for 0.25 s, or 2 s after the first), as continuous mode does.
* At most ``max_concurrent`` cycles at once, never two of one job or on one DEST.  The daemon holds
  ``DEST/.discrep/daemon.lock`` for each job's DEST (a ``replicate --every`` there is refused).
* Each cycle is a child process, ``discrep run -c SNAPSHOT --json -q JOB`` (``children.CycleChild``):
  a crash of one cycle cannot take the daemon down, and SIGTERM stops a cycle cleanly.
  SNAPSHOT is ``STATE_DIR/jobs.toml``, the bytes of the jobs file as last loaded: an edited but
  not yet reloaded (or bad) file never reaches a cycle.
* Failures: the job retries after 1 s, 2 s, 4 s ... capped at 300 s (as continuous mode).  A cycle
  process that died without reporting gets its error recorded in the replica catalog.
* One ``discrep watch ROOT`` child per local source root some job uses (``sources.SourceRoots``).
* SIGHUP reloads the jobs file; a running cycle goes on (a removed job is dropped when its cycle
  ends); a bad file is logged and the jobs loaded before are kept.  SIGTERM/SIGINT: children get
  SIGTERM, after ``grace_s`` SIGKILL (their process group; mounts under their temporary directory
  are then unmounted), and the daemon exits -- within ``grace_s`` + a few seconds.
* SIGUSR1 writes every thread's stack to the log (faulthandler), for a daemon that seems stuck.
* systemd: ``READY=1`` once running, ``RELOADING=1``/``READY=1`` around a reload, ``STOPPING=1`` at
  the stop, sent to ``$NOTIFY_SOCKET`` (``sd_notify``: a few lines with the socket module).
* State: per job ``jobstate.JobState`` in ``STATE_DIR/state.json`` (written atomically), metrics
  (``metrics.Metrics``) served at ``metrics_listen``.  ``STATE_DIR/daemon.lock`` keeps a second
  daemon off the same state directory.

Thread-safety: everything runs in the main thread (signal handlers only set flags and wake it
through a pipe) except one worker thread per running cycle, which waits for its child and hands
the outcome over through a queue; the metrics HTTP server reads the metrics in its own thread.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import queue
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from discrep.core import locks
from discrep.core.errors import DestinationError, Error, UsageError
from discrep.core.paths import state_dir as replica_state_dir
from discrep.run import jobstate
from discrep.run.children import CycleChild, Outcome, clean_tmpdir
from discrep.run.config import ConfigError, Job, JobsConfig, parse
from discrep.run.daemon import record_error
from discrep.run.jobstate import JobState
from discrep.run.metrics import Metrics, history_bytes
from discrep.run.sources import SourceRoots, wait_stopped

log = logging.getLogger(__name__)

GRACE_S = 6.0                 # SIGTERM -> SIGKILL for children at the stop (the whole stop stays under 10 s)
HISTORY_EVERY_S = 60.0        # DEST/.discrep/history is measured after a cycle that changed files, else
                              # at most this often (retention may have pruned it)
TICK_S = 1.0                  # watchers and per-root metrics at least this often
POLL_S = 0.1                  # journal polls for the early trigger
QUIET_S = 0.25
EAGER_MAX_S = 2.0
BACKOFF_MIN = 1.0
BACKOFF_MAX = 300.0
SNAPSHOT = "jobs.toml"
RUN_DIR = "run"


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET``; False when there is none."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s): %s", addr, e)
        return False
    return True


def read_config(path: str) -> Tuple[JobsConfig, bytes]:
    """The jobs file checked (``ConfigError`` as ``config.load`` raises it) and its exact bytes."""
    import tomllib
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, ["no such file"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot read it: {e.strerror}"]) from None
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return parse(doc, path), data


def replica_source_time(dest: str) -> Optional[float]:
    """Source (snapshot) time of the replica's newest committed cycle; None without one."""
    from discrep.replica.catalog import ReplicaCatalog
    sd = os.fsdecode(replica_state_dir(os.fsencode(dest)))
    if not os.path.exists(os.path.join(sd, "replica.db")):
        return None
    try:
        cat = ReplicaCatalog(sd)
    except Error:
        return None
    try:
        hist = cat.history()
    finally:
        cat.close()
    return hist[-1][1] / 1e9 if hist and hist[-1][1] else None


class _Waker:
    """A self-pipe: signal handlers and worker threads wake the main loop's select."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.w, b"x")
        except (BlockingIOError, OSError):
            pass

    def wait(self, timeout: float) -> None:
        select.select([self.r], [], [], max(0.0, timeout))
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@dataclass
class _Slot:
    """One job at run time (main thread)."""
    job: Job
    state: JobState
    child: Optional[CycleChild] = None
    removed: bool = False            # gone from the jobs file; dropped when its cycle ends
    first_new: Optional[float] = None
    last_seen: Optional[int] = None
    quiet_since: float = 0.0

    @property
    def dest(self) -> str:
        return os.path.abspath(self.job.options.dest)

    @property
    def root(self) -> Optional[str]:
        return None if self.job.options.remote_source else os.path.abspath(self.job.options.src)


def first_run(job: Job, st: JobState, now: float) -> float:
    """When a job (new, reloaded or at the daemon's start) runs next, from its state."""
    if st.last_status in ("error", "interrupted") or st.running:
        return now
    if st.last_start is None:
        return now if job.schedule is None else job.next_run(now)
    return max(now, job.next_run(st.last_start))


class Service:
    """The daemon (see the module doc); ``run()`` returns when it was told to stop."""

    def __init__(self, config_path: str, state_dir: str, *, grace_s: float = GRACE_S):
        self.config_path = os.path.abspath(config_path)
        self.grace_s = grace_s
        self.state_dir = jobstate.ensure_dir(state_dir)
        self.snapshot = os.path.join(self.state_dir, SNAPSHOT)
        self.cfg: Optional[JobsConfig] = None
        self.slots: Dict[str, _Slot] = {}
        self.metrics = Metrics()
        self.sources = SourceRoots(self.metrics)
        self.dest_locks: Dict[str, int] = {}
        # (job, child, outcome, history bytes, source time) from workers; child and outcome None: _measure
        self.done: "queue.Queue[Tuple[str, Optional[CycleChild], Optional[Outcome], Optional[int], Optional[float]]]" \
            = queue.Queue()
        self.history_at: Dict[str, float] = {}
        self.workers: List[threading.Thread] = []
        self.waker = _Waker()
        self.stop_reason: Optional[str] = None
        self.reload_wanted = False
        self.started = time.time()
        self.seq = 0
        self.lock_fd: Optional[int] = None
        self.totals = {r: 0 for r in jobstate.RESULTS}

    # -- signals ----------------------------------------------------------------------------------
    def on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.reload_wanted = True
        else:
            self.stop_reason = self.stop_reason or f"signal {signal.Signals(signum).name}"
        self.waker.wake()

    # -- start, loop, stop ------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        self.lock_fd = locks.take(os.path.join(self.state_dir, "daemon.lock"),
                                  f"another discrep daemon uses the state directory {self.state_dir}",
                                  hint="stop it first, or give this one its own --state-dir")
        old = {}
        try:
            if threading.current_thread() is threading.main_thread():
                for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    old[s] = signal.signal(s, self.on_signal)
                faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: stacks to the log
            self._start()
            sd_notify(f"READY=1\nSTATUS=running {len(self.slots)} job(s)")
            log.info("daemon running: %d job(s) from %s, state in %s", len(self.slots), self.config_path,
                     self.state_dir)
            self._loop()
        finally:                       # also after a bug in the loop: no child outlives the daemon
            self.stop_reason = self.stop_reason or "error"
            sd_notify(f"STOPPING=1\nSTATUS=stopping ({self.stop_reason})")
            try:
                self._stop()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
                if old:
                    faulthandler.unregister(signal.SIGUSR1)
                self._close()
        return {"stopped": self.stop_reason, "jobs": len(self.slots), "cycles": dict(self.totals),
                "state_dir": self.state_dir}

    def _start(self) -> None:
        left = clean_tmpdir(os.path.join(self.state_dir, RUN_DIR))      # a killed daemon's leftovers
        if left:
            log.warning("still mounted from an earlier run: %s", ", ".join(left))
        cfg, data = read_config(self.config_path)
        saved = jobstate.load(self.state_dir)["jobs"]
        self._apply_config(cfg, data, saved)

    def _loop(self) -> None:
        next_tick = 0.0
        while self.stop_reason is None:
            if self.reload_wanted:
                self.reload_wanted = False
                self.reload()
            self._collect()
            now = time.time()
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + TICK_S
                self.sources.supervise(time.monotonic())
            self._poll_journals(now)
            self._start_due(now)
            self.waker.wait(self._timeout(now, next_tick - time.monotonic()))

    def _timeout(self, now: float, to_tick: float) -> float:
        t = to_tick              # a due job waiting for a free slot is woken by a cycle's end
        for s in self.slots.values():
            if s.child is None and not s.removed and s.state.next_run is not None and s.state.next_run > now:
                t = min(t, s.state.next_run - now)
            if self._eager(s):
                t = min(t, POLL_S)
        return max(0.01, t)

    def _stop(self) -> None:
        running = [s.child for s in self.slots.values() if s.child is not None]
        log.info("stopping: %d running cycle(s), %d watcher(s)", len(running), len(self.sources.watchers))
        for c in running:
            c.terminate()
        self.sources.terminate()
        end = time.monotonic() + self.grace_s
        while True:
            self._collect()                       # a cycle's slot is free once its outcome is booked
            if not any(s.child for s in self.slots.values()) and self.sources.all_stopped():
                break
            if time.monotonic() >= end:
                break
            self.waker.wait(0.05)
        for s in self.slots.values():
            if s.child is not None:
                log.warning("cycle of job %s did not stop in %.0fs: SIGKILL", s.job.name, self.grace_s)
                s.child.kill()
        self.sources.kill()
        end = time.monotonic() + 2.0
        for w in self.workers:
            w.join(timeout=max(0.0, end - time.monotonic()))
        wait_stopped(self.sources, 1.0)
        self._collect()
        self._save()

    def _close(self) -> None:
        self.metrics.close()
        self.sources.close()
        for fd in self.dest_locks.values():
            os.close(fd)
        self.dest_locks.clear()
        self.waker.close()
        if self.lock_fd is not None:
            os.close(self.lock_fd)

    # -- configuration ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the jobs file (SIGHUP); on a problem keep the jobs loaded before."""
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            cfg, data = read_config(self.config_path)
        except ConfigError as e:
            log.error("reload: %s -- keeping the %d job(s) loaded before", e, len(self.slots))
            sd_notify("READY=1\nSTATUS=reload failed: the jobs file has problems; old jobs kept")
            return False
        self._apply_config(cfg, data, {})
        log.info("reloaded %s: %d job(s)", self.config_path, len(cfg.jobs))
        sd_notify(f"READY=1\nSTATUS=running {len(cfg.jobs)} job(s)")
        return True

    def _apply_config(self, cfg: JobsConfig, data: bytes, saved: Dict[str, JobState]) -> None:
        jobstate.write_atomic(self.snapshot, data)
        now = time.time()
        for name, old in list(self.slots.items()):
            if name not in cfg.jobs:
                old.removed = True
                if old.child is None:
                    self._drop(name)
        for name, job in cfg.jobs.items():
            self._apply_job(name, job, saved.get(name), now)
        self._listen(cfg)
        self.cfg = cfg
        self.sources.set_roots({s.root for s in self.slots.values() if s.root and not s.removed})
        self._release_locks()
        self._save()

    def _apply_job(self, name: str, job: Job, saved: Optional[JobState], now: float) -> None:
        """A job of a newly loaded jobs file: add it, or take its new definition (a running cycle goes
        on with the old one; the next run is recomputed only when the timing changed)."""
        slot = self.slots.get(name)
        if slot is None:
            st = saved or JobState(first_seen=now)
            slot = self.slots[name] = _Slot(job, st)
            self.metrics.add_job(name, job.rpo_s, st.first_seen)
            threading.Thread(target=self._measure, args=(name, slot.dest), name=f"measure-{name}",
                             daemon=True).start()
        else:
            changed_timing = (slot.job.every_s, slot.job.schedule) != (job.every_s, job.schedule)
            slot.job, slot.removed = job, False
            self.metrics.set_rpo(name, job.rpo_s)
            if not changed_timing or slot.child is not None:
                return
        if slot.child is None:
            slot.state.running = False
            slot.state.next_run = first_run(job, slot.state, now)
        self._publish(name)

    def _listen(self, cfg: JobsConfig) -> None:
        if self.cfg is not None and self.cfg.metrics_listen == cfg.metrics_listen:
            return
        self.metrics.close()
        if cfg.metrics_listen is None:
            return
        host, port = cfg.metrics_listen
        try:
            self.metrics.serve(host, port)
        except OSError as e:
            if self.cfg is None:
                raise UsageError(f"cannot serve metrics on {host}:{port}: {e.strerror}",
                                 hint="pick a free port for metrics_listen in the jobs file") from None
            log.error("cannot serve metrics on %s:%d: %s", host, port, e.strerror)
            return
        log.info("metrics at http://%s:%d/metrics", host, port)

    def _drop(self, name: str) -> None:
        self.slots.pop(name, None)
        self.metrics.remove_job(name)
        log.info("job %s removed", name)

    # -- scheduling -------------------------------------------------------------------------------
    def _eager(self, s: _Slot) -> bool:
        """Does the job take a sooner cycle when its journal has new entries?"""
        return (s.root is not None and s.job.every_s is not None and s.child is None and not s.removed
                and s.state.consecutive_failures == 0)

    def _poll_journals(self, now: float) -> None:
        mono = time.monotonic()
        for s in self.slots.values():
            if not self._eager(s) or s.state.next_run is None or s.state.next_run <= now:
                continue
            seq = self.sources.last_seq(s.root) if s.root else None
            cut = self.sources.cut(s.root) if s.root else None
            if seq is None or cut is None or seq <= cut:
                continue
            if s.first_new is None:
                s.first_new = mono
            if seq != s.last_seen:
                s.last_seen, s.quiet_since = seq, mono
            if mono - s.quiet_since >= QUIET_S or mono - s.first_new >= EAGER_MAX_S:
                log.debug("job %s: journal entries beyond seq %d: cycle now", s.job.name, cut)
                s.state.next_run = now

    def _start_due(self, now: float) -> None:
        limit = self.cfg.max_concurrent if self.cfg else 1
        running = [s for s in self.slots.values() if s.child is not None]
        busy = {s.dest for s in running}
        due = sorted((s.state.next_run, n) for n, s in self.slots.items()
                     if s.child is None and not s.removed and s.state.next_run is not None
                     and s.state.next_run <= now)
        for _t, name in due:
            if len(running) >= limit:
                break
            s = self.slots[name]
            if s.dest in busy:
                continue
            if self._launch(s, now):
                running.append(s)
                busy.add(s.dest)

    def _lock_dest(self, dest: str) -> None:
        if dest in self.dest_locks:
            return
        if not os.path.isdir(dest):
            par = os.path.dirname(dest)
            if not os.path.isdir(par):
                raise DestinationError(f"cannot create replica {dest}: {par} does not exist",
                                       hint="create the parent directory first")
            os.makedirs(dest, exist_ok=True)
        path = os.path.join(os.fsdecode(replica_state_dir(os.fsencode(dest))), "daemon.lock")
        self.dest_locks[dest] = locks.take(path, f"a continuous 'discrep replicate --every' already runs on {dest}",
                                           hint="stop it; the daemon runs this job's cycles")

    def _release_locks(self) -> None:
        used = {s.dest for s in self.slots.values() if not s.removed or s.child is not None}
        for dest in [d for d in self.dest_locks if d not in used]:
            os.close(self.dest_locks.pop(dest))

    def _launch(self, s: _Slot, now: float) -> bool:
        """Start a cycle of the job in a child process; False (and a recorded failure) if it cannot."""
        name = s.job.name
        self.seq += 1
        child = CycleChild(name, self.snapshot, os.path.join(self.state_dir, RUN_DIR, f"cycle-{self.seq}"))
        try:
            self._lock_dest(s.dest)
            child.start()
        except (Error, OSError) as e:
            msg = str(e) if isinstance(e, Error) else f"cannot start the cycle: {e}"
            self._finish(s, Outcome("error", error=msg, started=now, ended=time.time()), None, None)
            return False
        s.child = child
        s.first_new = s.last_seen = None
        s.state.running, s.state.last_start, s.state.next_run = True, child.started, None
        log.info("job %s: cycle started (pid %d)", name, child.pid)
        measure = time.monotonic() - self.history_at.get(name, -HISTORY_EVERY_S) >= HISTORY_EVERY_S
        if measure:
            self.history_at[name] = time.monotonic()
        t = threading.Thread(target=self._wait_child, args=(name, child, s.dest, measure), name=f"cycle-{name}",
                             daemon=True)
        self.workers = [w for w in self.workers if w.is_alive()] + [t]
        t.start()
        self._publish(name)
        self._save()
        return True

    def _wait_child(self, name: str, child: CycleChild, dest: str, measure: bool) -> None:
        """Worker thread: wait for the child, measure the replica, hand the outcome to the main loop.
        (Reads ``stop_reason``, which only the main thread sets: no measuring while stopping.)"""
        try:
            o = child.wait()
        except Exception as e:  # never lose a finished cycle: report it as an error
            o = Outcome("error", error=f"waiting for the cycle failed: {e}", started=child.started, ended=time.time())
        if o.status == "error" and not o.reported:     # the child died before it could record it
            record_error(dest, o.error or "the cycle failed")
        stopping = self.stop_reason is not None
        changed = any(o.figures.get(k) for k in ("files_changed", "files_deleted", "files_renamed"))
        hb = history_bytes(dest) if (measure or changed) and not stopping else None
        src_time = replica_source_time(dest) if o.status in ("ok", "warning") and not stopping else None
        self.done.put((name, child, o, hb, src_time))
        self.waker.wake()

    def _measure(self, name: str, dest: str) -> None:
        """Thread: the replica's newest recovery point and history size for a job just added (reading
        the replica's catalog may wait for a lock: not in the main loop)."""
        self.done.put((name, None, None, history_bytes(dest), replica_source_time(dest)))
        self.waker.wake()

    def _collect(self) -> None:
        while True:
            try:
                name, child, o, hb, src_time = self.done.get_nowait()
            except queue.Empty:
                return
            s = self.slots.get(name)
            if s is not None and o is None:           # a _measure result
                if src_time is not None and (s.state.source_time or 0) < src_time:
                    s.state.source_time = src_time
                    self._publish(name)
                if hb is not None:
                    self.metrics.set_history_bytes(name, hb)
                continue
            if s is None or s.child is not child or o is None:
                continue
            s.child = None
            self._finish(s, o, hb, src_time)
            if s.removed:
                self._drop(name)
                self._release_locks()
                self.sources.set_roots({x.root for x in self.slots.values() if x.root and not x.removed})

    def _finish(self, s: _Slot, o: Outcome, hb: Optional[int], src_time: Optional[float]) -> None:
        """Book a finished cycle: state, metrics, log, the replica catalog for unreported errors."""
        st, name, now = s.state, s.job.name, time.time()
        st.running, st.last_end = False, o.ended
        if o.status == "interrupted":
            st.last_status = "interrupted"
            st.next_run = now
            log.info("job %s: cycle interrupted (the replica stays at its last committed cycle)", name)
        elif o.status in ("ok", "warning"):
            st.last_status, st.last_result, st.last_success = o.status, _figures(o.figures), o.ended
            st.source_time = src_time or st.source_time
            st.consecutive_failures = 0
            st.next_run = max(now, s.job.next_run(o.started if s.job.schedule is None else now))
            if s.root:
                self.sources.refresh_cut(s.root)      # no early trigger until the new cut is read
            log.info("job %s: cycle %s %s (%s): %s files changed, %s bytes read, %.1fs", name,
                     o.figures.get("cycle"), o.status, o.figures.get("change_source"),
                     o.figures.get("files_changed"), o.figures.get("bytes_transferred"), o.ended - o.started)
            for line in o.stderr_tail if o.status == "warning" else []:
                log.warning("job %s: %s", name, line)
        else:
            st.last_status, st.last_error, st.last_error_time = "error", o.error, o.ended
            st.consecutive_failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (st.consecutive_failures - 1))
            st.next_run = now + delay
            log.warning("job %s: cycle failed (%d in a row; retry in %.0fs): %s", name,
                        st.consecutive_failures, delay, o.error)
            for line in [ln for ln in o.stderr_tail if not ln.startswith("discrep: error:")][-5:]:
                log.info("job %s: %s", name, line)
        if o.status != "interrupted":
            st.cycles[o.status] += 1
            self.totals[o.status] += 1
            self.metrics.cycle_done(name, o.status, o.figures, o.ended - o.started)
        if hb is not None:
            self.metrics.set_history_bytes(name, hb)
        self._publish(name)
        self._save()

    def _publish(self, name: str) -> None:
        s = self.slots[name]
        st = s.state
        self.metrics.set_state(name, last_success=st.last_success,
                               lag_ref=st.source_time or st.last_success or st.first_seen,
                               failures=st.consecutive_failures, running=s.child is not None,
                               next_run=st.next_run)

    def _save(self) -> None:
        try:
            jobstate.save(self.state_dir, {n: s.state for n, s in self.slots.items() if not s.removed},
                          {"config": self.config_path, "daemon_pid": os.getpid(), "started": self.started,
                           "updated": time.time(),
                           "watchers": {r: pid for r, pid in self.sources.watcher_pids().items()}})
        except OSError as e:
            log.error("cannot write the state file in %s: %s", self.state_dir, e)


def _figures(res: Dict[str, Any]) -> Dict[str, Any]:
    keep = ("cycle", "base", "change_source", "snapshot", "files_changed", "files_renamed", "files_deleted",
            "bytes_transferred", "bytes_written", "history_bytes", "duration_s", "warnings")
    return {k: res[k] for k in keep if k in res}


def serve(config_path: str, state_dir: str, *, grace_s: float = GRACE_S) -> Dict[str, Any]:
    """Run the daemon until SIGTERM/SIGINT; its summary."""
    return Service(config_path, state_dir, grace_s=grace_s).run()

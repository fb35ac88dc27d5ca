"""Continuous mode: ``discrep replicate --every SECONDS SRC DEST``.

Runs one cycle per interval -- sooner when the (local) source journal has
entries beyond the last acknowledged cut (``Journal.last_seq``, one indexed
MAX() query every 0.1 s; a cycle starts once the journal has been quiet for
0.25 s or 2 s after the first new entry) -- until SIGINT/SIGTERM.

* A remote source keeps one SSH session, one source agent and one sshfs mount for all cycles
  (remote.RemoteSession); a failed cycle closes it and the next cycle opens a new one.
* Never two cycles on one DEST: ``DEST/.discrep/daemon.lock`` (flock) is held for
  the daemon's lifetime (``LockedError`` when another daemon holds it); the
  replica sync also takes its own lock per cycle.
* Failures: the error is recorded in the replica catalog's meta
  (``last_error``, ``last_error_ns``) and the cycle is retried after an
  exponential backoff (1 s, 2 s, 4 s ... capped at 300 s, never shorter than
  needed to reach the next interval).  Usage errors stop the daemon.
* After each cycle its figures go to meta ``last_cycle_stats`` (JSON).
* A signal between cycles stops at once; during a cycle it interrupts the cycle
  (its own cleanup runs: export unmounted, nothing committed half-way), so the
  replica stays at its last committed cycle.
* Remote sources (``[user@]host:path``) go through ``discrep.run.remote.replicate_remote``.

Thread-safety: runs in the caller's (main) thread.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Dict, Optional

from discrep.core import locks
from discrep.core.errors import DestinationError, Error, UsageError, WarningList
from discrep.core.paths import state_dir
from discrep.run.local import check_pair, replicate_local
from discrep.run.options import CycleOptions
from discrep.run.remote import RemoteSession

log = logging.getLogger(__name__)

BACKOFF_MIN = 1.0
BACKOFF_MAX = 300.0
POLL_S = 0.1
QUIET_S = 0.25
EAGER_MAX_S = 2.0


def _lock(dest: str) -> int:
    if not os.path.isdir(dest):
        par = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(par):
            raise DestinationError(f"cannot create replica {dest}: {par} does not exist",
                                   hint="create the parent directory first")
        os.makedirs(dest, exist_ok=True)
    return locks.take(os.path.join(os.fsdecode(state_dir(os.fsencode(dest))), "daemon.lock"),
                      f"a continuous 'discrep replicate --every' already runs on {dest}",
                      hint="stop it first; two cycles never run at once on one DEST")


def daemon_running(dest: str) -> bool:
    return locks.held(os.path.join(os.fsdecode(state_dir(os.fsencode(dest))), "daemon.lock"))


def _set_meta(dest: str, items: Dict[str, str]) -> None:
    from discrep.replica.catalog import ReplicaCatalog
    if not os.path.isdir(os.fsdecode(state_dir(os.fsencode(dest)))):
        return                  # no replica there (yet): nothing to record into, and nothing to create
    try:
        cat = ReplicaCatalog(os.fsdecode(state_dir(os.fsencode(dest))))
    except Exception as e:  # the catalog itself is the problem: nothing to record into
        log.warning("cannot record into the replica catalog: %s", e)
        return
    try:
        for k, v in items.items():
            cat.set_meta(k, v)
    except Exception as e:
        log.warning("cannot record into the replica catalog: %s", e)
    finally:
        cat.close()


def error_text(e: BaseException) -> str:
    """One line for a failed cycle: discrep errors as they print, others with their type."""
    return str(e) if isinstance(e, Error) else f"{type(e).__name__}: {e}"


def record_result(dest: str, res: Dict[str, Any], warnings: int) -> Dict[str, Any]:
    """Record a finished cycle's figures in the replica catalog (meta ``last_cycle_stats``, read by
    ``discrep status DEST``); returns them with ``warnings`` and ``finished_ns`` added."""
    rec = dict(res, warnings=warnings, finished_ns=time.time_ns())
    _set_meta(os.path.abspath(dest), {"last_cycle_stats": json.dumps(rec)})
    return rec


def record_error(dest: str, message: str) -> None:
    """Record a failed cycle in the replica catalog (meta ``last_error`` and ``last_error_ns``)."""
    _set_meta(os.path.abspath(dest), {"last_error": message, "last_error_ns": str(time.time_ns())})


class _JournalPoll:
    """Cheap 'are there entries beyond the last acknowledged cut?' for a local source."""

    def __init__(self, src: str):
        self.src = os.fsencode(os.path.abspath(src))
        self.journal = None

    def _open(self) -> bool:
        if self.journal is not None:
            return True
        sd = os.path.join(self.src, b".discrep")
        if not os.path.exists(os.path.join(sd, b"journal.db")):
            return False
        from discrep.journal.store import Journal
        try:
            self.journal = Journal(os.fsdecode(sd))
        except Error:
            return False
        return True

    def last_seq(self) -> Optional[int]:
        if not self._open():
            return None
        try:
            return self.journal.last_seq()
        except Exception:
            self.close()
            return None

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None


def _acked_cut(src: str) -> int:
    from discrep.source.cycles import acked_cycle
    rec = acked_cycle(os.fsencode(os.path.abspath(src)))
    return rec.cut_seq if rec else 0


class _Loop:
    """The state of one continuous run: counters, the last result and error, the remote session."""

    def __init__(self, opts: CycleOptions, warnings: WarningList, progress, stop: threading.Event,
                 max_cycles: Optional[int]):
        self.opts, self.warnings, self.progress = opts, warnings, progress
        self.stop, self.max_cycles = stop, max_cycles
        self.every = float(opts.every or 0)
        self.dest = os.path.abspath(opts.dest)
        self.remote = opts.remote_source
        self.poll: Optional[_JournalPoll] = None if self.remote else _JournalPoll(opts.src)
        self.session: Optional[RemoteSession] = None
        self.in_cycle = False
        self.cycles = self.failures = self.consecutive = 0
        self.last_res: Optional[Dict[str, Any]] = None
        self.last_err: Optional[str] = None
        self.stopped_by = "signal"

    def on_signal(self, signum, frame) -> None:
        self.stop.set()
        if self.in_cycle:
            raise KeyboardInterrupt

    def one_cycle(self, cw: WarningList) -> Dict[str, Any]:
        """One cycle: remote ones share one SSH session, agent and sshfs mount for all cycles."""
        self.in_cycle = True
        try:
            if self.remote:
                if self.session is None:
                    self.session = RemoteSession(self.opts)
                try:
                    return self.session.cycle(cw, self.progress)
                except BaseException:
                    self.session.close()      # a failed cycle may have broken it: a fresh one next time
                    self.session = None
                    raise
            # --force lets only the first cycle into a non-empty DEST
            copts = self.opts if self.cycles == 0 else replace(
                self.opts, replica=replace(self.opts.replica, force=False))
            return replicate_local(copts, cw, self.progress)
        finally:
            self.in_cycle = False

    def failed(self, e: Exception) -> None:
        self.failures += 1
        self.consecutive += 1
        self.last_err = error_text(e)
        log.warning("cycle failed (%d in a row): %s", self.consecutive, self.last_err)
        record_error(self.dest, self.last_err)
        self.stop.wait(min(BACKOFF_MAX, BACKOFF_MIN * (2 ** (self.consecutive - 1))))

    def succeeded(self, res: Dict[str, Any], cw: WarningList) -> None:
        for w in cw:
            self.warnings.add(w.path, w.message)
        self.cycles += 1
        self.consecutive = 0
        self.last_res = record_result(self.dest, res, len(cw))
        log.info("cycle %s done (%s): %s files changed, %s bytes", res.get("cycle"),
                 res.get("change_source"), res.get("files_changed"), res.get("bytes_transferred"))

    def wait_next(self, t_start: float) -> None:
        """Until the next interval, or sooner when the journal has new entries (quiet for
        QUIET_S, or EAGER_MAX_S after the first one)."""
        cut = _acked_cut(self.opts.src) if self.poll else 0
        first_new = last_seen = quiet_since = None
        while not self.stop.is_set():
            now = time.monotonic()
            if now - t_start >= self.every:
                break
            if self.poll is not None:
                seq = self.poll.last_seq()
                if seq is not None and seq > cut:
                    if first_new is None:
                        first_new = now
                    if seq != last_seen:
                        last_seen, quiet_since = seq, now
                    if now - quiet_since >= QUIET_S or now - first_new >= EAGER_MAX_S:
                        break
            self.stop.wait(POLL_S)

    def run(self) -> None:
        while not self.stop.is_set():
            t_start = time.monotonic()
            cw = WarningList()
            try:
                res = self.one_cycle(cw)
            except KeyboardInterrupt:
                self.stop.set()
                self.stopped_by = "signal (during a cycle; the replica stays at its last committed cycle)"
                return
            except UsageError:
                raise
            except Exception as e:
                self.failed(e)
                continue
            self.succeeded(res, cw)
            if self.max_cycles is not None and self.cycles >= self.max_cycles:
                self.stopped_by = "max_cycles"
                return
            self.wait_next(t_start)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.poll is not None:
            self.poll.close()

    def result(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"cycle": 0, "base": 0, "change_source": None, "files_changed": 0,
                               "files_renamed": 0, "files_deleted": 0, "bytes_transferred": 0,
                               "bytes_written": 0, "duration_s": 0.0}
        out.update(self.last_res or {})
        out.update(cycles=self.cycles, failures=self.failures, last_error=self.last_err, stopped=self.stopped_by)
        return out


def run_every(opts: CycleOptions, warnings: WarningList, progress=None, *,
              stop: Optional[threading.Event] = None, max_cycles: Optional[int] = None) -> Dict[str, Any]:
    """The continuous loop (see module doc).  ``stop``/``max_cycles`` are for tests and embedding."""
    if float(opts.every or 0) <= 0:
        raise UsageError("--every needs a positive number of seconds")
    if not opts.remote_source:
        check_pair(os.path.abspath(opts.src), os.path.abspath(opts.dest))
    lock_fd = _lock(os.path.abspath(opts.dest))
    loop = _Loop(opts, warnings, progress, stop or threading.Event(), max_cycles)
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, loop.on_signal)
    try:
        loop.run()
    finally:
        loop.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        os.close(lock_fd)
    return loop.result()

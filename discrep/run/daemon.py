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
    try:
        cat = ReplicaCatalog(os.fsdecode(state_dir(os.fsencode(dest))))
    except Exception as e:  # the catalog itself is the problem: nothing to record into
        log.warning("cannot record into the replica catalog: %s", e)
        return
    try:
        for k, v in items.items():
            cat.set_meta(k, v)
    finally:
        cat.close()


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


def run_every(opts: CycleOptions, warnings: WarningList, progress=None, *,
              stop: Optional[threading.Event] = None, max_cycles: Optional[int] = None) -> Dict[str, Any]:
    """The continuous loop (see module doc).  ``stop``/``max_cycles`` are for tests and embedding."""
    every = float(opts.every or 0)
    if every <= 0:
        raise UsageError("--every needs a positive number of seconds")
    remote = opts.remote_source
    if not remote:
        check_pair(os.path.abspath(opts.src), os.path.abspath(opts.dest))
    dest = os.path.abspath(opts.dest)
    lock_fd = _lock(dest)
    stop = stop or threading.Event()
    in_cycle = [False]
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        def on_sig(signum, frame):
            stop.set()
            if in_cycle[0]:
                raise KeyboardInterrupt
        for s in (signal.SIGINT, signal.SIGTERM):
            old_handlers[s] = signal.signal(s, on_sig)
    poll = None if remote else _JournalPoll(opts.src)
    cycles = failures = 0
    consecutive = 0
    last_res: Optional[Dict[str, Any]] = None
    last_err: Optional[str] = None
    stopped_by = "signal"
    session = None
    try:
        while not stop.is_set():
            t_start = time.monotonic()
            cw = WarningList()
            try:
                in_cycle[0] = True
                try:
                    if remote:   # one SSH session, agent and sshfs mount for all cycles
                        if session is None:
                            session = RemoteSession(opts)
                        try:
                            res = session.cycle(cw, progress)
                        except BaseException:
                            session.close()      # a failed cycle may have broken it: a fresh one next time
                            session = None
                            raise
                    else:
                        # --force lets only the first cycle into a non-empty DEST
                        copts = opts if cycles == 0 else replace(
                            opts, replica=replace(opts.replica, force=False))
                        res = replicate_local(copts, cw, progress)
                finally:
                    in_cycle[0] = False
            except KeyboardInterrupt:
                stop.set()
                stopped_by = "signal (during a cycle; the replica stays at its last committed cycle)"
                break
            except UsageError:
                raise
            except Exception as e:
                failures += 1
                consecutive += 1
                last_err = f"{type(e).__name__}: {e}" if not isinstance(e, Error) else str(e)
                log.warning("cycle failed (%d in a row): %s", consecutive, last_err)
                _set_meta(dest, {"last_error": last_err, "last_error_ns": str(time.time_ns())})
                delay = min(BACKOFF_MAX, BACKOFF_MIN * (2 ** (consecutive - 1)))
                stop.wait(delay)
                continue
            for w in cw:
                warnings.add(w.path, w.message)
            cycles += 1
            consecutive = 0
            last_res = dict(res, warnings=len(cw), finished_ns=time.time_ns())
            _set_meta(dest, {"last_cycle_stats": json.dumps(last_res)})
            log.info("cycle %s done (%s): %s files changed, %s bytes", res.get("cycle"),
                     res.get("change_source"), res.get("files_changed"), res.get("bytes_transferred"))
            if max_cycles is not None and cycles >= max_cycles:
                stopped_by = "max_cycles"
                break
            # wait for the next interval, or sooner when the journal has new entries
            cut = _acked_cut(opts.src) if poll else 0
            first_new = None
            last_seen = None
            quiet_since = None
            while not stop.is_set():
                now = time.monotonic()
                if now - t_start >= every:
                    break
                if poll is not None:
                    seq = poll.last_seq()
                    if seq is not None and seq > cut:
                        if first_new is None:
                            first_new = now
                        if seq != last_seen:
                            last_seen, quiet_since = seq, now
                        if now - quiet_since >= QUIET_S or now - first_new >= EAGER_MAX_S:
                            break
                stop.wait(POLL_S)
    finally:
        if session is not None:
            session.close()
        if poll is not None:
            poll.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        os.close(lock_fd)
    out: Dict[str, Any] = {"cycle": 0, "base": 0, "change_source": None, "files_changed": 0,
                           "files_renamed": 0, "files_deleted": 0, "bytes_transferred": 0,
                           "bytes_written": 0, "duration_s": 0.0}
    out.update(last_res or {})
    out.update(cycles=cycles, failures=failures, last_error=last_err, stopped=stopped_by)
    return out

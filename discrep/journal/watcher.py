"""``discrep watch ROOT``: journal every change under ROOT as it happens.

Backends
--------
* **fanotify** (preferred; root): one ``FAN_MARK_FILESYSTEM`` mark in
  ``FAN_REPORT_DFID_NAME`` mode with ``FAN_RENAME``: no per-directory watch, no
  race with directories created and filled at once.  Events carry (directory
  file handle, name); the handle is resolved with ``open_by_handle_at`` +
  ``readlink /proc/self/fd/N`` and cached (handle -> path).  Events outside ROOT
  (the mark sees the whole filesystem) cost one dict lookup.
* **inotify** (fallback): one watch per directory, kept in a tree model
  (wd -> parent wd, name) updated in event order, so paths are always those of
  the moment of the event.  A new directory gets its watch, then its contents
  are scanned and journaled as creates (what happened before the watch existed
  is not lost).  ``ENOSPC`` from ``inotify_add_watch`` (out of watches) opens a
  gap, and the watcher keeps reopening it after each catch-up scan until the
  missing watches could be added.

Ordering (fanotify).  A handle resolves to the directory's path *now*, which may
already include renames still queued.  So a batch is resolved as a whole: drain
the queue, resolve every handle, read again; if that read brought directory
renames, resolve everything again (until a read brings none).  All paths are
then in the namespace at the end of the batch.  The batch's renames are
journaled first, each mapped back to the namespace of its own moment (undoing
the later directory renames of the batch, newest first), then every other
change, deduplicated, in the end namespace.  Unresolvable handles (directory
deleted since) are dropped: the deletion of that directory is itself an event
in an existing parent.

Durability / fsync policy.  The journal is SQLite WAL with ``synchronous=FULL``:
a row is on disk once its batch's transaction has committed.  The watcher
commits a batch at most every ``batch_s`` (default 50 ms) after its first event,
or at once when it holds ``max_items`` rows; so SIGKILL loses at most the last
~50 ms of events -- and a killed watcher is noticed (its flock is gone, the next
cycle scans; the next watcher start opens a gap).

Gaps (``journal.mark_gap``): at every start (changes while no watcher ran are
unknown; marked before *and* after the watches are in place), on queue overflow
(``FAN_Q_OVERFLOW`` / ``IN_Q_OVERFLOW``), when inotify runs out of watches, when
the handle resolution fails for another reason than a deleted directory, when
ROOT itself moves.  The next cycle's catch-up scan closes the gap.

Memory: per batch, one row per distinct path and op (1000 writes to one file
are one ``modify``); the handle cache is capped; inotify keeps one small record
per directory.

Structure: the event sources (fanotify, inotify) are in backends.py; they report
rows, gaps and the cycle barrier into a ``Sink`` (sink.py) that the ``Watcher``
owns and drains into the ``Journal`` (store.py).  The ``Watcher`` owns the lock
fd, the journal, the backend and its wake-up pipe.

Thread-safety: a ``Watcher`` runs in one thread; ``stop()`` may be called from
any thread or a signal handler; ``call(fn)`` from any other thread runs ``fn(journal)``
in the watcher's thread, on its one journal connection (a second connection to the
journal in the same process would lose the first one's SQLite locks), and waits for it.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from discrep.core import locks
from discrep.core.errors import JournalError, UsageError
from discrep.core.paths import STATE_DIR, join
from discrep.journal.backends import Backend, open_backend
from discrep.journal.sink import Sink
from discrep.journal.store import Journal

log = logging.getLogger(__name__)

T = TypeVar("T")


class Watcher:
    """Journal every change under ``root``: ``start``, ``run`` (until ``stop``), ``close``."""

    def __init__(self, root: "str | bytes", backend: str = "auto", *, batch_s: float = 0.05,
                 max_items: int = 20_000):
        root_b = os.fsencode(root)
        if not os.path.isdir(root_b):
            raise UsageError(f"{os.fsdecode(root_b)} does not exist or is not a directory")
        self.root = os.path.realpath(root_b)
        self.want = backend
        self.batch_s = batch_s
        self.max_items = max_items
        self.sink = Sink()
        self.state_dir = join(self.root, STATE_DIR)
        self.journal: Optional[Journal] = None
        self.backend: Optional[Backend] = None
        self.lock_fd = -1
        self._stop = threading.Event()
        self._wr, self._ww = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events = 0
        self.rows = 0
        self._calls: "queue.Queue[Tuple[Callable[[Journal], Any], Future]]" = queue.Queue()
        self._running = False

    @property
    def gaps(self) -> List[str]:
        """Every gap reason of this run."""
        return self.sink.gaps

    # -- life cycle ----------------------------------------------------
    def start(self) -> "Watcher":
        self.lock_fd = locks.take(join(self.state_dir, b"watcher.lock"),
                                  f"a watcher already runs for {os.fsdecode(self.root)}",
                                  hint="see 'discrep status ROOT'; stop it first")
        try:
            self.journal = Journal(os.fsdecode(self.state_dir))
            # changes while no watcher ran are unknown; also while the watches are being placed
            self.journal.mark_gap("watcher starting")
            self.backend = open_backend(self.root, self.sink, self.want)
            self.journal.mark_gap("watcher started (changes before it are unknown)")
            self.journal.set("watcher_backend", self.backend.name)
            self.journal.set("watcher_pid", str(os.getpid()))
            self.journal.set("watcher_started_ns", str(time.time_ns()))
            self.journal.set("watcher_stopped_ns", "")
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.getpid()} {self.backend.name}\n".encode(), 0)
        except BaseException:
            self.close()
            raise
        log.info("watching %s with %s", os.fsdecode(self.root), self.backend.name)
        self._running = True          # calls queue up until ``run`` serves them
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._ww, b"x")
        except OSError:
            pass

    def close(self) -> None:
        self._running = False
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.journal is not None:
            try:
                self.journal.set("watcher_stopped_ns", str(time.time_ns()))
            except Exception:
                pass
            self.journal.close()
            self.journal = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        for fd in (self._wr, self._ww):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wr = self._ww = -1

    # -- journal -------------------------------------------------------
    def call(self, fn: "Callable[[Journal], T]", timeout: float = 60.0) -> T:
        """``fn(journal)`` in the watcher's thread, after the rows seen so far are written; its
        result (or exception).  JournalError when the watcher is not running (any more)."""
        if not self._running:
            raise JournalError("the watcher is not running")
        fut: "Future[T]" = Future()
        self._calls.put((fn, fut))
        try:
            os.write(self._ww, b"c")
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fut.result(0.2)
            except TimeoutError:
                if not self._running:
                    fut.cancel()
                    raise JournalError("the watcher stopped") from None
                if time.monotonic() > deadline:
                    raise JournalError("the watcher did not answer") from None

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                assert self.journal is not None
                self.flush()
                fut.set_result(fn(self.journal))
            except BaseException as e:  # handed to the caller
                fut.set_exception(e)

    def gap(self, reason: str) -> None:
        """Open a journal gap after the rows gathered so far are written."""
        self.sink.gap(reason)

    def _ack_barrier(self) -> None:
        assert self.journal is not None
        self.flush()
        try:
            token = os.stat(self.state_dir).st_mtime_ns
        except OSError:
            return
        self.journal.set("barrier_ns", str(token))
        self.sink.barrier_pending = False

    def flush(self) -> None:
        assert self.journal is not None
        self.rows += self.sink.write_rows(self.journal)
        self.sink.write_gap(self.journal)

    # -- loop ----------------------------------------------------------
    def run(self) -> None:
        assert self.backend is not None and self.journal is not None
        be = self.backend
        poller = select.poll()
        poller.register(be.fd, select.POLLIN)
        poller.register(self._wr, select.POLLIN)
        last_check = time.monotonic()
        self._running = True
        try:
            while not self._stop.is_set():
                now = self._step(be, poller)
                self._run_calls()
                if now - last_check >= 1.0:
                    last_check = now
                    self._check_degraded()
            be.settle()
            self.flush()
        finally:
            self._running = False
            if self.sink.batch.items and self.journal is not None:
                self.flush()

    def _step(self, be: Backend, poller: "select.poll") -> float:
        """Wait for events (at most until the batch is due), read them, commit what is due;
        returns the time of the commit check."""
        batch = self.sink.batch
        if batch.items or be.pending():
            left = self.batch_s - (time.monotonic() - batch.first)
            timeout = max(5, int(left * 1000))
        else:
            timeout = 1000
        ready = poller.poll(timeout)
        for fd, _ev in ready:
            if fd == self._wr:
                try:
                    os.read(self._wr, 64)
                except OSError:
                    pass
        if any(fd == be.fd for fd, _ in ready):
            self.events += be.pump()
        now = time.monotonic()
        if (batch.items or be.pending()) and (
                now - batch.first >= self.batch_s or len(batch) >= self.max_items
                or be.pending() >= self.max_items * 4):
            be.settle()
            self.flush()
        elif self.sink.pending_gap is not None:
            self.flush()
        if self.sink.barrier_pending:
            be.settle()
            self._ack_barrier()
        return now

    def _check_degraded(self) -> None:
        be = self.backend
        if be is None or be.degraded is None or self.journal is None:
            return
        if self.journal.gap() is not None:
            return
        # a scan closed the gap, but some changes are still not seen (directories not watched):
        # retry, else reopen
        reason = be.degraded
        if be.rewatch():
            self.gap("inotify watches restored after running out (changes meanwhile unknown)")
        else:
            self.gap(reason)
        self.flush()

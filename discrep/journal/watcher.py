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

The event sources (fanotify, inotify) are in watch_backends.py.

Thread-safety: a ``Watcher`` runs in one thread; ``stop()`` may be called from
any thread or a signal handler.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from typing import Dict, List, Optional

from discrep.core import locks
from discrep.core.errors import SourceError, UsageError
from discrep.journal.store import Journal
from discrep.core.paths import STATE_DIR, join
from discrep.journal.backends import _Backend, FanotifyBackend, InotifyBackend, _submounts, is_state  # noqa: F401

log = logging.getLogger(__name__)





# --------------------------------------------------------------------------- batch

class Batch:
    """Rows of one journal transaction, deduplicated.

    Renames are kept in order and start a new *segment*; inside a segment each
    path has at most three ops (``delete`` resets, a repeated op or a
    modify/meta after a create/modify is dropped)."""

    def __init__(self) -> None:
        self.items: List[list] = []       # ["rename", new, old] or [ops list, path]
        self.idx: Dict[bytes, list] = {}
        self.first = 0.0
        self.nrows = 0

    def __len__(self) -> int:
        return self.nrows

    def _mark(self) -> None:
        if not self.items:
            self.first = time.monotonic()

    def touch(self, op: str, path: bytes) -> None:
        if not path or is_state(path):
            return
        it = self.idx.get(path)
        if it is None:
            self._mark()
            it = [[op], path]
            self.items.append(it)
            self.idx[path] = it
            self.nrows += 1
            return
        ops = it[0]
        last = ops[-1]
        if op == "delete":
            if ops != ["delete"]:
                self.nrows -= len(ops) - 1
                it[0] = ["delete"]
        elif op == "create":
            if last != "create":
                ops.append(op)
                self.nrows += 1
        elif last == "delete":
            ops.append(op)
            self.nrows += 1

    def rename(self, old: bytes, new: bytes) -> None:
        self._mark()
        self.items.append(["rename", new, old])
        self.idx = {}
        self.nrows += 1

    def rows(self):
        for it in self.items:
            if it[0] == "rename":
                yield ("rename", it[1], it[2], None)
            else:
                for op in it[0]:
                    yield (op, it[1], None, None)


class Watcher:
    def __init__(self, root: "str | bytes", backend: str = "auto", *, batch_s: float = 0.05,
                 max_items: int = 20_000):
        root_b = os.fsencode(root)
        if not os.path.isdir(root_b):
            raise UsageError(f"{os.fsdecode(root_b)} does not exist or is not a directory")
        self.root = os.path.realpath(root_b)
        self.want = backend
        self.batch_s = batch_s
        self.max_items = max_items
        self.batch = Batch()
        self.state_dir = join(self.root, STATE_DIR)
        self.journal: Optional[Journal] = None
        self.backend: Optional[_Backend] = None
        self.lock_fd = -1
        self.degraded: Optional[str] = None
        self.gaps: List[str] = []
        self._pending_gap: Optional[str] = None
        self._barrier_pending = False
        self._stop = threading.Event()
        self._wr, self._ww = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events = 0
        self.rows = 0

    # -- life cycle ----------------------------------------------------
    def start(self) -> "Watcher":
        self.lock_fd = locks.take(join(self.state_dir, b"watcher.lock"),
                                  f"a watcher already runs for {os.fsdecode(self.root)}",
                                  hint="see 'discrep status ROOT'; stop it first")
        try:
            self.journal = Journal(os.fsdecode(self.state_dir))
            # changes while no watcher ran are unknown; also while the watches are being placed
            self.journal.mark_gap("watcher starting")
            self.backend = self._open_backend()
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
        return self

    def _open_backend(self) -> _Backend:
        want = self.want
        if want in ("auto", "fanotify"):
            subs = _submounts(self.root)
            if subs and want == "auto":
                log.info("%d filesystems mounted below ROOT: using inotify", len(subs))
            else:
                if subs:
                    raise UsageError(f"{os.fsdecode(subs[0])} is mounted below ROOT; a fanotify "
                                     f"filesystem mark would not see it", hint="use --backend inotify")
                try:
                    return FanotifyBackend(self)
                except OSError as e:
                    if want == "fanotify":
                        raise SourceError(f"fanotify is not available for {os.fsdecode(self.root)}: "
                                          f"{e.strerror}", hint="run as root on Linux >= 5.17, or use "
                                          "--backend inotify") from None
                    log.info("fanotify unavailable (%s): using inotify", e.strerror)
        try:
            return InotifyBackend(self)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise SourceError("inotify: out of watches or instances",
                                  hint="raise fs.inotify.max_user_watches / max_user_instances") from None
            raise

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._ww, b"x")
        except OSError:
            pass

    def close(self) -> None:
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
    def gap(self, reason: str) -> None:
        """Open a journal gap after the rows gathered so far are written."""
        if self._pending_gap is None:
            self._pending_gap = reason
        self.gaps.append(reason)
        log.warning("journal gap: %s", reason)

    def barrier(self) -> None:
        """A cycle touched ROOT/.discrep (see source.wait_for_watcher): everything seen before that
        event must be committed before the cycle reads its journal cut."""
        self._barrier_pending = True

    def _ack_barrier(self) -> None:
        assert self.journal is not None
        self.flush()
        try:
            token = os.stat(self.state_dir).st_mtime_ns
        except OSError:
            return
        self.journal.set("barrier_ns", str(token))
        self._barrier_pending = False

    def flush(self) -> None:
        assert self.journal is not None
        if self.batch.items:
            rows = list(self.batch.rows())
            self.journal.append_many(rows)
            self.rows += len(rows)
            self.batch = Batch()
        if self._pending_gap is not None:
            self.journal.mark_gap(self._pending_gap)
            self._pending_gap = None

    # -- loop ----------------------------------------------------------
    def run(self) -> None:
        assert self.backend is not None and self.journal is not None
        be = self.backend
        poller = select.poll()
        poller.register(be.fd, select.POLLIN)
        poller.register(self._wr, select.POLLIN)
        last_check = time.monotonic()
        try:
            while not self._stop.is_set():
                busy = bool(self.batch.items) or be.pending()
                if busy:
                    left = self.batch_s - (time.monotonic() - self.batch.first)
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
                if (self.batch.items or be.pending()) and (
                        now - self.batch.first >= self.batch_s or len(self.batch) >= self.max_items
                        or be.pending() >= self.max_items * 4):
                    be.settle()
                    self.flush()
                elif self._pending_gap is not None:
                    self.flush()
                if self._barrier_pending:
                    be.settle()
                    self._ack_barrier()
                if now - last_check >= 1.0:
                    last_check = now
                    self._check_degraded()
            be.settle()
            self.flush()
        finally:
            try:
                if self.batch.items and self.journal is not None:
                    self.flush()
            finally:
                pass

    def _check_degraded(self) -> None:
        if self.degraded is None or self.journal is None:
            return
        if self.journal.gap() is not None:
            return
        # a scan closed the gap, but some directories are still not watched: retry, else reopen
        be = self.backend
        if isinstance(be, InotifyBackend) and be.rewatch():
            self.degraded = None
            self.gap("inotify watches restored after running out (changes meanwhile unknown)")
        else:
            self.gap(self.degraded)
        self.flush()


# --------------------------------------------------------------------------- CLI

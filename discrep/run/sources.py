"""The local source roots the service's jobs read: their watchers and their journals.

For every local source root some job uses, ``SourceRoots`` keeps a ``discrep watch ROOT`` child
running (``children.WatcherChild``: restarted with backoff when it dies; none is started while
another process, say a ``discrep-watch@`` unit, holds the root's watcher lock), and a poller
thread reads each root's journal: its last seq every 0.1 s (one indexed MAX() query, as continuous
mode polls, for the early-cycle trigger) and, every 2 s or when asked, the acknowledged cut and the
entries beyond it, which it also sets as the metrics ``discrep_journal_pending_entries`` and
``discrep_watcher_up``.

A journal is opened only once ``ROOT/.discrep/journal.db`` exists (nothing is created in a
source by asking).  The SQLite reads can wait for a cycle's write lock (busy timeout 30 s): that
is why they run in the poller and never in the daemon's main loop.

Thread-safety: the watchers belong to the main thread.  The poller thread owns the journal
connections; the values it reads are handed over in dicts under ``_lock``.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, List, Optional, Set

from discrep.core.errors import Error
from discrep.journal.store import Journal
from discrep.run.children import WatcherChild
from discrep.run.metrics import Metrics
from discrep.source.build import watcher_alive
from discrep.source.cycles import acked_cycle

log = logging.getLogger(__name__)

POLL_S = 0.1
METRICS_EVERY_S = 2.0


def acked_cut(root: str) -> int:
    """The journal seq the source's last acknowledged cycle covered (0: none)."""
    try:
        rec = acked_cycle(os.fsencode(root))
    except Error:
        return 0
    return rec.cut_seq if rec else 0


def watcher_up(root: str) -> bool:
    return watcher_alive(os.fsencode(root))


class _Poller(threading.Thread):
    """Reads the journals of the wanted roots (its own thread and SQLite connections)."""

    def __init__(self, metrics: Metrics):
        super().__init__(name="journal-poller", daemon=True)
        self.metrics = metrics
        self.lock = threading.Lock()
        self.wanted: Set[str] = set()
        self.seq: Dict[str, Optional[int]] = {}
        self.cut: Dict[str, int] = {}            # absent: not read since it was asked for
        self.stop = threading.Event()
        self.journals: Dict[str, Journal] = {}
        self.slow_at: Dict[str, float] = {}

    def _journal(self, root: str) -> Optional[Journal]:
        if root not in self.journals:
            sd = os.path.join(root, ".discrep")
            if not os.path.exists(os.path.join(sd, "journal.db")):
                return None
            try:
                self.journals[root] = Journal(sd)
            except Error:
                return None
        return self.journals[root]

    def _read(self, root: str, slow: bool) -> None:
        j = self._journal(root)
        seq = cut = pending = None
        try:
            seq = j.last_seq() if j is not None else None
            if slow:
                cut = acked_cut(root)
                pending = j.count(cut) if j is not None else None
        except Exception:                # replaced or damaged: reopen next time
            self._close(root)
        up = watcher_up(root) if slow else False
        with self.lock:                  # (under the lock: a root just removed gets no metrics back)
            if root not in self.wanted:
                return
            self.seq[root] = seq
            if cut is not None:
                self.cut[root] = cut
            if slow:
                self.metrics.set_root(root, watcher_up=up, pending=pending)

    def _close(self, root: str) -> None:
        j = self.journals.pop(root, None)
        if j is not None:
            j.close()

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                roots = sorted(self.wanted)
                fresh = {r for r in roots if r not in self.cut}
            for r in set(self.journals) - set(roots):
                self._close(r)
            now = time.monotonic()
            for r in roots:
                slow = r in fresh or now - self.slow_at.get(r, 0.0) >= METRICS_EVERY_S
                if slow:
                    self.slow_at[r] = now
                self._read(r, slow)
            self.stop.wait(POLL_S)
        for r in list(self.journals):
            self._close(r)


class SourceRoots:
    """Watchers (main thread) and journal polls (the poller thread) for a set of local source roots."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.watchers: Dict[str, WatcherChild] = {}
        self.retired: List[WatcherChild] = []     # roots no job uses any more: their watchers are stopping
        self.metrics_roots: Set[str] = set()
        self.poller = _Poller(metrics)
        self.poller.start()

    def set_roots(self, roots: Set[str]) -> None:
        for r in sorted(roots - set(self.watchers)):
            self.watchers[r] = WatcherChild(r)
        for r in sorted(set(self.watchers) - roots):
            old = self.watchers.pop(r)
            old.terminate()
            self.retired.append(old)
        with self.poller.lock:
            for r in self.poller.wanted - roots:
                self.poller.seq.pop(r, None)
                self.poller.cut.pop(r, None)
            self.poller.wanted = set(roots)
        for r in sorted(set(self.metrics_roots) - roots):
            self.metrics.remove_root(r)
        self.metrics_roots = set(roots)

    def supervise(self, now: float) -> None:
        """Start or restart watchers; reap retired ones."""
        for r, w in self.watchers.items():
            w.supervise(now, external=w.pid is None and watcher_up(r))
        self.retired = [w for w in self.retired if not w.reap()]

    def last_seq(self, root: str) -> Optional[int]:
        with self.poller.lock:
            return self.poller.seq.get(root)

    def cut(self, root: str) -> Optional[int]:
        """The acknowledged cut as last read; None while a fresh read is pending."""
        with self.poller.lock:
            return self.poller.cut.get(root)

    def refresh_cut(self, root: str) -> None:
        """A cycle ended: the cut moved.  ``cut`` answers None until the poller has read it again."""
        with self.poller.lock:
            self.poller.cut.pop(root, None)

    def watcher_pids(self) -> Dict[str, Optional[int]]:
        return {r: w.pid for r, w in self.watchers.items()}

    # -- stopping ---------------------------------------------------------------------------------
    def terminate(self) -> None:
        for w in [*self.watchers.values(), *self.retired]:
            w.terminate()

    def kill(self) -> None:
        for w in [*self.watchers.values(), *self.retired]:
            if not w.reap():
                log.warning("watcher of %s did not stop in time: SIGKILL", w.root)
                w.kill()

    def all_stopped(self) -> bool:
        return all(w.reap() for w in [*self.watchers.values(), *self.retired])

    def close(self) -> None:
        """Stop the poller (it closes its journals; one stuck in a busy wait is left to exit with us)."""
        self.poller.stop.set()
        self.poller.join(timeout=1.0)


def wait_stopped(roots: SourceRoots, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not roots.all_stopped():
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True

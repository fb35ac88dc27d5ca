"""The local source roots the service's jobs read: their watchers and their journals.

For every local source root some job uses, ``SourceRoots`` keeps a ``discrep watch ROOT`` child
running (``children.WatcherChild``: restarted with backoff when it dies; none is started while
another process, say a ``discrep-watch@`` unit, holds the root's watcher lock), answers "what is
the journal's last seq" for the early-cycle trigger (one indexed MAX() query, as continuous mode
polls), and sets the per-root metrics ``discrep_watcher_up`` and
``discrep_journal_pending_entries`` (entries beyond the acknowledged cut) every few seconds.

A journal is opened only once ``ROOT/.discrep/journal.db`` exists (nothing is created in a
source by asking), and closed when its root leaves the jobs file.

Thread-safety: main thread only (the SQLite connections are not shared).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Optional, Set

from discrep.core.errors import Error
from discrep.journal.store import Journal
from discrep.run.children import WatcherChild
from discrep.run.metrics import Metrics
from discrep.source.build import acked_cycle, watcher_alive

log = logging.getLogger(__name__)

METRICS_EVERY_S = 2.0


def acked_cut(root: str) -> int:
    """The journal seq the source's last acknowledged cycle covered (0: none)."""
    try:
        rec = acked_cycle(os.fsencode(root))
    except Error:
        return 0
    return rec.cut_seq if rec else 0


class _Root:
    def __init__(self, root: str):
        self.root = root
        self.watcher = WatcherChild(root)
        self.journal: Optional[Journal] = None

    def open_journal(self) -> Optional[Journal]:
        if self.journal is None:
            sd = os.path.join(self.root, ".discrep")
            if not os.path.exists(os.path.join(sd, "journal.db")):
                return None
            try:
                self.journal = Journal(sd)
            except Error:
                return None
        return self.journal

    def query(self, what: str) -> Optional[int]:
        """``last`` (the last seq) or ``pending`` (entries beyond the acked cut); None if unknown."""
        j = self.open_journal()
        if j is None:
            return None
        try:
            return j.last_seq() if what == "last" else j.count(acked_cut(self.root))
        except Exception:          # the journal was replaced or damaged: reopen next time
            self.close()
            return None

    def up(self) -> bool:
        return watcher_alive(os.fsencode(self.root))

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
            self.journal = None


class SourceRoots:
    """Watchers and journal polls for a set of local source roots."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.roots: Dict[str, _Root] = {}
        self.retired: List[_Root] = []       # roots no job uses any more: their watchers are stopping
        self._metrics_at = 0.0

    def set_roots(self, roots: Set[str]) -> None:
        for r in sorted(roots - set(self.roots)):
            self.roots[r] = _Root(r)
        for r in sorted(set(self.roots) - roots):
            old = self.roots.pop(r)
            old.watcher.terminate()
            old.close()
            self.metrics.remove_root(r)
            self.retired.append(old)

    def supervise(self, now: float) -> None:
        """Start or restart watchers; reap retired ones; refresh the per-root metrics."""
        for r in self.roots.values():
            external = r.watcher.pid is None and r.up()
            r.watcher.supervise(now, external)
        self.retired = [r for r in self.retired if not r.watcher.reap()]
        if now - self._metrics_at >= METRICS_EVERY_S:
            self._metrics_at = now
            for r in self.roots.values():
                self.metrics.set_root(r.root, watcher_up=r.up(), pending=r.query("pending"))

    def last_seq(self, root: str) -> Optional[int]:
        r = self.roots.get(root)
        return None if r is None else r.query("last")

    def watcher_pids(self) -> Dict[str, Optional[int]]:
        return {r.root: r.watcher.pid for r in self.roots.values()}

    # -- stopping ---------------------------------------------------------------------------------
    def terminate(self) -> None:
        for r in [*self.roots.values(), *self.retired]:
            r.watcher.terminate()

    def kill(self) -> None:
        for r in [*self.roots.values(), *self.retired]:
            if not r.watcher.reap():
                log.warning("watcher of %s did not stop in time: SIGKILL", r.root)
                r.watcher.kill()

    def all_stopped(self) -> bool:
        return all(r.watcher.reap() for r in [*self.roots.values(), *self.retired])

    def close(self) -> None:
        for r in self.roots.values():
            r.close()


def wait_stopped(roots: SourceRoots, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not roots.all_stopped():
        if time.monotonic() >= end:
            return False
        time.sleep(0.05)
    return True

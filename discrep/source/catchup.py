"""The watcher's own catch-up scan: ``discrep watch`` closes the journal gap it opens.

A watcher start (and a queue overflow, or running out of inotify watches) marks a journal gap:
changes made while no watcher saw them are unknown, so the next cycle of every replica would walk
the tree (source.build's catch-up scan) before it can trust the journal.  ``CatchUp`` runs beside
the watcher and closes such a gap itself, in the background, once per replica position (source.
positions: each position's catalog is the state ITS replica has):

1. for every position with an acknowledged cycle (and no cycle built and unacknowledged, no
   filter rules: those scan in their own cycle), walk the tree against that position's catalog
   (``scan.compare_tree``) *without* the source lock;
2. under the source lock, only if the position did not move meanwhile (same last cycle) and the
   gap generation is the one the round began with, journal what the walk found -- exactly what a
   cycle's own scan journals (``scan.scan_entries``: the marker with the seq the walk began at,
   so events that raced with the walk are kept, see journal.changes; paths that vanished during
   the walk are touched) -- and record in the position's catalog the gap generation it covered
   and its marker's seq (``positions.record_catch_up``).  A build of that position then trusts
   the journal (``positions.journal_covers``) and keeps this block while it drops every other
   scan block (``positions.drop_foreign_scans``);
3. once every position was handled, close the gap (compare-and-clear on its generation).

A position skipped or not covered (a newer gap, a cycle built meanwhile, filters) has no record
for the current generation, so its next cycle scans, as before: when in doubt, scan.  Once
``discrep status`` says the watcher is caught up, a replica's cycle reads the journal.

Thread-safety: ``CatchUp`` runs one daemon thread with its own catalog connections; every
journal read and write runs in the watcher's thread (``Watcher.call``: one journal connection
per process); ``stop()`` may be called from any thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from discrep.core.errors import Error, SourceError
from discrep.core.paths import state_dir
from discrep.core.statedir import StateDir
from discrep.journal.store import Journal
from discrep.journal.watcher import Watcher
from discrep.protocol.filterspec import FilterSpec
from discrep.source import positions
from discrep.source.catalog import SourceCatalog
from discrep.source.cycles import source_lock
from discrep.source.scan import compare_tree, scan_entries

log = logging.getLogger(__name__)

INTERVAL_S = 0.5      # how often the thread looks for an open gap


def catch_up(root: bytes, watcher: Watcher, state: StateDir) -> bool:
    """Close the journal gap of ``root`` with one scan per position, if a gap is open: True when
    no gap is open (now), False when this round could not close it (try again).  Journal reads and
    writes go through ``watcher.call`` (its one connection)."""
    gap, gen = watcher.call(lambda j: (j.gap(), j.gap_generation()))
    if gap is None:
        return True
    sd = os.fsdecode(state_dir(root))
    for store in sorted(set(positions.stores(root).values())):
        if not os.path.exists(os.path.join(sd, store)):      # (nothing built for it yet: a full cycle)
            continue
        if catch_up_position(root, watcher, state, store, gen) is False:
            return False
    with source_lock(root):   # busy (a cycle builds or acks): LockedError, next round
        return watcher.call(lambda j: j.close_gap(gen))


def catch_up_position(root: bytes, watcher: Watcher, state: StateDir, store: str, gen: int) -> Optional[bool]:
    """One position's catch-up scan for gap generation ``gen``: True when journaled and recorded,
    False when the gap moved on (try again), None when not attempted (its own cycle scans)."""
    catalog = SourceCatalog(state, store)
    try:
        acked, last = catalog.last_acked(), catalog.last_cycle()
        if acked is None or FilterSpec.from_record(acked.info.get("filters")).active:
            return None
        if last is None or last.cycle != acked.cycle:      # a built cycle waits for its ack
            return None
        t0 = time.monotonic()
        begin = watcher.call(lambda j: j.last_seq())
        res = compare_tree(root, catalog)
        with source_lock(root):   # busy (a cycle builds or acks): LockedError, next round
            now = catalog.last_cycle()
            if now is None or now.cycle != last.cycle:
                return None

            def commit(j: Journal) -> Optional[int]:
                if j.gap() is None or j.gap_generation() != gen:    # closed, or a newer gap opened
                    return None
                before = j.last_seq()
                items = scan_entries(res, begin)
                items += [("touch", p, None, None) for p in res.vanished]   # looked at by the cycle
                j.append_many(items)
                return next(e.seq for e in j.entries(before, j.last_seq()) if e.op == "scan")
            seq = watcher.call(commit)
            if seq is None:
                return False
            positions.record_catch_up(catalog, gen, acked.cycle, seq)
    finally:
        catalog.close()
    log.info("position %s caught up in %.2fs: %d entries seen, %d touched, %d moves", store,
             time.monotonic() - t0, res.seen, len(res.touched), len(res.moves))
    return True


class CatchUp:
    """A thread that closes every journal gap of the watcher's root while it runs (module doc)."""

    def __init__(self, watcher: Watcher, interval_s: float = INTERVAL_S):
        self.watcher = watcher
        self.root = watcher.root
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True, name="discrep-catch-up")

    def start(self) -> "CatchUp":
        self._t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._t.join(timeout)

    def _run(self) -> None:
        state = StateDir(self.root, error=SourceError)   # catalog paths stay valid while the thread runs
        try:
            while not self._stop.is_set():
                t = time.monotonic()
                pause = self.interval_s
                try:
                    catch_up(self.root, self.watcher, state)
                    # a gap that reopens at once (inotify out of watches) is not walked back to back
                    pause = max(pause, 4 * (time.monotonic() - t))
                except Error as e:       # the source lock is busy (a cycle builds), a file vanished: next round
                    log.info("catch-up scan not done: %s", e)
                except Exception as e:   # never take the watcher down
                    log.warning("catch-up scan failed: %s", e)
                self._stop.wait(pause)
        finally:
            state.close()

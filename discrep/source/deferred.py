"""A streamed cycle's deferred (live) files: checked once its replica has read them.

A streamed first copy does not copy large files into the snapshot: the snapshot holds a
symlink to the live file, which stays open, and the manifest describes it by its stat
before (``live``).  Once the replica has read every file (agent ``verify``), or before the
export serves the snapshot, ``settle_deferred`` checks each: unchanged -> nothing; changed
-> a verified copy in the cycle directory (``redo-<idx>``) and a fresh entry, the pending
catalog row updated; gone or still changing -> dropped from the cycle (pending row removed)
and journaled for the next one.  ``close_deferred`` lets go of them when the cycle fails.

Thread-safety: runs in the agent's thread; the catalog update takes the source lock.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

from discrep.core.errors import WarningList
from discrep.core.paths import join
from discrep.protocol import layout
from discrep.protocol.manifest import entry_for
from discrep.source import snapshot as snapmod
from discrep.source.build import BuiltCycle
from discrep.source.catalog import Row
from discrep.source.cycles import cycle_dir, locked_state


def settle_deferred(root: bytes, b: BuiltCycle, warnings: WarningList, materialize: bool = False
                    ) -> Tuple[List[Dict[str, Any]], List[bytes]]:
    """The replica has read the deferred (live) files of streamed cycle ``b``: check that none
    changed since it was described.  Returns (entries to read again, paths to drop): a file that
    changed was copied (verified) to ``cycle/redo-<idx>`` and gets a fresh entry (same idx); one
    that is gone or keeps changing is dropped from the cycle (its pending catalog row too) and
    journaled for the next.  ``materialize``: the export is about to serve the snapshot, so each
    deferred symlink becomes a real (verified) copy.  Settles each file once."""
    redo: List[Dict[str, Any]] = []
    gone: List[bytes] = []
    if not b.deferred:
        return redo, gone
    cdir = cycle_dir(root, b.cycle)
    fresh: List[Tuple[bytes, Row]] = []
    items = sorted(b.deferred.items())
    b.deferred.clear()
    for n, (p, (idx, before, fd)) in enumerate(items):
        live, copy_to = join(root, p), join(cdir, layout.REDO_FILE % idx)
        try:
            if materialize:
                how, st = snapmod.materialize_deferred(live, before, fd, copy_to, join(b.snapshot, p), p, warnings)
            else:
                how, st = snapmod.settle_deferred(live, before, fd, copy_to, p, warnings)
        except BaseException:
            for _p, (_i, _b, left) in items[n + 1:]:
                os.close(left)
            raise
        if how == "copied":
            e = entry_for(p, copy_to, st)
            e["idx"] = idx
            redo.append(e)
            fresh.append((p, Row.of(st)))
        elif how == "gone":
            gone.append(p)
    if fresh or gone:
        with locked_state(root, b.store) as (journal, catalog):
            catalog.settle_pending(b.cycle, fresh, gone)
            journal.append_many(("touch", p, None, None) for p in gone)   # at-least-once: next cycle
    return redo, gone


def close_deferred(b: BuiltCycle) -> None:
    """The cycle ends unsettled (failed): let go of the files held open for its replica."""
    for _idx, _before, fd in b.deferred.values():
        os.close(fd)
    b.deferred.clear()

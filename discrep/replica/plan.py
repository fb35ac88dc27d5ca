"""What a cycle would do to DEST, worked out before anything changes.

* ``deletions``: the entries a cycle would delete, as the replica's catalog knows them (a
  deleted directory counts its contents; a full cycle deletes whatever the snapshot lacks);
* ``check_max_delete``: refuse (``MaxDeleteError``, exit 19) a cycle that would delete more
  than ``ReplicaOptions.max_delete`` entries (or ``max_delete_pct`` percent of the replica's).

Only reads the catalog; never writes DEST.

Thread-safety: the applying thread only (it uses that thread's catalog connection).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from discrep.core.errors import MaxDeleteError
from discrep.core.paths import show
from discrep.core.store import prefix_end
from discrep.protocol.manifest import Entry
from discrep.replica.catalog import ReplicaCatalog
from discrep.replica.options import ReplicaOptions

SHOWN = 5    # paths named in the refusal


def catalog_size(cat: ReplicaCatalog) -> int:
    """Entries the replica's catalog records."""
    return int(cat.con.execute("SELECT COUNT(*) FROM files").fetchone()[0])


def subtree_size(cat: ReplicaCatalog, rel: bytes) -> int:
    """``rel`` and everything the catalog records below it (at least 1: ``rel`` itself)."""
    n = cat.con.execute("SELECT COUNT(*) FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                        (rel, rel + b"/", prefix_end(rel))).fetchone()[0]
    return max(1, int(n))


def deletions(cat: ReplicaCatalog, full: bool, entries: List[Entry],
              protects: Optional[Callable[[bytes], bool]] = None) -> Tuple[int, List[bytes]]:
    """(entries deleted, the deleted paths at the top of each deleted subtree); ``protects``: the
    paths the replica's filter rules keep (not counted)."""
    keeps = protects or (lambda _p: False)
    if full:
        keep = {e.path for e in entries if e.is_upsert}
        gone = [bytes(r[0]) for r in cat.con.execute("SELECT path FROM files ORDER BY path")
                if bytes(r[0]) not in keep and not keeps(bytes(r[0]))]
        tops: List[bytes] = []
        for p in gone:
            if not tops or not p.startswith(tops[-1] + b"/"):
                tops.append(p)
        return len(gone), tops
    moved_out = {e.old for e in entries if e.op == "move"}
    tops = sorted(e.path for e in entries if e.op == "delete" and not keeps(e.path))
    return sum(subtree_size(cat, p) for p in tops if p not in moved_out), tops


def limit_of(opts: ReplicaOptions, total: int) -> Optional[int]:
    """The most entries a cycle may delete (None: no limit)."""
    lim: Optional[int] = None
    if opts.max_delete is not None and opts.max_delete >= 0:
        lim = opts.max_delete
    if opts.max_delete_pct is not None and opts.max_delete_pct >= 0:
        pct = int(total * opts.max_delete_pct / 100)
        lim = pct if lim is None else min(lim, pct)
    return lim


def check_max_delete(cat: ReplicaCatalog, dest: bytes, full: bool, entries: List[Entry],
                     opts: ReplicaOptions, protects: Optional[Callable[[bytes], bool]] = None) -> int:
    """Raise ``MaxDeleteError`` when the cycle would delete more than the limit; else the count."""
    total = catalog_size(cat)
    lim = limit_of(opts, total)
    if lim is None:
        return 0
    n, tops = deletions(cat, full, entries, protects)
    if n <= lim:
        return n
    first = ", ".join(show(p) for p in tops[:SHOWN]) + (", ..." if len(tops) > SHOWN else "")
    what = f"{opts.max_delete_pct:g}% of {total}" if opts.max_delete_pct is not None else str(lim)
    raise MaxDeleteError(
        f"this cycle would delete {n} of the {total} entries of {os.fsdecode(dest)} (more than the limit "
        f"--max-delete {what}): {first}; nothing was changed",
        hint="if the source really lost them, run again with a higher --max-delete, or --max-delete -1 "
             "(or without it) for no limit; if the source is not mounted or was emptied by mistake, fix it first")

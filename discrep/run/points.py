"""Recovery points of a replica: list them, restore one, prune history, roll back a crash.

What ``history``, ``restore``, ``prune`` and ``recover`` run: each takes the replica's
lock where it changes anything, opens the catalog, and calls the replica side.

Thread-safety: runs in the caller's thread; the replica lock keeps other runs out.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

from discrep.core.errors import UsageError
from discrep.core.paths import check_rel
from discrep.replica.history import available, clone_replica, hist_dir, restore, size_of
from discrep.replica.sync import apply_retention, open_catalog, recover, replica_lock, state_path


def _require_replica(dest: str) -> str:
    sd = os.path.join(dest, ".discrep")
    if not os.path.exists(os.path.join(sd, "replica.db")):
        raise UsageError(f"{dest} is not a discrep replica")
    return sd


def list_points(dest: str) -> Tuple[List[Dict[str, Any]], Optional[int]]:
    """Every committed cycle with its figures and whether it can still be restored; the
    interrupted cycle, if any."""
    _require_replica(dest)
    cat = open_catalog(os.fsencode(dest))
    try:
        rows = cat.history()
        applying = cat.applying()
        state = state_path(cat)
        have = set(available(state))
        committed = [c for c, *_ in rows]
        out = []
        for c, s, _cm, st in rows:
            restorable = all(x in have for x in committed if x > c)
            out.append({"cycle": c, "source_time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s / 1e9)),
                        "files_changed": st.get("files_changed"),
                        "bytes_transferred": st.get("bytes_transferred"), "bytes_written": st.get("bytes_written"),
                        "history_bytes": size_of(hist_dir(state, c)) if c in have else 0,
                        "restorable": restorable})
    finally:
        cat.close()
    return out, applying


def restore_point(dest: str, cycle: int, to: str, path: Optional[str]) -> None:
    """Materialize committed cycle ``cycle`` (or one path of it) into the new directory ``to``."""
    bdest = os.fsencode(os.path.abspath(dest))
    _require_replica(dest)
    with replica_lock(bdest):
        cat = open_catalog(bdest)
        try:
            if cat.applying() is not None:
                raise UsageError(f"{dest} holds an interrupted cycle", hint=f"run 'discrep recover {dest}' first")
            committed = [c for c, *_ in cat.history()]
            sub = check_rel(os.fsencode(path.strip("/"))) if path else None
            restore(bdest, state_path(cat), cycle, committed, os.fsencode(os.path.abspath(to)), sub, clone_replica)
        finally:
            cat.close()


def prune_points(dest: str, keep_last: int, keep_within_s: Optional[float]) -> List[int]:
    """Drop history no kept recovery point needs; the cycles whose history went."""
    bdest = os.fsencode(os.path.abspath(dest))
    with replica_lock(bdest):
        cat = open_catalog(bdest)
        try:
            return apply_retention(bdest, cat, keep_last, keep_within_s)
        finally:
            cat.close()


def recover_replica(dest: str) -> Optional[Tuple[int, int]]:
    """Roll an interrupted cycle back: (cycle, changes undone), or None when there was none."""
    return recover(os.fsencode(os.path.abspath(dest)))

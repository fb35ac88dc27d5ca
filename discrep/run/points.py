"""Recovery points of a replica: list them, restore one, prune history, roll back a crash, repair.

What ``history``, ``restore``, ``prune``, ``recover`` and ``repair-state`` run: each takes the
replica's lock where it changes anything, opens the catalog, and calls the replica side.
``repair_state`` rebuilds a lost or damaged catalog from DEST and its history store: the damaged
file is moved aside, the committed cycles are those with a history dir and the one before
the oldest of them (numbered one less: the history does not record a base), the rows come from
a walk of DEST with fresh signatures (DEST is taken as its newest cycle).

Thread-safety: runs in the caller's thread; the replica lock keeps other runs out.
"""
from __future__ import annotations

import os
import stat as statmod
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import blockdiff

from discrep.core.errors import DestinationError, UsageError
from discrep.core.paths import check_rel
from discrep.core.statedir import StateDir
from discrep.core.walk import walk
from discrep.replica.catalog import CatalogRow, ReplicaCatalog
from discrep.replica.history import available, clone_replica, hist_dir, restore, size_of
from discrep.replica.versions import find_versions
from discrep.replica import retention
from discrep.replica.retention import GridRule
from discrep.replica.sync import (apply_retention, open_catalog, recover, replica_lock, retention_points,
                                  state_path)


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
                        "consistency": _consistency(st),
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


def find_points(dest: str, pattern: str) -> Dict[str, Any]:
    """Every restorable recovery point's version of the entries matching ``pattern`` (rsync syntax),
    replayed from DEST's history (``replica.versions``); the points looked at and those too old."""
    bdest = os.fsencode(os.path.abspath(dest))
    _require_replica(dest)
    with replica_lock(bdest):
        cat = open_catalog(bdest)
        try:
            if cat.applying() is not None:
                raise UsageError(f"{dest} holds an interrupted cycle", hint=f"run 'discrep recover {dest}' first")
            hist = {h.cycle: h for h in cat.history()}
            versions, seen = find_versions(bdest, state_path(cat), sorted(hist), pattern)
        finally:
            cat.close()
    out = []
    for v in versions:
        h = hist[v.cycle]
        out.append({"cycle": v.cycle, "source_time": _when(h.source_time_ns), "path": os.fsdecode(v.path),
                    "type": v.kind, "size": v.size, "mode": f"{v.mode:04o}", "mtime": _when(v.mtime_ns),
                    "digest": v.digest, "consistency": _consistency(h.stats)})
    return {"pattern": pattern, "versions": out, "points": sorted(seen),
            "not_restorable": sorted(c for c in hist if c not in seen)}


def _consistency(stats: Dict[str, Any]) -> str:
    """"app" (the source's pre_snapshot hook succeeded), "crash-fallback" (it failed; the point was
    taken anyway) or "crash" (no hook)."""
    c = stats.get("consistency")
    return c if c in ("app", "crash-fallback") else "crash"


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def prune_points(dest: str, keep_last: int, keep_within_s: Optional[float],
                 grid: Sequence[GridRule] = ()) -> List[int]:
    """Drop history no kept recovery point needs; the cycles whose history went."""
    bdest = os.fsencode(os.path.abspath(dest))
    with replica_lock(bdest):
        cat = open_catalog(bdest)
        try:
            return apply_retention(bdest, cat, keep_last, keep_within_s, grid)
        finally:
            cat.close()


def prune_plan(dest: str, keep_last: int, keep_within_s: Optional[float],
               grid: Sequence[GridRule] = ()) -> List[Dict[str, Any]]:
    """What ``prune_points`` would do, changing nothing: every recovery point, oldest first, kept or
    dropped and the rules that keep it (``replica.retention``)."""
    _require_replica(dest)
    cat = open_catalog(os.fsencode(os.path.abspath(dest)))
    try:
        hist = cat.history()
        points = retention_points(hist, available(state_path(cat)))
    finally:
        cat.close()
    decided = {d.cycle: d for d in retention.plan(points, time.time_ns(), keep_last, keep_within_s, grid)}
    out = []
    for h in hist:
        d = decided.get(h.cycle)
        out.append({"cycle": h.cycle, "source_time": _when(h.source_time_ns or h.committed_ns),
                    "action": "pruned earlier" if d is None else "keep" if d.keep else "drop",
                    "rules": list(d.reasons) if d else [], "consistency": _consistency(h.stats)})
    return out


def recover_replica(dest: str) -> Optional[Tuple[int, int]]:
    """Roll an interrupted cycle back: (cycle, changes undone), or None when there was none."""
    return recover(os.fsencode(os.path.abspath(dest)))


def repair_state(dest: str) -> Dict[str, Any]:
    """Rebuild DEST's catalog (see the module doc); the recovery points stay."""
    bdest = os.fsencode(os.path.abspath(dest))
    if not os.path.isdir(os.path.join(dest, ".discrep")):
        raise UsageError(f"{dest} is not a discrep replica (it has no .discrep)")
    with replica_lock(bdest), StateDir(bdest, create=False) as sd:
        try:
            cat = ReplicaCatalog(sd)
        except DestinationError:
            cat = None                          # damaged: rebuilt below
        if cat is not None:
            try:
                if cat.applying() is not None:
                    raise UsageError(f"{dest} holds an interrupted cycle", hint=f"run 'discrep recover {dest}' first")
            finally:
                cat.close()
        aside = _move_aside(sd)
        state = os.fsencode(sd.path)
        cycles = available(state)
        cat = ReplicaCatalog(sd)
        try:
            n = 0
            rows = []
            for row in _walk_rows(bdest):
                rows.append(row)
                n += 1
            points = [(c, os.stat(hist_dir(state, c)).st_mtime_ns) for c in cycles]
            if cycles and cycles[0] > 1:     # undoing the oldest history reaches the point before it
                points.insert(0, (cycles[0] - 1, points[0][1]))
            cat.rebuild(points, rows)
            cycles = [c for c, _t in points]
        finally:
            cat.close()
    return {"cycles": cycles, "rows": n, "moved_aside": aside}


def _move_aside(sd: StateDir) -> Optional[str]:
    """Move replica.db (and its -wal/-shm) aside as ``replica.db.damaged-<ns>``; the new name."""
    stamp = time.time_ns()
    moved = None
    for suffix in ("", "-wal", "-shm"):
        name = "replica.db" + suffix
        try:
            os.rename(name, f"replica.db.damaged-{stamp}{suffix}", src_dir_fd=sd.fd, dst_dir_fd=sd.fd)
        except FileNotFoundError:
            continue
        if not suffix:
            moved = f"replica.db.damaged-{stamp}"
    return moved


def _walk_rows(root: bytes) -> Iterator[CatalogRow]:
    """A catalog row for every file, directory and symlink below ``root``, files freshly signed."""
    for rel, st in walk(root):
        if statmod.S_ISDIR(st.st_mode):
            yield CatalogRow.dir(rel, st.st_mtime_ns, st.st_ino)
        elif statmod.S_ISLNK(st.st_mode):
            yield CatalogRow.symlink(rel, st.st_mtime_ns)
        elif statmod.S_ISREG(st.st_mode):
            fd = os.open(os.path.join(root, rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                sig = blockdiff.sign_fd(fd, st.st_size).to_bytes()
            finally:
                os.close(fd)
            yield CatalogRow.file(rel, st.st_size, st.st_mtime_ns, st.st_ino, sig)

"""The source's built cycles after the build: queries, acknowledgement, release, reset, settling.

A cycle the source built (source.build) is ``built`` until the replica acknowledges it:
``ack_cycle`` then applies the catalog updates the build recorded, trims the journal and
releases older snapshots (``acked`` -> ``released``).  ``reset`` forgets what was
replicated (the next cycle compares everything); ``settle_source`` makes the source's base
equal to the replica's last committed cycle before a new cycle is built.  ``source_lock``
and ``locked_state`` serialize every run that builds or acknowledges a cycle of one tree;
``cycle_dir`` names a cycle's directory.

Each replica has its own position, a *store* (the catalog file named by
``source.positions.store_for``; ``catalog.db`` for the legacy, id-less replica): every function
here that reads or changes a position takes the store.  The journal is shared: an ack trims it
only up to the lowest cut some other held position still needs (``positions.trim_point``);
``forget_replica`` drops one position and what only it held.

Thread-safety: each call runs in one thread and takes the process-wide source lock
(``source_lock``) around what it changes; read-only queries take no lock.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple, TypeVar

from discrep.core import locks
from discrep.core.errors import SourceDiskFullError, SourceError
from discrep.core.paths import join, state_dir
from discrep.core.statedir import StateDir
from discrep.core.store import is_disk_full
from discrep.journal.store import Journal
from discrep.source import snapshot as snapmod
from discrep.source import positions
from discrep.source.catalog import CATALOG_FILE, CycleRec, SourceCatalog

log = logging.getLogger(__name__)

T = TypeVar("T")
_TAMPERED = "the catalog was damaged or planted: move SRC/.discrep/catalog.db aside (the next cycle compares everything)"


@contextmanager
def source_lock(root: bytes) -> Iterator[None]:
    with StateDir(root, error=SourceError) as sd, \
            locks.holding(sd.file("source.lock"),
                          f"another discrep run is building or acknowledging a cycle of {os.fsdecode(root)}",
                          hint="wait for it to finish"):
        yield


@contextmanager
def locked_state(root: bytes, store: str = CATALOG_FILE) -> Iterator[Tuple[Journal, SourceCatalog]]:
    """The source's journal and the catalog of position ``store``, open under the source lock."""
    with source_lock(root):
        sd = os.fsdecode(state_dir(root))
        journal, catalog = Journal(sd), SourceCatalog(sd, store)
        try:
            yield journal, catalog
        finally:
            journal.close()
            catalog.close()


@contextmanager
def disk_full_said(root: bytes) -> Iterator[None]:
    """Around building a cycle: running out of space on the source (its snapshot copy, manifest,
    catalog) is a ``SourceDiskFullError`` naming the source (exit 20), not a damaged catalog or a
    cycle with holes; the half-built cycle is not recorded, so nothing reaches the replica."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        if not is_disk_full(e):
            raise
        raise SourceDiskFullError(f"the source filesystem of {os.fsdecode(root)} is full: cycle not built "
                                  f"({e})") from None


def cycle_dir(root: bytes, n: int) -> bytes:
    return join(state_dir(root), b"cycles/" + str(n).encode())


def _catalog_read(root: bytes, fn: Callable[[SourceCatalog], T], store: str = CATALOG_FILE) -> Optional[T]:
    """``fn(catalog)`` on the catalog of position ``store``, or None when it has no state yet."""
    sd = os.fsdecode(state_dir(root))
    if not os.path.exists(os.path.join(sd, store)):
        return None
    cat = SourceCatalog(sd, store)
    try:
        return fn(cat)
    finally:
        cat.close()


def pending_cycle(root: bytes, store: str = CATALOG_FILE) -> Optional[CycleRec]:
    """The last cycle, if it was built but not acknowledged yet."""
    last = _catalog_read(root, SourceCatalog.last_cycle, store)
    return last if last and last.state == "built" else None


def acked_cycle(root: bytes, store: str = CATALOG_FILE) -> Optional[CycleRec]:
    """The last cycle the replica acknowledged (the base of the next one), if any."""
    return _catalog_read(root, SourceCatalog.last_acked, store)


def last_acked(root: bytes, store: str = CATALOG_FILE) -> int:
    rec = acked_cycle(root, store)
    return rec.cycle if rec else 0


def ack_cycle(root: bytes, n: int, store: str = CATALOG_FILE) -> None:
    """The replica committed cycle ``n``: update its position's catalog, trim the journal as far as
    every held position allows, release the position's older snapshots."""
    with locked_state(root, store) as (journal, catalog):
        rec = catalog.cycle(n)
        if rec is None:
            raise SourceError(f"cycle {n} is unknown to the source {os.fsdecode(root)}")
        if rec.state in ("acked", "released"):
            return
        if rec.state != "built":
            raise SourceError(f"cycle {n} is {rec.state}; it cannot be acknowledged")
        catalog.ack(n)
        positions.record_cut(root, store, rec.cut_seq)
        journal.trim(positions.trim_point(root, journal, store, rec.cut_seq))
        for old in catalog.cycles(["acked", "abandoned"]):
            if old.cycle < n or (old.cycle == n and old.provider == "copy"):
                _release(root, catalog, old)


def _release(root: bytes, catalog: SourceCatalog, rec: CycleRec) -> None:
    """Release a cycle's snapshot and directory.  What the catalog says is checked first: only
    ``SRC/.discrep/snapshots/<N>`` is ever removed, reached through the checked state dir."""
    n = rec.cycle
    if not isinstance(n, int) or n <= 0:
        raise SourceError(f"the source catalog of {os.fsdecode(root)} lists a bad cycle number {n!r}",
                          hint=_TAMPERED)
    snap = bytes(rec.snapshot or b"")
    if snap and not snap.endswith(b"/.discrep/snapshots/%d" % n):
        raise SourceError(f"the source catalog says snapshot {snap!r} for cycle {n}, not "
                          f".discrep/snapshots/{n}: nothing was removed", hint=_TAMPERED)
    with StateDir(root, create=False, error=SourceError) as sd:
        if snap:
            snapmod.release(rec.provider, os.fsencode(f"{sd.path}/snapshots/{n}"))
        cdir = os.fsencode(f"{sd.path}/cycles/{n}")
        if os.path.lexists(cdir):
            shutil.rmtree(cdir)
    catalog.set_state(rec.cycle, "released" if rec.state == "acked" else "abandoned-released")


def reset(root: bytes, store: str = CATALOG_FILE) -> None:
    """Forget what position ``store`` replicated: its next cycle is a full comparison (the replica
    was replaced).  The other positions keep theirs: the journal gets no gap (a full comparison
    does not read it)."""
    with locked_state(root, store) as (journal, catalog):
        for rec in catalog.cycles(["built", "acked", "abandoned"]):
            _release(root, catalog, rec)
        catalog.forget()
        positions.record_cut(root, store, None)
        if store == CATALOG_FILE and len(positions.stores(root)) <= 1:
            journal.mark_gap("source catalog reset")


def forget_replica(root: bytes, replica_id: str) -> str:
    """Drop replica ``replica_id``'s position: its snapshots and cycle directories are released,
    its catalog deleted (the legacy one emptied), and the journal trimmed to what the remaining
    positions need.  Returns the store it had."""
    with source_lock(root):
        store = positions.drop(root, replica_id)
        sd = os.fsdecode(state_dir(root))
        journal, catalog = Journal(sd), SourceCatalog(sd, store)
        try:
            for rec in catalog.cycles(["built", "acked", "abandoned"]):
                _release(root, catalog, rec)
            catalog.forget()
            held = [c for c in (_acked_cut_of(root, s) for s in positions.stores(root).values() if s != store)
                    if c is not None]
            journal.trim(min(held) if held else journal.last_seq())
        finally:
            journal.close()
            catalog.close()
        if store != CATALOG_FILE:
            with StateDir(root, create=False, error=SourceError) as sdir:
                for suffix in ("", "-wal", "-shm"):
                    try:
                        os.unlink(store + suffix, dir_fd=sdir.fd)
                    except FileNotFoundError:
                        pass
    log.info("replica %s forgotten (%s)", replica_id, store)
    return store


def _acked_cut_of(root: bytes, store: str) -> Optional[int]:
    rec = acked_cycle(root, store)
    return rec.cut_seq if rec else None


def settle_source(src: bytes, replica_cycle: int, store: str = CATALOG_FILE) -> None:
    """Make the base of position ``store`` equal the replica's last committed cycle."""
    pend = pending_cycle(src, store)
    if pend is not None and pend.cycle == replica_cycle:
        log.info("acknowledging cycle %d, which the replica committed in an earlier run", replica_cycle)
        ack_cycle(src, replica_cycle, store)
    acked = last_acked(src, store)
    if acked != replica_cycle:
        log.warning("source base is cycle %d but the replica is at cycle %d: this cycle compares everything",
                    acked, replica_cycle)
        reset(src, store)

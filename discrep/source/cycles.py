"""The source's built cycles after the build: queries, acknowledgement, release, reset, settling.

A cycle the source built (source.build) is ``built`` until the replica acknowledges it:
``ack_cycle`` then applies the catalog updates the build recorded, trims the journal and
releases older snapshots (``acked`` -> ``released``).  ``reset`` forgets what was
replicated (the next cycle compares everything); ``settle_source`` makes the source's base
equal to the replica's last committed cycle before a new cycle is built.  ``source_lock``
and ``locked_state`` serialize every run that builds or acknowledges a cycle of one tree;
``cycle_dir`` names a cycle's directory.

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
from discrep.source.catalog import CycleRec, SourceCatalog

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
def locked_state(root: bytes) -> Iterator[Tuple[Journal, SourceCatalog]]:
    """The source's journal and catalog, open under the source lock."""
    with source_lock(root):
        sd = os.fsdecode(state_dir(root))
        journal, catalog = Journal(sd), SourceCatalog(sd)
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


def _catalog_read(root: bytes, fn: Callable[[SourceCatalog], T]) -> Optional[T]:
    """``fn(catalog)`` on the source's catalog, or None when the source has no state yet."""
    sd = os.fsdecode(state_dir(root))
    if not os.path.exists(os.path.join(sd, "catalog.db")):
        return None
    cat = SourceCatalog(sd)
    try:
        return fn(cat)
    finally:
        cat.close()


def pending_cycle(root: bytes) -> Optional[CycleRec]:
    """The last cycle, if it was built but not acknowledged yet."""
    last = _catalog_read(root, SourceCatalog.last_cycle)
    return last if last and last.state == "built" else None


def acked_cycle(root: bytes) -> Optional[CycleRec]:
    """The last cycle the replica acknowledged (the base of the next one), if any."""
    return _catalog_read(root, SourceCatalog.last_acked)


def last_acked(root: bytes) -> int:
    rec = acked_cycle(root)
    return rec.cycle if rec else 0


def ack_cycle(root: bytes, n: int) -> None:
    """The replica committed cycle ``n``: update the catalog, trim the journal, release old snapshots."""
    with locked_state(root) as (journal, catalog):
        rec = catalog.cycle(n)
        if rec is None:
            raise SourceError(f"cycle {n} is unknown to the source {os.fsdecode(root)}")
        if rec.state in ("acked", "released"):
            return
        if rec.state != "built":
            raise SourceError(f"cycle {n} is {rec.state}; it cannot be acknowledged")
        catalog.ack(n)
        journal.trim(rec.cut_seq)
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


def reset(root: bytes) -> None:
    """Forget what was replicated: the next cycle is a full comparison (replica was replaced)."""
    with locked_state(root) as (journal, catalog):
        for rec in catalog.cycles(["built", "acked", "abandoned"]):
            _release(root, catalog, rec)
        catalog.forget()
        journal.mark_gap("source catalog reset")


def settle_source(src: bytes, replica_cycle: int) -> None:
    """Make the source's base equal the replica's last committed cycle."""
    pend = pending_cycle(src)
    if pend is not None and pend.cycle == replica_cycle:
        log.info("acknowledging cycle %d, which the replica committed in an earlier run", replica_cycle)
        ack_cycle(src, replica_cycle)
    acked = last_acked(src)
    if acked != replica_cycle:
        log.warning("source base is cycle %d but the replica is at cycle %d: this cycle compares everything",
                    acked, replica_cycle)
        reset(src)

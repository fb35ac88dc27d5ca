"""Replica side of a cycle: read the export's cycle description and manifest, apply, commit.

``sync(reader, dest)`` applies one cycle under DEST's lock:

1. an interrupted earlier cycle is rolled back first (``recover_locked``);
2. the cycle description is checked against the catalog (same source tree, built on the
   cycle DEST is at, or a full cycle); a cycle applied already is not applied again;
3. every path of the manifest is validated (``manifest.Entry``: ``paths.check_rel``) before
   anything is touched, and owners are mapped (``owners.OwnerMap``);
4. ``apply.Applier`` applies it (a first copy that is still being built:
   ``stream.StreamApplier``), every write through directory fds opened component by
   component with O_NOFOLLOW -- a symlink inside DEST is never followed;
5. ``syncfs`` of DEST, then the catalog records the cycle as committed and old history
   goes (``apply_retention``).  A failure rolls DEST back to its last committed cycle at once.

The export is read only through ``reader.Reader``; the transport is never imported.

Thread-safety: ``sync`` runs in one thread; only range reads fan out to the reader's pool,
writing with pwrite to fds this thread owns.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from discrep.core import locks
from discrep.core.errors import (CycleMismatchError, DestinationError, DiskFullError, Error, LiveChangedError,
                                 ManifestError,
                                 WarningList)
from discrep.core.paths import holds_only_state, join, state_dir
from discrep.core.statedir import StateDir
from discrep.protocol import layout
from discrep.protocol.manifest import Entry, read_lines
from discrep.replica.apply import Applier
from discrep.replica import retention
from discrep.replica.catalog import HistoryRow, ReplicaCatalog
from discrep.replica.dest import remove_stage
from discrep.replica.files import check_size
from discrep.replica.history import available, prune, rollback
from discrep.replica.options import ReplicaOptions
from discrep.replica.plan import check_max_delete
from discrep.replica.protect import Protection, protection
from discrep.protocol.filterspec import FilterSpec
from discrep.replica.owners import OwnerMap
from discrep.replica.reader import Reader, StreamedCycle
from discrep.replica.retention import GridRule
from discrep.replica.stats import Progress, SyncStats

log = logging.getLogger(__name__)

MAX_CYCLE_BYTES = 1 << 20     # a cycle description (a small JSON object)


def result_fields(stats: SyncStats) -> dict:
    """The replica's figures in a cycle result (--json): one place for local and remote cycles."""
    return {"files_changed": stats.files_changed, "files_unchanged": stats.files_unchanged,
            "files_repaired": stats.files_repaired,
            "files_deleted": stats.files_deleted, "files_renamed": stats.files_renamed,
            "dirs_created": stats.dirs, "symlinks": stats.symlinks,
            "bytes_transferred": stats.bytes_transferred, "bytes_written": stats.bytes_written,
            "files_meta_changed": stats.files_meta_changed, "history_bytes": stats.history_bytes,
            "streamed": stats.streamed,
            "worker_segments": stats.worker_segments, "consistency": stats.consistency}


@contextmanager
def replica_lock(dest: bytes) -> Iterator[None]:
    """DEST's lock, a file in its checked state dir (never a planted symlink's target)."""
    with StateDir(dest) as sd, locks.holding(sd.file("lock"), f"another discrep run is writing to {os.fsdecode(dest)}",
                                             hint="wait for it, or stop it; two cycles never run at once on one DEST"):
        yield


def sync(reader: Reader, dest: bytes, options: Optional[ReplicaOptions] = None, *,
         warnings: Optional[WarningList] = None, progress: Optional[Progress] = None,
         stream: Optional[StreamedCycle] = None, live_changed: Optional[Callable[[], bool]] = None) -> SyncStats:
    """Apply the cycle exported through ``reader`` to replica directory ``dest``.

    ``stream``: a cycle still being built (``reader.StreamedCycle``); a first copy into an
    empty DEST is applied while it streams, any other cycle once its manifest is complete.
    ``live_changed``: asked, when every file is applied and before the commit, whether a file
    the source let us read live (entries marked ``live``) changed meanwhile; if so the cycle
    is rolled back (``LiveChangedError``): what was read of it is no point-in-time copy."""
    opts = options or ReplicaOptions()
    warnings = warnings if warnings is not None else WarningList()
    t0 = time.monotonic()
    if not os.path.isdir(dest):
        raise DestinationError(f"replica directory {os.fsdecode(dest)} does not exist",
                               hint="create it, or let 'discrep replicate' create it")
    if not os.access(dest, os.W_OK):
        raise DestinationError(f"replica directory {os.fsdecode(dest)} is not writable")
    with replica_lock(dest):
        cat = open_catalog(dest)
        try:
            st = _sync(reader, dest, cat, warnings, progress, t0, opts, stream, live_changed)
            if not st.already_committed:
                apply_retention(dest, cat, opts.keep_last, opts.keep_within_s, opts.keep_grid)
            return st
        finally:
            cat.close()


def open_catalog(dest: bytes) -> ReplicaCatalog:
    """DEST's catalog, opened through its checked state dir; a catalog that is new or empty while
    DEST has recovery points (it was truncated or replaced) is refused rather than restarted."""
    cat = ReplicaCatalog(os.fsdecode(state_dir(dest)))
    try:
        if cat.last_committed() == 0 and cat.applying() is None and available(state_path(cat)):
            raise DestinationError(
                f"the replica catalog {os.fsdecode(join(state_dir(dest), b'replica.db'))} lists no cycle, but "
                f"{os.fsdecode(dest)} has recovery points: the catalog was lost or damaged",
                hint=f"run 'discrep repair-state {os.fsdecode(dest)}': it rebuilds the catalog from DEST and "
                     f"keeps the recovery points")
    except BaseException:
        cat.close()
        raise
    return cat


def state_path(cat: ReplicaCatalog) -> bytes:
    """Path of DEST's checked state dir (through its fd) as the history functions take it."""
    return os.fsencode(cat.state.path)


def recover_locked(dest: bytes, cat: ReplicaCatalog) -> Optional[Tuple[int, int]]:
    """Roll an interrupted cycle back to the last committed one: (cycle, records undone) or None."""
    n = cat.applying()
    if n is None:
        return None
    log.warning("rolling back interrupted cycle %d of %s", n, os.fsdecode(dest))
    undone = rollback(dest, state_path(cat), n)
    cat.abandon(n)
    remove_stage(cat.state)
    return n, undone


def recover(dest: bytes) -> Optional[Tuple[int, int]]:
    if not os.path.exists(join(state_dir(dest), b"replica.db")):
        raise DestinationError(f"{os.fsdecode(dest)} is not a discrep replica")
    with replica_lock(dest):
        cat = open_catalog(dest)
        try:
            return recover_locked(dest, cat)
        finally:
            cat.close()


def apply_retention(dest: bytes, cat: ReplicaCatalog, keep_last: int, keep_within_s: Optional[float],
                    grid: Sequence[GridRule] = ()) -> List[int]:
    """Prune history no kept recovery point needs (the newest cycle is always kept; see
    ``replica.retention``)."""
    hist = cat.history()
    committed = [h.cycle for h in hist]
    if not committed:
        return []
    decisions = retention.plan(retention_points(hist, available(state_path(cat))), time.time_ns(), keep_last,
                               keep_within_s, grid)
    return prune(state_path(cat), committed, [d.cycle for d in decisions if d.keep])


def retention_points(hist: Sequence[HistoryRow], have: Sequence[int]) -> List[retention.Point]:
    """The committed cycles that can still be restored (every later cycle has its history), as
    retention sees them: a point's time is its source snapshot time."""
    got, out = set(have), []
    later_ok = True
    for h in reversed(hist):
        if later_ok:
            out.append(retention.Point(h.cycle, h.source_time_ns or h.committed_ns))
        later_ok = later_ok and h.cycle in got
    return out[::-1]


# -- one cycle, step by step ------------------------------------------------------

def _sync(reader: Reader, dest: bytes, cat: ReplicaCatalog, warnings: WarningList, progress: Optional[Progress],
          t0: float, opts: ReplicaOptions, stream: Optional[StreamedCycle],
          live_changed: Optional[Callable[[], bool]] = None) -> SyncStats:
    header, cycle, base = _read_header(reader, stream)
    recover_locked(dest, cat)   # an interrupted earlier run: back to the last committed cycle first
    last = cat.last_committed()
    sid = header.get("source_id")
    _check_source(dest, cat, sid, opts.force)
    if cycle == last:
        return SyncStats(cycle=cycle, base=base, already_committed=True,
                         bytes_transferred=reader.bytes_read, duration_s=time.monotonic() - t0)
    if cycle < last or cycle <= 0:     # full or not: a committed recovery point is never rewritten
        raise CycleMismatchError(
            f"the export is cycle {cycle}, but {os.fsdecode(dest)} has committed cycle {last} already: a "
            f"cycle number must exceed the last committed one",
            hint="the source's state was reset or replaced: 'discrep reset SRC' starts a new full cycle "
                 "numbered after the replica's")
    if not header.get("full") and base != last:
        raise CycleMismatchError(
            f"the export is cycle {cycle} built on cycle {base}, but {os.fsdecode(dest)} is at cycle {last}",
            hint="run 'discrep replicate' (it rebuilds against the replica), or 'discrep reset SRC' for a "
                 "full comparison")
    _check_filters(header, opts.filter_spec())
    owners = OwnerMap(opts.numeric_ids)
    fresh = bool(header.get("full")) and last == 0 and holds_only_state(dest)
    streamed = stream is not None and fresh
    entries: List[Entry] = []
    if not streamed:    # the whole manifest, validated before anything is touched
        entries = _load_entries(reader, stream, cycle)
        reader.know_files({e.idx: e.path for e in entries if e.op == "file"})
        owners.map_entries(entries)
    _map_root_owner(header, owners)
    if not streamed:
        for e in entries:                  # before anything is touched
            if e.op == "file":
                check_size(e, opts.max_file_size)
    prot = None if fresh else protection(dest, opts.filter_spec())
    try:
        if not streamed:
            check_max_delete(cat, dest, bool(header.get("full")), entries, opts,
                             prot.protects if prot is not None else None)
        cat.begin(cycle, base, int(header.get("created_ns", 0)))
        return _apply(reader, dest, cat, header, entries, warnings, progress, t0, opts, stream, owners,
                      fresh, streamed, last, prot, live_changed)
    finally:
        if prot is not None:
            prot.close()


def _apply(reader: Reader, dest: bytes, cat: ReplicaCatalog, header: Dict[str, Any], entries: List[Entry],
           warnings: WarningList, progress: Optional[Progress], t0: float, opts: ReplicaOptions,
           stream: Optional[StreamedCycle], owners: OwnerMap, fresh: bool, streamed: bool, last: int,
           prot: Optional[Protection], live_changed: Optional[Callable[[], bool]]) -> SyncStats:
    """Apply the begun cycle and commit it, or roll DEST back to ``last``."""
    cycle = int(header["cycle"])
    ap = Applier(reader, dest, cat, header, entries, warnings, progress, fresh=fresh, nosuid=opts.nosuid)
    ap.files.checksum = opts.checksum and not fresh
    ap.files.max_size = opts.max_file_size
    ap.protect = prot
    try:
        if streamed and stream is not None:     # (a first copy only: its worker process is imported here)
            from discrep.replica.stream import StreamApplier
            stats = StreamApplier(ap, stream, owners).run()
        else:
            stats = ap.run()
        live = sum(1 for e in entries if e.live) if live_changed is not None and not streamed else 0
        if live:
            log.info("cycle %d: %d file(s) read live; asking the source whether any changed meanwhile", cycle, live)
            if live_changed():
                raise LiveChangedError(f"cycle {cycle}: files read live changed while they were read",
                                       hint="run again: the cycle is rebuilt with those files copied")
        _commit(ap, reader, header, t0)
    except BaseException as exc:
        ap.close()
        _roll_back(dest, cat, cycle, last, exc)
        raise
    ap.close()
    remove_stage(cat.state)
    return stats


def _read_header(reader: Reader, stream: Optional[StreamedCycle]) -> Tuple[Dict[str, Any], int, int]:
    """The cycle description (a copy: owners get mapped in it), its cycle and base."""
    try:
        header = dict(stream.header) if stream is not None else json.loads(reader.read_all(layout.CYCLE_REL, MAX_CYCLE_BYTES))
        return header, int(header["cycle"]), int(header["base"])
    except (ValueError, KeyError, TypeError):
        raise ManifestError("the export's .discrep/cycle is not a valid cycle description") from None


def _check_source(dest: bytes, cat: ReplicaCatalog, sid: Optional[str], force: bool) -> None:
    mine = cat.get_meta("source_id")
    if sid and mine and sid != mine and not force:
        raise DestinationError(f"{os.fsdecode(dest)} is a replica of another source tree",
                               hint="use the right DEST, or --force to make this one a replica of the new "
                                    "source (what differs is kept in its history)")


def _load_entries(reader: Reader, stream: Optional[StreamedCycle], cycle: int) -> List[Entry]:
    """Every entry of the manifest, validated (a streamed cycle: all its segments, then built)."""
    if stream is not None:
        entries: List[Entry] = []
        for ents, _packs in stream.segments():
            entries.extend(ents)
        stream.finish()
        return entries
    mhead, raw = read_lines(reader.read_all(layout.MANIFEST_REL))
    if int(mhead.get("cycle", -1)) != cycle:
        raise ManifestError("manifest and cycle description disagree")
    return [Entry(r) for r in raw]


def _map_root_owner(header: Dict[str, Any], owners: OwnerMap) -> None:
    """The top directory's owner (validated like an entry), mapped like every entry's."""
    if not owners.numeric_ids and isinstance(header.get("root"), dict):
        r = Entry(dict(header["root"], op="dir", path="_"))
        owners.map_entry(r)
        header["root"] = dict(header["root"], uid=r.uid, gid=r.gid)


def _commit(ap: Applier, reader: Reader, header: Dict[str, Any], t0: float) -> None:
    """The cycle is on disk: the catalog records it as committed."""
    ap.symlink_rows()
    stats = ap.stats
    stats.bytes_transferred = reader.bytes_read
    stats.duration_s = time.monotonic() - t0
    c = header.get("consistency")
    stats.consistency = c if c in ("app", "crash-fallback") else ""      # a claim of the source, checked
    ap.cat.commit(stats.cycle, full=bool(header.get("full")), moves=ap.moves.pairs, deletes=ap.deleted,
                  rows=ap.rows, stats=asdict(stats))
    sid = header.get("source_id")
    if sid:
        ap.cat.set_meta("source_id", str(sid))
    ap.cat.set_meta("filters", json.dumps(header.get("filters")))    # the rules DEST was made with


def _check_filters(header: Dict[str, Any], spec: FilterSpec) -> None:
    """The source applied this replica's rules (an older source ignores them: refused, not misapplied)."""
    try:
        used = FilterSpec.from_record(header.get("filters"))
    except Error:
        raise ManifestError("the export's cycle description records malformed filter rules") from None
    if used.rules != spec.rules:
        raise ManifestError("the source built this cycle with other filter rules than this replica's",
                            hint="install the same discrep version on both hosts (filters need both to know them)")


def _roll_back(dest: bytes, cat: ReplicaCatalog, cycle: int, last: int, exc: BaseException) -> None:
    """The cycle failed: leave the replica at its last committed cycle now rather than at the next
    run; a full disk is said as such."""
    cat.unstage()
    try:
        recover_locked(dest, cat)
    except Exception as e2:
        log.error("rollback of cycle %d failed (%s); run 'discrep recover %s'", cycle, e2, os.fsdecode(dest))
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or \
            (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)):
        raise DiskFullError(f"replica filesystem full while applying cycle {cycle}; rolled back to cycle "
                            f"{last}") from None

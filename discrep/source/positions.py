"""One source, many replicas: an acknowledged position per replica id.

Design
------
*What a replica has* is the source catalog of its last acknowledged cycle (``files``: the live
stat of every replicated entry; ``cycles``: the cycles built for it, their journal cuts and
snapshots; ``pending``).  Each replica gets its own such catalog, a *store*:
``SRC/.discrep/catalog-<id>.db`` (same schema as ``catalog.db``).  A replica that sends no id
(an older client, ``discrep snapshot``) keeps using ``catalog.db``, the *legacy* store.  So a
replica's cycle is built exactly as the single-replica one was -- journal since ITS cut, or a
catch-up scan against ITS catalog -- and a store's ack, reset or forget releases only the
snapshots and cycle directories of its own cycles.  (The cheaper alternative, one shared
``files`` table plus a cut per replica, cannot interpret a journal interval, nor catch up with a
scan, against a catalog state it no longer has; a catalog per replica costs one row per file per
replica and is always correct.)

What the stores share, and how it is kept correct:

* **Cycle numbers** are source-wide: ``reserve_cycle`` (under the source lock, from the build)
  hands out numbers above the registry's high-water mark, so ``cycles/<N>`` and
  ``snapshots/<N>`` never collide across stores.
* **The journal** is trimmed at the lowest cut any *held* position still needs
  (``trim_point``): a store with an acknowledged cycle holds the entries after its cut unless
  more than ``hold_cap`` entries (default 1,000,000; ``discrep replicas SRC --hold-cap N``)
  wait for it, in which case it is let go.  A replica whose entries were trimmed (journal
  ``trimmed_seq`` past its cut) gets a catch-up scan against its own catalog: never an error.
* **Gaps**: a gap closed by another replica's scan would hide from this one that changes were
  missed.  Each cycle records the journal's gap generation when it was planned (cycle info
  ``gap_gen``); a later cycle trusts the journal only if the generation is still the same
  (``journal_covers``), else it scans.  A base cycle without that record (built before this
  version) is not trusted: one scan.  The watcher's own catch-up (source.catchup) scans once per
  position against its catalog and records in that catalog the generation it covered and its scan
  marker's seq (``record_catch_up``); ``journal_covers`` accepts that generation too while the
  position's acknowledged cycle is still the one scanned against (``own_catch_up``).
* **Other replicas' scans** write a ``scan`` marker followed by ``move``/``touch`` entries that
  are relative to *their* catalog, and the marker would make the coalescer drop everything
  before it.  A build therefore drops every scan block journaled before it was planned
  (``drop_foreign_scans``: the marker and the move/touch entries of the same transaction -- same
  ``ts_ns``) -- except the block of its position's own catch-up (``own_catch_up``); its own
  scan, if it makes one, comes after.  That is only sound when no gap
  opened since its base cycle, which the gap generation guarantees.
* **The registry** ``SRC/.discrep/replicas.db``: ``replicas(id, store, registered_ns,
  seen_ns, cut_seq)`` and meta ``high_cycle``, ``hold_cap``.  A new id gets a fresh store, except that
  the first id whose replica stands at the legacy store's acknowledged (or built) cycle -- or
  any first id while ``catalog.db`` holds no position -- *adopts* ``catalog.db`` (the upgrade of
  an existing pair costs nothing, and a source with one replica keeps its position where
  ``status`` and the service's metrics read it).  ``cut_seq`` repeats the store's acknowledged
  cut (written after the store's own ack, under the source lock, so it is never ahead of it: a
  stale value only holds more journal), so an ack reads one small file, not every catalog.  An id the source
  does not know, or whose position does not match the replica's committed cycle, gets a full
  comparison (``cycles.settle_source``), as a replaced replica always did.

``discrep replicas SRC`` lists the positions (``positions``): id, last acknowledged cycle and
time, journal entries waiting (lag), whether the journal still covers it.  ``discrep forget SRC
ID`` (a local admin command, ``cycles.forget_replica``) releases the store's snapshots and
cycle directories, deletes its catalog and re-trims the journal.

Threat model: an id from the wire is checked (protocol.replicaid: 32 hex digits) before a file
name is made from it; a replica acknowledges only cycles of its own store and moves only its own
cut; the journal is never trimmed past another held position; only ``forget`` (local) drops
another replica's position.

Thread-safety: functions open their own connections.  Everything that changes a store or the
journal runs under the source lock (source.cycles); registry rows are written in IMMEDIATE
transactions (two ids registering at once serialize in SQLite).
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from discrep.core.errors import SourceError, UsageError
from discrep.core.paths import state_dir
from discrep.core.statedir import StateDir
from discrep.core.store import META_SCHEMA, get_meta, open_store, set_meta, transaction
from discrep.journal.store import Entry, Journal
from discrep.protocol.replicaid import is_replica_id
from discrep.source.catalog import CATALOG_FILE, SourceCatalog

log = logging.getLogger(__name__)

LEGACY_ID = "legacy"                # the id-less replica's name in listings and for forget
REGISTRY_FILE = "replicas.db"
DEFAULT_HOLD_CAP = 1_000_000        # journal entries one lagging replica may hold back

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY, store TEXT NOT NULL, registered_ns INTEGER NOT NULL, seen_ns INTEGER,
    cut_seq INTEGER
);
""" + META_SCHEMA


def store_file(replica_id: Optional[str]) -> str:
    """The catalog file of a fresh store for ``replica_id`` (checked: never a path)."""
    if replica_id is None:
        return CATALOG_FILE
    if not is_replica_id(replica_id):
        raise SourceError(f"bad replica id {replica_id!r:.40}")
    return f"catalog-{replica_id}.db"


class _Registry:
    """``SRC/.discrep/replicas.db`` (see the module doc)."""

    def __init__(self, sd: StateDir):
        self.path, self.con = open_store(sd, REGISTRY_FILE, _SCHEMA, SourceError, "replica registry",
                                         hint="move it aside; every replica then gets a full comparison")

    def close(self) -> None:
        self.con.close()

    def rows(self) -> List[Tuple[str, str, int, int, Optional[int]]]:
        """(id, store, registered_ns, seen_ns, acknowledged cut or None) of every registered replica."""
        return [(_checked(r[0], r[1]), r[1], r[2], r[3] or 0, r[4]) for r in
                self.con.execute("SELECT id, store, registered_ns, seen_ns, cut_seq FROM replicas "
                                 "ORDER BY registered_ns, id")]

    def store_of(self, replica_id: str) -> Optional[str]:
        r = self.con.execute("SELECT store FROM replicas WHERE id = ?", (replica_id,)).fetchone()
        return None if r is None else _checked(replica_id, r[0]) and str(r[0])

    def hold_cap(self) -> int:
        return int(get_meta(self.con, "hold_cap") or DEFAULT_HOLD_CAP)


def _checked(replica_id: object, store: object) -> str:
    """A registry row is read like input: its id is an id and its store that id's file (or the
    legacy catalog), never another file of the state directory."""
    if not is_replica_id(replica_id) or store not in (CATALOG_FILE, f"catalog-{replica_id}.db"):
        raise SourceError(f"the replica registry names a bad replica or store ({replica_id!r:.40}, {store!r:.60})",
                          hint="move SRC/.discrep/replicas.db aside (every replica gets a full comparison)")
    return str(replica_id)


@contextmanager
def _registry(root: bytes, create: bool = True) -> Iterator[Optional[_Registry]]:
    """The registry of ``root`` (None when it has none and ``create`` is false)."""
    with StateDir(root, create=create, error=SourceError) as sd:
        if not create and not os.path.exists(os.path.join(sd.path, REGISTRY_FILE)):
            yield None
            return
        reg = _Registry(sd)
        try:
            yield reg
        finally:
            reg.close()


def _open_store(root: bytes, store: str) -> SourceCatalog:
    return SourceCatalog(os.fsdecode(state_dir(root)), store)


def _has(root: bytes, store: str) -> bool:
    return os.path.exists(os.path.join(os.fsdecode(state_dir(root)), store))


def _legacy_at(root: bytes, replica_cycle: int) -> bool:
    """The legacy store stands at ``replica_cycle`` (acknowledged, or built and not yet acked)."""
    if replica_cycle <= 0 or not _has(root, CATALOG_FILE):
        return False
    cat = _open_store(root, CATALOG_FILE)
    try:
        acked, last = cat.last_acked(), cat.last_cycle()
        return (acked is not None and acked.cycle == replica_cycle) or \
            (last is not None and last.state == "built" and last.cycle == replica_cycle)
    finally:
        cat.close()


def store_for(root: bytes, replica_id: Optional[str], replica_cycle: int) -> str:
    """The catalog file that holds ``replica_id``'s position, registering the id if it is new
    (a new id adopts the legacy store when it stands at the replica's cycle; see module doc)."""
    if replica_id is None:
        return CATALOG_FILE
    fresh = store_file(replica_id)
    now = time.time_ns()
    with _registry(root) as reg:
        assert reg is not None
        known = reg.store_of(replica_id) is not None
        adopt = not known and (_legacy_at(root, replica_cycle) or not _legacy_in_use(root))
        with transaction(reg.con) as con:
            r = con.execute("SELECT store FROM replicas WHERE id = ?", (replica_id,)).fetchone()
            if r is not None:
                con.execute("UPDATE replicas SET seen_ns = ? WHERE id = ?", (now, replica_id))
                store = str(r[0])
            else:
                taken = con.execute("SELECT 1 FROM replicas WHERE store = ?", (CATALOG_FILE,)).fetchone()
                store = CATALOG_FILE if adopt and taken is None else fresh
                con.execute("INSERT INTO replicas VALUES (?,?,?,?,NULL)", (replica_id, store, now, now))
                log.info("replica %s registered (%s)", replica_id,
                         "takes over the legacy position" if store == CATALOG_FILE else "a new position")
    _checked(replica_id, store)
    if store != CATALOG_FILE and (not known or not _has(root, store)):
        _share_source_id(root, store)
    elif not known:       # an adopted position holds the journal after its cut from now on
        record_cut(root, store, _acked_cut(root, store))
    return store


def _share_source_id(root: bytes, store: str) -> None:
    """Every store answers the source tree's one id (the replica checks it)."""
    main, cat = _open_store(root, CATALOG_FILE), _open_store(root, store)
    try:
        cat.con.execute("INSERT OR IGNORE INTO meta VALUES ('source_id', ?)", (main.source_id(),))
    finally:
        main.close()
        cat.close()


def stores(root: bytes) -> Dict[str, str]:
    """{replica id (or LEGACY_ID): store file} of every position the source holds.  The legacy
    store counts while no id adopted it and it exists."""
    out: Dict[str, str] = {}
    with _registry(root, create=False) as reg:
        rows = reg.rows() if reg is not None else []
    for rid, store, _reg, _seen, _cut in rows:
        out[rid] = store
    if CATALOG_FILE not in out.values() and _legacy_in_use(root):
        out[LEGACY_ID] = CATALOG_FILE
    return out


def _legacy_in_use(root: bytes) -> bool:
    """``catalog.db`` holds an id-less replica's position (a cycle built or acknowledged)."""
    if not _has(root, CATALOG_FILE):
        return False
    cat = _open_store(root, CATALOG_FILE)
    try:
        return bool(cat.cycles(["built", "acked", "released"]))
    finally:
        cat.close()


# -- under the source lock (called from source.build and source.cycles) ---------------------------

def reserve_cycle(root: bytes, catalog: SourceCatalog, n: int) -> int:
    """The number of the cycle being built: at least ``n`` and above every number handed out
    before, by any store (the high-water mark is raised to it)."""
    with _registry(root) as reg:
        assert reg is not None
        with transaction(reg.con) as con:
            high = get_meta(con, "high_cycle")
            hw = int(high) if high is not None else _highest(root, catalog)
            got = max(n, hw + 1)
            set_meta(con, "high_cycle", str(got))
    return got


def _highest(root: bytes, catalog: SourceCatalog) -> int:
    """The highest cycle number any store has used (the registry's first high-water mark)."""
    last = catalog.last_cycle()
    hw = last.cycle if last else 0
    for store in set(stores(root).values()) | {CATALOG_FILE}:
        if _has(root, store):
            cat = _open_store(root, store)
            try:
                rec = cat.last_cycle()
                hw = max(hw, rec.cycle if rec else 0)
            finally:
                cat.close()
    return hw


def journal_covers(journal: Journal, base_info: Optional[dict], acked_cut: int,
                   caught_up: Optional[int] = None) -> bool:
    """The journal after ``acked_cut`` holds every change since the base cycle: nothing after the
    cut was trimmed, and no gap opened since the base was planned (its recorded ``gap_gen``) --
    or since the position's own catch-up scan (``caught_up``: the gap generation it covered,
    ``own_catch_up``)."""
    if int(journal.get("trimmed_seq", "0") or 0) > acked_cut:
        return False
    gen = base_info.get("gap_gen") if isinstance(base_info, dict) else None
    now = journal.gap_generation()
    return (isinstance(gen, int) and gen == now) or (caught_up is not None and caught_up == now)


def drop_foreign_scans(entries: Iterable[Entry], upto: int, own: Optional[int] = None) -> Iterator[Entry]:
    """``entries`` without the scan blocks journaled at or before seq ``upto`` (another build's
    catch-up scan: its marker and the move/touch entries of the same transaction), except the
    block whose marker is at seq ``own`` (this position's own catch-up scan, ``own_catch_up``)."""
    block_ts: Optional[int] = None
    for e in entries:
        if e.seq <= upto:
            if e.op == "scan" and e.seq != own:
                block_ts = e.ts_ns
                continue
            if block_ts is not None and e.ts_ns == block_ts and e.op in ("move", "touch"):
                continue
        block_ts = None
        yield e


# -- the watcher's catch-up scans (source.catchup) ---------------------------------------------------

CATCH_UP_KEY = "catch_up"


def record_catch_up(catalog: SourceCatalog, gen: int, base: int, seq: int) -> None:
    """Position ``catalog``'s own catch-up scan, journaled with its marker at ``seq``, covered gap
    generation ``gen`` against its acknowledged cycle ``base`` (under the source lock)."""
    with transaction(catalog.con) as con:
        set_meta(con, CATCH_UP_KEY, json.dumps({"gen": int(gen), "base": int(base), "seq": int(seq)}))


def own_catch_up(catalog: SourceCatalog, journal: Journal) -> Optional[Tuple[int, int]]:
    """(gap generation, marker seq) of the position's catch-up scan when it still stands: made
    against its acknowledged cycle of now, for the journal's current gap generation; else None."""
    raw = get_meta(catalog.con, CATCH_UP_KEY)
    acked = catalog.last_acked()
    if raw is None or acked is None:
        return None
    try:
        rec = json.loads(raw)
        gen, base, seq = int(rec["gen"]), int(rec["base"]), int(rec["seq"])
    except (ValueError, TypeError, KeyError):
        return None
    if base != acked.cycle or gen != journal.gap_generation() or seq <= acked.cut_seq:
        return None
    return gen, seq


def trim_point(root: bytes, journal: Journal, store: str, cut: int) -> int:
    """The seq the journal may be trimmed to once ``store`` acknowledged a cycle with ``cut``:
    the lowest cut of every held position (a store lagging more than the hold cap is let go)."""
    with _registry(root, create=False) as reg:
        cap = reg.hold_cap() if reg is not None else DEFAULT_HOLD_CAP
        cuts = {r[1]: r[4] for r in reg.rows()} if reg is not None else {}
    point = cut
    for rid, other in stores(root).items():
        if other == store:
            continue
        ocut = cuts[other] if other in cuts else _acked_cut(root, other)   # (the legacy store: its catalog)
        if ocut is None or ocut >= point:
            continue
        if journal.count(ocut) > cap:
            log.info("replica %s is more than %d journal entries behind: its next cycle scans", rid, cap)
            continue
        point = ocut
    return point


def record_cut(root: bytes, store: str, cut: Optional[int]) -> None:
    """``store``'s acknowledged cut is now ``cut`` (None: it holds nothing); after the store's own
    change, under the source lock."""
    with _registry(root, create=False) as reg:
        if reg is not None:
            with transaction(reg.con) as con:
                con.execute("UPDATE replicas SET cut_seq = ? WHERE store = ?", (cut, store))


def _acked_cut(root: bytes, store: str) -> Optional[int]:
    if not _has(root, store):
        return None
    cat = _open_store(root, store)
    try:
        rec = cat.last_acked()
        return rec.cut_seq if rec else None
    finally:
        cat.close()


def drop(root: bytes, replica_id: str) -> str:
    """Remove ``replica_id``'s registry row; its store file (the caller releases its cycles)."""
    known = stores(root)
    if replica_id not in known:
        raise UsageError(f"{os.fsdecode(root)} has no replica {replica_id!r:.40}",
                         hint="see 'discrep replicas SRC' for the registered ids")
    if replica_id != LEGACY_ID:
        with _registry(root) as reg:
            assert reg is not None
            with transaction(reg.con) as con:
                con.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))
    return known[replica_id]


def set_hold_cap(root: bytes, cap: int) -> None:
    if cap < 0:
        raise UsageError("--hold-cap must be 0 or more")
    with _registry(root) as reg:
        assert reg is not None
        set_meta(reg.con, "hold_cap", str(cap))


# -- listing ----------------------------------------------------------------------------------

@dataclass
class Position:
    """One replica's acknowledged position (``discrep replicas SRC``)."""
    id: str
    store: str
    acked_cycle: int            # 0: nothing acknowledged yet (its first cycle is a full comparison)
    acked_ns: int               # when that cycle was built (0: none)
    cut_seq: int
    lag_entries: int            # journal entries after its cut
    lag_s: Optional[float]      # seconds since its acknowledged cycle was built
    journal_covers: bool        # its next cycle can use the journal (else: a catch-up scan)
    registered_ns: int = 0
    seen_ns: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def positions(root: bytes) -> List[Position]:
    """Every registered replica's position (read-only: nothing is created in the source)."""
    sd = os.fsdecode(state_dir(root))
    if not os.path.isdir(sd):
        return []
    with _registry(root, create=False) as reg:
        rows = {r[0]: r for r in reg.rows()} if reg is not None else {}
    journal = Journal(sd) if os.path.exists(os.path.join(sd, "journal.db")) else None
    out = []
    try:
        for rid, store in stores(root).items():
            cat = _open_store(root, store)
            try:
                rec = cat.last_acked()
                own = own_catch_up(cat, journal) if journal is not None else None
            finally:
                cat.close()
            cut = rec.cut_seq if rec else 0
            lag = journal.count(cut) if journal is not None and rec else 0
            covers = bool(rec) and journal is not None and journal_covers(journal, rec.info, cut,
                                                                          own[0] if own else None) \
                and journal.gap() is None
            row = rows.get(rid, (rid, store, 0, 0))
            out.append(Position(rid, store, rec.cycle if rec else 0, rec.created_ns if rec else 0, cut, lag,
                                round(time.time() - rec.created_ns / 1e9, 3) if rec else None, covers,
                                row[2], row[3]))
    finally:
        if journal is not None:
            journal.close()
    return out

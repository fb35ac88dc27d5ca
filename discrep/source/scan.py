"""Catch-up scan: compare the live tree with the source catalog, journal the differences.

Used when the journal cannot be trusted (no watcher, queue overflow, journal
lost, first cycle).  It walks ROOT once (``os.scandir``, never following
symlinks, skipping ``ROOT/.discrep``), matches vanished catalog paths to new
paths by inode to find renames (a directory rename is one ``move``; children
that did not change are implied and cost nothing), and appends to the journal:
one ``scan`` marker, then ``move`` and ``touch`` entries (see journal.py).

A lost journal costs time, never data: anything the scan cannot prove unchanged
(same inode, size, mtime_ns, ctime_ns and mode) is touched, and touched files
are compared block by block later.

Thread-safety: runs in the caller's thread; uses the caller's Journal/SourceCatalog.
"""
from __future__ import annotations

import logging
import os
import stat as statmod
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from discrep.core.errors import SourceError
from discrep.journal.store import Journal
from discrep.core.paths import parent
from discrep.core.walk import walk
from discrep.source.catalog import Row, SourceCatalog

log = logging.getLogger(__name__)


def same_object(row: Row, st: os.stat_result) -> bool:
    return row.ino == st.st_ino and statmod.S_IFMT(row.mode) == statmod.S_IFMT(st.st_mode)


def unchanged(row: Row, st: os.stat_result) -> bool:
    return (row.ino == st.st_ino and row.size == st.st_size and row.mtime_ns == st.st_mtime_ns
            and row.ctime_ns == st.st_ctime_ns and row.mode == st.st_mode)


@dataclass
class ScanResult:
    seen: int = 0
    moves: List[Tuple[bytes, bytes]] = field(default_factory=list)  # (base, new)
    touched: List[bytes] = field(default_factory=list)
    stats: Dict[bytes, os.stat_result] = field(default_factory=dict)  # live stat of touched paths
    last_seq: int = 0


def scan(root: bytes, catalog: SourceCatalog, journal: Journal, *, journal_touched: bool = True,
         keep: Optional[Callable[[bytes, os.stat_result], bool]] = None) -> ScanResult:
    """Walk ``root``, journal what differs from ``catalog``; closes the journal gap.

    ``journal_touched=False``: the touched paths are only returned (the caller uses them
    directly); the scan marker and moves are journaled all the same.  ``keep``: the walk's
    filter hook (source.filtering): catalog paths it excludes look vanished (deletes)."""
    if not os.path.isdir(root):
        raise SourceError(f"source {os.fsdecode(root)} is not a directory")
    gen = journal.gap_generation()
    begin_seq = journal.last_seq()
    base = catalog.load_all()
    res = ScanResult()
    seen_base, new_paths = _compare(root, base, res, keep)
    missing = {p: r for p, r in base.items() if p not in seen_base}
    moves, consumed = _match_renames(new_paths, missing, res)
    kept = _drop_implied(moves)
    res.moves = [(b, n) for n, b in kept.items()]
    res.touched.extend(_deletions(missing, consumed, kept))

    items = [("scan", b"", None, begin_seq)]
    items += [("move", n, b, None) for b, n in res.moves]
    if journal_touched:
        items += [("touch", p, None, None) for p in res.touched]
    res.last_seq = journal.append_many(items)
    journal.close_gap(gen)
    log.info("scan: %d entries seen, %d touched, %d moves", res.seen, len(res.touched), len(res.moves))
    return res


def _touch(res: ScanResult, rel: bytes, st: os.stat_result) -> None:
    res.touched.append(rel)
    res.stats[rel] = st


def _compare(root: bytes, base: Dict[bytes, Row], res: ScanResult,
             keep: Optional[Callable[[bytes, os.stat_result], bool]] = None
             ) -> Tuple[Set[bytes], List[Tuple[bytes, os.stat_result]]]:
    """Walk the tree against the catalog: (catalog paths still there as the same object, paths
    that are new or another object now); changed ones are touched in ``res``."""
    seen_base: Set[bytes] = set()
    new_paths: List[Tuple[bytes, os.stat_result]] = []
    errors: List[str] = []

    def on_error(rel: bytes, e: OSError) -> None:
        errors.append(f"{os.fsdecode(rel) or '.'}: {e.strerror}")

    for rel, st in walk(root, on_error=on_error, keep=keep):
        res.seen += 1
        row = base.get(rel)
        if row is not None and same_object(row, st):
            seen_base.add(rel)
            if not unchanged(row, st):
                _touch(res, rel, st)
        else:
            new_paths.append((rel, st))
    if errors:
        raise SourceError("cannot read parts of the source: " + "; ".join(errors[:5]),
                          hint="fix the permissions or run as a user that can read the whole tree")
    return seen_base, new_paths


def _match_renames(new_paths: List[Tuple[bytes, os.stat_result]], missing: Dict[bytes, Row], res: ScanResult
                   ) -> Tuple[Dict[bytes, bytes], Set[bytes]]:
    """Match new paths to vanished catalog paths by inode and type: (moves new -> base, the base
    paths consumed by a move).  New paths, and moved ones that changed (or are directories), are
    touched in ``res``."""
    by_ino: Dict[Tuple[int, int], bytes] = {}
    for p, r in missing.items():
        by_ino.setdefault((r.ino, statmod.S_IFMT(r.mode)), p)
    consumed: Set[bytes] = set()
    moves: Dict[bytes, bytes] = {}  # new -> base
    for rel, st in new_paths:
        b = by_ino.get((st.st_ino, statmod.S_IFMT(st.st_mode)))
        if b is not None and b not in consumed:
            consumed.add(b)
            moves[rel] = b
            if not unchanged(missing[b], st) or statmod.S_ISDIR(st.st_mode):
                _touch(res, rel, st)
        else:
            _touch(res, rel, st)
    return moves, consumed


def _drop_implied(moves: Dict[bytes, bytes]) -> Dict[bytes, bytes]:
    """The moves without those implied by a moved ancestor (a renamed directory moves its children)."""
    kept: Dict[bytes, bytes] = {}
    for new in sorted(moves, key=lambda p: p.count(b"/")):
        b = moves[new]
        implied = _map_up(new, kept)
        if implied is not None and implied == b:
            continue
        kept[new] = b
    return kept


def _deletions(missing: Dict[bytes, Row], consumed: Set[bytes], kept: Dict[bytes, bytes]) -> List[bytes]:
    """Vanished base paths not moved, expressed in the new namespace, top-most only."""
    src_of = {b: n for n, b in kept.items()}
    gone = sorted(p for p in missing if p not in consumed)
    gone_set = set(gone)
    out: List[bytes] = []
    for p in gone:
        anc = parent(p)
        top = True
        while anc:
            if anc in gone_set:
                top = False
                break
            anc = parent(anc)
        if top:
            out.append(map_through(p, src_of))
    return out


def _map_up(new: bytes, kept: Dict[bytes, bytes]) -> Optional[bytes]:
    """Base path that ``new`` corresponds to through its nearest moved ancestor, if any."""
    anc = parent(new)
    while True:
        if anc in kept:
            return kept[anc] + new[len(anc):]
        if not anc:
            return None
        anc = parent(anc)


def map_through(p: bytes, moved: Dict[bytes, bytes]) -> bytes:
    """``p`` through its nearest ancestor-or-self that is a key of ``moved`` (a move's other side)."""
    anc = p
    while anc:
        if anc in moved:
            return moved[anc] + p[len(anc):]
        anc = parent(anc)
    return p

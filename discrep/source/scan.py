"""Catch-up scan: compare the live tree with the source catalog, journal the differences.

Used when the journal cannot be trusted (no watcher, queue overflow, journal
lost, first cycle).  It walks ROOT once (``os.scandir``, never following
symlinks, skipping ``ROOT/.discrep``), matches vanished catalog paths to new
paths by inode to find renames (a directory rename is one ``move``; children
that did not change are implied and cost nothing), and appends to the journal:
one ``scan`` marker, then ``move`` and ``touch`` entries (see journal.py).

Deletions are journaled top-most in the new namespace: a vanished path is implied by a vanished
ancestor only if that ancestor is no longer a live directory (a directory moved out of a deleted
one, or deleted and made again, keeps its own deletions).  A path that vanishes or moves while
the walk runs is left as the catalog has it (never reported deleted from a half-seen state) and
returned in ``ScanResult.vanished``; the cycle warns and journals it after its cut.

A lost journal costs time, never data: anything the scan cannot prove unchanged
(same inode, size, mtime_ns, ctime_ns and mode) is touched, and touched files
are compared block by block later.

Thread-safety: runs in the caller's thread; uses the caller's Journal/SourceCatalog.
"""
from __future__ import annotations

import errno
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
    # paths that vanished or moved while the walk ran: kept as the catalog has them this cycle
    # (never reported deleted on a half-seen state); the caller warns and journals them for the next
    vanished: List[bytes] = field(default_factory=list)


def scan(root: bytes, catalog: SourceCatalog, journal: Journal, *, journal_touched: bool = True,
         keep: Optional[Callable[[bytes, os.stat_result], bool]] = None) -> ScanResult:
    """Walk ``root``, journal what differs from ``catalog``; closes the journal gap.

    ``journal_touched=False``: the touched paths are only returned (the caller uses them
    directly); the scan marker and moves are journaled all the same.  ``keep``: the walk's
    filter hook (source.filtering): catalog paths it excludes look vanished (deletes)."""
    gen = journal.gap_generation()
    begin_seq = journal.last_seq()
    res = compare_tree(root, catalog, keep)
    res.last_seq = journal.append_many(scan_entries(res, begin_seq, journal_touched))
    journal.close_gap(gen)
    log.info("scan: %d entries seen, %d touched, %d moves", res.seen, len(res.touched), len(res.moves))
    return res


def compare_tree(root: bytes, catalog: SourceCatalog,
                 keep: Optional[Callable[[bytes, os.stat_result], bool]] = None) -> ScanResult:
    """Walk ``root`` against ``catalog``: what differs (moves, touched paths and their stat); nothing
    is journaled (``scan_entries`` says what a scan journals)."""
    if not os.path.isdir(root):
        raise SourceError(f"source {os.fsdecode(root)} is not a directory")
    base = catalog.load_all()
    res = ScanResult()
    seen_base, new_paths, live_dirs, unsure = _compare(root, base, res, keep)
    missing = {p: r for p, r in base.items() if p not in seen_base and not _below_any(p, unsure)}
    moves, consumed = _match_renames(new_paths, missing, res)
    kept = _drop_implied(moves)
    res.moves = [(b, n) for n, b in kept.items()]
    res.touched.extend(_deletions(missing, consumed, kept, live_dirs))
    return res


def scan_entries(res: ScanResult, begin_seq: int, journal_touched: bool = True
                 ) -> List[Tuple[str, bytes, Optional[bytes], Optional[int]]]:
    """The journal entries of a scan that began at journal seq ``begin_seq``: its marker, its
    moves and (``journal_touched``) its touched paths."""
    items: List[Tuple[str, bytes, Optional[bytes], Optional[int]]] = [("scan", b"", None, begin_seq)]
    items += [("move", n, b, None) for b, n in res.moves]
    if journal_touched:
        items += [("touch", p, None, None) for p in res.touched]
    return items


def _touch(res: ScanResult, rel: bytes, st: os.stat_result) -> None:
    res.touched.append(rel)
    res.stats[rel] = st


def _compare(root: bytes, base: Dict[bytes, Row], res: ScanResult,
             keep: Optional[Callable[[bytes, os.stat_result], bool]] = None
             ) -> Tuple[Set[bytes], List[Tuple[bytes, os.stat_result]], Set[bytes], Set[bytes]]:
    """Walk the tree against the catalog: (catalog paths still there as the same object, paths
    that are new or another object now, the live directories, the paths whose state the walk
    could not see whole); changed ones are touched in ``res``.

    A path that vanished while the walk ran (listed, then gone; a directory gone before it was
    listed) or a directory met twice (moved from a part not walked yet into one walked later) is
    "unsure": the catalog's rows at and below it are neither deleted nor moved by this scan, and
    the path goes to ``res.vanished`` (a warning, looked at again next cycle)."""
    seen_base: Set[bytes] = set()
    new_paths: List[Tuple[bytes, os.stat_result]] = []
    live_dirs: Set[bytes] = set()
    dir_at: Dict[Tuple[int, int], bytes] = {}
    unsure: Set[bytes] = set()
    errors: List[str] = []

    def on_error(rel: bytes, e: OSError) -> None:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):    # gone between its stat and its listing
            unsure.add(rel)
        else:
            errors.append(f"{os.fsdecode(rel) or '.'}: {e.strerror}")

    for rel, st in walk(root, on_error=on_error, keep=keep, on_vanished=unsure.add):
        res.seen += 1
        if statmod.S_ISDIR(st.st_mode):
            live_dirs.add(rel)
            first = dir_at.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:          # the same directory at two places: it moved during the walk
                unsure.update((first, rel))
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
    res.vanished = sorted(unsure)
    return seen_base, new_paths, live_dirs, unsure


def _below_any(p: bytes, tops: Set[bytes]) -> bool:
    """``p`` is one of ``tops`` or below one."""
    if not tops:
        return False
    anc = p
    while anc:
        if anc in tops:
            return True
        anc = parent(anc)
    return False


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


def _deletions(missing: Dict[bytes, Row], consumed: Set[bytes], kept: Dict[bytes, bytes],
               live_dirs: Set[bytes]) -> List[bytes]:
    """Vanished base paths not moved, expressed in the new namespace, without those whose
    deletion is implied: a path is covered by a vanished ancestor only if that ancestor (in the new
    namespace too) is no longer a live directory -- a directory moved out of a deleted one, or one
    deleted and made again, does not take the deletions below it along."""
    src_of = {b: n for n, b in kept.items()}
    gone = {map_through(p, src_of) for p in missing if p not in consumed}
    out: List[bytes] = []
    for q in sorted(gone):
        anc = parent(q)
        while anc and not (anc in gone and anc not in live_dirs):
            anc = parent(anc)
        if not anc:
            out.append(q)
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

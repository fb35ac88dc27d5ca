"""Source side of a cycle: journal cut, snapshot, manifest, packs.

``build_cycle`` runs, under the source lock: (catch-up scan when the journal has
a gap) -> read the journal cut -> coalesce the interval -> take the snapshot ->
write ``ROOT/.discrep/cycles/<N>/manifest.zst`` and packs of small files ->
record the cycle as ``built`` with the catalog updates its ack will apply
(``PendingRow``).  A streamed build also cuts the manifest into segments and
announces each (``protocol.agent_messages.Segment``) as soon as it is on disk.
What happens to a built cycle afterwards (ack, release, reset) is source.cycles;
a streamed cycle's live files are checked by source.deferred; the FUSE export of
a built cycle is source.export.

Thread-safety: ``build_cycle`` runs in one thread and takes the process-wide
source lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat as statmod
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import blockdiff
import xxhash
from blockdiff import framing

from discrep.core import locks
from discrep.core.errors import SourceError, WarningList
from discrep.core.paths import enc, join, show, state_dir
from discrep.core.walk import walk
from discrep.journal.changes import coalesce
from discrep.journal.store import Journal
from discrep.protocol import cbt, layout
from discrep.protocol.agent_messages import Segment
from discrep.protocol.filterspec import FilterSpec
from discrep.protocol.manifest import ManifestWriter, entry_for, file_line
from discrep.source import positions
from discrep.source import snapshot as snapmod
from discrep.source.catalog import CATALOG_FILE, CycleRec, PendingRow, SourceCatalog
from discrep.source.cycles import cycle_dir, locked_state
from discrep.source.filtering import SourceFilter
from discrep.source.scan import map_through, scan

log = logging.getLogger(__name__)

SMALL_MAX = 64 * 1024        # files up to this size travel in packs
PACK_MAX = 8 * 1024 * 1024   # raw bytes per pack
SEGMENT_ENTRIES = 8192       # a streamed build cuts a manifest segment at least this often


def watcher_alive(root: bytes) -> bool:
    """True when a ``discrep watch`` process holds the watcher lock of ``root``."""
    return locks.held(join(state_dir(root), b"watcher.lock"))


BARRIER_WAIT_S = 3.0


def wait_for_watcher(root: bytes, journal: Journal) -> bool:
    """Make the watcher commit everything it has seen up to now before the cut is read.

    The cycle sets ROOT/.discrep's mtime to a fresh token; the watcher, on that event, commits
    its batch and records the token (watcher.barrier).  Events are delivered in order, so a
    change made before this call is then in the journal.  If the watcher does not answer in
    time, the cycle goes on: what it missed has a later seq and comes next cycle."""
    token = time.time_ns()
    sd = state_dir(root)
    os.utime(sd, ns=(token, token))
    token = os.stat(sd).st_mtime_ns      # the filesystem's granularity
    deadline = time.monotonic() + BARRIER_WAIT_S
    while time.monotonic() < deadline:
        if int(journal.get("barrier_ns", "0") or 0) >= token:
            return True
        time.sleep(0.005)
    log.info("the watcher did not confirm within %.1fs; changes it has not written yet come next cycle",
             BARRIER_WAIT_S)
    return False


@dataclass
class BuiltCycle:
    cycle: int
    base: int
    cut_seq: int
    provider: str
    snapshot: bytes
    change_source: str
    entries: int
    files: int
    bytes_total: int
    warnings: WarningList = field(default_factory=WarningList)
    reused: bool = False
    deferred: Dict[bytes, Tuple[int, os.stat_result, int]] = field(default_factory=dict)  # path -> (idx, before, fd)
    store: str = CATALOG_FILE             # the position it was built against (source.positions)


def build_cycle(root: bytes, *, snapshot_kind: str = "auto", force_scan: bool = False, min_cycle: int = 1,
                warnings: Optional[WarningList] = None,
                on_segment: Optional[Callable[[Segment], None]] = None, totals: bool = True,
                consistency: str = "", on_captured: Optional[Callable[[], None]] = None,
                defer: bool = True, read_live: bool = False, filters: Optional[FilterSpec] = None,
                store: str = CATALOG_FILE) -> BuiltCycle:
    """Build the next cycle of ``root`` (see module doc).

    ``on_segment``: streamed build.  The manifest is also cut into segments
    ``cycles/<N>/seg-<s>.zst`` (each referring only to packs already written), and
    ``on_segment`` is called with a ``Segment`` (number, packs, entries, ...) after each one is
    on disk, so a replica can apply the cycle while it is still being built.  Segment 0 carries
    the totals (files, bytes) of the cycle -- unless ``totals`` is false: then a first cycle is
    built as the tree is walked (the first segment comes at once, no walk before it).

    Snapshot hooks (``source.hooks``): ``consistency`` goes into the cycle header,
    ``on_captured`` is called once the snapshot holds everything the cycle exports, and
    ``defer=False`` makes the build capture its large files too instead of reading them live.

    ``read_live`` (the agent, whose replica verifies before it commits): a ``copy`` snapshot does
    not copy large files, as in a streamed build; the replica reads them live and the cycle is
    checked afterwards (source.deferred).

    ``filters``: the replica's rules (source.filtering): excluded paths are not walked nor
    journaled into the cycle; the cycle records the spec (cycle.json, the catalog's cycle row).

    ``store``: the replica's position (source.positions): the cycle is built against that
    catalog, since that replica's own last cycle."""
    warnings = warnings if warnings is not None else WarningList()
    if not os.path.isdir(root):
        raise SourceError(f"source {os.fsdecode(root)} does not exist or is not a directory",
                          hint="check the path")
    with locked_state(root, store) as (journal, catalog):
        build = _CycleBuild(root, journal, catalog, warnings, on_segment, filters or FilterSpec())
        build.catalog_file = store
        build.consistency, build.on_captured, build.defer = consistency, on_captured, defer
        build.read_live = read_live
        try:
            return build.run(snapshot_kind, force_scan, min_cycle, totals)
        finally:
            if build.flt is not None:
                build.flt.close()


class _CycleBuild:
    """One cycle's build, as named steps: plan (number, base, how changes are found), capture
    (the changed paths and their snapshot), write (manifest, segments, packs, changed-block
    maps; the pending catalog rows), record (the cycle in the catalog)."""

    def __init__(self, root: bytes, journal: Journal, catalog: SourceCatalog, warnings: WarningList,
                 on_segment: Optional[Callable[[Segment], None]], spec: FilterSpec):
        self.root, self.journal, self.catalog, self.warnings = root, journal, catalog, warnings
        self.spec = spec
        self.flt = SourceFilter(root, spec) if spec.active else None      # None: everything selected
        self.excluded_gone: List[bytes] = []              # catalog paths the rules now exclude: deletes
        self.on_segment = on_segment
        self.stats: Dict[bytes, os.stat_result] = {}      # lstat of what a scan or walk saw
        self.walk_errors: List[str] = []
        self.late: Set[bytes] = set()     # moved or vanished during the cycle: journaled after the cut
        self.pending: List[PendingRow] = []
        self.links: Dict[Tuple[int, int], bytes] = {}     # hard-link group -> the path carrying its data
        self.deferred: Dict[bytes, Tuple[int, os.stat_result, int]] = {}
        self.nfiles = self.nbytes = self.idx = 0
        self.segs = self.seg_mark = 0                     # segments cut, manifest count at the last cut
        self.base_snap: Optional[bytes] = None
        self.consistency = ""                             # snapshot hooks: see build_cycle
        self.on_captured: Optional[Callable[[], None]] = None
        self.defer = True
        self.read_live = False                            # large files read live, verified after (copy)
        self.catalog_file = CATALOG_FILE                  # the position's store (source.positions)

    def run(self, kind: str, force_scan: bool, min_cycle: int, totals: bool) -> BuiltCycle:
        t0 = time.monotonic()
        self.live = snapmod.LivePaths(self.root)   # live entries, never reached through a symlink
        self.in_snap: Optional[snapmod.LivePaths] = None
        try:
            self._plan(kind, force_scan, min_cycle, totals)
            ordered = self._capture()
            atomic = self.kind == "btrfs" and not self.walking    # whole tree captured at once
            if atomic and self.on_captured is not None:
                self.on_captured()
            self._open_dir()
            try:
                self._write(ordered)        # copy, reflink: small files are captured here, into packs
            finally:
                self.mw.close()
            if not atomic and self.on_captured is not None:
                self.on_captured()
            return self._record(t0)
        finally:
            for lp in (self.live, self.in_snap, getattr(getattr(self, "cap", None), "live", None)):
                if lp is not None:
                    lp.close()

    def _exists(self, p: bytes) -> bool:
        """``p`` exists live (no symlink followed on the way)."""
        try:
            os.lstat(self.live.path(p))
            return True
        except OSError:
            return False

    # -- plan and capture --------------------------------------------------
    def _plan(self, kind: str, force_scan: bool, min_cycle: int, totals: bool) -> None:
        catalog = self.catalog
        acked = catalog.last_acked()
        self.base, self.acked_cut = (acked.cycle, acked.cut_seq) if acked else (0, 0)
        last = catalog.last_cycle()
        self.n = positions.reserve_cycle(self.root, catalog, max((last.cycle + 1) if last else 1, min_cycle))
        self.kind = snapmod.choose(kind, self.root)
        # other positions' scans journaled so far are not this one's (source.positions)
        self.gap_gen, self.plan_seq = self.journal.gap_generation(), self.journal.last_seq()
        # ...except this position's own catch-up scan (the watcher's, source.catchup), if it stands
        own = positions.own_catch_up(catalog, self.journal)
        self.own_scan = own[1] if own else None
        self.use_journal = (not force_scan and self.base > 0 and self.journal.gap() is None
                            and watcher_alive(self.root)
                            and positions.journal_covers(self.journal, acked.info if acked else None,
                                                         self.acked_cut, own[0] if own else None))
        if self.use_journal and self.flt is not None and self.flt.needs_scan(positions.drop_foreign_scans(
                self.journal.entries(self.acked_cut, self.plan_seq), self.plan_seq, self.own_scan)):
            self.use_journal = False
        # a first streamed cycle nobody shows totals for: walk, capture and stream in one pass
        self.walking = (self.on_segment is not None and not totals and self.base == 0 and not self.use_journal
                        and self.kind in ("copy", "reflink"))

    def _capture(self) -> Iterable[bytes]:
        """Start the snapshot; the paths the cycle describes, in manifest order (walking: each is
        captured as it is yielded)."""
        root, journal = self.root, self.journal
        ordered: Iterable[bytes]
        if self.walking:
            self.gen = journal.gap_generation()
            journal.append_many([("scan", b"", None, journal.last_seq())])
            self.cut = journal.last_seq()        # before anything is captured; later changes: next cycle
            self.moves: Dict[bytes, bytes] = {}
            root_meta = entry_for(b"", root, os.lstat(root))
            self.snap, self.cap = snapmod.start(self.kind, root, self.n, self.warnings, inline_max=SMALL_MAX,
                                                defer_over=SMALL_MAX if self.defer else None)
            ordered = _walk_capturing(root, self.cap, self.stats, self.walk_errors, self._vanished, self.flt)
        else:
            self.cut, self.moves, root_meta, ordered = _changed_paths(
                root, journal, self.catalog, self.base, self.acked_cut, self.use_journal, self.stats, self.late,
                self.flt, self.excluded_gone, self.plan_seq,
                self.own_scan if self.use_journal else None)
            for p in self.late:
                self.warnings.add(show(p), "moved or vanished while the source was scanned; "
                                           "left as it was, looked at again next cycle")
            # a streamed cycle's replica reads large files while the rest is built: not copied first, but
            # read live and verified afterwards (settle_deferred), as a copy would have been
            self.snap = snapmod.take(self.kind, root, self.n, ordered, self.warnings, inline_max=SMALL_MAX,
                                     stats=self.stats,
                                     defer_over=SMALL_MAX if (self.on_segment is not None or self.read_live)
                                     and self.defer else None)
        for k in ("op", "path"):
            root_meta.pop(k, None)
        self.root_meta = root_meta
        return ordered

    def _open_dir(self) -> None:
        """A fresh cycle directory, the header, the manifest writer and the packer."""
        self.cdir = cdir = cycle_dir(self.root, self.n)
        if os.path.lexists(cdir):
            shutil.rmtree(cdir)
        os.makedirs(cdir)
        self.header: Dict[str, Any] = {
            "cycle": self.n, "base": self.base, "seq_from": self.acked_cut, "seq_to": self.cut,
            "provider": self.kind, "created_ns": time.time_ns(), "full": self.base == 0,
            "change_source": "journal" if self.use_journal else "scan",
            "block_size": blockdiff.FINE_SIZE, "factor": blockdiff.COARSE_FACTOR, "root": self.root_meta,
            "source_id": self.catalog.source_id()}
        if self.spec.active or self.spec.delete_excluded:
            self.header["filters"] = self.spec.record()
        if self.consistency:
            self.header["consistency"] = self.consistency
        self.mw = ManifestWriter(os.fsdecode(join(cdir, layout.MANIFEST_FILE)), self.header)
        self.packer = _Packer(cdir)

    # -- write -------------------------------------------------------------
    def _write(self, ordered: Iterable[bytes]) -> None:
        self._add_moves()
        for p in self.excluded_gone:          # replicated before, excluded now: the replica decides
            self._delete(p)
        self.base_snap = self._base_snapshot()
        self._add_paths(ordered)
        if self.walking:
            self.cap.finish()
            if self.walk_errors:
                raise SourceError("cannot read parts of the source: " + "; ".join(self.walk_errors[:5]),
                                  hint="fix the permissions or run as a user that can read the whole tree")
            self.journal.close_gap(self.gen)
        self.packer.close()
        if self.on_segment is not None:
            self._cut_segment()               # the last one: "built" follows

    def _cut_segment(self) -> None:
        """Cut a manifest segment (its packs flushed first) and announce it."""
        self.packer.flush()
        self.mw.cut(os.fsdecode(join(self.cdir, layout.SEGMENT_FILE % self.segs)))
        first = self.segs == 0
        totals = None
        if first and not self.walking:
            regular = [st for st in self.stats.values() if statmod.S_ISREG(st.st_mode)]
            totals = {"files": len(regular), "bytes": sum(st.st_size for st in regular)}
        msg = Segment(seg=self.segs, packs=self.packer.count, entries=self.mw.count, dir=os.fsdecode(self.cdir),
                      header=self.header if first else None,
                      snapshot=os.fsdecode(self.snap.root) if first else None, totals=totals)
        self.segs += 1
        self.seg_mark = self.mw.count
        assert self.on_segment is not None
        self.on_segment(msg)

    def _pack_add(self, data: bytes) -> List[int]:
        if self.on_segment is not None and self.packer.full_for(len(data)):
            self._cut_segment()               # every entry of a segment refers to packs already written
        return self.packer.add(data)

    def _gone(self, p: bytes) -> None:
        """A touched path not found in the snapshot: deleted, or vanished during the cycle."""
        if p in self.stats:       # it was there when the cycle's changes were read: vanished since
            self._vanished(p)
            return
        self._delete(p)

    def _delete(self, p: bytes) -> None:
        self.mw.add({"op": "delete", "path": enc(p)})
        self.pending.append(PendingRow.gone(p))

    def _vanished(self, p: bytes) -> None:
        """``p`` moved or vanished while the cycle was built: not described by this cycle (the
        replica keeps what it has), a warning, and journaled after the cut for the next cycle."""
        if p not in self.late:
            self.late.add(p)
            self.warnings.add(show(p), "moved or vanished while the cycle was built; left as it was, "
                                       "looked at again next cycle")

    def _add_moves(self) -> None:
        snap = self.snap
        for new, old in sorted(self.moves.items()):
            if self.catalog.exists(old) and (new in snap.inline or os.path.lexists(snap.locate(new))):
                self.mw.add({"op": "move", "path": enc(new), "old": enc(old)})
                self.pending.append(PendingRow.move(new, old))

    def _base_snapshot(self) -> Optional[bytes]:
        """The base cycle's snapshot, when changed-block tracking can compare against it."""
        rec = self.catalog.cycle(self.base) if self.base else None
        if rec and rec.provider in ("btrfs", "reflink") and os.path.isdir(rec.snapshot):
            return rec.snapshot
        return None

    def _add_paths(self, ordered: Iterable[bytes]) -> None:
        streamed, mw = self.on_segment is not None, self.mw
        skipped, inline = self.snap.skipped, self.snap.inline
        for p in ordered:
            if streamed and mw.count - self.seg_mark >= SEGMENT_ENTRIES:
                self._cut_segment()
            if p in skipped:
                continue
            if p in inline:
                self._add_inline(p)
            else:
                self._add_captured(p)

    def _add_inline(self, p: bytes) -> None:
        """A small file: captured now, straight into its pack (the hot path)."""
        try:
            dfd, name = self.live.at(p)
            got = snapmod.read_verified(name, p, self.warnings, SMALL_MAX, self.stats.get(p), dir_fd=dfd)
        except OSError as err:
            got = None
            if err.errno in snapmod.VANISHED and not self._exists(p):
                self._gone(p)
                return
        if got is None:
            self.snap.skipped.add(p)
            return
        data, st, xattrs = got
        size = st.st_size
        self.nfiles += 1
        self.nbytes += size
        if size:
            h = xxhash.xxh3_128_hexdigest(blockdiff.fine_digests(data))
            self.mw.add_line(file_line(p, st, xattrs, self.idx, h, self._pack_add(data)))
        else:
            self.mw.add_line(file_line(p, st, xattrs, self.idx))
        self.idx += 1
        self.pending.append(PendingRow.upsert(p, st))

    def _add_captured(self, p: bytes) -> None:
        """A path of the snapshot (or a deferred live file, or a walked directory)."""
        snap = self.snap
        held = snap.deferred.get(p)
        try:
            if self.in_snap is None:    # the snapshot's entries, never reached through a symlink in it
                self.in_snap = snapmod.LivePaths(snap.root)
            full = self.in_snap.path(p)
            st0 = held[0] if held is not None else self.stats.get(p) if self.walking else None
            if st0 is not None and (held is not None or statmod.S_ISDIR(st0.st_mode)):
                # a symlink to the open live file (described by its stat before), or a walked
                # directory (its snapshot copy gets its metadata at the end): the live path
                full, st = self.live.path(p), st0
            else:
                st = os.lstat(full)
        except OSError as err:
            if err.errno not in snapmod.VANISHED:
                raise
            if not snap.full and self._exists(p):
                self.snap.skipped.add(p)  # exists live but was not captured (raced): next cycle
                return
            self._gone(p)
            return
        if not (statmod.S_ISDIR(st.st_mode) or statmod.S_ISLNK(st.st_mode) or statmod.S_ISREG(st.st_mode)):
            self.warnings.add(show(p), "skipped: FIFOs, sockets and device files are not replicated")
            return
        e = entry_for(p, full, st)
        if e["op"] == "file":
            self._file_fields(e, p, full, st, held)
        self.mw.add(e)
        live = snap.live_stats.get(p)
        self.pending.append(PendingRow.upsert(p, st if live is None else live))

    def _file_fields(self, e: Dict[str, Any], p: bytes, full: bytes, st: os.stat_result,
                     held: Optional[Tuple[os.stat_result, int]]) -> None:
        """A regular file's idx, and its hard link, sparse extents, pack or changed-block map."""
        self.nfiles += 1
        e["idx"] = self.idx
        self.idx += 1
        if held is not None:    # read live by the replica; settle_deferred checks it after
            e["live"] = True
            self.deferred[p] = (e["idx"], held[0], held[1])
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            e["link"] = enc(self.links[key])
            return
        # (walking, the other links are captured after this one: the live count says)
        if st.st_nlink > 1 or (self.walking and self.stats[p].st_nlink > 1):
            self.links[key] = p
        self.nbytes += st.st_size
        if st.st_blocks * 512 < st.st_size:
            e["extents"] = _extents(full, st.st_size)
        elif 0 < st.st_size <= SMALL_MAX:
            data = _read_small(full, st.st_size)
            e["h"] = xxhash.xxh3_128_hexdigest(blockdiff.fine_digests(data))
            e["pack"] = self._pack_add(data)
        if st.st_size > SMALL_MAX and self.base_snap is not None and held is None:
            _track_changes(e, join(self.base_snap, map_through(p, self.moves)), full, st.st_size, self.base,
                           self.cdir)

    # -- record ------------------------------------------------------------
    def _record(self, t0: float) -> BuiltCycle:
        """cycle.json, the cycle and its pending rows in the catalog; skipped paths journaled."""
        mw, n = self.mw, self.n
        with open(os.fsdecode(join(self.cdir, b"cycle.json")), "w") as f:
            json.dump(dict(self.header, entries=mw.count, packs=self.packer.count), f)
        change_source = self.header["change_source"]
        rec = CycleRec(n, self.base, self.cut, "built", self.kind, self.snap.root, time.time_ns(),
                       {"entries": mw.count, "change_source": change_source, "filters": self.spec.record(),
                        "gap_gen": self.gap_gen})
        self.catalog.add_cycle(rec, self.pending)
        if self.snap.skipped or self.late:  # at-least-once: look again next cycle
            self.journal.append_many(("touch", p, None, None) for p in sorted(self.snap.skipped | self.late))
        log.info("cycle %d built: %d entries, %d files, %.2fs", n, mw.count, self.nfiles, time.monotonic() - t0)
        return BuiltCycle(n, self.base, self.cut, self.kind, self.snap.root, change_source, mw.count, self.nfiles,
                          self.nbytes, self.warnings, deferred=self.deferred, store=self.catalog_file)


def _changed_paths(root: bytes, journal: Journal, catalog: SourceCatalog, base: int, acked_cut: int,
                   use_journal: bool, stats: Dict[bytes, os.stat_result], late: Set[bytes],
                   flt: Optional[SourceFilter] = None, gone: Optional[List[bytes]] = None,
                   plan_seq: int = 0, own_scan: Optional[int] = None
                   ) -> Tuple[int, Dict[bytes, bytes], Dict[str, Any], List[bytes]]:
    """What the cycle looks at: (journal cut, moves new -> base, the top directory's entry, the
    touched paths in manifest order); ``stats`` gets the lstat of every touched path that exists
    (the scan's, or taken right after the cut); ``late`` the paths that moved or vanished while
    the scan ran (not touched: looked at next cycle).  ``flt``: only what the filter selects (the
    scan does not walk excluded paths; excluded journal entries are dropped, those the catalog
    holds go to ``gone``).  Scan blocks journaled up to ``plan_seq`` were other positions'
    (source.positions.drop_foreign_scans), except the block at ``own_scan`` (this position's own
    catch-up scan, source.catchup)."""
    scanned: List[bytes] = []
    if not use_journal:
        # with nothing acknowledged yet every path is new: the scan's list is used as it is
        # instead of being journaled and read back (the marker is still journaled)
        sres = scan(root, catalog, journal, journal_touched=base > 0, keep=flt.keep if flt else None)
        stats.update(sres.stats)
        late.update(sres.vanished)
        if base == 0:
            scanned = sres.touched
    if use_journal:
        wait_for_watcher(root, journal)
    cut = journal.last_seq()            # the cut is read BEFORE the snapshot is taken
    cs = coalesce(positions.drop_foreign_scans(journal.entries(acked_cut, cut), plan_seq, own_scan),
                  catalog.exists)
    if flt is not None:
        (gone if gone is not None else []).extend(flt.prune(cs, catalog.exists))
    touched = set(cs.touched)
    touched.update(scanned)
    for p in list(cs.expand):           # subtrees that must be looked at whole
        full = join(root, p)
        if os.path.isdir(full) and not os.path.islink(full):
            touched.update(p + b"/" + rel for rel, _st in walk(full, keep=flt.keep_below(p) if flt else None))
    for new in cs.moves:                # a moved directory's metadata is rewritten too
        touched.add(new)
    if not catalog.empty():             # (nothing replicated yet: no siblings, no stale subtrees)
        asked = set(touched)
        _add_related(root, catalog, touched, stats, cs.moves, use_journal)
        if flt is not None:             # what it added: only as the rules select
            touched -= {p for p in touched - asked if not flt.allowed(p)}
    root_meta = entry_for(b"", root, os.lstat(root))  # the tree's top directory, stat before the snapshot
    # parents before children, once (NUL sorts below every byte of a name: same order as by components)
    return cut, dict(cs.moves), root_meta, sorted(touched, key=lambda q: q.replace(b"/", b"\0"))


def _add_related(root: bytes, catalog: SourceCatalog, touched: Set[bytes], stats: Dict[bytes, os.stat_result],
                 moves: Dict[bytes, bytes], by_journal: bool) -> None:
    """Complete an incremental cycle's touched paths (current namespace) and their stats: paths
    below a live non-directory are replaced by it, then the other names of hard-linked files are
    added -- of a touched file's live inode, and of the inode a touched name held in the base cycle
    when that name leads elsewhere now (deleted, replaced: a change made through it before shows
    only under the other names) -- and the replicated entries of a directory that is another
    directory now (base paths from the catalog, mapped through the cycle's moves).  The last two
    need the base row of each touched name: only with the journal (a scan compares every row with
    the tree, so it touched those names itself)."""
    back = {b: n for n, b in moves.items()}                       # base -> new
    asked = set(touched)
    _settle_paths(root, touched, stats)
    extra: Set[bytes] = set()
    for p in asked:
        st = stats.get(p) if p in touched else None
        if st is not None and statmod.S_ISREG(st.st_mode) and st.st_nlink > 1:    # a link group: all its names
            extra.update(map_through(b, back) for b in catalog.paths_with_ino(st.st_ino))
        if not by_journal:
            continue
        b = map_through(p, moves)
        row = catalog.get(b)
        if row is None or (st is not None and row.ino == st.st_ino):
            continue
        if statmod.S_ISREG(row.mode):
            group = catalog.paths_with_ino(row.ino)
            if len(group) > 1:        # the base inode of this name lives on under other names
                extra.update(map_through(c, back) for c in group if c != b)
        elif statmod.S_ISDIR(row.mode) and st is not None and statmod.S_ISDIR(st.st_mode):
            # another directory took this name: what the replica holds below it goes
            extra.update(map_through(c, back) for c in catalog.paths_below(b))
    if extra - touched:
        touched.update(extra)
        _settle_paths(root, touched, stats)


def _settle_paths(root: bytes, touched: Set[bytes], stats: Dict[bytes, os.stat_result]) -> None:
    """Replace each touched path that lies below a live non-directory (a directory replaced by a
    file or a symlink) by that top-most non-directory: its upsert replaces the old subtree, and
    nothing is looked up through a symlink.  ``stats`` gets the lstat of every touched path that
    exists now (checked from the top down, so no lstat follows a symlink)."""
    anc: Dict[bytes, Optional[os.stat_result]] = {}   # fresh lstat of ancestors (the scan's may be old)

    def lstat(a: bytes) -> Optional[os.stat_result]:
        try:
            return os.lstat(join(root, a))
        except OSError:
            return None

    for p in sorted(touched, key=lambda q: q.count(b"/")):
        parts = p.split(b"/")
        cut_at: Optional[bytes] = None
        for i in range(1, len(parts)):
            a = b"/".join(parts[:i])
            if a not in anc:
                anc[a] = lstat(a)
            st = anc[a]
            if st is None:
                break                           # gone: so is p (looked up as a delete)
            if not statmod.S_ISDIR(st.st_mode):
                cut_at = a
                break
        if cut_at is not None:
            touched.discard(p)
            touched.add(cut_at)
            continue
        if p not in stats:
            st = lstat(p)
            if st is not None:
                stats[p] = st


def _walk_capturing(root: bytes, cap: "snapmod.Capturer", stats: Dict[bytes, os.stat_result],
                    errors: List[str], vanished: Callable[[bytes], None],
                    flt: Optional[SourceFilter] = None) -> Iterator[bytes]:
    """Every path below ``root`` in manifest order, each captured into the snapshot (and its lstat
    put in ``stats``) just before it is yielded; unreadable directories go to ``errors``, entries
    gone while the walk ran to ``vanished``."""
    def on_error(rel: bytes, e: OSError) -> None:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            vanished(rel)
        else:
            errors.append(f"{show(rel) or '.'}: {e.strerror}")
    for rel, st in walk(root, on_error=on_error, keep=flt.keep if flt else None, on_vanished=vanished):
        stats[rel] = st
        cap.add(rel, st)
        yield rel


def _track_changes(e: dict, old: bytes, new: bytes, size: int, base: int, cdir: bytes) -> None:
    """Changed-block tracking: when FIEMAP proves most of the file shares extents with the base
    snapshot's copy, record the candidate ranges; the export hashes only those."""
    cand = cbt.candidates(old, new)
    if cand is None or sum(ln for _o, ln in cand) * 2 > size:
        return
    e["cbt"] = base
    with open(os.fsdecode(join(cdir, layout.CBT_FILE % e["idx"])), "w") as f:
        json.dump(cand, f)


def _extents(path: bytes, size: int) -> List[List[int]]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return [[o, ln] for o, ln in blockdiff.data_extents(fd, size)]
    finally:
        os.close(fd)


def _read_small(path: bytes, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = os.pread(fd, size + 1, 0)
    finally:
        os.close(fd)
    if len(data) != size:
        raise SourceError(f"snapshot file {os.fsdecode(path)} changed size while read")
    return data


class _Packer:
    """Concatenates small files into ``pack-<k>`` files (one framing.pack frame each)."""

    def __init__(self, cdir: bytes):
        self.cdir = cdir
        self.count = 0
        self.buf: List[bytes] = []
        self.size = 0

    def full_for(self, n: int) -> bool:
        """Adding ``n`` bytes would start a new pack."""
        return self.size + n > PACK_MAX and bool(self.buf)

    def flush(self) -> None:
        if self.buf:
            self._flush()

    def add(self, data: bytes) -> List[int]:
        if self.full_for(len(data)):
            self._flush()
        ref = [self.count, self.size]
        self.buf.append(data)
        self.size += len(data)
        return ref

    def _flush(self) -> None:
        flag, payload = framing.pack_parts(b"".join(self.buf))
        fd = os.open(join(self.cdir, layout.PACK_FILE % self.count), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600)
        try:
            os.writev(fd, [flag, payload])
        finally:
            os.close(fd)
        self.count += 1
        self.buf, self.size = [], 0

    def close(self) -> None:
        if self.buf:
            self._flush()

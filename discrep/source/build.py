"""Source side of a cycle: journal cut, snapshot, manifest, export content, ack.

``build_cycle`` runs, under the source lock: (catch-up scan when the journal has
a gap) -> read the journal cut -> coalesce the interval -> take the snapshot ->
write ``ROOT/.discrep/cycles/<N>/manifest.zst`` and packs of small files ->
record the cycle as ``built`` with the catalog updates its ack will apply.
``ack_cycle`` applies those updates, trims the journal and releases older
snapshots.  ``ExportContent`` is the ``.discrep/`` control tree the FUSE export
serves: ``cycle``, ``manifest``, ``pack/<k>``, and per-file ``sig/<idx>`` (block
signatures), ``cdc/<idx>`` (content-defined chunk list) and ``data/<idx>`` (the
file's bytes), computed lazily on first read.

Thread-safety: ``build_cycle``/``ack_cycle`` run in one thread and take a
process-wide file lock.  ``ExportContent`` is read by FUSE worker threads; its
lazy files build once under a lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat as statmod
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import blockdiff
import xxhash
from blockdiff import framing

from discrep.protocol import cbt
from discrep.core import locks
from discrep.source import snapshot as snapmod
from discrep.journal.changes import coalesce
from discrep.core.errors import SourceError, WarningList
from discrep.journal.store import Journal
from discrep.protocol.manifest import ManifestWriter, entry_for, file_line
from discrep.core.paths import enc, join, show, state_dir
from discrep.source.scan import scan
from discrep.core.walk import walk
from discrep.source.catalog import CycleRec, SourceCatalog
from discrep.protocol import layout

log = logging.getLogger(__name__)

SMALL_MAX = 64 * 1024        # files up to this size travel in packs
PACK_MAX = 8 * 1024 * 1024   # raw bytes per pack
SEGMENT_ENTRIES = 8192       # a streamed build cuts a manifest segment at least this often


@contextmanager
def source_lock(root: bytes) -> Iterator[None]:
    with locks.holding(join(state_dir(root), b"source.lock"),
                       f"another discrep run is building or acknowledging a cycle of {os.fsdecode(root)}",
                       hint="wait for it to finish"):
        yield


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


def cycle_dir(root: bytes, n: int) -> bytes:
    return join(state_dir(root), b"cycles/" + str(n).encode())


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


def build_cycle(root: bytes, *, snapshot_kind: str = "auto", force_scan: bool = False, min_cycle: int = 1,
                warnings: Optional[WarningList] = None,
                on_segment: Optional[Callable[[Dict[str, Any]], None]] = None, totals: bool = True) -> BuiltCycle:
    """Build the next cycle of ``root`` (see module doc).

    ``on_segment``: streamed build.  The manifest is also cut into segments
    ``cycles/<N>/seg-<s>.zst`` (each referring only to packs already written), and
    ``on_segment`` is called with ``{"seg", "packs", "entries", ...}`` after each one is on disk,
    so a replica can apply the cycle while it is still being built.  Segment 0 carries the
    totals (files, bytes) of the cycle -- unless ``totals`` is false: then a first cycle is
    built as the tree is walked (the first segment comes at once, no walk before it)."""
    warnings = warnings if warnings is not None else WarningList()
    if not os.path.isdir(root):
        raise SourceError(f"source {os.fsdecode(root)} does not exist or is not a directory",
                          hint="check the path")
    with source_lock(root):
        sd = os.fsdecode(state_dir(root))
        journal, catalog = Journal(sd), SourceCatalog(sd)
        try:
            return _build(root, journal, catalog, snapshot_kind, force_scan, warnings, min_cycle, on_segment, totals)
        finally:
            journal.close()
            catalog.close()


def _build(root: bytes, journal: Journal, catalog: SourceCatalog, kind: str, force_scan: bool,
           warnings: WarningList, min_cycle: int = 1,
           on_segment: Optional[Callable[[Dict[str, Any]], None]] = None, totals: bool = True) -> BuiltCycle:
    t0 = time.monotonic()
    acked = catalog.last_acked()
    base, acked_cut = (acked.cycle, acked.cut_seq) if acked else (0, 0)
    last = catalog.last_cycle()
    n = max((last.cycle + 1) if last else 1, min_cycle)
    kind = snapmod.choose(kind, root)
    use_journal = (not force_scan and base > 0 and journal.gap() is None and watcher_alive(root))
    stats: Dict[bytes, os.stat_result] = {}
    # a first streamed cycle nobody shows totals for: walk, capture and stream in one pass
    walking = (on_segment is not None and not totals and base == 0 and not use_journal
               and kind in ("copy", "reflink"))
    walk_errors: List[str] = []
    if walking:
        gen = journal.gap_generation()
        journal.append_many([("scan", b"", None, journal.last_seq())])
        cut = journal.last_seq()        # before anything is captured; later changes: next cycle
        moves: Dict[bytes, bytes] = {}
        root_meta = entry_for(b"", root, os.lstat(root))
        snap, cap = snapmod.start(kind, root, n, warnings, inline_max=SMALL_MAX, defer_over=SMALL_MAX)
        ordered: Iterable[bytes] = _walk_capturing(root, cap, stats, walk_errors)
    else:
        cut, moves, root_meta, ordered = _changed_paths(root, journal, catalog, base, acked_cut, use_journal,
                                                        stats)
        # a streamed cycle's replica reads large files while the rest is built: not copied first, but
        # read live and verified afterwards (settle_deferred), as a copy would have been
        snap = snapmod.take(kind, root, n, ordered, warnings, inline_max=SMALL_MAX, stats=stats,
                            defer_over=SMALL_MAX if on_segment is not None else None)
    for k in ("op", "path"):
        root_meta.pop(k, None)
    cdir = cycle_dir(root, n)
    if os.path.lexists(cdir):
        shutil.rmtree(cdir)
    os.makedirs(cdir)
    header = {"cycle": n, "base": base, "seq_from": acked_cut, "seq_to": cut, "provider": kind,
              "created_ns": time.time_ns(), "full": base == 0,
              "change_source": "journal" if use_journal else "scan",
              "block_size": blockdiff.FINE_SIZE, "factor": blockdiff.COARSE_FACTOR, "root": root_meta,
              "source_id": catalog.source_id()}
    pending: List[Tuple] = []
    mw = ManifestWriter(os.fsdecode(join(cdir, layout.MANIFEST_FILE)), header)
    nfiles = nbytes = 0
    segs = [0, 0]                       # segments cut, manifest count at the last cut

    def cut_segment() -> None:
        packer.flush()
        mw.cut(os.fsdecode(join(cdir, layout.SEGMENT_FILE % segs[0])))
        msg: Dict[str, Any] = {"seg": segs[0], "packs": packer.count, "entries": mw.count,
                               "dir": os.fsdecode(cdir)}
        if segs[0] == 0:
            msg.update(header=header, snapshot=os.fsdecode(snap.root))
            if not walking:
                msg["totals"] = {"files": sum(1 for st in stats.values() if statmod.S_ISREG(st.st_mode)),
                                 "bytes": sum(st.st_size for st in stats.values() if statmod.S_ISREG(st.st_mode))}
        segs[0] += 1
        segs[1] = mw.count
        on_segment(msg)

    def pack_add(data: bytes) -> List[int]:
        if on_segment is not None and packer.full_for(len(data)):
            cut_segment()               # every entry of a segment refers to packs already written
        return packer.add(data)
    try:
        for new, old in sorted(moves.items()):
            if catalog.exists(old) and (new in snap.inline or os.path.lexists(snap.locate(new))):
                mw.add({"op": "move", "path": enc(new), "old": enc(old)})
                pending.append(("move", new, old, None, None, None, None, None))
        packer = _Packer(cdir)
        base_rec = catalog.cycle(base) if base else None
        base_snap = base_rec.snapshot if (base_rec and base_rec.provider in ("btrfs", "reflink")
                                          and os.path.isdir(base_rec.snapshot)) else None
        moves_map = moves
        links: Dict[Tuple[int, int], bytes] = {}
        idx = 0
        skipped, inline, root_slash = snap.skipped, snap.inline, root.rstrip(b"/") + b"/"
        deferred, deferred_idx = snap.deferred, {}
        read_verified, fine_digests, xxh3_128_hex = snapmod.read_verified, blockdiff.fine_digests, \
            xxhash.xxh3_128_hexdigest
        for p in ordered:
            if on_segment is not None and mw.count - segs[1] >= SEGMENT_ENTRIES:
                cut_segment()
            if p in skipped:
                continue
            if p in inline:     # a small file: captured now, straight into its pack (the hot loop)
                full = root_slash + p
                try:
                    got = read_verified(full, p, warnings, SMALL_MAX, stats.get(p))
                except OSError as err:
                    got = None
                    if err.errno == errno.ENOENT and not os.path.lexists(full):
                        mw.add({"op": "delete", "path": enc(p)})
                        pending.append(("gone", p, None, None, None, None, None, None))
                        continue
                if got is None:
                    skipped.add(p)
                    continue
                data, st, xattrs = got
                size = st.st_size
                nfiles += 1
                nbytes += size
                if size:
                    mw.add_line(file_line(p, st, xattrs, idx, xxh3_128_hex(fine_digests(data)), pack_add(data)))
                else:
                    mw.add_line(file_line(p, st, xattrs, idx))
                idx += 1
                pending.append(("upsert", p, None, st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode))
                continue
            held = deferred.get(p)
            full = snap.locate(p)
            try:
                st0 = held[0] if held is not None else stats.get(p) if walking else None
                if st0 is not None and (held is not None or statmod.S_ISDIR(st0.st_mode)):
                    # a symlink to the open live file (described by its stat before), or a walked
                    # directory (its snapshot copy gets its metadata at the end): the live path
                    full, st = root_slash + p, st0
                else:
                    st = os.lstat(full)
            except FileNotFoundError:
                if not snap.full and os.path.lexists(join(root, p)):
                    continue  # exists live but was not captured (raced): next cycle
                mw.add({"op": "delete", "path": enc(p)})
                pending.append(("gone", p, None, None, None, None, None, None))
                continue
            if not (statmod.S_ISDIR(st.st_mode) or statmod.S_ISLNK(st.st_mode) or statmod.S_ISREG(st.st_mode)):
                warnings.add(show(p), "skipped: FIFOs, sockets and device files are not replicated")
                continue
            e = entry_for(p, full, st)
            if e["op"] == "file":
                nfiles += 1
                e["idx"] = idx
                idx += 1
                if held is not None:    # read live by the replica; settle_deferred checks it after
                    e["live"] = True
                    deferred_idx[p] = (e["idx"], held[0], held[1])
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in links:
                    e["link"] = enc(links[key])
                else:
                    # (walking, the other links are captured after this one: the live count says)
                    if st.st_nlink > 1 or (walking and stats[p].st_nlink > 1):
                        links[key] = p
                    nbytes += st.st_size
                    if st.st_blocks * 512 < st.st_size:
                        e["extents"] = _extents(full, st.st_size)
                    elif 0 < st.st_size <= SMALL_MAX:
                        data = _read_small(full, st.st_size)
                        e["h"] = xxhash.xxh3_128_hexdigest(blockdiff.fine_digests(data))
                        e["pack"] = pack_add(data)
                    if st.st_size > SMALL_MAX and base_snap is not None and held is None:
                        _track_changes(e, join(base_snap, _base_path(p, moves_map)), full, st.st_size, base, cdir)
            mw.add(e)
            live = snap.live_stats.get(p)
            if live is None:
                live = st
            pending.append(("upsert", p, None, live.st_ino, live.st_size, live.st_mtime_ns,
                            live.st_ctime_ns, live.st_mode))
        if walking:
            cap.finish()
            if walk_errors:
                raise SourceError("cannot read parts of the source: " + "; ".join(walk_errors[:5]),
                                  hint="fix the permissions or run as a user that can read the whole tree")
            journal.close_gap(gen)
        packer.close()
        if on_segment is not None:
            cut_segment()               # the last one: "built" follows
    finally:
        mw.close()
    with open(os.fsdecode(join(cdir, b"cycle.json")), "w") as f:
        json.dump(dict(header, entries=mw.count, packs=packer.count), f)
    rec = CycleRec(n, base, cut, "built", kind, snap.root, time.time_ns(),
                   {"entries": mw.count, "change_source": header["change_source"]})
    catalog.add_cycle(rec, pending)
    if snap.skipped:  # at-least-once: look again next cycle
        journal.append_many(("touch", p, None, None) for p in snap.skipped)
    log.info("cycle %d built: %d entries, %d files, %.2fs", n, mw.count, nfiles, time.monotonic() - t0)
    return BuiltCycle(n, base, cut, kind, snap.root, header["change_source"], mw.count, nfiles,
                      nbytes, warnings, deferred=deferred_idx)


def _changed_paths(root: bytes, journal: Journal, catalog: SourceCatalog, base: int, acked_cut: int,
                   use_journal: bool, stats: Dict[bytes, os.stat_result]
                   ) -> Tuple[int, Dict[bytes, bytes], Dict[str, Any], List[bytes]]:
    """What the cycle looks at: (journal cut, moves new -> base, the top directory's entry, the
    touched paths in manifest order); ``stats`` gets the scan's lstat of what it saw."""
    scanned: List[bytes] = []
    if not use_journal:
        # with nothing acknowledged yet every path is new: the scan's list is used as it is
        # instead of being journaled and read back (the marker is still journaled)
        sres = scan(root, catalog, journal, journal_touched=base > 0)
        stats.update(sres.stats)
        if base == 0:
            scanned = sres.touched
    if use_journal:
        wait_for_watcher(root, journal)
    cut = journal.last_seq()            # the cut is read BEFORE the snapshot is taken
    cs = coalesce(journal.entries(acked_cut, cut), catalog.exists)
    touched = set(cs.touched)
    touched.update(scanned)
    for p in list(cs.expand):           # subtrees that must be looked at whole
        full = join(root, p)
        if os.path.isdir(full) and not os.path.islink(full):
            touched.update(p + b"/" + rel for rel, _st in walk(full))
    for new in cs.moves:                # a moved directory's metadata is rewritten too
        touched.add(new)
    if catalog.con.execute("SELECT 1 FROM files LIMIT 1").fetchone() is not None:
        _add_link_siblings(root, catalog, touched, stats)   # (nothing replicated yet: no siblings)
    root_meta = entry_for(b"", root, os.lstat(root))  # the tree's top directory, stat before the snapshot
    # parents before children, once (NUL sorts below every byte of a name: same order as by components)
    return cut, dict(cs.moves), root_meta, sorted(touched, key=lambda q: q.replace(b"/", b"\0"))


def _walk_capturing(root: bytes, cap: "snapmod.Capturer", stats: Dict[bytes, os.stat_result],
                    errors: List[str]) -> Iterator[bytes]:
    """Every path below ``root`` in manifest order, each captured into the snapshot (and its lstat
    put in ``stats``) just before it is yielded; unreadable directories go to ``errors``."""
    def on_error(rel: bytes, e: OSError) -> None:
        errors.append(f"{show(rel) or '.'}: {e.strerror}")
    for rel, st in walk(root, on_error=on_error):
        stats[rel] = st
        cap.add(rel, st)
        yield rel


def settle_deferred(root: bytes, b: BuiltCycle, warnings: WarningList, materialize: bool = False
                    ) -> Tuple[List[Dict[str, Any]], List[bytes]]:
    """The replica has read the deferred (live) files of streamed cycle ``b``: check that none
    changed since it was described.  Returns (entries to read again, paths to drop): a file that
    changed was copied (verified) to ``cycle/redo-<idx>`` and gets a fresh entry (same idx); one
    that is gone or keeps changing is dropped from the cycle (its pending catalog row too) and
    journaled for the next.  ``materialize``: the export is about to serve the snapshot, so each
    deferred symlink becomes a real (verified) copy.  Settles each file once."""
    redo: List[Dict[str, Any]] = []
    gone: List[bytes] = []
    if not b.deferred:
        return redo, gone
    cdir = cycle_dir(root, b.cycle)
    fresh: List[Tuple] = []
    items = sorted(b.deferred.items())
    b.deferred.clear()
    for n, (p, (idx, before, fd)) in enumerate(items):
        live, copy_to = join(root, p), join(cdir, layout.REDO_FILE % idx)
        try:
            if materialize:
                how, st = snapmod.materialize_deferred(live, before, fd, copy_to, join(b.snapshot, p), p, warnings)
            else:
                how, st = snapmod.settle_deferred(live, before, fd, copy_to, p, warnings)
        except BaseException:
            for _p, (_i, _b, left) in items[n + 1:]:
                os.close(left)
            raise
        if how == "copied":
            e = entry_for(p, copy_to, st)
            e["idx"] = idx
            redo.append(e)
            fresh.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, b.cycle, p))
        elif how == "gone":
            gone.append(p)
    if fresh or gone:
        sd = os.fsdecode(state_dir(root))
        with source_lock(root):
            _settle_rows(sd, b.cycle, fresh, gone)
    return redo, gone


def close_deferred(b: BuiltCycle) -> None:
    """The cycle ends unsettled (failed): let go of the files held open for its replica."""
    for _idx, _before, fd in b.deferred.values():
        os.close(fd)
    b.deferred.clear()


def _settle_rows(sd: str, n: int, fresh: List[Tuple], gone: List[bytes]) -> None:
    """Cycle ``n``'s pending rows after settling: fresh stats, dropped paths out (and journaled)."""
    catalog, journal = SourceCatalog(sd), Journal(sd)
    try:
        con = catalog.con
        con.execute("BEGIN IMMEDIATE")
        try:
            con.executemany("UPDATE pending SET ino=?, size=?, mtime_ns=?, ctime_ns=?, mode=? "
                            "WHERE cycle=? AND path=? AND kind='upsert'", fresh)
            con.executemany("DELETE FROM pending WHERE cycle=? AND path=? AND kind='upsert'",
                            [(n, p) for p in gone])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        journal.append_many(("touch", p, None, None) for p in gone)   # at-least-once: next cycle
    finally:
        catalog.close()
        journal.close()


def _base_path(p: bytes, moves: Dict[bytes, bytes]) -> bytes:
    q = p
    while q:
        if q in moves:
            return moves[q] + p[len(q):]
        i = q.rfind(b"/")
        q = q[:i] if i > 0 else b""
    return p


def _track_changes(e: dict, old: bytes, new: bytes, size: int, base: int, cdir: bytes) -> None:
    """Changed-block tracking: when FIEMAP proves most of the file shares extents with the base
    snapshot's copy, record the candidate ranges; the export hashes only those."""
    cand = cbt.candidates(old, new)
    if cand is None or sum(ln for _o, ln in cand) * 2 > size:
        return
    e["cbt"] = base
    with open(os.fsdecode(join(cdir, layout.CBT_FILE % e["idx"])), "w") as f:
        json.dump(cand, f)


def _add_link_siblings(root: bytes, catalog: SourceCatalog, touched: set,
                       stats: Dict[bytes, os.stat_result]) -> None:
    """A touched hard-linked file drags in the other members of its link group."""
    extra = []
    for p in touched:
        st = stats.get(p)
        if st is None:
            try:
                st = os.lstat(join(root, p))
            except OSError:
                continue
        if statmod.S_ISREG(st.st_mode) and st.st_nlink > 1:
            for (q,) in catalog.con.execute("SELECT path FROM files WHERE ino = ?", (st.st_ino,)):
                extra.append(bytes(q))
    touched.update(extra)


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


def _catalog_read(root: bytes, fn):
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
    with source_lock(root):
        sd = os.fsdecode(state_dir(root))
        journal, catalog = Journal(sd), SourceCatalog(sd)
        try:
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
        finally:
            journal.close()
            catalog.close()


def _release(root: bytes, catalog: SourceCatalog, rec: CycleRec) -> None:
    snapmod.release(rec.provider, rec.snapshot)
    cdir = cycle_dir(root, rec.cycle)
    if os.path.lexists(cdir):
        shutil.rmtree(cdir)
    catalog.set_state(rec.cycle, "released" if rec.state == "acked" else "abandoned-released")


def reset(root: bytes) -> None:
    """Forget what was replicated: the next cycle is a full comparison (replica was replaced)."""
    with source_lock(root):
        sd = os.fsdecode(state_dir(root))
        journal, catalog = Journal(sd), SourceCatalog(sd)
        try:
            for rec in catalog.cycles(["built", "acked", "abandoned"]):
                _release(root, catalog, rec)
            catalog.con.execute("DELETE FROM files")
            catalog.con.execute("DELETE FROM pending")
            catalog.con.execute("UPDATE cycles SET state = 'forgotten' WHERE state IN ('acked', 'released')")
            journal.mark_gap("source catalog reset")
        finally:
            journal.close()
            catalog.close()


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

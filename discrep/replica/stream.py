"""The streamed first copy, replica side: a cycle applied while the source still builds it.

``StreamApplier.run`` drives the parts of an ``apply.Applier`` segment by segment as the
source announces manifest segments (``reader.StreamedCycle``): directories, packed files and
symlinks at once, the common packed file through ``packed.PackedWriter``; from the second
segment on a second process (``worker.FreshWorker``) takes segments too.  Large, sparse and
hard-linked files (``deferred``) and all metadata follow once the cycle is built; files the
source let us read live are then checked by the source, and those that changed meanwhile
are read again from its copy (or left for the next cycle).  Only a first copy into an empty
DEST is streamed: a bad later segment fails the cycle, and its undo empties DEST again.

Thread-safety: runs in the applying thread; the worker is another process.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Set

from discrep.core.errors import ManifestError, TransportError
from discrep.core.paths import basename, parent, show
from discrep.protocol.manifest import Entry
from discrep.replica.apply import Applier
from discrep.replica.catalog import CatalogRow
from discrep.replica.owners import OwnerMap
from discrep.replica.packed import PackedWriter, Warns, mkdir_in
from discrep.replica.reader import StreamedCycle
from discrep.replica.stats import SyncStats
from discrep.replica.worker import MAX_QUEUED, FreshWorker, SegmentDone

log = logging.getLogger(__name__)


class StreamApplier:
    """Applies one streamed first copy through ``ap``'s parts (see module doc)."""

    def __init__(self, ap: Applier, stream: StreamedCycle, owners: OwnerMap):
        self.ap = ap
        self.stream = stream
        self.owners = owners
        self.deferred: List[Entry] = []              # files read once the cycle is built; hard links
        self.done = self.done_bytes = 0              # files and bytes done (for progress)
        totals = stream.totals or {}
        self.nfiles, self.nbytes = int(totals.get("files", 0)), int(totals.get("bytes", 0))
        self.packed = PackedWriter(ap.dest.ensure_parent, ap.dest.dirs.dirty, owners, nosuid=ap.meta.nosuid)

    def run(self) -> SyncStats:
        """Apply the cycle (see module doc); returns the SyncStats."""
        t0 = time.monotonic()
        ap = self.ap
        if not ap.dest.fresh:
            raise ManifestError("a streamed cycle needs a first copy into an empty replica")
        ap.dest.log_fresh()
        ap.stats.streamed = True
        ap.packs.prefetch = True
        ap.packs.pack_rel = self.stream.pack_rel
        ap.packs.packs_known = lambda: self.stream.packs_known
        self._segments()
        self._progress()
        self.stream.finish()                     # the cycle is built (its export comes if a read needs it)
        ap.reader.know_files({e.idx: e.path for e in ap.entries if e.op == "file"},
                             [e.idx for e in self.deferred if e.live])
        self._settle_live(self._read_deferred())
        ap.dest.flush_installs()                 # primaries in place before links to them
        for e in self.deferred:
            if e.link is not None:
                ap.hardlink(e)
        ap.dest.flush_installs()
        ups = [e for e in ap.entries if e.is_upsert]
        ap.metadata(ups, [e for e in ups if e.op == "dir"])
        ap.stats.duration_s = time.monotonic() - t0
        return ap.stats

    # -- segments as they are announced ------------------------------------
    def _segments(self) -> None:
        """Every segment, applied here or handed to the second process, until the cycle is built."""
        worker: Optional[FreshWorker] = None
        lo = 0                                   # packs before the segment being handed out
        try:
            for n, npacks in self.stream.announced():
                self.ap.packs.n_packs = npacks
                if n == 1:                       # more than one segment: worth a second process
                    worker = self._start_worker()
                if worker is not None:
                    self._collect(worker.results(block=False))
                    if len(worker.outstanding) < MAX_QUEUED and npacks > lo:
                        worker.submit(n, lo, npacks)   # the worker reads these packs itself
                        self.ap.packs.hand_over(lo, npacks)
                        lo = npacks
                        continue
                lo = npacks
                self.ap.packs.read_ahead_next()  # the next pack may have been written meanwhile
                self._apply_segment(self.stream.raw(n))
                self._progress()
            if worker is not None:
                self._collect(worker.results(block=True))
                worker.close()
                worker = None
        finally:
            if worker is not None:   # failed: nothing of the worker may still write
                worker.kill()

    def _start_worker(self) -> Optional[FreshWorker]:
        """A second applying process when the segments and packs can be read directly (sshfs)."""
        cdir = self.ap.reader.cycle_dir
        if not cdir:
            return None
        try:
            worker = FreshWorker(self.ap.dest.path, cdir, self.owners.numeric_ids, self.ap.meta.nosuid)
        except OSError as e:
            log.info("no second applying process (%s); applying in one", e)
            return None
        self.ap.dest.dirs.shared = True
        self.ap.packs.packs_known = lambda: 0   # read ahead only packs of segments applied here
        return worker

    def _apply_segment(self, raws: Iterable[Dict[str, Any]], made_dirs: bool = False) -> None:
        """Apply one segment's raw entries (``made_dirs``: the worker made its directories already):
        the common packed file through ``PackedWriter``, the rest as Entries."""
        write = self.packed.write
        rows: List[CatalogRow] = []
        warns: Warns = []
        for r in raws:
            row = write(r, self.ap.packs.get)
            if row is not None:
                rows.append(row)
                continue
            e = Entry(r)
            self.owners.map_entries([e])
            self.ap.entries.append(e)
            if e.op == "file" and e.link is None and e.pack is not None:
                rows.append(self.packed.write_entry(e, self.ap.packs.get, warns))
            else:
                self._apply_entry(e, made_dirs)
        self._written(rows, warns)

    def _apply_entry(self, e: Entry, made_dirs: bool) -> None:
        ap, op = self.ap, e.op
        if op == "file":
            self.done += 1
            if e.link is None and e.size == 0:
                ap.files.apply(e)
            else:
                self.deferred.append(e)
        elif op == "dir":
            if e.path in ap.dest.dir_paths:
                raise ManifestError(f"{show(e.path)} appears twice in the manifest")
            ap.dest.dir_paths.add(e.path)
            pfd = ap.dest.ensure_parent(e.path)
            if not made_dirs:
                mkdir_in(pfd, e.path)
            ap.dest.created.add(e.path)
            ap.dest.dirs.dirty.add(parent(e.path))
            ap.stats.dirs += 1
        elif op == "symlink":
            ap.symlink(e)
        elif op == "delete":          # vanished while the source was captured
            ap.deleted.append(e.path)
        else:
            raise ManifestError(f"a first copy cannot hold a {op!r} entry ({show(e.path)})")

    def _written(self, rows: List[CatalogRow], warns: Warns) -> None:
        """Account for packed files written in place (here or by the worker): catalog rows (staged in
        the catalog at once: the commit then has little left to insert), stats."""
        ap = self.ap
        ap.cat.stage(rows)
        ap.dest.created.update(r.path for r in rows)
        nbytes = sum(r.size for r in rows)
        ap.stats.files_changed += len(rows)
        ap.stats.bytes_written += nbytes
        self.done += len(rows)
        self.done_bytes += nbytes
        for rel, msg in warns:
            ap.warnings.add(show(rel), msg)

    def _collect(self, results: List[SegmentDone]) -> None:
        """Segments the worker finished: its rows, and the entries it left to us."""
        for res in results:
            self.ap.stats.worker_segments += 1
            self.ap.reader.add_bytes_read(res.bytes_read)
            self.ap.dest.dirs.dirty.update(res.dirty)
            self._written(res.rows, res.warnings)
            self._apply_segment(res.others, made_dirs=True)

    def _progress(self) -> None:
        if self.ap.progress:
            self.ap.progress(self.done, max(self.done, self.nfiles), self.ap.reader.bytes_read, self.done_bytes,
                             max(self.done_bytes, self.nbytes))

    # -- once the cycle is built --------------------------------------------
    def _read_deferred(self) -> Dict[bytes, BaseException]:
        """Read the deferred files; returns the live ones we could not read whole (the source
        settles them)."""
        ap = self.ap
        failed: Dict[bytes, BaseException] = {}
        for e in self.deferred:
            if e.link is not None:
                continue
            try:
                ap.files.apply(e)
            except (ManifestError, TransportError) as err:
                if not e.live:
                    raise
                log.info("%s could not be read live (%s); asking the source", show(e.path), err)
                failed[e.path] = err
                ap.stats.files_changed -= 1
                continue
            self.done_bytes += e.size
            if ap.progress:
                ap.progress(self.done, self.done, ap.reader.bytes_read, self.done_bytes,
                            max(self.done_bytes, self.nbytes))
        return failed

    def _settle_live(self, failed: Dict[bytes, BaseException]) -> None:
        """Large files were read live: have the source say which changed meanwhile."""
        redo, gone = self.stream.verify()
        settled = {e.path for e in redo} | set(gone)
        for p, err in failed.items():
            if p not in settled:             # unchanged, yet unreadable: a real error
                raise err
        if redo or gone:
            self._read_again(redo, gone, set(failed))

    def _read_again(self, redo: List[Entry], gone: List[bytes], failed: Set[bytes]) -> None:
        """The source found files that changed while we read them live: ``redo`` (fresh entries, the
        same idx) are read again from the copy it made; ``gone`` ones are dropped from this cycle
        (the source looks at them again next cycle).  ``failed``: paths we could not read at all
        (nothing of them was written)."""
        ap = self.ap
        again = self._check_redo(redo, gone)
        gone_set = set(gone)
        undo = set(again) | gone_set
        for p in undo - failed:   # what we wrote of them is not a point-in-time copy: away with it
            os.unlink(basename(p), dir_fd=ap.dest.dirs.get(parent(p)))
            ap.stats.files_changed -= 1      # (a file read again is counted again by FilePatcher)
        ap.rows[:] = [r for r in ap.rows if r.path not in undo]
        ap.entries = [again.get(e.path, e) for e in ap.entries if e.path not in gone_set or e.op != "file"]
        for p in gone:
            ap.dest.created.discard(p)
            ap.warnings.add(show(p), "changed or vanished while it was read; left for the next cycle")
        for e in again.values():
            log.info("%s changed while it was read: reading the source's copy of it", show(e.path))
            self.owners.map_entries([e])
            ap.files.data_override[e.idx] = self.stream.redo_rel(e.idx)
            ap.files.apply(e)

    def _check_redo(self, redo: List[Entry], gone: List[bytes]) -> Dict[bytes, Entry]:
        """``redo`` by path, after checking that the source names only files it let us read live."""
        mine = {e.path: e for e in self.deferred if e.live and e.link is None and e.pack is None}
        again: Dict[bytes, Entry] = {}
        for e in redo:
            old = mine.get(e.path)
            if old is None or e.op != "file" or e.idx != old.idx or e.pack is not None or e.link is not None:
                raise ManifestError(f"the source asked to read {show(e.path)} again, which it did not let us "
                                    "read live")
            again[e.path] = e
        for p in gone:
            if p not in mine:
                raise ManifestError(f"the source dropped {show(p)}, which it did not let us read live")
        return again

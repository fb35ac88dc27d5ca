"""The streamed first copy, replica side: a mixin of ``replica.Applier``.

``run_stream`` applies a cycle while the source still builds it (remote.CycleStream announces
manifest segments as they are cut): directories, packed files and symlinks at once, the common
packed file through ``fresh_worker.PackedWriter``; from the second segment on a second process
(``fresh_worker``) takes segments too.  Large, sparse and hard-linked files and all metadata
follow once the cycle is built.

Thread-safety: runs in the applying thread; the worker is another process.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from discrep.replica import worker as fresh_worker
from discrep.core.errors import ManifestError, TransportError
from discrep.protocol.manifest import Entry
from discrep.core.paths import basename, parent, show
from discrep.replica.reader import StreamedCycle

log = logging.getLogger(__name__)


class StreamOps:
    """Streamed-first-copy half of the Applier (see module doc)."""

    def run_stream(self, stream: StreamedCycle, prep: Callable[[List[Entry]], None]):
        """A streamed first copy into an empty DEST (``self.fresh``): each manifest segment's
        directories, packed and empty files and symlinks are applied as soon as it arrives, while
        the source still builds the rest; files read through the snapshot (large, sparse), hard links
        and all metadata follow once the cycle is built (``stream.finish()``); returns the SyncStats.
        ``stream.announced()`` yields (segment, packs written so far), ``stream.raw(n)`` a segment's
        entries; ``prep`` maps owners.
        A bad later segment fails the cycle, and the undo of a first copy empties DEST again."""
        t0 = time.monotonic()
        if not self.fresh:
            raise ManifestError("a streamed cycle needs a first copy into an empty replica")
        self._log_fresh()
        self.stats.streamed = True
        self.prefetch_packs = True
        totals = stream.totals or {}
        nfiles, nbytes = int(totals.get("files", 0)), int(totals.get("bytes", 0))
        deferred: List[Entry] = []
        counts = [0, 0]                          # files done, bytes done (for progress)
        self._packed = fresh_worker.PackedWriter(self.ensure_parent, self.dirs.dirty, self.owners)
        worker = None
        lo = 0                                   # packs before the segment being handed out
        try:
            for n, npacks in stream.announced():
                self.n_packs = npacks
                if n == 1:                       # more than one segment: worth a second process
                    worker = self._start_worker(stream)
                    if worker is not None:
                        self.dirs.shared = True
                        self.packs_known = lambda: 0   # read ahead only packs of segments applied here
                if worker is not None:
                    for res in worker.results(block=False):
                        self._worker_done(res, deferred, prep, counts)
                    if len(worker.outstanding) < fresh_worker.MAX_QUEUED and npacks > lo:
                        worker.submit(n, lo, npacks)   # the worker reads these packs itself
                        for k in range(lo, npacks):
                            self._foreign_packs.add(k)
                            self._pack_next.pop(k, None)
                        lo = npacks
                        continue
                lo = npacks
                self.prefetch_pack(self._pack_cur + 1)   # the next pack may have been written meanwhile
                self._stream_apply(stream.raw(n), deferred, counts, prep)
                self._progress_stream(counts, nfiles, nbytes)
            if worker is not None:
                for res in worker.results(block=True):
                    self._worker_done(res, deferred, prep, counts)
                worker.close()
                worker = None
        finally:
            if worker is not None:   # failed: nothing of the worker may still write
                worker.kill()
        done, done_bytes = counts
        self._progress_stream(counts, nfiles, nbytes)
        stream.finish()                          # the cycle is built (its export comes if a read needs it)
        self.reader.know_files({e.idx: e.path for e in self.entries if e.op == "file"},
                               [e.idx for e in deferred if e.live])
        failed: Dict[bytes, BaseException] = {}  # live files we could not read whole: the source settles them
        for e in deferred:
            if e.link is None:
                try:
                    self._file(e)
                except (ManifestError, TransportError) as err:
                    if not e.live:
                        raise
                    log.info("%s could not be read live (%s); asking the source", show(e.path), err)
                    failed[e.path] = err
                    self.stats.files_changed -= 1
                    continue
                done_bytes += e.size
                if self.progress:
                    self.progress(done, done, self.reader.bytes_read, done_bytes, max(done_bytes, nbytes))
        redo, gone = stream.verify()             # large files were read live: did any change meanwhile?
        settled = {e.path for e in redo} | set(gone)
        for p, err in failed.items():
            if p not in settled:                 # unchanged, yet unreadable: a real error
                raise err
        if redo or gone:
            self._read_again(redo, gone, deferred, stream.redo_rel, prep, set(failed))
        self.flush_installs()                    # primaries in place before links to them
        for e in deferred:
            if e.link is not None:
                self._hardlink(e)
        self.flush_installs()
        ups = [e for e in self.entries if e.is_upsert]
        self._metadata_phase(ups, [e for e in ups if e.op == "dir"])
        self.stats.duration_s = time.monotonic() - t0
        return self.stats

    def _read_again(self, redo: List[Entry], gone: List[bytes], deferred: List[Entry],
                    redo_rel: Callable[[int], bytes], prep, failed: Set[bytes]) -> None:
        """The source found files that changed while we read them live: ``redo`` (fresh entries, the
        same idx) are read again from the copy it made; ``gone`` ones are dropped from this cycle
        (the source looks at them again next cycle).  ``failed``: paths we could not read at all
        (nothing of them was written)."""
        mine = {e.path: e for e in deferred if e.live and e.link is None and e.pack is None}
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
        gone_set = set(gone)
        undo = set(again) | gone_set
        for p in undo - failed:   # what we wrote of them is not a point-in-time copy: away with it
            os.unlink(basename(p), dir_fd=self.dirs.get(parent(p)))
            self.stats.files_changed -= 1      # (a file read again is counted again by _file)
        self.rows = [r for r in self.rows if r[0] not in undo]
        self.entries = [again.get(e.path, e) for e in self.entries if e.path not in gone_set or e.op != "file"]
        for p in gone:
            self.created.discard(p)
            self.warnings.add(show(p), "changed or vanished while it was read; left for the next cycle")
        for e in again.values():
            log.info("%s changed while it was read: reading the source's copy of it", show(e.path))
            prep([e])
            self._data_override[e.idx] = redo_rel(e.idx)
            self._file(e)

    def _start_worker(self, stream) -> "Optional[fresh_worker.FreshWorker]":
        """A second applying process when the segments and packs can be read directly (sshfs)."""
        cdir = self.reader.cycle_dir
        if not self.use_worker or not cdir:
            return None
        try:
            return fresh_worker.FreshWorker(self.dest, cdir, self.owners.numeric_ids)
        except OSError as e:
            log.info("no second applying process (%s); applying in one", e)
            return None

    def _stream_apply(self, raws, deferred: List[Entry], counts: List[int], prep,
                      made_dirs: bool = False) -> None:
        """Apply one segment's raw entries (``made_dirs``: the worker made its directories already):
        the common packed file through ``fresh_worker.PackedWriter``, the rest as Entries."""
        write = self._packed.write
        rows: List[Tuple] = []
        warns: List[Tuple[bytes, str]] = []
        for r in raws:
            row = write(r, self._pack)
            if row is not None:
                rows.append(row)
                continue
            e = Entry(r)
            prep([e])
            self.entries.append(e)
            op = e.op
            if op == "file":
                if e.link is None and e.pack is not None:
                    rows.append(self._packed.write_entry(e, self._pack, warns))
                    continue
                counts[0] += 1
                if e.link is None and e.size == 0:
                    self._file(e)
                else:
                    deferred.append(e)
            elif op == "dir":
                if e.path in self.dir_paths:
                    raise ManifestError(f"{show(e.path)} appears twice in the manifest")
                self.dir_paths.add(e.path)
                pfd = self.ensure_parent(e.path)
                if not made_dirs:
                    fresh_worker.mkdir_in(pfd, e.path)
                self.created.add(e.path)
                self.dirs.dirty.add(parent(e.path))
                self.stats.dirs += 1
            elif op == "symlink":
                self._symlink(e)
            elif op == "delete":          # vanished while the source was captured
                self.deleted.append(e.path)
            else:
                raise ManifestError(f"a first copy cannot hold a {op!r} entry ({show(e.path)})")
        self._written(rows, warns, counts)

    def _written(self, rows: List[Tuple], warns: List[Tuple[bytes, str]], counts: List[int]) -> None:
        """Account for packed files written in place (here or by the worker): catalog rows (staged in
        the catalog at once: the commit then has little left to insert), stats."""
        self.cat.stage(rows)
        self.created.update(r[0] for r in rows)
        nbytes = sum(r[2] for r in rows)
        self.stats.files_changed += len(rows)
        self.stats.bytes_written += nbytes
        counts[0] += len(rows)
        counts[1] += nbytes
        for rel, msg in warns:
            self.warnings.add(show(rel), msg)

    def _worker_done(self, res: Tuple, deferred: List[Entry], prep, counts: List[int]) -> None:
        _done, _n, rows, others, nread, dirty, warns = res
        self.stats.worker_segments += 1
        self.reader.add_bytes_read(nread)
        self.dirs.dirty.update(dirty)
        self._written(rows, warns, counts)
        self._stream_apply(others, deferred, counts, prep, made_dirs=True)

    def _progress_stream(self, counts: List[int], nfiles: int, nbytes: int) -> None:
        if self.progress:
            done, done_bytes = counts
            self.progress(done, max(done, nfiles), self.reader.bytes_read, done_bytes, max(done_bytes, nbytes))

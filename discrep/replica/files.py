"""Regular-file content for the replica: compare, fetch only changed ranges, write.

``FilePatcher.apply(e)`` decides, for one file entry, from the replica catalog's signature of
the old copy (trusted only while inode, size and mtime still match), between: unchanged
(metadata only), small file from a pack, whole fetch into a staged new file, in-place patch
of changed fine blocks (the source's changed-block list or a two-level signature compare;
the old blocks go to the undo log first), or a content-defined-chunk rebuild when data
shifted.  It appends each file's ``CatalogRow`` to the cycle's rows.

Thread-safety: runs in the applying thread; range reads fan out to the reader's pool, which
writes with pwrite into fds owned by this thread.
"""
from __future__ import annotations

import os
import stat as statmod
from typing import Callable, Dict, List, Optional, Tuple, Union

import blockdiff
from blockdiff import cdc_index

from discrep.core import platform
from discrep.core.errors import ManifestError
from discrep.core.paths import basename, enc, parent, show
from discrep.core.writes import pwrite_all
from discrep.protocol import cbt, layout
from discrep.protocol.manifest import MAX_FILE_SIZE, Entry
from discrep.replica.catalog import CatalogRow, ReplicaCatalog
from discrep.replica.dest import Dest
from discrep.replica.dirs import O_FILE, create_file
from discrep.replica.fetch import LazySig, fetch_ranges, split_by_extents, windows
from discrep.replica.meta import MetaWriter
from discrep.replica.packs import PackSource
from discrep.replica.reader import Reader
from discrep.replica.stats import SyncStats

CDC_MIN_SIZE = 1024 * 1024   # below this, shifted data is simply refetched where it differs
FETCH_WINDOW = 64 << 20      # bytes of a whole fetch asked for at a time
CBT_HEADER = 64              # bytes of a changed-block answer's header, at most

Fill = Callable[[int], int]          # writes a new file's content into an fd; returns bytes written
Sig = Union[None, bytes, "blockdiff.Signature", LazySig]


class FilePatcher:
    """Applies file entries' content (see module doc)."""

    def __init__(self, reader: Reader, dest: Dest, cat: ReplicaCatalog, meta: MetaWriter, packs: PackSource,
                 stats: SyncStats, rows: List[CatalogRow], base_of: Callable[[bytes], bytes]):
        self.reader = reader
        self.dest = dest
        self.cat = cat
        self.meta = meta
        self.packs = packs
        self.stats = stats
        self.rows = rows
        self.base_of = base_of                       # path in the base cycle (before this cycle's moves)
        self.data_override: Dict[int, bytes] = {}    # file idx -> where to read it instead of .discrep/data/
        self.link_names: Dict[bytes, List[bytes]] = {}  # primary path -> its hard links in this manifest
        self.checksum = False                        # sign DEST's actual bytes instead of trusting the catalog
        self.max_size = MAX_FILE_SIZE                # the largest file size accepted from the manifest

    def apply(self, e: Entry) -> None:
        """Bring file ``e`` (not a hard link) to its new content and metadata."""
        check_size(e, self.max_size)
        dest = self.dest
        # in a directory this cycle made, nothing older can be there (unless moved in: dropped)
        new_dir = dest.fresh or (parent(e.path) in dest.created and e.path not in dest.dropped)
        st = None if new_dir else dest.dirs.lstat(e.path)
        old = self._actual_old(e, st) if self.checksum else self._trusted_old(e, st)
        old_sig = blockdiff.Signature.from_bytes(old.sig) if old else None
        if old_sig is not None and ((e.h is not None and old_sig.whole_digest() == e.h and old.size == e.size)
                                    or (e.size == 0 and old.size == 0)):
            self.unchanged(e, old_sig)
            return
        self.stats.files_changed += 1
        if e.pack is not None:
            self._from_pack(e)
        elif old_sig is None or e.size == 0:
            self._fetch_whole(e)
        else:
            self._patch(e, old_sig, st)

    def _trusted_old(self, e: Entry, st: Optional[os.stat_result]) -> Optional[CatalogRow]:
        if st is None or not statmod.S_ISREG(st.st_mode):
            return None
        row = self.cat.get(self.base_of(e.path))
        if row is None or row.kind != "file" or row.sig is None:
            return None
        if (row.ino, row.size, row.mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            return None
        return row

    def _actual_old(self, e: Entry, st: Optional[os.stat_result]) -> Optional[CatalogRow]:
        """--checksum: the old copy as its bytes in DEST are (signed now, not taken from the
        catalog); a copy whose bytes or stat differ from the catalog's record counts as repaired."""
        if st is None or not statmod.S_ISREG(st.st_mode):
            return None
        row = self.cat.get(self.base_of(e.path))
        known = blockdiff.Signature.from_bytes(row.sig) if row is not None and row.sig is not None else None
        geometry = (known.block_size, known.factor) if known is not None else \
            (blockdiff.FINE_SIZE, blockdiff.COARSE_FACTOR)
        fd = os.open(basename(e.path), os.O_RDONLY | os.O_NONBLOCK | O_FILE, dir_fd=self.dest.dirs.get(parent(e.path)))
        try:
            sig = blockdiff.sign_fd(fd, st.st_size, *geometry)
        finally:
            os.close(fd)
        if known is not None and row is not None and row.kind == "file" and (
                (row.ino, row.size, row.mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns)
                or known.whole_digest() != sig.whole_digest() or known.file_size != sig.file_size):
            self.stats.files_repaired += 1
        return CatalogRow.file(e.path, st.st_size, st.st_mtime_ns, st.st_ino, sig.to_bytes())

    def unchanged(self, e: Entry, sig: "blockdiff.Signature") -> None:
        """The content is the old copy's: metadata only, where it differs."""
        self.stats.files_unchanged += 1
        pfd = self.dest.dirs.get(parent(e.path))
        fd = os.open(basename(e.path), os.O_RDONLY | os.O_NONBLOCK | O_FILE, dir_fd=pfd)
        try:
            if not self.meta.matches(e, fd) or self.shared_elsewhere(e, fd):   # (a link the source broke)
                if self.shared_elsewhere(e, fd):   # other names share the inode: a copy of its own
                    self._write_new(e, lambda nfd: _clone(fd, nfd, e.size), sig.to_bytes())
                    return
                self.dest.log_meta(e.path, fd)
                self.dest.log.barrier()
                self.meta.apply_fd(e, fd)
                self.stats.files_meta_changed += 1
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.rows.append(CatalogRow.file(e.path, e.size, e.mtime_ns, st.st_ino, sig.to_bytes()))

    def shared_elsewhere(self, e: Entry, fd: int) -> bool:
        """The inode open at ``fd`` (``e.path`` in DEST) has names that this cycle does not change
        with it: another replicated name whose hard link the source broke, or a history ``keep/``
        entry.  Such an inode is never changed in place (data or metadata)."""
        st = os.fstat(fd)
        if st.st_nlink <= 1:
            return False
        mine = 0
        for rel in [e.path] + self.link_names.get(e.path, []):
            other = self.dest.dirs.lstat(rel)
            if other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                mine += 1
        return mine < st.st_nlink

    def _from_pack(self, e: Entry) -> None:
        k, off = e.pack
        data = self.packs.get(k)[off:off + e.size]
        whole, sig = blockdiff.sign_small(data)
        if len(data) != e.size or whole != e.h:
            raise ManifestError(f"pack {k} does not hold the bytes the manifest announces for {show(e.path)}")
        self._write_new(e, lambda fd: pwrite_all(fd, data, 0) if data else 0, sig)

    def _write_new(self, e: Entry, fill: Fill, sig: Sig) -> None:
        """Create the file in the stage, fill it, apply metadata, rename into place.

        No fsync per file: the cycle ends with one syncfs of DEST before it commits, and a crash
        before the commit rolls the cycle back."""
        dest = self.dest
        if dest.fresh:   # a first copy into an empty DEST: written in place (see dest.Dest)
            pfd = dest.ensure_parent(e.path)
            tmp, dir_fd, mode = basename(e.path), pfd, e.mode & 0o777
            dest.dirs.dirty.add(parent(e.path))
        else:
            tmp, dir_fd, mode = dest.tmpname("f"), dest.stage_fd, 0o600

        def body(fd: int) -> Tuple[int, bytes]:
            n = fill(fd)
            if n != e.size or e.extents is not None:
                os.ftruncate(fd, e.size)
            self.stats.bytes_written += n or 0
            sig_bytes = _sig_bytes(sig, fd, e.size)
            self.meta.apply_fd(e, fd, fresh=True, mode_set=self.meta.created_with(mode, e.mode))
            return os.fstat(fd).st_ino, sig_bytes
        ino, sig_bytes = create_file(dir_fd, tmp, mode, body)
        if dest.fresh:
            dest.created.add(e.path)
        else:
            dest.install(tmp, e.path)
        self.rows.append(CatalogRow.file(e.path, e.size, e.mtime_ns, ino, sig_bytes))

    def _data_rel(self, e: Entry) -> bytes:
        return self.data_override.get(e.idx) or layout.per_file(layout.DATA, e.idx)

    def _fetch_whole(self, e: Entry) -> None:
        """A new copy of ``e`` from its data, window by window: memory follows the bytes that
        arrive, never the size the manifest declares (the digests of holes excepted, bounded by
        ``max_size``); a source that sends less than it declared fails at its first short read."""
        ranges = e.extents if e.extents is not None else ([(0, e.size)] if e.size else [])
        bs = blockdiff.FINE_SIZE
        # digests taken as the data arrives (no reread) when every range covers whole blocks
        whole_blocks = all(o % bs == 0 and ((o + ln) % bs == 0 or o + ln == e.size) for o, ln in ranges)
        lazy = LazySig(e.size) if whole_blocks else None
        rel = self._data_rel(e)

        def fill(fd: int) -> int:
            n = 0
            for group in windows(ranges, FETCH_WINDOW):
                if lazy is not None:
                    lazy.reserve(max(o + ln for o, ln in group))   # extents need not be sorted
                got = self.reader.copy_ranges(rel, group, fd, lazy.on_data if lazy is not None else None)
                if got != sum(ln for _o, ln in group):
                    raise ManifestError(f"the source sent less data for {show(e.path)} than its manifest declares")
                n += got
            return n
        self._write_new(e, fill, lazy)

    def _patch(self, e: Entry, old_sig: "blockdiff.Signature", st: os.stat_result) -> None:
        if e.cbt is not None and e.cbt == self.stats.base and self._patch_cbt(e, old_sig):
            return
        rel = layout.per_file(layout.SIG, e.idx)
        hdr = blockdiff.SigHeader.from_bytes(self.reader.pread(rel, blockdiff.HEADER_SIZE, 0))
        if hdr.file_size != e.size or hdr.block_size != old_sig.block_size or hdr.factor != old_sig.factor:
            raise ManifestError(f"signature of {show(e.path)} does not match its manifest entry")
        c_off, c_len = hdr.coarse_range()
        coarse = self.reader.pread(rel, c_len, c_off)
        diff_c = blockdiff.differing_coarse(old_sig, hdr, coarse)
        if not diff_c:
            self.stats.files_changed -= 1
            self.unchanged(e, old_sig)
            return
        if e.size != old_sig.file_size and e.size >= CDC_MIN_SIZE and len(diff_c) * 2 > hdr.n_coarse:
            self._cdc(e, st)
            return
        reqs = [(rel,) + tuple(hdr.fine_range(ci)) for ci in diff_c]
        slices = self.reader.preads(reqs)
        blocks: List[int] = []
        fine = _fine_array(old_sig, hdr.n_blocks)
        for ci, sl in zip(diff_c, slices):
            blocks += blockdiff.differing_fine(old_sig, hdr, ci, sl)
            start = ci * hdr.factor * 8
            fine[start:start + len(sl)] = sl
        self._apply_blocks(e, old_sig, blocks, bytes(fine), hdr.block_size, hdr.factor)

    def _patch_cbt(self, e: Entry, old_sig: "blockdiff.Signature") -> bool:
        """The source proved which blocks may have changed since the base cycle (our copy):
        compare only those digests.  False when the answer does not fit (then use signatures)."""
        # at most one range and one digest per block of the file: a larger answer is refused unread
        most = CBT_HEADER + (-(-e.size // old_sig.block_size) + 1) * 24
        base, size, bs, rs, digs = cbt.parse(self.reader.read_all(layout.per_file(layout.CBT, e.idx), most))
        if base != self.stats.base or size != e.size or bs != old_sig.block_size:
            return False
        n_new = -(-e.size // bs)
        fine = _fine_array(old_sig, n_new)
        blocks: List[int] = []
        k = 0
        listed = set()
        for off, ln in rs:
            for b in range(off // bs, -(-(off + ln) // bs)):
                d = digs[k * 8:k * 8 + 8]
                k += 1
                listed.add(b)
                if b >= old_sig.n_blocks or old_sig.fine[b * 8:b * 8 + 8] != d or \
                        (b == old_sig.n_blocks - 1 and old_sig.file_size != e.size):
                    blocks.append(b)
                fine[b * 8:b * 8 + 8] = d
        if any(b >= old_sig.n_blocks for b in range(n_new) if b not in listed):
            return False  # growth the answer does not cover: do not guess
        if not blocks and e.size == old_sig.file_size:
            self.stats.files_changed -= 1
            self.unchanged(e, old_sig)
            return True
        self._apply_blocks(e, old_sig, blocks, bytes(fine), bs, old_sig.factor)
        return True

    def _apply_blocks(self, e: Entry, old_sig: "blockdiff.Signature", blocks: List[int], fine: bytes,
                      bs: int, factor: int) -> None:
        """Patch changed ``blocks`` in place (old bytes to the undo log first); ``fine`` is the new
        file's complete fine-digest array, so the new signature needs no reread."""
        ranges = blockdiff.blocks_to_ranges(sorted(set(blocks)), bs, e.size)
        holes: List[Tuple[int, int]] = []
        if e.extents is not None:
            ranges, holes = split_by_extents(ranges, e.extents)
        new_sig = blockdiff.Signature(e.size, bs, factor, fine, blockdiff.coarse_digests(fine, factor))
        fd = os.open(basename(e.path), os.O_RDWR | O_FILE, dir_fd=self.dest.dirs.get(parent(e.path)))
        try:
            if self.shared_elsewhere(e, fd):   # break the hard link: patch a copy of its own
                self._write_new(e, lambda nfd: self._patch_fd(e, fd, nfd, ranges, holes), new_sig.to_bytes())
                return
            self._save_old(e, fd, ranges + holes)
            if e.size < old_sig.file_size:
                os.ftruncate(fd, e.size)
            n = 0
            for off, data in fetch_ranges(self.reader, e, ranges).items():
                pwrite_all(fd, data, off)
                n += len(data)
            for off, ln in holes:
                try:
                    platform.punch_hole(fd, off, ln)
                except Exception:
                    pwrite_all(fd, bytes(ln), off)
            if e.size > old_sig.file_size:
                os.ftruncate(fd, e.size)
            self.stats.bytes_written += n
            self.meta.apply_fd(e, fd)
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.rows.append(CatalogRow.file(e.path, e.size, e.mtime_ns, ino, new_sig.to_bytes()))

    def _patch_fd(self, e: Entry, ofd: int, fd: int, ranges: List[Tuple[int, int]],
                  holes: List[Tuple[int, int]]) -> int:
        """A staged copy of the old file (``ofd``) with ``ranges`` fetched and ``holes`` zeroed."""
        _clone(ofd, fd, min(e.size, os.fstat(ofd).st_size))
        n = 0
        for off, data in fetch_ranges(self.reader, e, ranges).items():
            pwrite_all(fd, data, off)
            n += len(data)
        for off, ln in holes:
            pwrite_all(fd, bytes(ln), off)
        return n

    def _save_old(self, e: Entry, fd: int, changed: List[Tuple[int, int]]) -> None:
        """Write-ahead: the old bytes a patch overwrites (and a cut tail) go to the undo log first."""
        old_size = os.fstat(fd).st_size
        save = [(o, min(ln, old_size - o)) for o, ln in sorted(changed) if o < old_size]
        if e.size < old_size:
            save.append((e.size, old_size - e.size))
        save = [(o, ln) for o, ln in save if ln > 0]
        old = b"".join(os.pread(fd, ln, o) for o, ln in save)
        self.dest.log_meta(e.path, fd)   # first: undone last, after the content is back
        self.dest.log.add({"op": "patch", "path": enc(e.path), "old_size": old_size,
                           "ranges": [[o, ln] for o, ln in save]}, old)
        self.dest.log.barrier()
        self.stats.history_bytes += len(old)

    def _cdc(self, e: Entry, st: os.stat_result) -> None:
        """Shifted data: read the super-chunk table, chunk entries of differing super-chunks only,
        then fetch the chunks the old copy lacks; everything else is copied from the old copy."""
        rel = layout.per_file(layout.CDC, e.idx)
        guess = cdc_index.HEADER_SIZE + (e.size // (blockdiff.CDC_AVG << cdc_index.SUPER_BITS) + 8) * \
            cdc_index.SUPER_SIZE                  # header + the expected super table, in one read
        head = self.reader.pread(rel, min(guess, 1 << 20), 0)
        h = cdc_index.IndexHeader.from_bytes(head)
        if h.file_size != e.size or h.n_chunks > e.size // blockdiff.CDC_MIN + 1:
            raise ManifestError(f"chunk index of {show(e.path)} does not match its size")
        so, sl = h.supers_range()
        table = head[so:so + sl] if so + sl <= len(head) else self.reader.pread(rel, sl, so)
        supers = cdc_index.parse_supers(h, table)
        ofd = os.open(basename(e.path), os.O_RDONLY | O_FILE, dir_fd=self.dest.dirs.get(parent(e.path)))
        try:
            old_chunks = blockdiff.chunk_fd(ofd, st.st_size)
            diff = cdc_index.differing_supers(old_chunks, supers)
            reqs = [(rel,) + h.chunks_range(supers[i].first, supers[i].count) for i in diff]
            entries = {i: cdc_index.parse_chunks(b) for i, b in zip(diff, self.reader.preads(reqs))}
            ops = cdc_index.plan_two_level(old_chunks, supers, e.size, entries)
            fetched = fetch_ranges(self.reader, e, blockdiff.fetch_ranges(ops))

            def fill(fd: int) -> int:
                return blockdiff.build_from_plan(fd, ofd, ops, fetched)
            self._write_new(e, fill, None)
        finally:
            os.close(ofd)


def check_size(e: Entry, max_size: int) -> None:
    """Refuse a file the manifest declares larger than ``max_size`` (what the replica's memory
    for its digests, size / 512, and DEST's space are bounded by)."""
    if e.size is not None and e.size > max_size:
        raise ManifestError(f"the manifest declares {show(e.path)} {e.size} bytes long, more than the "
                            f"replica accepts ({max_size}; ReplicaOptions.max_file_size)")


def _clone(ofd: int, fd: int, size: int) -> int:
    """New file ``fd`` gets the first ``size`` bytes of ``ofd`` (a reflink where possible)."""
    try:
        platform.reflink(ofd, fd)
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        return size
    except (platform.NotSupported, OSError):
        os.ftruncate(fd, 0)
        return platform.copy_range(ofd, fd, size)


def _sig_bytes(sig: Sig, fd: int, size: int) -> bytes:
    """A new file's signature: as given, from digests taken as its data arrived, or read back."""
    if sig is None:
        return blockdiff.sign_fd(fd, size).to_bytes()
    if isinstance(sig, LazySig):
        return sig.get().to_bytes()
    return sig if isinstance(sig, bytes) else sig.to_bytes()


def _fine_array(old_sig: "blockdiff.Signature", n_blocks: int) -> bytearray:
    """The old copy's fine digests, cut or zero-padded to ``n_blocks`` (updated as blocks differ)."""
    fine = bytearray(old_sig.fine[:n_blocks * 8])
    if len(fine) < n_blocks * 8:
        fine.extend(b"\0" * (n_blocks * 8 - len(fine)))
    return fine

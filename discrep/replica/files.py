"""Regular-file content for the replica: compare, fetch only changed ranges, write.

A mixin of ``replica.Applier``: for each file entry it decides, from the
replica catalog's signature of the old copy (trusted only while inode, size
and mtime still match), between: unchanged (metadata only), small file from a
pack, whole fetch into a staged new file, in-place patch of changed fine blocks
(two-level signature compare; the old blocks go to the undo log first), or a
content-defined-chunk rebuild when data shifted.

Thread-safety: methods run in the applying thread; range reads fan out to the
reader's pool, which writes with pwrite into fds owned by this thread.
"""
from __future__ import annotations

import os
import stat as statmod
from typing import Dict, List, Optional, Tuple

import blockdiff
from blockdiff import cdc_index, framing

from discrep.core import platform
from discrep.protocol import cbt
from discrep.protocol import ranges as rq
from discrep.core.errors import ManifestError
from discrep.protocol.manifest import Entry
from discrep.core.paths import basename, enc, parent, show
from discrep.replica.catalog import CatalogRow
from discrep.protocol import layout
from discrep.core.xattrs import read_xattrs

PACK_AHEAD = 3               # packs read ahead on a first copy
CDC_MIN_SIZE = 1024 * 1024   # below this, shifted data is simply refetched where it differs
O_FILE = os.O_NOFOLLOW | os.O_CLOEXEC


class FileOps:
    """File-content half of the Applier (see module doc)."""

    # -- regular files -------------------------------------------------
    def _trusted_old(self, e: Entry, st: Optional[os.stat_result]) -> Optional[CatalogRow]:
        if st is None or not statmod.S_ISREG(st.st_mode):
            return None
        row = self.cat.get(self.base_of(e.path))
        if row is None or row.kind != "file" or row.sig is None:
            return None
        if (row.ino, row.size, row.mtime_ns) != (st.st_ino, st.st_size, st.st_mtime_ns):
            return None
        return row

    def _pack(self, k: int) -> bytes:
        """Pack ``k``, decoded.  Packs are consumed in order: while this one's files are written,
        the next one is already being read (a reader-pool thread; I/O releases the GIL)."""
        data = self._packs.get(k)
        if data is None:
            fut = self._pack_next.pop(k, None)
            self._packs.clear()
            data = fut.result() if fut is not None else self._read_pack(k)
            self._packs[k] = data
            self._pack_cur = k
            self.prefetch_pack(k + 1)
        return data

    def prefetch_pack(self, k: int) -> None:
        """Start reading packs ``k`` .. ``k + PACK_AHEAD - 1`` that exist yet (prefetching on):
        several reads in flight keep the mount busy while files are written."""
        if not self.prefetch_packs:
            return
        for j in range(k, min(k + PACK_AHEAD, max(self.n_packs, self.packs_known()))):
            if j not in self._pack_next and j not in self._packs and j not in self._foreign_packs:
                self._pack_next[j] = self.reader.pool.submit(self._read_pack, j)

    def _read_pack(self, k: int) -> bytes:
        return framing.unpack(self.reader.read_all(self.pack_rel % k))

    def _file(self, e: Entry) -> None:
        # in a directory this cycle made, nothing older can be there (unless moved in: dropped)
        new_dir = self.fresh or (parent(e.path) in self.created and e.path not in self.dropped)
        st = None if new_dir else self.dirs.lstat(e.path)
        old = self._trusted_old(e, st)
        old_sig = blockdiff.Signature.from_bytes(old.sig) if old else None
        if e.h is not None and old_sig is not None and old_sig.whole_digest() == e.h and old.size == e.size:
            self._unchanged(e, old_sig)
            return
        if e.size == 0 and old_sig is not None and old.size == 0:
            self._unchanged(e, old_sig)
            return
        self.stats.files_changed += 1
        if e.pack is not None:
            k, off = e.pack
            blob = self._pack(k)
            data = blob[off:off + e.size]
            whole, sig = blockdiff.sign_small(data)
            if len(data) != e.size or whole != e.h:
                raise ManifestError(f"pack {k} does not hold the bytes the manifest announces for {show(e.path)}")
            self._write_new(e, lambda fd: os.pwrite(fd, data, 0) if data else 0, sig)
            return
        if old_sig is None or e.size == 0:
            self._fetch_whole(e)
            return
        self._patch(e, old_sig, st)

    def _unchanged(self, e: Entry, sig) -> None:
        self.stats.files_unchanged += 1
        fd = os.open(basename(e.path), os.O_RDONLY | os.O_NONBLOCK | O_FILE, dir_fd=self.dirs.get(parent(e.path)))
        try:
            if not self._meta_matches(e, fd):
                self._log_meta(e.path, fd)
                self.log.barrier()
                self._apply_meta_fd(e, fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.rows.append((e.path, "file", e.size, e.mtime_ns, st.st_ino, sig.to_bytes()))

    def _meta_matches(self, e: Entry, fd: int) -> bool:
        st = os.fstat(fd)
        if (statmod.S_IMODE(st.st_mode), st.st_mtime_ns) != (e.mode, e.mtime_ns):
            return False
        if self.euid == 0 and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            return False
        have = read_xattrs(fd)
        return {k: v for k, v in have.items() if not k.startswith("security.")} == e.xattrs

    def _write_new(self, e: Entry, fill, sig) -> None:
        """Create the file in the stage, fill it, apply metadata, rename into place.

        No fsync per file: the cycle ends with one syncfs of DEST before it commits, and a crash
        before the commit rolls the cycle back."""
        if self.fresh:   # a first copy into an empty DEST: written in place (see Applier.fresh)
            pfd = self.ensure_parent(e.path)
            tmp, dir_fd, mode = basename(e.path), pfd, e.mode & 0o777
            self.dirs.dirty.add(parent(e.path))
        else:
            tmp, dir_fd, mode = self._tmpname("f"), self.stage_fd, 0o600
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_FILE, mode, dir_fd=dir_fd)
        try:
            n = fill(fd)
            if n != e.size or e.extents is not None:
                os.ftruncate(fd, e.size)
            self.stats.bytes_written += n or 0
            if sig is None:
                sig = blockdiff.sign_fd(fd, e.size)
            elif isinstance(sig, _LazySig):
                sig = sig.get()
            self._apply_meta_fd(e, fd, fresh=True, mode_set=(mode & ~self.umask) == e.mode)
            ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.close(fd)
        if self.fresh:
            self.created.add(e.path)
        else:
            self.install(tmp, e.path)
        self.rows.append((e.path, "file", e.size, e.mtime_ns, ino,
                          sig if isinstance(sig, bytes) else sig.to_bytes()))

    def _data_rel(self, e: Entry) -> bytes:
        return self._data_override.get(e.idx) or layout.per_file(layout.DATA, e.idx)

    def _fetch_whole(self, e: Entry) -> None:
        ranges = e.extents if e.extents is not None else ([(0, e.size)] if e.size else [])
        bs = blockdiff.FINE_SIZE
        aligned = all(o % bs == 0 for o, _ in ranges)
        nblocks = -(-e.size // bs)
        fine = bytearray(blockdiff.zero_block_digest(bs) * nblocks)

        def on_data(off: int, data: bytes) -> None:
            d = blockdiff.fine_digests(data, bs)
            i = off // bs
            fine[i * 8:i * 8 + len(d)] = d

        def fill(fd: int) -> int:
            return self.reader.copy_ranges(self._data_rel(e), ranges, fd, on_data if aligned else None)
        lazy = None
        if aligned and all((o + ln) % bs == 0 or o + ln == e.size for o, ln in ranges):
            lazy = _LazySig(e.size, fine)  # digests arrive with the data: no reread of what we wrote
        self._write_new(e, fill, lazy)

    def _patch_cbt(self, e: Entry, old_sig, st) -> bool:
        """The source proved which blocks may have changed since the base cycle (our copy):
        compare only those digests.  False when the answer does not fit (then use signatures)."""
        base, size, bs, rs, digs = cbt.parse(self.reader.read_all(layout.per_file(layout.CBT, e.idx)))
        if base != self.stats.base or size != e.size or bs != old_sig.block_size:
            return False
        n_new = -(-e.size // bs)
        fine = bytearray(old_sig.fine[:n_new * 8])
        if len(fine) < n_new * 8:
            fine.extend(b"\0" * (n_new * 8 - len(fine)))
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
            self._unchanged(e, old_sig)
            return True
        self._apply_blocks(e, old_sig, blocks, bytes(fine), bs, old_sig.factor)
        return True

    def _patch(self, e: Entry, old_sig, st) -> None:
        if e.cbt is not None and e.cbt == self.stats.base and self._patch_cbt(e, old_sig, st):
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
            self._unchanged(e, old_sig)
            return
        if e.size != old_sig.file_size and e.size >= CDC_MIN_SIZE and len(diff_c) * 2 > hdr.n_coarse:
            self._cdc(e, st)
            return
        reqs = [(rel,) + tuple(hdr.fine_range(ci)) for ci in diff_c]
        slices = self.reader.preads(reqs)
        blocks: List[int] = []
        fine = bytearray(old_sig.fine[:hdr.n_blocks * 8])
        if len(fine) < hdr.n_blocks * 8:
            fine.extend(b"\0" * (hdr.n_blocks * 8 - len(fine)))
        for ci, sl in zip(diff_c, slices):
            blocks += blockdiff.differing_fine(old_sig, hdr, ci, sl)
            start = ci * hdr.factor * 8
            fine[start:start + len(sl)] = sl
        self._apply_blocks(e, old_sig, blocks, bytes(fine), hdr.block_size, hdr.factor)

    def _apply_blocks(self, e: Entry, old_sig, blocks: List[int], fine: bytes, bs: int, factor: int) -> None:
        """Patch changed ``blocks`` in place (old bytes to the undo log first); ``fine`` is the new
        file's complete fine-digest array, so the new signature needs no reread."""
        ranges = blockdiff.blocks_to_ranges(sorted(set(blocks)), bs, e.size)
        holes: List[Tuple[int, int]] = []
        if e.extents is not None:
            ranges, holes = _split_by_extents(ranges, e.extents)
        fd = os.open(basename(e.path), os.O_RDWR | O_FILE, dir_fd=self.dirs.get(parent(e.path)))
        try:
            # write-ahead: the old blocks this patch overwrites (and a cut tail) go to the undo log first
            old_size = os.fstat(fd).st_size
            save = [(o, min(ln, old_size - o)) for o, ln in sorted(ranges + holes) if o < old_size]
            if e.size < old_size:
                save.append((e.size, old_size - e.size))
            save = [(o, ln) for o, ln in save if ln > 0]
            old = b"".join(os.pread(fd, ln, o) for o, ln in save)
            self._log_meta(e.path, fd)   # first: undone last, after the content is back
            self.log.add({"op": "patch", "path": enc(e.path), "old_size": old_size,
                          "ranges": [[o, ln] for o, ln in save]}, old)
            self.log.barrier()
            self.stats.history_bytes += len(old)
            if e.size < old_sig.file_size:
                os.ftruncate(fd, e.size)
            n = 0
            for off, data in self._fetch_z(e, ranges).items():
                os.pwrite(fd, data, off)
                n += len(data)
            for off, ln in holes:
                try:
                    platform.punch_hole(fd, off, ln)
                except Exception:
                    os.pwrite(fd, bytes(ln), off)
            if e.size > old_sig.file_size:
                os.ftruncate(fd, e.size)
            self.stats.bytes_written += n
            self._apply_meta_fd(e, fd)
            os.fsync(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        new_sig = blockdiff.Signature(e.size, bs, factor, fine, blockdiff.coarse_digests(fine, factor))
        self.rows.append((e.path, "file", e.size, e.mtime_ns, ino, new_sig.to_bytes()))

    def _cdc(self, e: Entry, st) -> None:
        """Shifted data: read the super-chunk table, chunk entries of differing super-chunks only,
        then fetch the chunks the old copy lacks; everything else is copied from the old copy."""
        rel = layout.per_file(layout.CDC, e.idx)
        guess = cdc_index.HEADER_SIZE + (e.size // (blockdiff.CDC_AVG << cdc_index.SUPER_BITS) + 8) * \
            cdc_index.SUPER_SIZE                  # header + the expected super table, in one read
        head = self.reader.pread(rel, min(guess, 1 << 20), 0)
        h = cdc_index.IndexHeader.from_bytes(head)
        if h.file_size != e.size:
            raise ManifestError(f"chunk index of {show(e.path)} does not match its size")
        so, sl = h.supers_range()
        table = head[so:so + sl] if so + sl <= len(head) else self.reader.pread(rel, sl, so)
        supers = cdc_index.parse_supers(h, table)
        ofd = os.open(basename(e.path), os.O_RDONLY | O_FILE, dir_fd=self.dirs.get(parent(e.path)))
        try:
            old_chunks = blockdiff.chunk_fd(ofd, st.st_size)
            diff = cdc_index.differing_supers(old_chunks, supers)
            reqs = [(rel,) + h.chunks_range(supers[i].first, supers[i].count) for i in diff]
            entries = {i: cdc_index.parse_chunks(b) for i, b in zip(diff, self.reader.preads(reqs))}
            ops = cdc_index.plan_two_level(old_chunks, supers, e.size, entries)
            fetched = self._fetch_z(e, blockdiff.fetch_ranges(ops))

            def fill(fd: int) -> int:
                return blockdiff.build_from_plan(fd, ofd, ops, fetched)
            self._write_new(e, fill, None)
        finally:
            os.close(ofd)

    def _fetch_z(self, e: Entry, want: List[Tuple[int, int]]) -> Dict[int, bytes]:
        """Fetch byte ranges of file ``e`` in batched, compressed requests (ranges.py):
        returns {offset: bytes} for each wanted (offset, length)."""
        if not want:
            return {}
        bs = rq.BLOCK
        aligned: List[Tuple[int, int]] = []
        for off, ln in sorted(want):
            a, z = off - off % bs, min(-(-(off + ln) // bs) * bs, e.size)
            if aligned and a <= aligned[-1][0] + aligned[-1][1]:
                s0 = aligned[-1][0]
                aligned[-1] = (s0, max(aligned[-1][0] + aligned[-1][1], z) - s0)
            else:
                aligned.append((a, z - a))
        groups = rq.batches(aligned)
        names = [layout.range_request(e.idx, rq.encode(g)) for g in groups]
        blobs = list(self.reader.pool.map(lambda n: framing.unpack(self.reader.read_all(n)), names))
        have: List[Tuple[int, bytes]] = []
        for g, blob in zip(groups, blobs):
            pos = 0
            for off, ln in g:
                ln = min(ln, e.size - off)
                have.append((off, blob[pos:pos + ln]))
                pos += ln
            if pos != len(blob):
                raise ManifestError(f"range answer for {show(e.path)} has the wrong size")
        out: Dict[int, bytes] = {}
        j = 0
        for off, ln in sorted(want):
            while have[j][0] + len(have[j][1]) <= off:
                j += 1
            a, data = have[j]
            piece = data[off - a:off - a + ln]
            if len(piece) != ln:
                raise ManifestError(f"range answer for {show(e.path)} is short")
            out[off] = piece
        return out


class _LazySig:
    def __init__(self, size: int, fine: bytearray):
        self.size = size
        self.fine = fine

    def get(self):
        f = bytes(self.fine)
        return blockdiff.Signature(self.size, blockdiff.FINE_SIZE, blockdiff.COARSE_FACTOR, f,
                                   blockdiff.coarse_digests(f, blockdiff.COARSE_FACTOR))


def _split_by_extents(ranges, extents):
    """Split changed ranges into (parts inside data extents, parts inside holes)."""
    data, holes = [], []
    for off, ln in ranges:
        end = off + ln
        pos = off
        for eo, el in extents:
            ee = eo + el
            if ee <= pos or eo >= end:
                continue
            if eo > pos:
                holes.append((pos, eo - pos))
            s, t = max(pos, eo), min(end, ee)
            data.append((s, t - s))
            pos = t
        if pos < end:
            holes.append((pos, end - pos))
    return data, holes



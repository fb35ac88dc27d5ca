"""One cycle applied to DEST: the phases, driving the replica's parts.

``Applier`` owns the parts of one cycle -- ``dest.Dest`` (every change to DEST, with its undo
records), ``meta.MetaWriter``, ``packs.PackSource``, ``files.FilePatcher`` -- and the
cycle's own state: its ``SyncStats``, the catalog rows it produces, its moves and deletes.
``run`` applies a whole manifest:

1. moves first (no data): every moved object is lifted out to the history's keep/
   (deepest base path first), then dropped at its new path (shallowest first) --
   chains and swaps work, children of a moved directory follow it;
2. deletes (into the cycle's history), and on a full cycle whatever the snapshot lacks;
3. directories, then files (``FilePatcher``), symlinks, hard links;
4. metadata (owner, mode, xattrs, times; directories deepest first), then ``syncfs``.

A streamed first copy (``stream.StreamApplier``) drives the same parts segment by segment.

Thread-safety: one thread applies; only range and pack reads fan out to the reader's pool.
"""
from __future__ import annotations

import os
import stat as statmod
import time
from typing import Dict, List, Optional, Set, Tuple

from discrep.core.errors import ManifestError, WarningList
from discrep.core.paths import STATE_DIR, basename, depth, parent, show
from discrep.protocol.manifest import Entry
from discrep.replica.catalog import CatalogRow, ReplicaCatalog
from discrep.replica.dest import Dest
from discrep.replica.dirs import O_FILE
from discrep.replica.files import FilePatcher
from discrep.replica.meta import MetaWriter
from discrep.replica.packs import PackSource
from discrep.replica.protect import Protection
from discrep.replica.reader import Reader
from discrep.replica.stats import Progress, SyncStats


class Moves:
    """This cycle's moves: the (base, new) pairs applied, and where each new path came from."""

    def __init__(self) -> None:
        self.pairs: List[Tuple[bytes, bytes]] = []
        self._origin: Dict[bytes, bytes] = {}        # new path -> base path

    def add(self, old: bytes, new: bytes) -> None:
        self.pairs.append((old, new))
        self._origin[new] = old

    def base_of(self, rel: bytes) -> bytes:
        """``rel``'s path in the base cycle (a moved directory's children moved with it)."""
        q = rel
        while q:
            if q in self._origin:
                return self._origin[q] + rel[len(q):]
            q = parent(q)
        return rel


class Applier:
    """Applies one cycle's manifest to DEST (see module doc).  ``fresh``: a first copy into an
    empty DEST (one undo record for all; files written in place); ``nosuid``: see ``MetaWriter``."""

    def __init__(self, reader: Reader, dest: bytes, cat: ReplicaCatalog, header: dict, entries: List[Entry],
                 warnings: WarningList, progress: Optional[Progress] = None, *, fresh: bool = False,
                 nosuid: bool = False):
        self.reader = reader
        self.cat = cat
        self.header = header
        self.entries = entries
        self.warnings = warnings
        self.progress = progress
        self.stats = SyncStats(cycle=int(header["cycle"]), base=int(header.get("base", 0)))
        self.moves = Moves()
        self.deleted: List[bytes] = []
        self.rows: List[CatalogRow] = []
        self.protect: Optional[Protection] = None     # the replica's filter rules keep these entries
        dir_paths = {e.path for e in entries if e.op == "dir"}
        self.dest = Dest(dest, self.stats.cycle, fresh=fresh, dir_paths=dir_paths)
        self.meta = MetaWriter(lambda rel, msg: warnings.add(show(rel), msg), nosuid=nosuid)
        n_packs = 1 + max((e.pack[0] for e in entries if e.op == "file" and e.pack is not None), default=-1)
        # read ahead to the next pack only when every packed file is needed (a first copy)
        self.packs = PackSource(reader, n_packs, prefetch=bool(header.get("full")) and cat.is_empty())
        self.files = FilePatcher(reader, self.dest, cat, self.meta, self.packs, self.stats, self.rows,
                                 self.moves.base_of)
        for e in entries:
            if e.op == "file" and e.link is not None:
                self.files.link_names.setdefault(e.link, []).append(e.path)

    def close(self) -> None:
        self.dest.close()

    def run(self) -> SyncStats:
        """Apply the whole manifest (see module doc)."""
        t0 = time.monotonic()
        ents = self.entries
        ups = [e for e in ents if e.is_upsert]
        if self.dest.fresh:
            self.dest.log_fresh()
        self._moves([e for e in ents if e.op == "move"])
        self._deletes([e for e in ents if e.op == "delete"])
        if self.header.get("full"):
            self._remove_extraneous({e.path for e in ups})
        dir_ents = sorted((e for e in ups if e.op == "dir"), key=lambda d: depth(d.path))
        self._dirs(dir_ents)
        files = [e for e in ups if e.op == "file"]
        self._files(files)
        for e in ups:
            if e.op == "symlink":
                self.symlink(e)
        self.dest.flush_installs()        # primaries must be in place before links to them
        for e in files:
            if e.link is not None:
                self.hardlink(e)
        self.dest.flush_installs()
        self.metadata(ups, dir_ents)
        self.stats.duration_s = time.monotonic() - t0
        return self.stats

    # -- phases --------------------------------------------------------
    def _moves(self, moves: List[Entry]) -> None:
        """Lift out, deepest base first; then drop in, shallowest new path first."""
        lifted: List[Tuple[Entry, bytes]] = []
        for e in sorted(moves, key=lambda m: -depth(m.old)):
            if self.dest.dirs.lstat(e.old) is None:
                self.warnings.add(show(e.old), "moved on the source but missing on the replica; fetched whole")
                continue
            lifted.append((e, self.dest.lift(e.old, "m")))
        for e, name in sorted(lifted, key=lambda x: depth(x[0].path)):
            self.dest.drop(name, e.path)
            self.dest.dirs.clear()
            self.moves.add(e.old, e.path)
            self.stats.files_renamed += 1

    def _deletes(self, deletes: List[Entry]) -> None:
        for e in sorted(deletes, key=lambda d: -depth(d.path)):
            if self.protect is not None:
                if self.dest.dirs.lstat(e.path) is not None:
                    self._remove(e.path)
                continue
            if self.dest.dirs.lstat(e.path) is not None:
                self.dest.trash(e.path)
                self.stats.files_deleted += 1
            self.deleted.append(e.path)

    def _remove(self, rel: bytes) -> bool:
        """Trash ``rel`` unless the filter rules protect it; a directory holding protected entries
        keeps them and itself, its other entries go.  True when ``rel`` went."""
        pr = self.protect
        if pr is not None:
            if pr.protects(rel) and self.moves.base_of(rel) == rel:   # (a move of this cycle put it here)
                return False
            st = self.dest.dirs.lstat(rel)
            if st is not None and statmod.S_ISDIR(st.st_mode) and pr.holds_protected(rel):
                for child in list(pr.children(rel)):
                    self._remove(child)
                return False
        self.dest.trash(rel)
        self.stats.files_deleted += 1
        self.deleted.append(rel)
        return True

    def _remove_extraneous(self, keep: Set[bytes]) -> None:
        """Full cycle: anything in DEST that the snapshot does not have goes to the trash."""
        dirs = self.dest.dirs
        stack = [b""]
        while stack:
            d = stack.pop()
            try:
                names = os.listdir(dirs.get(d))
            except (FileNotFoundError, ManifestError):
                continue
            for n in names:
                name = os.fsencode(n)
                rel = name if not d else d + b"/" + name
                if not d and rel == STATE_DIR:
                    continue
                if rel not in keep:
                    if self.protect is None:
                        self.dest.trash(rel)
                        self.stats.files_deleted += 1
                    else:
                        self._remove(rel)
                else:
                    st = dirs.lstat(rel)
                    if st is not None and statmod.S_ISDIR(st.st_mode):
                        stack.append(rel)

    def _dirs(self, dir_ents: List[Entry]) -> None:
        """New directories (parents first); a non-directory in the way goes to the trash."""
        todo = []
        for e in dir_ents:
            st = self.dest.dirs.lstat(e.path)
            if st is not None and not statmod.S_ISDIR(st.st_mode):
                self.dest.trash(e.path)
                st = None
            if st is None:
                todo.append(e.path)
        self.dest.make_dirs(todo)
        self.stats.dirs += len(todo)

    def _files(self, files: List[Entry]) -> None:
        """File contents (hard links only count here: they follow their primaries), with progress."""
        total_bytes = sum(e.size for e in files if e.link is None)
        done = done_bytes = 0
        for e in files:
            if e.link is None:
                self.files.apply(e)
                done_bytes += e.size
            done += 1
            if self.progress:
                self.progress(done, len(files), self.reader.bytes_read, done_bytes, total_bytes)

    # -- other types ---------------------------------------------------
    def symlink(self, e: Entry) -> None:
        st = self.dest.dirs.lstat(e.path)
        if st is not None and statmod.S_ISLNK(st.st_mode):
            if os.readlink(basename(e.path), dir_fd=self.dest.dirs.get(parent(e.path))) == e.target:
                return
        tmp = self.dest.tmpname("l")
        os.symlink(e.target, tmp, dir_fd=self.dest.stage_fd)
        self.dest.install(tmp, e.path)
        self.stats.symlinks += 1

    def hardlink(self, e: Entry) -> None:
        dirs = self.dest.dirs
        st = dirs.lstat(e.path)
        pst = dirs.lstat(e.link)
        if pst is None or not statmod.S_ISREG(pst.st_mode):
            raise ManifestError(f"hard link {show(e.path)} points to {show(e.link)}, which is not a file")
        tmp = self.dest.tmpname("h")
        if st is None or (st.st_ino, st.st_dev) != (pst.st_ino, pst.st_dev):
            os.link(basename(e.link), tmp, src_dir_fd=dirs.get(parent(e.link)), dst_dir_fd=self.dest.stage_fd,
                    follow_symlinks=False)
            self.dest.install(tmp, e.path)
            self.stats.files_changed += 1
        prim = next((r for r in reversed(self.rows) if r.path == e.link), None)
        self.rows.append(CatalogRow.file(e.path, e.size, e.mtime_ns, pst.st_ino, prim.sig if prim else None))

    # -- metadata ------------------------------------------------------
    def metadata(self, ups: List[Entry], dir_ents: List[Entry]) -> None:
        """Links, then directories deepest first, then the top directory; everything on disk."""
        meta_ents = [e for e in ups if e.op == "symlink"] + sorted(dir_ents, key=lambda d: -depth(d.path))
        for e in meta_ents:
            self.dest.log_meta(e.path)
        root_meta = self.header.get("root")
        if isinstance(root_meta, dict):
            self.dest.log_meta(b"", self.dest.root_fd)
        self.dest.log.barrier()
        for e in meta_ents:
            self._meta(e)
        self.dest.keep_dir_times()
        if isinstance(root_meta, dict):
            self.meta.apply_fd(Entry(dict(root_meta, op="dir", path="_")), self.dest.root_fd)
        self.dest.sync()
        self.stats.history_records = self.dest.log.records

    def _meta(self, e: Entry) -> None:
        pfd = self.dest.dirs.get(parent(e.path))
        if e.op == "symlink":
            self.meta.apply_link(e, pfd)
            return
        fd = os.open(basename(e.path), os.O_RDONLY | os.O_DIRECTORY | O_FILE, dir_fd=pfd)
        try:
            self.meta.apply_fd(e, fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.rows.append(CatalogRow.dir(e.path, e.mtime_ns, ino))

    def symlink_rows(self) -> None:
        self.rows.extend(CatalogRow.symlink(e.path, e.mtime_ns) for e in self.entries if e.op == "symlink")

"""DEST while a cycle is applied: every change to it, each preceded by its durable undo record.

``Dest`` owns the root fd of DEST, the directory fds below it (``replica.dirs.DirFds``: no
symlink inside DEST is ever followed), the cycle's stage directory and its ``UndoLog``.  Its
primitives are the only ways the cycle changes what is already in DEST:

* ``lift``/``trash``/``drop``: move an object into the cycle's history ``keep/`` and (a move)
  out again at its new path;
* ``make_dirs``, ``ensure_parent``: new directories (a non-directory in the way is replaced
  only where the manifest says the path is now a directory);
* ``install``/``flush_installs``: staged files and links renamed into place, group-committed
  (one barrier for up to 256 installs; a replaced object is kept as a hard link in ``keep/``);
* ``log_meta``, ``dirmeta``: the metadata and directory times a change will touch.

What this cycle created (``created``) needs no record of its own: undoing its creation
removes it whole.  A first copy into an empty DEST (``fresh``) has one record for all
("empty DEST again") and writes files in place.

Thread-safety: used by the applying thread only; it owns every fd it opens.
"""
from __future__ import annotations

import os
import shutil
import stat as statmod
from typing import Dict, Iterable, List, Optional, Set, Tuple

from discrep.core.errors import ManifestError, UnsafePathError
from discrep.core.paths import STATE_DIR, basename, enc, parent, show
from discrep.core.statedir import StateDir
from discrep.core.xattrs import read_xattrs
from discrep.replica.dirs import O_FILE, DirFds, NotADir, syncfs
from discrep.replica.history import KEEP, UndoLog, encode_meta

STAGE_REL = STATE_DIR + b"/stage"
STAGE = b"stage"             # its name in the state dir
INSTALL_BATCH = 256          # installs per barrier
_Install = Tuple[bytes, bytes, Optional[bytes], bool]    # staged name, path, kept old object's name, new


def _fresh_stage(state: StateDir) -> int:
    """fd of a new, empty stage directory in the checked state dir (an old one is removed)."""
    try:
        shutil.rmtree(STAGE, dir_fd=state.fd)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        os.unlink(STAGE, dir_fd=state.fd)
    os.mkdir(STAGE, 0o700, dir_fd=state.fd)
    return os.open(STAGE, os.O_RDONLY | os.O_DIRECTORY | O_FILE, dir_fd=state.fd)


def remove_stage(state: StateDir) -> None:
    """Remove the stage directory (a cycle ended), never following a symlink."""
    try:
        shutil.rmtree(STAGE, dir_fd=state.fd)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        os.unlink(STAGE, dir_fd=state.fd)


class Dest:
    """DEST as one cycle changes it (see module doc).  ``dir_paths``: the manifest's directories
    (a streamed cycle adds to it as segments arrive)."""

    def __init__(self, path: bytes, cycle: int, *, fresh: bool, dir_paths: Set[bytes]):
        self.path = path
        self.fresh = fresh
        self.dir_paths = dir_paths
        self.root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.dirs = DirFds(self.root_fd, on_mkdir=self._log_mkdir)
        self.state = StateDir(path, create=False)      # checked, reached by fd (see core.statedir)
        try:
            self.stage_fd = _fresh_stage(self.state)
            self.log = UndoLog(os.fsencode(self.state.path), cycle)
        except BaseException:
            self.state.close()
            os.close(self.root_fd)
            raise
        self.created: Set[bytes] = set()             # made by this cycle: undo removes them whole
        self.dropped: Set[bytes] = set()             # older objects moved in by this cycle
        self._dm_done: Set[bytes] = set()
        self._dir_times: Dict[bytes, Tuple[int, int]] = {}   # directories whose entries this cycle changed
        self._installs: List[Tuple[bytes, bytes]] = []       # (staged name, path)
        self._n = 0

    def close(self) -> None:
        self.dirs.clear()
        self.log.close()
        for fd in (self.stage_fd, self.root_fd):
            os.close(fd)
        self.state.close()

    def tmpname(self, tag: str) -> bytes:
        """A new name in the stage directory."""
        self._n += 1
        return b"%s%d" % (tag.encode(), self._n)

    # -- undo records ------------------------------------------------------
    def was_created(self, rel: bytes) -> bool:
        """``rel`` itself was made new by this cycle (undo removes it).  Exact path only: an older
        object moved into a new directory still needs its own records."""
        return rel in self.created or (self.fresh and rel != b"")

    def dirmeta(self, d: bytes) -> None:
        """Before the first change of entries in directory ``d``: remember its times."""
        if d in self._dm_done or self.was_created(d):
            return
        self._dm_done.add(d)
        st = os.fstat(self.dirs.get(d))
        self._dir_times[d] = (st.st_atime_ns, st.st_mtime_ns)
        self.log.add({"op": "dirmeta", "path": enc(d), "mtime_ns": st.st_mtime_ns, "atime_ns": st.st_atime_ns})

    def log_fresh(self) -> None:
        """Before anything is written by a first copy into an empty DEST: its undo = empty DEST."""
        self.log.add({"op": "fresh"})
        self.log.barrier()

    def _log_mkdir(self, rel: bytes) -> None:
        if self.fresh:
            self.created.add(rel)
            return
        self.dirmeta(parent(rel))
        self.log.add({"op": "mkdir", "path": enc(rel)})
        self.log.barrier()
        self.created.add(rel)

    def log_meta(self, rel: bytes, fd: Optional[int] = None) -> None:
        """Remember the metadata of an existing entry before changing it (no-op for new ones)."""
        if self.was_created(rel):
            return
        if fd is None:
            st = os.stat(basename(rel), dir_fd=self.dirs.get(parent(rel)), follow_symlinks=False) if rel \
                else os.fstat(self.root_fd)
            xa = {}
        else:
            st = os.fstat(fd)
            xa = read_xattrs(fd)
        self.log.add({"op": "meta", "path": enc(rel), "old": encode_meta(st, xa)})

    # -- moving objects ----------------------------------------------------
    def lift(self, rel: bytes, tag: str = "t") -> bytes:
        """Move ``rel`` (any type) into this cycle's history keep/; returns its name there."""
        pfd = self.dirs.get(parent(rel))
        self.dirmeta(parent(rel))
        name = self.log.keep_name(tag)
        self.log.add({"op": "rename", "src": enc(rel), "dst": KEEP + os.fsdecode(name)})
        self.log.barrier()
        os.rename(basename(rel), name, src_dir_fd=pfd, dst_dir_fd=self.log.keep_fd)
        self.dirs.dirty.add(parent(rel))
        self.dirs.clear()
        return name

    def trash(self, rel: bytes) -> None:
        """Remove ``rel``: it is kept in the history as the reverse delta of this cycle."""
        self.lift(rel, "t")

    def drop(self, name: bytes, rel: bytes) -> None:
        """Put lifted entry ``name`` (in keep/) at ``rel``."""
        pfd = self.ensure_parent(rel)
        if self.dirs.lstat(rel) is not None:
            self.trash(rel)
            pfd = self.ensure_parent(rel)
        self.dirmeta(parent(rel))
        self.log.add({"op": "rename", "src": KEEP + os.fsdecode(name), "dst": enc(rel)})
        self.log.barrier()
        os.rename(name, basename(rel), src_dir_fd=self.log.keep_fd, dst_dir_fd=pfd)
        self.dropped.add(rel)
        self.dirs.dirty.add(parent(rel))

    # -- directories -------------------------------------------------------
    def ensure_parent(self, rel: bytes) -> int:
        """fd of rel's parent, creating missing directories.

        A non-directory in the way (a symlink inside DEST, say) is replaced only
        when this cycle's manifest says that path is now a directory; otherwise
        the path is refused and nothing is written through it.
        """
        while True:
            try:
                return self.dirs.get(parent(rel), create=True)
            except NotADir as nd:
                if nd.rel not in self.dir_paths:
                    raise UnsafePathError(f"refusing to write {show(rel)}: {show(nd.rel)} on the replica is "
                                          f"not a directory (a symlink?) and the manifest does not replace it")
                self.trash(nd.rel)

    def make_dirs(self, rels: List[bytes]) -> None:
        """Make new directories ``rels`` (parents first): one barrier for all their records."""
        for rel in rels:
            if parent(rel) not in self.created:
                self.dirmeta(parent(rel))
            if not self.fresh:
                self.log.add({"op": "mkdir", "path": enc(rel)})
            self.created.add(rel)
        if not self.fresh:
            self.log.barrier()
        for rel in rels:
            pfd = self.ensure_parent(rel)
            os.mkdir(basename(rel), 0o700, dir_fd=pfd)
            self.dirs.dirty.add(parent(rel))

    def keep_dir_times(self) -> None:
        """A directory whose entries changed here (files replaced by rename) while the source's
        directory did not change keeps its old times."""
        for d, (at, mt) in self._dir_times.items():
            if d and d not in self.dir_paths:
                try:
                    os.utime(self.dirs.get(d), ns=(at, mt))
                except (FileNotFoundError, ManifestError):
                    pass

    def sync(self) -> None:
        """Everything written is on disk: the changed directories, then the whole filesystem."""
        self.dirs.fsync_dirty()
        syncfs(self.root_fd)

    # -- installing staged objects -------------------------------------------
    def install(self, tmp: bytes, rel: bytes) -> None:
        """Queue staged ``tmp`` to be renamed over ``rel``; installs are group-committed."""
        self._installs.append((tmp, rel))
        if len(self._installs) >= INSTALL_BATCH:
            self.flush_installs()

    def flush_installs(self) -> None:
        """Log every queued install (create / replace keeping the old one), one barrier, then rename."""
        plan = self._plan_installs(self._installs)
        self._installs = []
        self.log.barrier()
        for tmp, rel, kept, new in plan:
            pfd = self.dirs.get(parent(rel))
            if kept is not None:
                os.link(basename(rel), kept, src_dir_fd=pfd, dst_dir_fd=self.log.keep_fd, follow_symlinks=False)
            os.rename(tmp, basename(rel), src_dir_fd=self.stage_fd, dst_dir_fd=pfd)
            self.dirs.dirty.add(parent(rel))
            if new:
                self.created.add(rel)

    def _plan_installs(self, installs: Iterable[Tuple[bytes, bytes]]) -> List[_Install]:
        """The undo records of ``installs`` (not yet durable): (tmp, rel, name of the kept old
        object or None, rel is new) each."""
        plan = []
        creates: List[str] = []
        for tmp, rel in installs:
            self.ensure_parent(rel)
            # in a directory this cycle made, only this cycle's own installs can exist
            st = None if (parent(rel) in self.created and rel not in self.created and rel not in self.dropped) \
                else self.dirs.lstat(rel)
            if st is not None and statmod.S_ISDIR(st.st_mode):
                self.trash(rel)
                st = None
            self.dirmeta(parent(rel))
            kept = None
            if st is None:
                creates.append(enc(rel))
            elif not self.was_created(rel):
                kept = self.log.keep_name("r")
                self.log.add({"op": "replace", "path": enc(rel), "kept": KEEP + os.fsdecode(kept)})
            plan.append((tmp, rel, kept, st is None))
        if creates:
            self.log.add({"op": "create", "paths": creates})
        return plan

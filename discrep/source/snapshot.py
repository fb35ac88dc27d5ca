"""Point-in-time snapshot providers: btrfs subvolume, reflink clones, verified copy.

``take(kind, root, cycle, paths, ...)`` captures the state of the source that a
cycle exports.  Snapshots live under ``ROOT/.discrep/snapshots/<cycle>``.

* ``btrfs``  -- ROOT is a btrfs subvolume: one read-only subvolume snapshot of the
  whole tree (atomic, O(1)).
* ``reflink`` -- FICLONE clones of the changed files (XFS reflink=1, btrfs): no data
  copied, point-in-time per file.
* ``copy``   -- a sparse-preserving copy of the changed files, verified: stat before
  and after, retried when the file moved meanwhile.  A streamed first copy may *defer*
  large files instead (``defer_over``): the capturing process opens the file (no symlink
  followed, the inode the scan saw) and the snapshot holds a symlink to that open file
  (``/proc/<pid>/fd/<n>``, so a path swapped for a symlink meanwhile is never followed);
  the replica reads it while the rest is built, and ``settle_deferred`` checks afterwards
  that it did not change (stat before = stat after, as for a copy); a file that did is
  copied then (verified) and read again, or left for the next cycle.

For ``reflink`` and ``copy`` the snapshot holds only the captured paths (plus
their parent directories); for ``btrfs`` it holds the whole tree.  A file that
keeps changing while it is captured is left out with a warning and looked at
again next cycle (at-least-once).  FIFOs, devices and sockets are skipped with
a warning.

Thread-safety: a provider call runs in the caller's thread.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat as statmod
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple  # noqa: F401

from discrep.core import platform
from discrep.core.errors import SnapshotError, SourceError, UsageError, WarningList
from discrep.core.paths import STATE_DIR, basename, join, parent, show
from discrep.core.statedir import StateDir
from discrep.core.store import is_disk_full

log = logging.getLogger(__name__)

KINDS = ("auto", "btrfs", "reflink", "copy")
RETRIES = 5


@dataclass
class Snapshot:
    kind: str
    root: bytes                 # directory that holds the captured tree
    full: bool                  # True when every path of the tree is in it
    live_stats: Dict[bytes, os.stat_result] = field(default_factory=dict)
    skipped: Set[bytes] = field(default_factory=set)  # touched paths not captured (retry next cycle)
    inline: Set[bytes] = field(default_factory=set)   # small files captured later, straight into packs
    # read live, verified after: (stat before, an fd of that very inode, which the snapshot's symlink names)
    deferred: Dict[bytes, Tuple[os.stat_result, int]] = field(default_factory=dict)

    def locate(self, rel: bytes) -> bytes:
        return join(self.root, rel)


def snapshots_dir(root: bytes) -> bytes:
    return join(root, STATE_DIR + b"/snapshots")


def choose(kind: str, root: bytes) -> str:
    """Resolve ``auto`` by probing the real filesystem; validate explicit choices."""
    if kind not in KINDS:
        raise UsageError(f"unknown snapshot provider {kind!r}; choose one of {', '.join(KINDS)}")
    caps = platform.probe(os.fsdecode(join(root, STATE_DIR)))
    if kind == "auto":
        if caps.btrfs_subvolume and platform.is_btrfs_subvolume(os.fsdecode(root)):
            return "btrfs"
        return "reflink" if caps.reflink else "copy"
    if kind == "btrfs" and not platform.is_btrfs_subvolume(os.fsdecode(root)):
        raise UsageError(f"--snapshot btrfs needs {os.fsdecode(root)} to be a btrfs subvolume",
                         hint="use --snapshot auto, or create the tree with 'btrfs subvolume create'")
    if kind == "reflink" and not caps.reflink:
        raise UsageError(f"--snapshot reflink: {caps.fs_type} at {os.fsdecode(root)} cannot clone files",
                         hint="use --snapshot auto (falls back to a verified copy)")
    return kind


def take(kind: str, root: bytes, cycle: int, paths: Iterable[bytes], warnings: WarningList,
         inline_max: int = 0, stats: Optional[Dict[bytes, os.stat_result]] = None,
         defer_over: Optional[int] = None) -> Snapshot:
    """Capture ``paths`` of ``root`` as snapshot ``cycle`` (a list is taken as already sorted,
    parents before children; any other iterable is sorted here).

    With ``inline_max``, regular single-link files up to that size are not copied: they are
    captured when the manifest is written, straight into a pack, with the same stat-before-
    and-after check (``read_verified``): the pack is their point-in-time copy.

    With ``defer_over`` (``copy`` only), regular single-link, non-sparse files larger than that
    are not copied: the snapshot holds a symlink to the live file and ``deferred`` its stat
    (the "before"); whoever reads them must call ``settle_deferred`` after reading.
    """
    plist = paths if isinstance(paths, list) else sorted(set(paths), key=lambda p: p.split(b"/"))
    if kind == "btrfs":
        dst = _fresh_dir(root, cycle, kind)
        snap = Snapshot("btrfs", dst, True)
        for p in plist:  # live stats before the snapshot: what the catalog records
            try:
                snap.live_stats[p] = os.lstat(join(root, p))
            except FileNotFoundError:
                pass
        try:
            platform.btrfs_snapshot(os.fsdecode(root), os.fsdecode(dst), readonly=True)
        except Exception as e:
            raise SnapshotError(f"btrfs snapshot of {os.fsdecode(root)} failed: {e}") from e
        return snap
    stats = stats or {}
    snap, cap = start(kind, root, cycle, warnings, inline_max, defer_over)
    try:
        for rel in plist:
            cap.add(rel, stats.get(rel))
        cap.finish()
    finally:
        cap.live.close()
    return snap


def _fresh_dir(root: bytes, cycle: int, kind: str) -> bytes:
    """Path of snapshot ``cycle``, with whatever an earlier attempt left there released."""
    with StateDir(root, error=SourceError) as sd:     # checked: ours, private, not a symlink
        sdir = os.fsencode(sd.path) + b"/snapshots"
        os.makedirs(sdir, 0o700, exist_ok=True)
        old = join(sdir, str(cycle).encode())
        if os.path.lexists(old):                     # removed through the checked directory's fd
            release(kind, old)
    return join(snapshots_dir(root), str(cycle).encode())


class LivePaths:
    """Names of live entries below ROOT that no path-based call can follow a symlink through:
    ``/proc/self/fd/<parent fd>/<name>``, the parent directory opened one component at a time with
    ``O_NOFOLLOW`` (fds of recent parents are kept, in manifest order one open per new directory).
    A directory swapped for a symlink (or a file) after the cycle's changes were read is never
    entered: ``path`` raises ``OSError`` (ELOOP, ENOTDIR, ENOENT), which callers treat as a path
    that vanished during the cycle.  ``close()`` closes the fds."""

    KEEP = 64

    def __init__(self, root: bytes):
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fds: Dict[bytes, int] = {}        # (insertion order: oldest first)
        self.last, self.last_fd = b"", self.root_fd

    def _dir_fd(self, d: bytes) -> int:
        if not d:
            return self.root_fd
        fd = self.fds.pop(d, None)
        if fd is None:
            pfd = self._dir_fd(parent(d))
            fd = os.open(basename(d), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        self.fds[d] = fd                        # most recent last
        while len(self.fds) > self.KEEP:
            old = next(iter(self.fds))
            os.close(self.fds.pop(old))
            if old == self.last:
                self.last, self.last_fd = b"", self.root_fd
        return fd

    def at(self, rel: bytes) -> Tuple[int, bytes]:
        """(fd of the parent directory, name): for ``os.open(name, ..., dir_fd=fd)``."""
        d, _sep, name = rel.rpartition(b"/")
        if d != self.last:                      # (in manifest order, mostly the same directory)
            self.last_fd, self.last = self._dir_fd(d), d
        return self.last_fd, name

    def path(self, rel: bytes) -> bytes:
        return b"/proc/self/fd/%d/%s" % self.at(rel)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.last = b""
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


VANISHED = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)    # a LivePaths path that is not there (any more)


class Capturer:
    """Captures paths into a ``reflink`` / ``copy`` snapshot one at a time, in manifest order
    (parents before children); ``finish()`` then sets the directories' metadata.  ``take`` runs
    it over a list; a streamed first copy feeds it from its walk (``start``)."""

    def __init__(self, root: bytes, snap: Snapshot, warnings: WarningList, *, reflink: bool, inline_max: int,
                 defer_over: Optional[int] = None):
        self.root, self.snap, self.warnings = root, snap, warnings
        self.reflink, self.inline_max, self.defer_over = reflink, inline_max, defer_over
        self.defer_max = _fd_budget() if defer_over is not None else 0
        self.linked: Dict[Tuple[int, int], bytes] = {}
        self.dirs: List[Tuple[bytes, os.stat_result]] = []
        self.made: Set[bytes] = {b""}
        self.live = LivePaths(root)

    def add(self, rel: bytes, st: Optional[os.stat_result] = None) -> None:
        """Capture ``rel`` (``st``: its lstat taken earlier, the "before"), or note why not."""
        snap, warnings = self.snap, self.warnings
        if st is not None and st.st_size <= self.inline_max and st.st_nlink == 1 and statmod.S_ISREG(st.st_mode):
            snap.inline.add(rel)   # verified when it is read into its pack (the common case, first)
            return
        dst = snap.locate(rel)
        try:
            src = self.live.path(rel)     # never through a symlink, whatever was swapped in meanwhile
            if st is None:
                st = os.lstat(src)
        except OSError as e:
            if e.errno in VANISHED:
                return  # deleted (or vanished during the cycle): the manifest writer sees it so
            warnings.add(show(rel), f"cannot stat: {e.strerror}")
            snap.skipped.add(rel)
            return
        if statmod.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= self.inline_max:
            snap.inline.add(rel)   # verified when it is read into its pack
            return
        if parent(rel) not in self.made:
            _ensure_parent(snap, rel)
            self.made.add(parent(rel))
        mode = st.st_mode
        try:
            if statmod.S_ISDIR(mode):
                if not os.path.isdir(dst):
                    os.mkdir(dst, 0o700)
                self.made.add(rel)
                self.dirs.append((rel, st))
                snap.live_stats[rel] = st
            elif statmod.S_ISLNK(mode):
                target = os.readlink(src)
                os.symlink(target, dst)
                st2 = os.lstat(src)
                platform.copy_metadata(src, dst, st2)
                snap.live_stats[rel] = st
            elif statmod.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in self.linked:
                    os.link(self.linked[key], dst)
                    snap.live_stats[rel] = st
                    return
                if self.defer_over is not None and st.st_nlink == 1 and st.st_size > self.defer_over \
                        and st.st_blocks * 512 >= st.st_size and len(snap.deferred) < self.defer_max:
                    fd = _open_same(src, st)
                    if fd is not None:    # read live; settle_deferred verifies it afterwards
                        try:
                            os.symlink(b"/proc/%d/fd/%d" % (os.getpid(), fd), dst)
                        except BaseException:
                            os.close(fd)
                            raise
                        snap.deferred[rel] = (st, fd)
                        snap.live_stats[rel] = st
                        return
                got = _capture_file(src, dst, rel, warnings)
                if got is None:
                    snap.skipped.add(rel)
                    return
                snap.live_stats[rel] = got
                if st.st_nlink > 1:
                    self.linked[key] = dst
            else:
                warnings.add(show(rel), "skipped: FIFOs, sockets and device files are not replicated")
                snap.skipped.add(rel)
        except FileNotFoundError:
            return  # vanished while captured: a delete, seen as such
        except OSError as e:
            if is_disk_full(e):
                raise          # the whole cycle cannot be captured (cycles.disk_full_said says so)
            warnings.add(show(rel), f"not captured: {e.strerror or e}")
            snap.skipped.add(rel)

    def finish(self) -> None:
        try:
            for rel, _st in reversed(self.dirs):  # children done: now directory metadata (mtime) sticks
                try:
                    platform.copy_metadata(self.live.path(rel), self.snap.locate(rel))
                except OSError as e:
                    if e.errno not in VANISHED:
                        raise
        finally:
            self.live.close()


def start(kind: str, root: bytes, cycle: int, warnings: WarningList, inline_max: int = 0,
          defer_over: Optional[int] = None) -> Tuple[Snapshot, Capturer]:
    """An empty ``reflink`` / ``copy`` snapshot and the Capturer that fills it path by path."""
    if kind not in ("reflink", "copy"):
        raise UsageError(f"a {kind} snapshot is not taken path by path")
    dst = _fresh_dir(root, cycle, kind)
    os.mkdir(dst, 0o700)
    snap = Snapshot(kind, dst, False)
    return snap, Capturer(root, snap, warnings, reflink=(kind == "reflink"), inline_max=inline_max,
                          defer_over=defer_over if kind == "copy" else None)


def _ensure_parent(snap: Snapshot, rel: bytes) -> None:
    par = parent(rel)
    if par and not os.path.isdir(snap.locate(par)):
        os.makedirs(snap.locate(par), 0o700, exist_ok=True)


def _capture_file(src: bytes, dst: bytes, rel: bytes, warnings: WarningList) -> Optional[os.stat_result]:
    """Clone/copy one regular file; verify it did not change meanwhile.  Returns the stat before."""
    for attempt in range(RETRIES):
        st1 = os.lstat(src)
        if not statmod.S_ISREG(st1.st_mode):
            raise FileNotFoundError(src)
        if os.path.lexists(dst):
            os.unlink(dst)
        platform.clone_file(os.fsdecode(src), os.fsdecode(dst))
        platform.copy_metadata(src, dst, st1)
        st2 = os.lstat(src)
        if (st1.st_ino, st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) == \
                (st2.st_ino, st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns):
            return st1
        log.debug("%s changed while captured (attempt %d)", show(rel), attempt + 1)
    warnings.add(show(rel), f"kept changing while it was copied ({RETRIES} tries); "
                            "left for the next cycle")
    if os.path.lexists(dst):
        os.unlink(dst)
    return None


def read_verified(path: bytes, rel: bytes, warnings: WarningList, max_size: int,
                  before: Optional[os.stat_result] = None, dir_fd: Optional[int] = None
                  ) -> Optional[Tuple[bytes, os.stat_result, Dict[str, bytes]]]:
    """Read a small live file as one point-in-time copy: (bytes, stat, xattrs), verified by
    stat before and after (inode, size, mtime, ctime); retried; None (with a warning) if it keeps
    changing, FileNotFoundError if it is gone or no longer a small regular file.

    ``before``: an lstat of ``path`` taken earlier (the scan's), used as the first try's "before"
    (one fstat less per file); the inode is then compared too, so a file replaced since counts
    as a change and is read again.  ``dir_fd``: ``path`` is a name in that directory."""
    for attempt in range(RETRIES):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st1 = before if attempt == 0 and before is not None else os.fstat(fd)
            if not statmod.S_ISREG(st1.st_mode) or st1.st_size > max_size:
                raise FileNotFoundError(path)
            data = os.pread(fd, st1.st_size + 1, 0)
            xattrs = {}
            try:
                for n in os.listxattr(fd):
                    xattrs[n] = os.getxattr(fd, n)
            except OSError:
                pass
            st2 = os.fstat(fd)
        finally:
            os.close(fd)
        if len(data) == st1.st_size and (st1.st_ino, st1.st_dev, st1.st_size, st1.st_mtime_ns, st1.st_ctime_ns) \
                == (st2.st_ino, st2.st_dev, st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns):
            return data, st2, xattrs
    warnings.add(show(rel), f"kept changing while it was read ({RETRIES} tries); left for the next cycle")
    return None


def _fd_budget() -> int:
    """How many deferred files may be held open (the soft fd limit raised toward the hard one,
    less a reserve); beyond that, files are copied as usual."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(0, min(soft, 1 << 16) - 256)


def _open_same(path: bytes, st: os.stat_result) -> Optional[int]:
    """An fd of ``path`` if it still is the regular file ``st`` describes (no symlink followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    st2 = os.fstat(fd)
    if not statmod.S_ISREG(st2.st_mode) or (st2.st_ino, st2.st_dev) != (st.st_ino, st.st_dev):
        os.close(fd)
        return None
    return fd


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """No write, truncate, chmod, xattr change or replacement between two stats of one path."""
    return (a.st_ino, a.st_dev, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == \
        (b.st_ino, b.st_dev, b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def settle_deferred(live: bytes, before: os.stat_result, fd: int, copy_to: bytes, rel: bytes,
                    warnings: WarningList) -> Tuple[str, Optional[os.stat_result]]:
    """After a deferred file was read through its fd: ``("same", None)`` if that inode did not
    change since ``before``; else a verified copy of the live path now goes to ``copy_to`` and the
    result is ``("copied", stat)``; ``("gone", None)`` if it is no longer a regular file or keeps
    changing (with a warning: left for the next cycle).  Closes ``fd``."""
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if same_file(before, st):
        return "same", None
    log.info("%s changed while it was read; copying it", show(rel))
    return _copy_now(live, copy_to, rel, warnings)


def materialize_deferred(live: bytes, before: os.stat_result, fd: int, copy_to: bytes, snap_path: bytes,
                         rel: bytes, warnings: WarningList) -> Tuple[str, Optional[os.stat_result]]:
    """``settle_deferred`` for a deferred file whose snapshot symlink must become a real file (the
    export is about to serve the snapshot): the file is copied now (verified) and put in place of the
    symlink; the result says whether it still is the file ``before`` described.  Closes ``fd``."""
    os.close(fd)
    how, st = _copy_now(live, copy_to, rel, warnings)
    os.unlink(snap_path)
    if how == "gone":
        return how, st
    os.link(copy_to, snap_path)
    if same_file(before, st):
        os.unlink(copy_to)
        return "same", None
    return how, st


def _copy_now(live: bytes, copy_to: bytes, rel: bytes, warnings: WarningList
              ) -> Tuple[str, Optional[os.stat_result]]:
    try:
        got = _capture_file(live, copy_to, rel, warnings)
    except FileNotFoundError:
        return "gone", None
    except OSError as e:
        warnings.add(show(rel), f"cannot be read: {e.strerror or e}; left for the next cycle")
        return "gone", None
    return ("copied", got) if got is not None else ("gone", None)


def release(kind: str, path: bytes) -> None:
    """Remove a snapshot (btrfs subvolume or captured directory)."""
    if not os.path.lexists(path):
        return
    try:
        if kind == "btrfs" or platform.is_btrfs_subvolume(os.fsdecode(path)):
            platform.btrfs_delete_subvolume(os.fsdecode(path))
        else:
            shutil.rmtree(path)
    except Exception as e:
        raise SnapshotError(f"cannot release snapshot {os.fsdecode(path)}: {e}") from e

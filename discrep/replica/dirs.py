"""Directory fds below DEST, opened without following symlinks; new files in them; ``syncfs``.

``DirFds`` opens each directory below a root fd one component at a time through
``core.paths.open_dir_nofollow`` (``O_NOFOLLOW``: a symlink placed inside DEST is never
followed) and caches the fds, so every write of the replica goes through a directory fd
whose path it checked.  With ``create`` it makes missing directories, calling
``on_mkdir(rel)`` first (the undo record of the mkdir is written ahead of it).  A
non-directory in the way raises ``NotADir`` (the caller may replace it) when creating,
``ManifestError`` otherwise.  ``dirty`` collects directories whose entries changed, for one
fsync each before the commit.  ``create_file`` makes a new file in such a directory and
removes it again if filling it fails.

Used by the applying cycle (``replica.dest``), the second applying process
(``replica.worker``) and the history (``syncfs`` after a rollback, ``reserve`` for its records, ``DirFds`` for undo).

Thread-safety: a ``DirFds`` belongs to one thread; it owns the fds it caches (``clear``
closes them), never the root fd.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Callable, Dict, Optional, Set, TypeVar

from discrep.core.errors import ManifestError, UnsafePathError
from discrep.core.paths import basename, open_dir_nofollow, parent, show
from discrep.core.platform import load_libc

MAX_CACHED = 512        # directory fds kept open at once
O_FILE = os.O_NOFOLLOW | os.O_CLOEXEC
T = TypeVar("T")

_libc = load_libc()


def syncfs(fd: int) -> None:
    """Commit the whole filesystem holding ``fd`` to disk (one call instead of an fsync a file)."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate ``[offset, offset+length)`` of ``fd`` now, the file size unchanged (KEEP_SIZE: an
    O_APPEND writer still appends at the end), so a full disk shows here, before a change that
    depends on the write; a filesystem that cannot preallocate is left to the write itself."""
    if length <= 0:
        return
    if _libc.fallocate(fd, 1, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:   # FALLOC_FL_KEEP_SIZE
        e = ctypes.get_errno()
        if e not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(e, os.strerror(e))


def create_file(dir_fd: int, name: bytes, mode: int, body: Callable[[int], T]) -> T:
    """Create new file ``name`` in ``dir_fd`` (never an existing one, never through a symlink)
    with ``mode`` and run ``body(fd)`` on it; the file is removed again when that fails."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_FILE, mode, dir_fd=dir_fd)
    try:
        out = body(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)
    return out


class NotADir(Exception):
    """``rel`` on the replica is not a directory (a symlink or a file) where one was to be made."""

    def __init__(self, rel: bytes):
        super().__init__(rel)
        self.rel = rel


class DirFds:
    """Directory fds below ``root_fd``, opened without following symlinks, cached (see module doc).

    ``shared``: a second process makes directories in the same tree (an existing one is fine)."""

    def __init__(self, root_fd: int, *, shared: bool = False,
                 on_mkdir: Optional[Callable[[bytes], None]] = None):
        self.root_fd = root_fd
        self.shared = shared
        self.on_mkdir = on_mkdir
        self.dirty: Set[bytes] = set()
        self._cache: Dict[bytes, int] = {}

    def get(self, rel: bytes, create: bool = False) -> int:
        """fd of directory ``rel`` (``b""``: the root); ``create`` makes missing ones."""
        fd = self._cache.get(rel)
        if fd is None:
            fd = self._open(rel, create) if rel else open_dir_nofollow(self.root_fd, b"")
            if len(self._cache) > MAX_CACHED:
                self.clear()
            self._cache[rel] = fd
        return fd

    def _open(self, rel: bytes, create: bool) -> int:
        pfd = self.get(parent(rel), create)
        name = basename(rel)
        try:
            return open_dir_nofollow(pfd, name)
        except FileNotFoundError:
            if not create:
                raise
            self._mkdir(pfd, rel)
            return open_dir_nofollow(pfd, name)
        except UnsafePathError:
            if not create:
                raise ManifestError(f"{show(rel)} is not a directory on the replica") from None
            raise NotADir(rel) from None

    def _mkdir(self, pfd: int, rel: bytes) -> None:
        if self.on_mkdir is not None:
            self.on_mkdir(rel)
        try:
            os.mkdir(basename(rel), 0o700, dir_fd=pfd)
        except FileExistsError:
            if not self.shared:
                raise
        self.dirty.add(parent(rel))

    def lstat(self, rel: bytes) -> Optional[os.stat_result]:
        """lstat of ``rel`` through the cached directory fds (no symlink followed); None if absent."""
        try:
            return os.stat(basename(rel), dir_fd=self.get(parent(rel)), follow_symlinks=False)
        except (FileNotFoundError, ManifestError):
            return None

    def clear(self) -> None:
        """Close every cached fd (after a rename, a cached path may name another directory)."""
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()

    def fsync_dirty(self) -> None:
        for rel in sorted(self.dirty):
            try:
                os.fsync(self.get(rel))
            except (FileNotFoundError, ManifestError):
                pass

"""Snapshot sources: the ``SnapshotSource`` protocol and ``DirectorySource`` over a real tree.

Role: a source answers lstat/listdir/readlink/pread/xattr/statfs for BYTES paths
relative to the export root (``b""`` is the root, ``b"a/b"`` a nested path).  The
view model (``model.py``) consumes any object with these methods; ``discrep``'s
snapshot objects satisfy the protocol structurally.

``DirectorySource`` never follows symlinks, not even in intermediate
components: every path is resolved component by component with
``openat(O_DIRECTORY|O_NOFOLLOW)`` starting at a root fd, and the resulting
directory fds (and O_RDONLY|O_NOFOLLOW file fds for ``pread``) are kept in a
small LRU cache.  The tree is assumed immutable (a snapshot), so cached fds
never go stale in a way that matters.

Threading: all methods may be called concurrently from FUSE worker threads.
The fd cache is guarded by one lock and reference-counts borrowed fds, so an fd
evicted while another thread is using it is closed only when that thread
returns it.  ``close()`` must be called when no request is in flight.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Set, Tuple, Union, runtime_checkable

from .errors import ExportError, IsADirectory, NotADirectory, NotFound, from_oserror

__all__ = ["SnapshotSource", "DirectorySource", "split_path"]

log = logging.getLogger(__name__)

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NOATIME", 0)


@runtime_checkable
class SnapshotSource(Protocol):
    """What the view needs from a snapshot.  Paths are bytes relative to the root.

    Methods may raise ``OSError`` or ``ExportError``; the view converts OSError.
    """

    def lstat(self, path: bytes) -> os.stat_result: ...

    def listdir(self, path: bytes) -> List[bytes]: ...

    def readlink(self, path: bytes) -> bytes: ...

    def pread(self, path: bytes, size: int, offset: int) -> bytes: ...

    def listxattr(self, path: bytes) -> List[bytes]: ...

    def getxattr(self, path: bytes, name: bytes) -> bytes: ...

    def statfs(self) -> os.statvfs_result: ...


def split_path(path: bytes) -> List[bytes]:
    """Components of a relative bytes path; ``b""`` -> ``[]``.

    Rejects (NotFound) empty components, ``.``/``..``, NUL and a leading ``/``:
    such a path can never name anything inside the export.
    """
    if not path:
        return []
    parts = path.split(b"/")
    for part in parts:
        if not part or part == b"." or part == b".." or b"\0" in part:
            raise NotFound(f"invalid export path {path!r}")
    return parts


class _FdCache:
    """LRU of open fds keyed by (kind, path), with borrow/return reference counts."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._lock = threading.Lock()
        # key -> [fd, refcount]
        self._entries: "OrderedDict[Tuple[str, bytes], List[int]]" = OrderedDict()
        # fds evicted while borrowed: fd -> refcount
        self._orphans: Dict[int, int] = {}
        self._closed = False

    def acquire(self, key: Tuple[str, bytes], opener: Callable[[], int]) -> int:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                self._entries.move_to_end(key)
                return entry[0]
        fd = opener()  # outside the lock: may block on slow storage
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None or self._closed:
                # another thread raced us (or we are closing): use/keep theirs
                if entry is None:
                    self._orphans[fd] = 1
                    return fd
                os.close(fd)
                entry[1] += 1
                self._entries.move_to_end(key)
                return entry[0]
            self._entries[key] = [fd, 1]
            self._evict_locked()
            return fd

    def release(self, key: Tuple[str, bytes], fd: int) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == fd:
                entry[1] -= 1
                return
            count = self._orphans.get(fd)
            if count is None:
                return
            if count <= 1:
                del self._orphans[fd]
                _close_quietly(fd)
            else:
                self._orphans[fd] = count - 1

    def _evict_locked(self) -> None:
        while len(self._entries) > self.capacity:
            key, (fd, refs) = next(iter(self._entries.items()))
            del self._entries[key]
            if refs > 0:
                self._orphans[fd] = refs
            else:
                _close_quietly(fd)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd, _refs in self._entries.values():
                _close_quietly(fd)
            self._entries.clear()
            for fd in self._orphans:
                _close_quietly(fd)
            self._orphans.clear()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # pragma: no cover - nothing useful to do
        log.debug("closing cached fd %d failed", fd, exc_info=True)


class DirectorySource:
    """A ``SnapshotSource`` over a real directory (e.g. a btrfs snapshot), no symlink following.

    ``exclude_top``: names directly under the root that are hidden (the source's
    own state dir ``ROOT/.discrep`` must not show through the export).
    ``max_fds``: capacity of the LRU of cached directory and file fds.
    """

    def __init__(
        self,
        root: Union[bytes, str, "os.PathLike[str]"],
        exclude_top: Optional[Set[bytes]] = None,
        *,
        max_fds: int = 256,
    ) -> None:
        self.root: bytes = os.fsencode(root)
        self.exclude_top: frozenset = frozenset({b".discrep"} if exclude_top is None else exclude_top)
        self._root_fd = os.open(self.root, _DIR_FLAGS)
        self._cache = _FdCache(max_fds)

    # -- lifecycle ------------------------------------------------------
    def close(self) -> None:
        """Close the cached fds and the root fd.  No request may be in flight."""
        self._cache.close()
        if self._root_fd >= 0:
            _close_quietly(self._root_fd)
            self._root_fd = -1

    def __enter__(self) -> "DirectorySource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- path resolution -----------------------------------------------
    def _parts(self, path: bytes) -> List[bytes]:
        parts = split_path(path)
        if parts and parts[0] in self.exclude_top:
            raise NotFound(f"{path!r} is excluded from the export")
        return parts

    @contextmanager
    def _dir_fd(self, parts: List[bytes]) -> Iterator[int]:
        """Borrow an fd of the directory named by ``parts`` (resolved without following symlinks)."""
        if not parts:
            yield self._root_fd
            return
        key = ("d", b"/".join(parts))
        fd = self._cache.acquire(key, lambda: self._open_dir(parts))
        try:
            yield fd
        finally:
            self._cache.release(key, fd)

    def _open_dir(self, parts: List[bytes]) -> int:
        with self._dir_fd(parts[:-1]) as parent:
            try:
                return os.open(parts[-1], _DIR_FLAGS, dir_fd=parent)
            except OSError as e:
                # ELOOP: the component is a symlink -> for us it is not a directory
                if e.errno == errno.ELOOP:
                    raise NotADirectory(f"{b'/'.join(parts)!r} is a symlink") from e
                raise from_oserror(e, b"/".join(parts)) from e

    @contextmanager
    def _parent(self, path: bytes) -> Iterator[Tuple[int, bytes]]:
        """Borrow (parent dir fd, final name) for a non-root path."""
        parts = self._parts(path)
        if not parts:
            raise ExportError("the root has no parent", errno=errno.EINVAL)
        with self._dir_fd(parts[:-1]) as fd:
            yield fd, parts[-1]

    # -- SnapshotSource -------------------------------------------------
    def lstat(self, path: bytes) -> os.stat_result:
        parts = self._parts(path)
        try:
            if not parts:
                return os.fstat(self._root_fd)
            with self._parent(path) as (fd, name):
                return os.lstat(name, dir_fd=fd)
        except OSError as e:
            raise from_oserror(e, path) from e

    def listdir(self, path: bytes) -> List[bytes]:
        parts = self._parts(path)
        try:
            # a fresh fd: os.listdir(fd) rewinds a dup sharing the offset, so a
            # cached fd listed by two threads at once would interleave.
            if not parts:
                fd = os.open(b".", _DIR_FLAGS, dir_fd=self._root_fd)
            else:
                with self._parent(path) as (pfd, name):
                    try:
                        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                    except OSError as e:
                        if e.errno == errno.ELOOP:
                            raise NotADirectory(f"{path!r} is a symlink") from e
                        raise
            try:
                # os.listdir(fd) returns str (fs encoding + surrogateescape): fsencode is exact
                names = [os.fsencode(n) for n in os.listdir(fd)]
            finally:
                os.close(fd)
        except OSError as e:
            raise from_oserror(e, path) from e
        if not parts and self.exclude_top:
            names = [n for n in names if n not in self.exclude_top]
        return names

    def readlink(self, path: bytes) -> bytes:
        try:
            with self._parent(path) as (fd, name):
                return os.readlink(name, dir_fd=fd)
        except OSError as e:
            raise from_oserror(e, path) from e

    def _open_file(self, path: bytes) -> int:
        with self._parent(path) as (pfd, name):
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=pfd)
            except OSError as e:
                if e.errno == errno.EPERM and _FILE_FLAGS & getattr(os, "O_NOATIME", 0):
                    # O_NOATIME needs ownership (or CAP_FOWNER): retry without it
                    fd = os.open(name, _FILE_FLAGS & ~os.O_NOATIME, dir_fd=pfd)
                else:
                    raise
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if (st.st_mode & 0o170000) == 0o040000:
            os.close(fd)
            raise IsADirectory(f"{path!r} is a directory")
        return fd

    @contextmanager
    def _file_fd(self, path: bytes) -> Iterator[int]:
        key = ("f", path)

        def opener() -> int:
            try:
                return self._open_file(path)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ExportError(f"{path!r} is a symlink", errno=errno.ELOOP) from e
                raise from_oserror(e, path) from e

        fd = self._cache.acquire(key, opener)
        try:
            yield fd
        finally:
            self._cache.release(key, fd)

    def pread(self, path: bytes, size: int, offset: int) -> bytes:
        try:
            with self._file_fd(path) as fd:
                return os.pread(fd, size, offset)
        except OSError as e:
            raise from_oserror(e, path) from e

    def preadinto(self, path: bytes, buf: memoryview, offset: int) -> int:
        """Read into ``buf`` (its full length at most) at ``offset``; bytes read (0 at EOF)."""
        try:
            with self._file_fd(path) as fd:
                total = 0
                want = len(buf)
                while total < want:
                    n = os.preadv(fd, [buf[total:]], offset + total)
                    if n == 0:
                        break
                    total += n
                return total
        except OSError as e:
            raise from_oserror(e, path) from e

    def listxattr(self, path: bytes) -> List[bytes]:
        try:
            if not self._parts(path):
                return [os.fsencode(n) for n in os.listxattr(self._root_fd)]
            with self._parent(path) as (fd, name):
                # /proc/self/fd/N/name: the magic link N is followed, ``name`` is not
                return [os.fsencode(n) for n in os.listxattr(b"/proc/self/fd/%d/%s" % (fd, name), follow_symlinks=False)]
        except OSError as e:
            raise from_oserror(e, path) from e

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        try:
            if not self._parts(path):
                return os.getxattr(self._root_fd, name)
            with self._parent(path) as (fd, base):
                return os.getxattr(b"/proc/self/fd/%d/%s" % (fd, base), name, follow_symlinks=False)
        except OSError as e:
            if e.errno == getattr(errno, "ENOATTR", errno.ENODATA):
                e.errno = errno.ENODATA
            raise from_oserror(e, path) from e

    def statfs(self) -> os.statvfs_result:
        try:
            return os.statvfs(self._root_fd)
        except OSError as e:
            raise from_oserror(e, b"") from e

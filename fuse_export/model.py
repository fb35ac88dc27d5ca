"""The export view model: snapshot tree + virtual ``.discrep/`` control tree, without FUSE.

Role: ``ExportView`` answers the filesystem questions of a read-only export
(getattr, readdir, readlink, open/read/release, xattrs, statfs, access) for
BYTES paths relative to the export root (``b""`` is the root).  It merges a
``SnapshotSource`` with an optional ``ControlTree`` mounted at
``control_name`` directly under the root, refuses every kind of write with
``ReadOnly`` and raises only ``ExportError`` subclasses (an ``OSError`` from the
source is converted, errno kept).  The FUSE adapter (``adapter.py``) is a thin
layer over this class; everything here is testable without FUSE.

This module also re-exports the domain errors, the source protocol with
``DirectorySource`` and the control tree types, so ``fuse_export.model`` is the
one import for users of the view.

Stat dictionaries use the keys of ``os.stat_result``; ``st_atime``,
``st_mtime`` and ``st_ctime`` are INTEGER NANOSECONDS (what mfusepy expects with
``use_ns = True``).  ``st_ino`` is stable per path (a hash of the path; the
root is 1), so it does not depend on the source's inode numbers.

Threading: all public methods may be called concurrently (FUSE worker
threads).  The open-handle table is guarded by a lock; the source and the
control tree must be thread-safe themselves (``DirectorySource`` and
``DictControlTree`` are).
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from .control import DIR, BytesFile, ControlFile, ControlTree, DictControlTree, LazyFile
from .errors import (
    AccessDenied,
    ExportError,
    InvalidArgument,
    IsADirectory,
    NoAttribute,
    NotADirectory,
    NotFound,
    ReadOnly,
    from_oserror,
)
from .source import DirectorySource, SnapshotSource, split_path

__all__ = [
    "ExportView",
    "ExportError",
    "NotFound",
    "NotADirectory",
    "IsADirectory",
    "ReadOnly",
    "AccessDenied",
    "NoAttribute",
    "InvalidArgument",
    "from_oserror",
    "SnapshotSource",
    "DirectorySource",
    "ControlFile",
    "BytesFile",
    "LazyFile",
    "ControlTree",
    "DictControlTree",
    "DIR",
    "stable_ino",
]

log = logging.getLogger(__name__)

#: open(2) flags that would modify something
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_TMPFILE", 0)
_STAT_KEYS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev", "st_blocks", "st_blksize")


def stable_ino(path: bytes) -> int:
    """An inode number derived from the path alone: 1 for the root, else a 63-bit hash >= 2."""
    if not path:
        return 1
    h = int.from_bytes(hashlib.blake2b(path, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return h if h >= 2 else h + 2


@dataclass
class _Handle:
    path: bytes
    control: Optional[ControlFile]  # None: a file of the source


class ExportView:
    """Read-only merged view of ``source`` plus ``control`` at ``control_name`` (see module doc)."""

    def __init__(
        self,
        source: SnapshotSource,
        control: Optional[ControlTree] = None,
        control_name: bytes = b".discrep",
    ) -> None:
        if not control_name or b"/" in control_name or control_name in (b".", b".."):
            raise ValueError(f"invalid control_name {control_name!r}")
        self.source = source
        self.control = control
        self.control_name = control_name
        self.created_ns = time.time_ns()
        self._handles: Dict[int, _Handle] = {}
        self._handles_lock = threading.Lock()
        self._next_fh = itertools.count(1)
        self._readinto = getattr(source, "preadinto", None)

    # -- helpers ----------------------------------------------------------
    def _control_rel(self, path: bytes) -> Optional[bytes]:
        """``rel`` inside the control tree if ``path`` is under it, else None."""
        if self.control is None:
            return None
        name = self.control_name
        if path == name:
            return b""
        if path.startswith(name) and path[len(name):len(name) + 1] == b"/":
            return path[len(name) + 1:]
        return None

    def _control_node(self, path: bytes, rel: bytes) -> Union[ControlFile, object]:
        assert self.control is not None
        if rel:
            split_path(rel)  # reject b"a//b", b"..", ...
        try:
            node = self.control.lookup(rel)
        except ExportError:
            raise
        except OSError as e:
            raise from_oserror(e, path) from e
        if rel == b"" and node is None:
            return DIR  # the control dir itself always exists
        if node is None:
            raise NotFound(f"no control file {path!r}")
        return node

    def _call_source(self, path: bytes, fn: Any, *args: Any) -> Any:
        split_path(path)  # NotFound for paths that cannot exist
        try:
            return fn(*args)
        except ExportError:
            raise
        except OSError as e:
            raise from_oserror(e, path) from e

    def _control_attrs(self, path: bytes, node: Union[ControlFile, object]) -> Dict[str, int]:
        if node is DIR:
            mode, size, nlink, mtime = stat.S_IFDIR | 0o555, 0, 2, self.created_ns
        else:
            f: ControlFile = node  # type: ignore[assignment]
            size = f.size()
            mode, nlink = stat.S_IFREG | 0o444, 1
            mtime = getattr(f, "mtime_ns", None)
            if mtime is None:
                mtime = self.created_ns
        return {
            "st_mode": mode,
            "st_nlink": nlink,
            "st_uid": 0,
            "st_gid": 0,
            "st_size": size,
            "st_rdev": 0,
            "st_blocks": (size + 511) // 512,
            "st_blksize": 4096,
            "st_atime": mtime,
            "st_mtime": mtime,
            "st_ctime": mtime,
            "st_ino": stable_ino(path),
        }

    # -- metadata -----------------------------------------------------------
    def getattr(self, path: bytes) -> Dict[str, int]:
        rel = self._control_rel(path)
        if rel is not None:
            return self._control_attrs(path, self._control_node(path, rel))
        st = self._call_source(path, self.source.lstat, path)
        attrs: Dict[str, int] = {k: getattr(st, k, 0) for k in _STAT_KEYS}
        attrs["st_atime"] = st.st_atime_ns
        attrs["st_mtime"] = st.st_mtime_ns
        attrs["st_ctime"] = st.st_ctime_ns
        attrs["st_ino"] = stable_ino(path)
        if path == b"" and not stat.S_ISDIR(st.st_mode):
            raise NotADirectory("the export root is not a directory")
        return attrs

    def readdir(self, path: bytes) -> List[bytes]:
        """Names in the directory (without ``.``/``..``)."""
        rel = self._control_rel(path)
        if rel is not None:
            node = self._control_node(path, rel)
            if node is not DIR:
                raise NotADirectory(f"{path!r} is not a directory")
            assert self.control is not None
            try:
                return list(self.control.listdir(rel))
            except ExportError:
                raise
            except OSError as e:
                raise from_oserror(e, path) from e
        names = list(self._call_source(path, self.source.listdir, path))
        if path == b"" and self.control is not None:
            # the control tree shadows a source entry of the same name
            names = [n for n in names if n != self.control_name]
            names.append(self.control_name)
        return names

    def readlink(self, path: bytes) -> bytes:
        rel = self._control_rel(path)
        if rel is not None:
            self._control_node(path, rel)
            raise InvalidArgument(f"{path!r} is not a symlink")
        if path == b"":
            raise InvalidArgument("the export root is not a symlink")
        return self._call_source(path, self.source.readlink, path)

    def access(self, path: bytes, mode: int) -> None:
        """Existence check; ``W_OK`` is refused with ReadOnly.  Permission bits are the kernel's job."""
        self.getattr(path)
        if mode & os.W_OK:
            raise ReadOnly(f"{path!r}: the export is read-only")

    def statfs(self) -> Dict[str, int]:
        try:
            sv = self.source.statfs()
        except ExportError:
            raise
        except OSError as e:
            raise from_oserror(e, b"") from e
        return {
            "f_bsize": sv.f_bsize,
            "f_frsize": sv.f_frsize,
            "f_blocks": sv.f_blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": sv.f_files,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": sv.f_namemax,
        }

    # -- xattrs -------------------------------------------------------------
    def listxattr(self, path: bytes) -> List[bytes]:
        rel = self._control_rel(path)
        if rel is not None:
            self._control_node(path, rel)
            return []
        return list(self._call_source(path, self.source.listxattr, path))

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        rel = self._control_rel(path)
        if rel is not None:
            self._control_node(path, rel)
            raise NoAttribute(f"{path!r} has no attribute {name!r}")
        return self._call_source(path, self.source.getxattr, path, name)

    # -- file contents ----------------------------------------------------------
    def open(self, path: bytes, flags: int) -> int:
        """A new file handle (> 0) for reading ``path``; write/create/truncate flags -> ReadOnly."""
        if flags & _WRITE_FLAGS:
            raise ReadOnly(f"{path!r}: the export is read-only")
        rel = self._control_rel(path)
        control: Optional[ControlFile] = None
        if rel is not None:
            node = self._control_node(path, rel)
            if node is DIR:
                raise IsADirectory(f"{path!r} is a directory")
            control = node  # type: ignore[assignment]
        else:
            st = self._call_source(path, self.source.lstat, path)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectory(f"{path!r} is a directory")
            if stat.S_ISLNK(st.st_mode):
                raise ExportError(f"{path!r} is a symlink", errno=errno.ELOOP)  # as O_NOFOLLOW would
            if not stat.S_ISREG(st.st_mode):
                raise AccessDenied(f"{path!r} is not a regular file")
        fh = next(self._next_fh)
        with self._handles_lock:
            self._handles[fh] = _Handle(path, control)
        return fh

    def _handle(self, path: bytes, fh: int) -> _Handle:
        with self._handles_lock:
            h = self._handles.get(fh)
        if h is not None:
            return h
        # no (known) handle, e.g. fh 0 from a caller without open(): resolve the path
        rel = self._control_rel(path)
        if rel is not None:
            node = self._control_node(path, rel)
            if node is DIR:
                raise IsADirectory(f"{path!r} is a directory")
            return _Handle(path, node)  # type: ignore[arg-type]
        return _Handle(path, None)

    def read(self, path: bytes, size: int, offset: int, fh: int = 0) -> bytes:
        if size < 0 or offset < 0:
            raise InvalidArgument(f"read of {size} bytes at {offset}")
        h = self._handle(path, fh)
        if h.control is not None:
            return h.control.pread(size, offset)
        return self._call_source(h.path, self.source.pread, h.path, size, offset)

    def readinto(self, path: bytes, buf: memoryview, offset: int, fh: int = 0) -> int:
        """Like ``read`` with ``size = len(buf)``, filling ``buf``; returns the count.

        Uses the source's optional ``preadinto(path, buf, offset)`` (no fresh
        allocation per request), else copies from ``pread``.
        """
        if offset < 0:
            raise InvalidArgument(f"read at {offset}")
        h = self._handle(path, fh)
        if h.control is None and self._readinto is not None:
            return self._call_source(h.path, self._readinto, h.path, buf, offset)
        data = self.read(path, len(buf), offset, fh)
        n = len(data)
        buf[:n] = data
        return n

    def release(self, fh: int) -> None:
        with self._handles_lock:
            self._handles.pop(fh, None)

    @property
    def open_handles(self) -> int:
        with self._handles_lock:
            return len(self._handles)

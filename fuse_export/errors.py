"""Domain errors of the export view, each carrying the errno the FUSE edge returns.

Role: the view model (``model.py``), the snapshot sources (``source.py``) and the
control tree (``control.py``) raise these; only the FUSE adapter turns them into
``-errno`` for libfuse.  ``from_oserror`` converts an ``OSError`` from the
operating system into the matching subclass, keeping its errno.

Threading: the classes are plain immutable exception types; safe everywhere.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import Dict, Optional, Type

__all__ = [
    "ExportError",
    "NotFound",
    "NotADirectory",
    "IsADirectory",
    "ReadOnly",
    "AccessDenied",
    "NoAttribute",
    "InvalidArgument",
    "from_oserror",
]


class ExportError(Exception):
    """Base of all view errors; ``errno`` is what the FUSE request fails with."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", *, errno: Optional[int] = None) -> None:
        if errno is not None:
            self.errno = errno
        super().__init__(message or os.strerror(self.errno))


class NotFound(ExportError):
    errno = _errno.ENOENT


class NotADirectory(ExportError):
    errno = _errno.ENOTDIR


class IsADirectory(ExportError):
    errno = _errno.EISDIR


class ReadOnly(ExportError):
    errno = _errno.EROFS


class AccessDenied(ExportError):
    errno = _errno.EACCES


class NoAttribute(ExportError):
    errno = _errno.ENODATA


class InvalidArgument(ExportError):
    errno = _errno.EINVAL


_BY_ERRNO: Dict[int, Type[ExportError]] = {
    cls.errno: cls
    for cls in (NotFound, NotADirectory, IsADirectory, ReadOnly, AccessDenied, NoAttribute, InvalidArgument)
}
# EPERM is "operation not permitted"; for a reader it means the same as EACCES,
# but keep the original errno so the client sees exactly what the OS said.
_BY_ERRNO.setdefault(_errno.EPERM, AccessDenied)


def from_oserror(exc: OSError, path: Optional[bytes] = None) -> ExportError:
    """The ExportError subclass for ``exc.errno`` (generic ``ExportError`` if none), errno kept.

    An OSError without an errno (should not happen) becomes EIO.
    """
    code = exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else _errno.EIO
    cls = _BY_ERRNO.get(code, ExportError)
    where = f" ({path!r})" if path is not None else ""
    err = cls(f"{exc.strerror or os.strerror(code)}{where}", errno=code)
    err.__cause__ = exc
    return err

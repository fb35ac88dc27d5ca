"""Opening an untrusted relative path strictly beneath a directory fd (``open_beneath``).

Role: a path that came from the other host (an export-relative name, a snapshot path the
source agent reported) is opened relative to a directory fd with no way out of it: no
``..`` component, no absolute path, no NUL, no symlink anywhere on the way (the last
component included), no /proc magic link.  Linux >= 5.6 does it in the kernel with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``; ``has_openat2()``
probes the syscall once, and without it the path is walked one component at a time with
``O_NOFOLLOW`` (a directory swapped for a symlink mid-walk is refused by O_NOFOLLOW too).

This sits beside ``core.platform`` (the Linux facade) rather than in it: platform.py is at
its module-size limit.

Errors: a path that tries to leave raises ``EscapeError`` (an ``OSError`` with EXDEV, the
errno openat2 uses for an escape; ELOOP for a symlink); other ``OSError`` propagate.

Threading: pure functions; the probe result is cached (a race only probes twice).
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from typing import List, Optional

from discrep.core.platform import load_libc

SYS_OPENAT2 = 437                  # the same number on every Linux architecture (unified table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
PATH_MAX = 4096
AT_FDCWD = -100

_probed: Optional[bool] = None
_syscall = None


class EscapeError(OSError):
    """A path that would leave its directory (``..``, absolute, NUL, a symlink)."""


def components(rel: bytes) -> List[bytes]:
    """The components of relative path ``rel`` ('' and '.' dropped); EscapeError for a path that
    could leave: absolute, with '..', with NUL, longer than PATH_MAX, or empty."""
    if not rel or len(rel) > PATH_MAX or b"\0" in rel or rel.startswith(b"/"):
        raise EscapeError(errno.EXDEV, "not a relative path below its directory", os.fsdecode(rel[:200]))
    parts = [p for p in rel.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise EscapeError(errno.EXDEV, "a path with '..' may leave its directory", os.fsdecode(rel[:200]))
    return parts


def _openat2(dirfd: int, path: bytes, flags: int) -> int:
    global _syscall
    if _syscall is None:
        libc = load_libc()
        fn = libc.syscall
        fn.restype = ctypes.c_long
        _syscall = fn
    how = struct.pack("=QQQ", flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    buf = ctypes.create_string_buffer(how, len(how))
    fd = _syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(path), buf,
                  ctypes.c_size_t(len(how)))
    if fd < 0:
        e = ctypes.get_errno()
        if e in (errno.EXDEV, errno.ELOOP):
            raise EscapeError(e, os.strerror(e), os.fsdecode(path))
        raise OSError(e, os.strerror(e), os.fsdecode(path))
    return int(fd)


def has_openat2() -> bool:
    """The kernel has openat2 (probed once on '.')."""
    global _probed
    if _probed is None:
        try:
            os.close(_openat2(AT_FDCWD, b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            _probed = True
        except OSError as e:
            _probed = e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL)
    return _probed


def _walk(dirfd: int, parts: List[bytes], flags: int) -> int:
    """The O_NOFOLLOW component walk (no openat2)."""
    cur = dirfd
    try:
        for p in parts[:-1]:
            try:
                nxt = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            except NotADirectoryError:   # O_DIRECTORY|O_NOFOLLOW on a symlink says ENOTDIR
                if stat.S_ISLNK(os.stat(p, dir_fd=cur, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symlink") from None
                raise
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise EscapeError(errno.ELOOP, "a symlink on the way", os.fsdecode(b"/".join(parts))) from None
        raise
    finally:
        if cur != dirfd:
            os.close(cur)


def open_beneath(dirfd: int, rel: bytes, flags: int = os.O_RDONLY, *, use_openat2: Optional[bool] = None) -> int:
    """Open ``rel`` strictly beneath directory fd ``dirfd`` (see module doc); a new fd."""
    parts = components(rel)
    if not parts:
        raise EscapeError(errno.EXDEV, "no file named", os.fsdecode(rel))
    if use_openat2 if use_openat2 is not None else has_openat2():
        return _openat2(dirfd, b"/".join(parts), flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    return _walk(dirfd, parts, flags)

"""Minimal ctypes binding of inotify(7): one instance, watches, raw event decoding.

Why ctypes and not a PyPI package: the three syscalls are tiny and stable, and
the watcher needs the exact errno of ``inotify_add_watch`` (ENOSPC = out of
watches -> journal gap, ENOENT = the directory went away meanwhile), which
wrappers tend to hide; no dependency is added.

``Inotify`` owns one non-blocking, close-on-exec inotify fd.  ``read()`` returns
decoded events ``(wd, mask, cookie, name)`` (name is bytes, ``b""`` for events
on the watched directory itself) or ``[]`` when nothing is queued.

Thread-safety: one thread uses an instance.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import List, NamedTuple

from discrep.journal.libc import errno_error, libc, read_queued

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

#: what the watcher asks for on every directory
WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
              | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_DONT_FOLLOW | IN_EXCL_UNLINK | IN_ONLYDIR)

_HDR = struct.Struct("iIII")  # wd, mask, cookie, len

libc.inotify_init1.argtypes = [ctypes.c_int]
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


class Event(NamedTuple):
    wd: int
    mask: int
    cookie: int
    name: bytes


class Inotify:
    def __init__(self) -> None:
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise errno_error("inotify_init1")
        self.fd = fd

    def add_watch(self, path: bytes, mask: int = WATCH_MASK) -> int:
        """Watch directory ``path``; OSError with the real errno (ENOSPC, ENOENT, ENOTDIR...)."""
        wd = libc.inotify_add_watch(self.fd, path, mask)
        if wd < 0:
            raise errno_error("inotify_add_watch", path)
        return wd

    def rm_watch(self, wd: int) -> None:
        libc.inotify_rm_watch(self.fd, wd)  # EINVAL when already gone: fine

    def read(self, size: int = 1 << 20) -> List[Event]:
        buf = read_queued(self.fd, size)
        out: List[Event] = []
        off, n = 0, len(buf)
        unpack = _HDR.unpack_from
        while off + 16 <= n:
            wd, mask, cookie, ln = unpack(buf, off)
            name = buf[off + 16:off + 16 + ln].rstrip(b"\0") if ln else b""
            out.append(Event(wd, mask, cookie, name))
            off += 16 + ln
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""Minimal ctypes binding of fanotify(7) in FID mode, plus handle -> path resolution.

The watcher uses one group created with ``FAN_REPORT_DFID_NAME`` and one
``FAN_MARK_FILESYSTEM`` mark on the filesystem holding ROOT: every
create/delete/rename/modify/attrib on that filesystem is reported as
(directory file handle, entry name), renames as one ``FAN_RENAME`` event with
both the old and the new (directory handle, name).  No per-directory watch,
and a directory created and filled at once still reports every child.

Needs CAP_SYS_ADMIN (filesystem mark) and CAP_DAC_READ_SEARCH
(``open_by_handle_at``); ``Fanotify()`` raises ``OSError`` (EPERM, EINVAL on
old kernels, ENODEV/EXDEV/EOPNOTSUPP on filesystems without file handles) and
the watcher falls back to inotify.

Thread-safety: one thread uses an instance.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import List, NamedTuple, Optional, Tuple

from discrep.journal.libc import errno_error, libc, read_queued

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_FILESYSTEM = 0x100

FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_FS_ERROR = 0x8000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_DFID = 3
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12

MARK_MASK = (FAN_CREATE | FAN_DELETE | FAN_RENAME | FAN_MODIFY | FAN_ATTRIB | FAN_CLOSE_WRITE
             | FAN_DELETE_SELF | FAN_ONDIR)

_META = struct.Struct("IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid
_INFO = struct.Struct("BBH")      # info_type, pad, len
_FH = struct.Struct("Ii")         # handle_bytes, handle_type

libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]

AT_FDCWD = -100


class Event(NamedTuple):
    mask: int
    #: (info_type, handle key, name) records; key = fsid + file_handle bytes
    records: Tuple[Tuple[int, bytes, bytes], ...]


class Fanotify:
    """A notification group in DFID_NAME mode with a filesystem mark on ``path``'s filesystem."""

    def __init__(self, path: bytes, mask: int = MARK_MASK) -> None:
        fd = libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_DFID_NAME,
                                os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        if fd < 0:
            raise errno_error("fanotify_init")
        self.fd = fd
        try:
            if libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD, path) != 0:
                raise errno_error("fanotify_mark", path)
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise

    def read(self, size: int = 1 << 20) -> List[Event]:
        return parse(read_queued(self.fd, size))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def parse(buf: bytes) -> List[Event]:
    out: List[Event] = []
    off, n = 0, len(buf)
    while off + _META.size <= n:
        ev_len, _vers, _res, meta_len, mask, fd, _pid = _META.unpack_from(buf, off)
        if ev_len < meta_len or ev_len == 0:
            break
        if fd >= 0:  # not in FID mode, but never leak one
            os.close(fd)
        recs = []
        p, end = off + meta_len, off + ev_len
        while p + 4 <= end:
            itype, _pad, ilen = _INFO.unpack_from(buf, p)
            if ilen < 4:
                break
            if itype in (FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_DFID, FAN_EVENT_INFO_TYPE_FID,
                         FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, FAN_EVENT_INFO_TYPE_NEW_DFID_NAME):
                hb, _ht = _FH.unpack_from(buf, p + 12)
                hend = p + 12 + 8 + hb
                key = bytes(buf[p + 4:hend])          # fsid (8) + struct file_handle
                name = b""
                if itype in (FAN_EVENT_INFO_TYPE_DFID_NAME, FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
                             FAN_EVENT_INFO_TYPE_NEW_DFID_NAME):
                    z = buf.find(b"\0", hend, p + ilen)
                    name = bytes(buf[hend:z if z >= 0 else p + ilen])
                recs.append((itype, key, name))
            p += ilen
        out.append(Event(mask, tuple(recs)))
        off += ev_len
    return out


class HandleResolver:
    """Directory handle -> absolute path, via open_by_handle_at + /proc/self/fd readlink.

    ``resolve`` returns the path (bytes), or None when the directory no longer
    exists (ESTALE/ENOENT, or unlinked while still open).  Any other failure
    raises OSError (the watcher marks a journal gap).
    """

    def __init__(self, mount_path: bytes):
        self.mount_fd = os.open(mount_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def resolve(self, key: bytes) -> Optional[bytes]:
        fh = key[8:]  # drop fsid
        fd = libc.open_by_handle_at(self.mount_fd, fh, os.O_PATH | os.O_CLOEXEC)
        if fd < 0:
            err = errno_error("open_by_handle_at")
            if err.errno in (errno.ESTALE, errno.ENOENT):
                return None
            raise err
        try:
            path = os.readlink(b"/proc/self/fd/%d" % fd)
            if path.endswith(b" (deleted)") and os.fstat(fd).st_nlink == 0:
                return None
            return path
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.mount_fd >= 0:
            os.close(self.mount_fd)
            self.mount_fd = -1

"""What the inotify and fanotify bindings share: the libc handle, errno -> OSError, and
reading a non-blocking event queue fd.

Role: a leaf under inotify.py and fanotify.py (each sets the ``argtypes`` of its own
functions on ``libc``).

Thread-safety: pure functions; ``ctypes.get_errno`` is per thread, so call ``errno_error``
in the thread whose libc call failed, right after it.
"""
from __future__ import annotations

import ctypes
import errno
import os
from typing import Optional

from discrep.core.platform import load_libc

libc = load_libc()


def errno_error(op: str, path: Optional[bytes] = None) -> OSError:
    """The OSError of the libc call ``op`` that just failed (on ``path``, if given)."""
    e = ctypes.get_errno()
    if path is None:
        return OSError(e, f"{op}: {os.strerror(e)}")
    return OSError(e, f"{op}: {os.strerror(e)}", os.fsdecode(path))


def read_queued(fd: int, size: int) -> bytes:
    """What is queued on the non-blocking event fd ``fd`` (at most ``size`` bytes); ``b""``
    when nothing is, or when a signal interrupted the read."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""
    except OSError as e:
        if e.errno == errno.EINTR:
            return b""
        raise

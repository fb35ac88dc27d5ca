"""Complete writes: ``pwrite_all`` writes every byte or raises.

On a filesystem that runs out of space, ``pwrite`` may write part of a buffer and return the
count (no error): a caller that ignores it leaves zeros where data should be, with a catalog
that says otherwise.  Every write of replicated data goes through ``pwrite_all``: a short write
is continued, and one that writes nothing is ENOSPC -- the cycle fails and rolls back.

Thread-safety: a stateless function; concurrent calls on one fd write disjoint ranges.
"""
from __future__ import annotations

import errno
import os
from typing import Union

Buffer = Union[bytes, bytearray, memoryview]


def pwrite_all(fd: int, data: Buffer, offset: int) -> int:
    """Write all of ``data`` at ``offset`` of ``fd``; the number of bytes (``len(data)``)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return done

"""Advisory file locks (flock) that keep two runs apart, and probes for them.

``take(path, message, hint)`` returns an fd holding an exclusive lock on
``path`` (created if missing, our pid written into it) or raises LockedError
naming the holder's pid; closing the fd releases it, and so does the death of
the process, even by SIGKILL.  ``held(path)`` tells whether some process holds
it.  Used for: the source (``SRC/.discrep/source.lock``), the watcher
(``watcher.lock``), the replica (``DEST/.discrep/lock``) and continuous mode
(``daemon.lock``).

Thread-safety: plain functions; an fd belongs to its caller.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator, Optional, Union

from discrep.core.errors import LockedError

PathLike = Union[str, bytes]


def take(path: PathLike, message: str, hint: Optional[str] = None) -> int:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = (os.pread(fd, 64, 0).decode(errors="replace").split() or [""])[0]
        except OSError:
            holder = ""
        os.close(fd)
        raise LockedError(message + (f" (pid {holder})" if holder.isdigit() else ""), hint=hint) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def holding(path: PathLike, message: str, hint: Optional[str] = None) -> Iterator[int]:
    fd = take(path, message, hint)
    try:
        yield fd
    finally:
        os.close(fd)


def held(path: PathLike) -> bool:
    """True when a live process holds ``path``'s lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)

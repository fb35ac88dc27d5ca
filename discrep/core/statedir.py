"""The state directory of a tree (``SRC/.discrep``, ``DEST/.discrep``), opened by fd and checked.

Whoever owns the tree's root controls the directory that holds ``.discrep``: they can rename it
away and put their own in its place, with a planted catalog, journal or undo log that points
elsewhere.  So discrep never trusts the state directory by its path:

- it is created ``0700``, so no other user can even look inside;
- it is opened without following a symlink (``O_NOFOLLOW | O_DIRECTORY``), and the open directory
  is checked: owned by the user running discrep, a directory, no group/other access (a directory
  of ours with wider modes, as older versions made them, is tightened to ``0700``);
- everything below it is reached through that fd: ``path`` is ``/proc/<pid>/fd/<n>``, which the
  kernel resolves to the very directory that was checked, even if the name is swapped later
  (SQLite and child processes of discrep open files by such paths).

``StateDir`` owns its fd: ``close()`` releases it (also a context manager).  Whatever the files
in it hold is still validated like input by their readers.

Thread-safety: the object is immutable after ``__init__``; the fd may be shared by threads.
"""
from __future__ import annotations

import logging
import os
import stat as statmod
from typing import Type

from discrep.core.errors import DestinationError, Error
from discrep.core.paths import STATE_DIR

log = logging.getLogger(__name__)

class StateDir:
    """``ROOT/.discrep`` of one tree, opened and checked (see the module doc)."""

    def __init__(self, root: bytes, *, create: bool = True, error: Type[Error] = DestinationError):
        self.root = root
        self.fd = -1
        rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if create:
                try:
                    os.mkdir(STATE_DIR, 0o700, dir_fd=rfd)
                except FileExistsError:
                    pass
            try:
                fd = os.open(STATE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rfd)
            except FileNotFoundError:
                raise error(f"{os.fsdecode(root)} has no state directory {STATE_DIR.decode()}") from None
            except OSError as e:      # ELOOP / ENOTDIR: a symlink or a file where the directory belongs
                raise error(f"state directory {os.fsdecode(os.path.join(root, STATE_DIR))} is not a "
                            f"plain directory ({e.strerror})",
                            hint="someone replaced it: check who can write to the tree's root") from None
        finally:
            os.close(rfd)
        try:
            self._check(fd, error)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.path = f"/proc/{os.getpid()}/fd/{fd}"

    def _check(self, fd: int, error: Type[Error]) -> None:
        st = os.fstat(fd)
        shown = os.fsdecode(os.path.join(self.root, STATE_DIR))
        if not statmod.S_ISDIR(st.st_mode):
            raise error(f"state directory {shown} is not a directory")
        if st.st_uid != os.geteuid():
            raise error(f"state directory {shown} belongs to uid {st.st_uid}, not to the user running "
                        f"discrep (uid {os.geteuid()})",
                        hint="someone may have put it there to plant state: inspect it, move it aside, "
                             "and run again as the tree's replicating user")
        if st.st_mode & 0o077:
            log.info("tightening %s from %o to 0700", shown, statmod.S_IMODE(st.st_mode))
            os.fchmod(fd, 0o700)

    def file(self, name: str) -> str:
        """Path of ``name`` inside the checked directory (through the fd)."""
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"bad state file name {name!r}")
        return f"{self.path}/{name}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "StateDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


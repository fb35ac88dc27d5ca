"""Metadata of replicated objects: owner, mode, xattrs and times, set through fds.

``MetaWriter`` knows this process's euid/egid and umask, so for a file it has just created
(``fresh``) it skips the calls that would change nothing: the owner when it is ours already,
the mode when the file was created with it, xattrs when there are none to set.  Times come
last (any other change would touch them).  Which xattr names it manages is
``core.xattrs.replicated`` (rsync -X's rule: ``security.*`` only as root, never the host's
own labels); ``nosuid`` strips setuid/setgid and file capabilities (README, Safety).
xattrs that cannot be set are returned (``set_fd``) or handed to ``warn`` as (path,
message) (``apply_fd``); nothing else is swallowed.

Thread-safety: a MetaWriter is used by one thread (the umask is read once, at creation).
"""
from __future__ import annotations

import os
import stat as statmod
from typing import Callable, Dict, List, Optional, Tuple

from discrep.core.paths import basename
from discrep.core.xattrs import CAPABILITY, only_replicated, read_xattrs, set_xattrs_fd
from discrep.protocol.manifest import Entry

Warn = Callable[[bytes, str], None]
SET_ID = statmod.S_ISUID | statmod.S_ISGID


def xattr_warning(name: str, why: str) -> str:
    return f"xattr {name} not set: {why}"


def current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


class MetaWriter:
    """Sets owner, mode, xattrs and times (see module doc).  ``nosuid``: strip setuid/setgid
    bits of non-directories and file capabilities (``security.capability``) on the replica."""

    def __init__(self, warn: Warn = lambda rel, msg: None, *, nosuid: bool = False):
        self.warn = warn
        self.nosuid = nosuid
        self.umask = current_umask()
        self.euid, self.egid = os.geteuid(), os.getegid()

    def created_with(self, create_mode: int, mode: int) -> bool:
        """A file created with ``create_mode`` has ``mode`` already (the umask taken off)."""
        return (create_mode & ~self.umask) == mode

    def wanted_mode(self, mode: int, fd: int) -> int:
        """The mode ``fd`` gets for a wanted ``mode``: set-id bits of a non-directory taken off
        under ``nosuid`` (a directory's setgid only chooses new files' group: kept)."""
        if self.nosuid and mode & SET_ID and not statmod.S_ISDIR(os.fstat(fd).st_mode):
            return mode & ~SET_ID
        return mode

    def wanted_xattrs(self, xattrs: Optional[Dict[str, bytes]]) -> Dict[str, bytes]:
        """The xattrs the replica gives an object whose source has ``xattrs`` (``core.xattrs.replicated``
        names; no file capability under ``nosuid``)."""
        want = only_replicated(xattrs or {}, self.euid == 0)
        if self.nosuid:
            want.pop(CAPABILITY, None)
        return want

    def set_fd(self, fd: int, uid: int, gid: int, mode: int, mtime_ns: int,
               xattrs: Optional[Dict[str, bytes]], *, fresh: bool = False,
               mode_set: bool = False) -> List[Tuple[str, str]]:
        """Owner, mode, xattrs, times (last) of ``fd``; (name, reason) of each xattr not set.
        ``fresh``: a file this cycle just created (owned by us, no xattrs yet); ``mode_set``: it
        was created with its mode."""
        if self.euid == 0 and not (fresh and uid == self.euid and gid == self.egid):
            os.fchown(fd, uid, gid)   # (clears set-id bits and file capabilities: mode and xattrs come after)
        if not mode_set:
            os.fchmod(fd, self.wanted_mode(mode, fd))
        failed = set_xattrs_fd(fd, self.wanted_xattrs(xattrs), self.euid == 0) if not fresh or xattrs else []
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        return failed

    def apply_fd(self, e: Entry, fd: int, *, fresh: bool = False, mode_set: bool = False) -> None:
        """``set_fd`` with the metadata of manifest entry ``e``; xattrs not set go to ``warn``."""
        failed = self.set_fd(fd, e.uid, e.gid, e.mode, e.mtime_ns, e.xattrs, fresh=fresh, mode_set=mode_set)
        for name, why in failed:
            self.warn(e.path, xattr_warning(name, why))

    def apply_link(self, e: Entry, pfd: int) -> None:
        """Owner and times of symlink ``e`` in its parent directory ``pfd`` (a link has no mode)."""
        name = basename(e.path)
        if self.euid == 0:
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def matches(self, e: Entry, fd: int) -> bool:
        """``fd`` has the metadata of ``e`` already: the same rule (``wanted_*``) on both sides, so
        names that are the replica's own (``security.selinux``...) never make a file look changed."""
        st = os.fstat(fd)
        if (statmod.S_IMODE(st.st_mode), st.st_mtime_ns) != (self.wanted_mode(e.mode, fd), e.mtime_ns):
            return False
        if self.euid == 0 and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            return False
        return only_replicated(read_xattrs(fd), self.euid == 0) == self.wanted_xattrs(e.xattrs)

"""Extended attributes of one file: read all, make them exactly a wanted set.

Used by the source (manifest entries), the replica (apply, undo records) and ``verify``.
A path is never followed if it is a symlink; an fd is used as it is.

Thread-safety: stateless functions.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple, Union

Target = Union[bytes, int]
KEPT_SYSTEM = ("system.posix_acl_access", "system.posix_acl_default")   # the system.* names replicated


def _names(t: Target) -> List[str]:
    return os.listxattr(t) if isinstance(t, int) else os.listxattr(t, follow_symlinks=False)


def _get(t: Target, name: str) -> bytes:
    return os.getxattr(t, name) if isinstance(t, int) else os.getxattr(t, name, follow_symlinks=False)


def read_xattrs(t: Target) -> Dict[str, bytes]:
    """Every readable xattr of ``t`` (path or fd), by name in sorted order; ``{}`` where the
    filesystem has none or refuses to list them."""
    out: Dict[str, bytes] = {}
    try:
        names = sorted(_names(t))
    except OSError:
        return out
    for name in names:
        try:
            out[name] = _get(t, name)
        except OSError:
            continue
    return out


def set_xattrs_fd(fd: int, want: Dict[str, bytes]) -> List[Tuple[str, str]]:
    """Make ``fd``'s xattrs exactly ``want`` (other ``system.*`` names than the POSIX ACLs are left
    alone); returns (name, reason) for each one that could not be set."""
    try:
        have = set(os.listxattr(fd))
    except OSError:
        have = set()
    for name in have - set(want):
        if name.startswith("system.") and name not in KEPT_SYSTEM:
            continue
        try:
            os.removexattr(fd, name)
        except OSError:
            pass
    failed = []
    for name, val in want.items():
        try:
            if name in have and os.getxattr(fd, name) == val:
                continue
            os.setxattr(fd, name, val)
        except OSError as err:
            failed.append((name, err.strerror or str(err)))
    return failed

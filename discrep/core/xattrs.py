"""Extended attributes of one file: read all, make them exactly a wanted set.

Used by the source (manifest entries), the replica (apply, undo records) and ``verify``.
A path is never followed if it is a symlink; an fd is used as it is.  ``replicated`` is the
one rule for which names the replica manages (what it has and what the manifest wants are
both filtered by it, so an unchanged file never looks changed).

Thread-safety: stateless functions.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple, Union

Target = Union[bytes, int]
KEPT_SYSTEM = ("system.posix_acl_access", "system.posix_acl_default")   # the system.* names replicated
CAPABILITY = "security.capability"      # file capabilities (a privileged executable's, like setuid)
# labels and integrity data the replica host's own security modules assign: never replicated
HOST_LABELS = ("security.selinux", "security.SMACK64", "security.apparmor", "security.ima", "security.evm")


def replicated(name: str, privileged: bool) -> bool:
    """``name`` is an xattr the replica makes equal to the source's (what it has and what the
    manifest wants are compared on these names only): like rsync -X, every name but ``system.*``
    (the POSIX ACLs excepted), ``security.*`` only when ``privileged`` (root) and never the
    labels of ``HOST_LABELS``.  Other names are the replica's own: neither set nor removed."""
    if name.startswith("system."):
        return name in KEPT_SYSTEM
    if name.startswith("security."):
        return privileged and not name.startswith(HOST_LABELS)
    return True


def only_replicated(xattrs: Dict[str, bytes], privileged: bool) -> Dict[str, bytes]:
    """The entries of ``xattrs`` whose names are ``replicated``."""
    return {k: v for k, v in xattrs.items() if replicated(k, privileged)}


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


def set_xattrs_fd(fd: int, want: Dict[str, bytes], privileged: Optional[bool] = None) -> List[Tuple[str, str]]:
    """Make ``fd``'s ``replicated`` xattrs exactly those of ``want`` (names that are not
    replicated are left alone on both sides; ``privileged`` defaults to running as root);
    returns (name, reason) for each one that could not be set."""
    priv = os.geteuid() == 0 if privileged is None else privileged
    try:
        have = set(os.listxattr(fd))
    except OSError:
        have = set()
    want = only_replicated(want, priv)
    for name in have - set(want):
        if not replicated(name, priv):
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

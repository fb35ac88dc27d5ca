"""Which entries of DEST the replica's filter rules protect from deletion (rsync's receiver side).

Role: as in rsync, an entry of DEST that the replica's rules exclude is *protected*: a cycle
that would delete it (a delete entry, or an extraneous entry of a full cycle) leaves it as it
is, unless ``--delete-excluded`` makes the rules sender-only.  A directory that is deleted on
the source but holds protected entries on the replica keeps them, and itself.  Rules are read
against DEST itself: dir-merge files are DEST's copies (as rsync's receiver reads its own),
opened strictly beneath DEST's root fd, and "is a directory" is DEST's own lstat.

``protection(dest, spec)`` is None when nothing can be protected (no rules, or
--delete-excluded), so callers pay nothing without filters.

Thread-safety: one ``Protection`` per cycle, used by the applying thread.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

from discrep.core.beneath import open_beneath
from discrep.core.paths import STATE_DIR
from discrep.protocol.filters import Filter
from discrep.protocol.filterspec import FilterSpec, beneath_reader

O_PATH = getattr(os, "O_PATH", 0)


class Protection:
    """The replica's rules over DEST (see module doc); ``close`` when done."""

    def __init__(self, dest: bytes, spec: FilterSpec):
        self.fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.flt = Filter(spec.rules, beneath_reader(self.fd) if spec.rules.merge_names else None)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def is_dir(self, rel: bytes) -> bool:
        """``rel`` is a directory of DEST (reached with no symlink on the way)."""
        if not rel:
            return True
        try:
            fd = open_beneath(self.fd, rel, O_PATH | os.O_DIRECTORY)
        except OSError:
            return False
        os.close(fd)
        return True

    def protects(self, rel: bytes) -> bool:
        """``rel`` (or a parent) is excluded: a cycle must not delete it."""
        return not self.flt.path_allowed(rel, self.is_dir)

    def children(self, rel: bytes) -> Iterator[bytes]:
        """The entries of DEST's directory ``rel``."""
        try:
            fd = open_beneath(self.fd, rel, os.O_RDONLY | os.O_DIRECTORY) if rel else os.dup(self.fd)
        except OSError:
            return
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        for n in names:
            name = os.fsencode(n)
            if rel or name != STATE_DIR:
                yield (rel + b"/" + name) if rel else name

    def holds_protected(self, rel: bytes) -> bool:
        """Directory ``rel`` has a protected entry somewhere below it."""
        stack = [rel]
        while stack:
            d = stack.pop()
            for c in self.children(d):
                if self.protects(c):
                    return True
                if self.is_dir(c):
                    stack.append(c)
        return False


def protection(dest: bytes, spec: FilterSpec) -> Optional[Protection]:
    """The protection of ``spec`` over DEST, or None when nothing is protected."""
    if not spec.active or spec.delete_excluded:
        return None
    return Protection(dest, spec)

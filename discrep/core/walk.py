"""Walk a tree in manifest order, never following symlinks, skipping the state directory.

Used by the catch-up scan, the cycle build, ``verify`` and ``restore``.

Thread-safety: a generator; runs in the caller's thread.
"""
from __future__ import annotations

import os
import stat as statmod
from typing import Callable, Iterator, Optional, Tuple

from discrep.core.paths import STATE_DIR


def walk(root: bytes, *, on_error: Optional[Callable[[bytes, OSError], None]] = None,
         keep: Optional[Callable[[bytes, os.stat_result], bool]] = None,
         on_vanished: Optional[Callable[[bytes], None]] = None) -> Iterator[Tuple[bytes, os.stat_result]]:
    """Yield (relative path, lstat) for every entry below ``root`` (root itself excluded, and
    ``ROOT/.discrep``), in manifest order: each directory's entries by name, a directory's subtree
    right after it (the order of ``sorted(paths, key=lambda p: p.replace(b"/", b"\\0"))``).
    ``keep(rel, lstat)`` false: the entry is skipped and, a directory, never descended (filters).

    ``on_vanished(rel)``: called for an entry that was listed but is gone when it is looked at
    (deleted or renamed while the walk runs; otherwise it is skipped silently)."""
    def listing(rel: bytes) -> Iterator[os.DirEntry]:
        try:
            with os.scandir(root + b"/" + rel if rel else root) as it:
                return iter(sorted(it, key=lambda e: e.name))
        except OSError as e:
            if on_error is None:
                raise
            on_error(rel, e)
            return iter(())
    stack = [(b"", listing(b""))]
    while stack:
        rel, it = stack[-1]
        e = next(it, None)
        if e is None:
            stack.pop()
            continue
        name = e.name
        if not rel and name == STATE_DIR:
            continue
        crel = rel + b"/" + name if rel else name
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            if on_vanished is not None:
                on_vanished(crel)
            continue
        if keep is not None and not keep(crel, st):
            continue
        yield crel, st
        if statmod.S_ISDIR(st.st_mode):
            stack.append((crel, listing(crel)))

"""Sparse-file helpers: find the data extents of a file via SEEK_DATA/SEEK_HOLE.

Role: lets the signer skip holes without reading them.  Where the filesystem
(or the fd type) does not support hole probing, the whole file is reported as
one data extent, which is always correct, just slower.

Threading: ``data_extents`` moves the fd's *shared* file offset while probing
(it restores it before returning), so do not call it concurrently with other
users of the same fd's offset (``read``/``write``; ``pread``/``pwrite`` are
unaffected).  ``is_sparse`` is pure.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import List, Tuple

log = logging.getLogger(__name__)

__all__ = ["data_extents", "is_sparse"]

_SEEK_DATA = getattr(os, "SEEK_DATA", None)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", None)


def is_sparse(st: os.stat_result) -> bool:
    """True when fewer bytes are allocated than the apparent size.

    Note: filesystems with transparent compression also report this.
    """
    return st.st_blocks * 512 < st.st_size


def data_extents(fd: int, size: int) -> List[Tuple[int, int]]:
    """Return ``[(offset, length), ...]`` of the data regions within ``[0, size)``.

    Holes are omitted.  Extents are sorted, non-overlapping and clipped to
    ``size``.  If hole probing is unsupported, returns ``[(0, size)]``
    (``[]`` for ``size == 0``).
    """
    if size <= 0:
        return []
    whole = [(0, size)]
    if _SEEK_DATA is None or _SEEK_HOLE is None:
        return whole
    try:
        saved = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return whole  # pipe / unseekable
    extents: List[Tuple[int, int]] = []
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, _SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break  # no data at or after pos: the rest is a hole
                if pos == 0:
                    log.debug("SEEK_DATA unsupported on fd %d (%s); treating as dense", fd, e)
                    return whole
                extents.append((pos, size - pos))
                break
            if data >= size:
                break
            try:
                hole = os.lseek(fd, data, _SEEK_HOLE)
            except OSError:
                hole = size
            hole = min(max(hole, data), size)
            if hole == data:  # defensive: never loop without progress
                hole = size
            if extents and extents[-1][0] + extents[-1][1] == data:
                start, _ = extents.pop()
                extents.append((start, hole - start))
            else:
                extents.append((data, hole - data))
            pos = hole
    finally:
        try:
            os.lseek(fd, saved, os.SEEK_SET)
        except OSError:  # pragma: no cover - fd closed under us
            pass
    return extents

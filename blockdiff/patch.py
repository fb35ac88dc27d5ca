"""Applying changes to a replica file: in-place block ranges or a CDC rebuild.

Role: ``apply_ranges`` pwrites fetched fixed-block ranges into the replica
file; ``build_from_plan`` writes a complete new file from a ``cdc.plan``
(copy ops from the old file, fetch ops from fetched bytes).  Copies use
``os.copy_file_range`` (reflink / in-kernel copy) where the kernel and
filesystem allow, otherwise ``pread``/``pwrite`` in 8 MiB pieces.

Threading: only positional I/O on caller-owned fds; safe to run concurrently
on different files.  Callers must not write the same output region from two
threads.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Iterable, Mapping, Sequence, Tuple, Union

from .cdc import Op
from .errors import PatchError

log = logging.getLogger(__name__)

__all__ = ["apply_ranges", "build_from_plan", "COPY_PIECE"]

#: bytes per pread/pwrite when copying without copy_file_range
COPY_PIECE = 8 << 20

Buffer = Union[bytes, bytearray, memoryview]

# errnos meaning "copy_file_range cannot do this here, use read/write"
_CFR_FALLBACK = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                 getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EBADF, errno.ETXTBSY,
                 errno.EPERM}


def _pwrite_all(fd: int, data: Buffer, offset: int) -> int:
    mv = memoryview(data).cast("B")
    done = 0
    n = len(mv)
    while done < n:
        w = os.pwrite(fd, mv[done:], offset + done)
        if w <= 0:
            raise PatchError(f"fd {fd}: pwrite at offset {offset + done} wrote nothing")
        done += w
    return n


def apply_ranges(fd: int, items: Iterable[Tuple[int, Buffer]]) -> int:
    """pwrite each ``(offset, data)``; returns the total bytes written."""
    total = 0
    for offset, data in items:
        if offset < 0:
            raise PatchError(f"negative write offset {offset}")
        total += _pwrite_all(fd, data, offset)
    return total


def _copy_rw(src: int, dst: int, length: int, src_off: int, dst_off: int) -> None:
    done = 0
    while done < length:
        n = min(COPY_PIECE, length - done)
        data = os.pread(src, n, src_off + done)
        if not data:
            raise PatchError(
                f"old file too short: no data at offset {src_off + done} (copy of {length} bytes "
                f"from {src_off})")
        _pwrite_all(dst, data, dst_off + done)
        done += len(data)


class _Copier:
    """Copies ranges, remembering whether copy_file_range works for this fd pair."""

    def __init__(self) -> None:
        self.use_cfr = hasattr(os, "copy_file_range")

    def copy(self, src: int, dst: int, length: int, src_off: int, dst_off: int) -> None:
        done = 0
        if self.use_cfr:
            try:
                while done < length:
                    n = os.copy_file_range(src, dst, length - done, src_off + done, dst_off + done)
                    if n == 0:
                        raise PatchError(
                            f"old file too short: no data at offset {src_off + done} "
                            f"(copy of {length} bytes from {src_off})")
                    done += n
                return
            except OSError as e:
                if e.errno not in _CFR_FALLBACK:
                    raise
                log.debug("copy_file_range unusable (%s); falling back to pread/pwrite", e)
                self.use_cfr = False
        _copy_rw(src, dst, length - done, src_off + done, dst_off + done)


def build_from_plan(out_fd: int, old_fd: int, ops: Sequence[Op], fetched: Mapping[int, Buffer]) -> int:
    """Write the new file described by ``ops`` into ``out_fd``; returns bytes written.

    Ops must tile ``[0, total)`` in order.  ``fetched[op.new_offset]`` holds
    the bytes of each fetch op and must have exactly ``op.length`` bytes.
    ``out_fd`` is truncated to the new size at the end.  ``PatchError`` on a
    gap/overlap, a missing or wrong-sized fetched item, or a short old file.
    """
    copier = _Copier()
    pos = 0
    for op in ops:
        if op.new_offset != pos:
            raise PatchError(f"ops not contiguous: op at {op.new_offset}, expected {pos}")
        if op.length <= 0:
            raise PatchError(f"op at {op.new_offset} has non-positive length {op.length}")
        if op.kind == "copy":
            if op.old_offset < 0:
                raise PatchError(f"copy op at {op.new_offset} has negative old_offset {op.old_offset}")
            copier.copy(old_fd, out_fd, op.length, op.old_offset, op.new_offset)
        elif op.kind == "fetch":
            data = fetched.get(op.new_offset)
            if data is None:
                raise PatchError(f"missing fetched data for offset {op.new_offset} ({op.length} bytes)")
            n = memoryview(data).nbytes
            if n != op.length:
                raise PatchError(
                    f"fetched data for offset {op.new_offset} has {n} bytes, op needs {op.length}")
            _pwrite_all(out_fd, data, op.new_offset)
        else:
            raise PatchError(f"unknown op kind {op.kind!r}")
        pos += op.length
    os.ftruncate(out_fd, pos)
    return pos

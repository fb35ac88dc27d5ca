"""One-byte-flag compression frames for data sent between source and replica.

Role: wraps a payload so the receiver knows whether it is zstd-compressed.
A frame is ``b"\\x00" + raw`` when compression would not shrink the data (or
the data is shorter than ``MIN_COMPRESS`` bytes), else
``b"\\x01" + zstd(data)`` (a single zstd frame).  ``unpack`` is strict: an
empty frame, an unknown flag, a corrupt/truncated zstd payload or trailing
bytes after the zstd frame raise ``FrameError``; ``max_size`` bounds the
decompressed size (protection against decompression bombs).

Threading: pure functions; pyzstd objects are created per call.
"""
from __future__ import annotations

import logging
from typing import Tuple, Iterable, Iterator, Optional, Union

import pyzstd

from .errors import FrameError

log = logging.getLogger(__name__)

__all__ = ["FLAG_RAW", "FLAG_ZSTD", "MIN_COMPRESS", "pack", "unpack", "pack_stream", "unpack_stream"]

FLAG_RAW = 0
FLAG_ZSTD = 1
#: payloads shorter than this are never compressed
MIN_COMPRESS = 64

Buffer = Union[bytes, bytearray, memoryview]
_RAW = b"\x00"
_ZSTD = b"\x01"


PROBE_OVER = 512 * 1024   # larger buffers are probed before a full compression attempt
_PROBE = 32 * 1024


def _looks_compressible(mv: memoryview, level: int) -> bool:
    """Three 32 KiB samples (start, middle, end): does any shrink by 3 % or more?"""
    n = len(mv)
    for off in (0, n // 2 - _PROBE // 2, n - _PROBE):
        sample = mv[off:off + _PROBE]
        if len(pyzstd.compress(sample, level)) < len(sample) * 0.97:
            return True
    return False


def pack_parts(data: Buffer, level: int = 1) -> Tuple[bytes, Buffer]:
    """``(flag, payload)`` of the frame of ``data`` -- for writing with writev, no copy of raw data."""
    mv = memoryview(data).cast("B")
    if len(mv) >= PROBE_OVER and not _looks_compressible(mv, level):
        return _RAW, mv
    if len(mv) >= MIN_COMPRESS:
        comp = pyzstd.compress(mv, level)
        if len(comp) < len(mv):
            return _ZSTD, comp
    return _RAW, mv


def pack(data: Buffer, level: int = 1) -> bytes:
    """Frame ``data``: zstd-compressed at ``level`` if that makes it smaller, else raw."""
    flag, payload = pack_parts(data, level)
    return flag + bytes(payload)


def unpack(frame: Buffer, max_size: Optional[int] = None) -> bytes:
    """Inverse of ``pack``.  ``max_size`` (if given) caps the decompressed length."""
    mv = memoryview(frame).cast("B")
    if len(mv) == 0:
        raise FrameError("empty frame (missing flag byte)")
    flag = mv[0]
    payload = mv[1:]
    if flag == FLAG_RAW:
        if max_size is not None and len(payload) > max_size:
            raise FrameError(f"raw frame payload {len(payload)} bytes exceeds max_size {max_size}")
        return bytes(payload)
    if flag != FLAG_ZSTD:
        raise FrameError(f"unknown frame flag 0x{flag:02x}")
    d = pyzstd.ZstdDecompressor()
    try:
        out = d.decompress(payload, -1 if max_size is None else max_size + 1)
    except pyzstd.ZstdError as e:
        raise FrameError(f"corrupt zstd frame payload ({len(payload)} bytes): {e}") from e
    if max_size is not None and len(out) > max_size:
        raise FrameError(f"zstd frame decompresses to more than max_size {max_size} bytes")
    if not d.eof:
        raise FrameError(f"truncated zstd frame payload ({len(payload)} bytes)")
    if d.unused_data:
        raise FrameError(f"{len(d.unused_data)} trailing bytes after zstd frame")
    return out


def pack_stream(chunks: Iterable[Buffer], level: int = 1) -> Iterator[bytes]:
    """``pack`` each chunk; yields frames."""
    for c in chunks:
        yield pack(c, level)


def unpack_stream(frames: Iterable[Buffer], max_size: Optional[int] = None) -> Iterator[bytes]:
    """``unpack`` each frame; yields payloads."""
    for f in frames:
        yield unpack(f, max_size)

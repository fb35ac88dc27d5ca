"""Error tree of the ``blockdiff`` leaf library.

Every failure the library reports is a ``BlockdiffError`` subclass carrying a
one-line message that names what was wrong (and where, for parse errors).
Format errors additionally subclass ``ValueError`` so generic callers that
catch ``ValueError`` for "bad input bytes" keep working.

Thread-safety: the classes are plain immutable exception types.
"""
from __future__ import annotations

__all__ = [
    "BlockdiffError",
    "SignatureFormatError",
    "ChunkListFormatError",
    "FrameError",
    "PatchError",
    "ShortReadError",
]


class BlockdiffError(Exception):
    """Base class of every error raised by ``blockdiff``."""


class SignatureFormatError(BlockdiffError, ValueError):
    """Serialized signature (or its header / a slice of it) is malformed."""


class ChunkListFormatError(BlockdiffError, ValueError):
    """Serialized content-defined chunk list is malformed."""


class FrameError(BlockdiffError, ValueError):
    """A compression frame has an unknown flag or a corrupt payload."""


class PatchError(BlockdiffError):
    """A patch could not be applied (length mismatch, missing data, short source)."""


class ShortReadError(BlockdiffError):
    """The file ended before the expected size (it shrank while being read)."""

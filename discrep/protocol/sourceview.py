"""What a dry run needs of the source: the ``SourceView`` interface and its values.

Role: ``replicate -n`` (run.dryrun) compares SRC as it is now with DEST.  It reads SRC through a
``SourceView``: ``entries()`` walks SRC with the replica's filter rules and yields one
``SrcEntry`` per object in manifest order (parents before their contents); ``sign(requests)``
answers, for files the replica asks about, the whole digest of their first ``size`` bytes at a
block size and factor, and -- given the replica catalog's old fine digests -- the count of bytes
in blocks that differ (``SignAnswer``).  Two implementations: the local one walks and reads the
tree itself (source.dryview.LocalSourceView); the remote one asks the source agent in dry-run
mode over SSH (transport.dryview_client).  Both compute answers with ``sign_answer`` and
``xattr_digest`` below, so the two give the same lines for the same pair.

Thread-safety: immutable values and pure functions.
"""
from __future__ import annotations

import hashlib
import stat as statmod
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Protocol

from discrep.core.xattrs import only_replicated

FINE = 8                     # bytes of one fine block digest in a blockdiff signature
MAX_TARGET = 4096            # longest symlink target a view may report


@dataclass(frozen=True)
class SrcEntry:
    """One object of SRC: its lstat fields, symlink target, and xattrs digest (not for symlinks)."""
    path: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: Optional[bytes] = None
    xattrs: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        return statmod.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return statmod.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return statmod.S_ISLNK(self.mode)


@dataclass(frozen=True)
class SignRequest:
    """Sign the first ``size`` bytes of ``path`` at ``block_size``/``factor``; with ``fine`` (the
    old signature's fine digests) also count the bytes of blocks that differ from them."""
    path: bytes
    size: int
    block_size: int
    factor: int
    fine: Optional[bytes] = None


@dataclass(frozen=True)
class SignAnswer:
    """``whole``: the whole digest (None: the file could not be read as asked); ``differ``: bytes
    of the blocks that differ from the request's ``fine`` (None without ``fine``)."""
    whole: Optional[bytes]
    differ: Optional[int] = None


class SourceView(Protocol):
    """SRC as a dry run sees it (see module doc)."""

    def entries(self) -> Iterator[SrcEntry]: ...

    def sign(self, requests: List[SignRequest]) -> List[SignAnswer]: ...

    def close(self) -> None: ...


def xattr_digest(xattrs: Dict[str, bytes], privileged: bool) -> str:
    """A canonical digest of an object's xattrs (name -> value), hex, over the names a replica
    running ``privileged`` (root) manages (core.xattrs.replicated); equal dicts, equal digests."""
    h = hashlib.sha256()
    xattrs = only_replicated(xattrs, privileged)
    for name in sorted(xattrs):
        n, v = name.encode("utf-8", "surrogateescape"), xattrs[name]
        h.update(len(n).to_bytes(4, "big") + n + len(v).to_bytes(8, "big") + v)
    return h.hexdigest()


def sign_answer(fd: int, req: SignRequest) -> SignAnswer:
    """The answer to ``req`` for the open file ``fd`` (blockdiff: imported here, not at start-up)."""
    import blockdiff
    new = blockdiff.sign_fd(fd, req.size, req.block_size, req.factor)
    if req.fine is None:
        return SignAnswer(new.whole_digest())
    old = req.fine
    bs, n_old = req.block_size, len(old) // FINE
    differ = 0
    for b in range(new.n_blocks):
        if b >= n_old or new.fine[b * FINE:b * FINE + FINE] != old[b * FINE:b * FINE + FINE]:
            differ += min(bs, req.size - b * bs)
    return SignAnswer(new.whole_digest(), differ)

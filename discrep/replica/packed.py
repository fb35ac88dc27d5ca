"""The first copy's hot path: a packed file written in place into an empty DEST.

A first copy of many small files is bound by per-file work in Python.  ``PackedWriter``
writes such a file with as little of it as possible: ``write`` takes the common raw manifest
entry (a packed file with no xattrs, no link, not empty) with the checks of
``manifest.Entry`` inline, checks its bytes against the manifest's digest, creates it with
its mode, sets owner and times, and returns its ``CatalogRow``; anything unusual is left to
the general path (``write`` returns None), and ``write_entry`` takes any validated packed
Entry.  Used by the streamed first copy (``replica.stream``) and by the second applying
process (``replica.worker``); only a first copy into an empty DEST uses it (nothing older can
be in the way; its undo is "empty DEST again").

Thread-safety: a PackedWriter is used by one thread; the fds it opens are closed before it returns.
"""
from __future__ import annotations

import os
import stat as statmod
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import blockdiff

from discrep.core.errors import ManifestError
from discrep.core.paths import basename, check_rel, dec, parent, show
from discrep.core.writes import pwrite_all
from discrep.protocol.manifest import Entry
from discrep.replica.catalog import CatalogRow
from discrep.replica.dirs import create_file
from discrep.replica.meta import MetaWriter, xattr_warning
from discrep.replica.owners import OwnerMap

BlobOf = Callable[[int], bytes]       # pack k -> its decoded bytes
Warns = List[Tuple[bytes, str]]       # (path, message)

_SHAPE = frozenset(("path", "mode", "uid", "gid", "user", "group", "mtime_ns", "op", "size", "idx", "h", "pack"))


def mkdir_in(pfd: int, rel: bytes) -> None:
    """Make directory ``rel`` (in parent fd ``pfd``) for a first copy; already there as a
    directory is fine (the other process made it as a parent of a file it wrote)."""
    name = basename(rel)
    try:
        os.mkdir(name, 0o700, dir_fd=pfd)
    except FileExistsError:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if not statmod.S_ISDIR(st.st_mode):
            raise ManifestError(f"{show(rel)} appears twice in the manifest") from None


def _common(r: Dict[str, Any]) -> bool:
    """``r`` is a packed file of the common shape, with valid fields (the checks of manifest.Entry)."""
    if len(r) != 12 or r.keys() != _SHAPE or r["op"] != "file":
        return False
    path, mode, uid, gid, mt, size, pk, h = (r["path"], r["mode"], r["uid"], r["gid"], r["mtime_ns"],
                                             r["size"], r["pack"], r["h"])
    return (type(path) is str and type(mode) is int and 0 <= mode < 0o10000 and type(uid) is int
            and 0 <= uid < 1 << 32 and type(gid) is int and 0 <= gid < 1 << 32 and type(mt) is int
            and -(1 << 63) <= mt < 1 << 63 and type(size) is int and 0 < size < 1 << 63
            and type(pk) is list and len(pk) == 2 and type(pk[0]) is int and type(pk[1]) is int
            and pk[0] >= 0 and pk[1] >= 0 and type(h) is str and len(h) == 32 and type(r["idx"]) is int)


class PackedWriter:
    """Writes packed files of a first copy in place (see module doc).  ``parent_fd(rel)``: the
    fd of rel's parent directory, made if missing; ``dirty`` collects the directories written to."""

    def __init__(self, parent_fd: Callable[[bytes], int], dirty: Set[bytes], owners: OwnerMap, *,
                 nosuid: bool = False):
        self.parent_fd = parent_fd
        self.dirty = dirty
        self.owners = owners
        self.meta = MetaWriter(nosuid=nosuid)

    def write(self, r: Dict[str, Any], blob_of: BlobOf) -> Optional[CatalogRow]:
        """The catalog row of raw entry ``r`` after writing it, or None when ``r`` is not of the
        common shape (the caller applies it the general way)."""
        if not _common(r):
            return None         # the general path says what is wrong
        try:
            want = bytes.fromhex(r["h"])
        except ValueError:
            return None
        uid, gid = self.owners.ids(r["user"], r["group"], r["uid"], r["gid"])
        k, off = r["pack"]
        return self._put(check_rel(dec(r["path"])), k, off, r["size"], want, r["mode"], uid, gid,
                         r["mtime_ns"], blob_of)

    def write_entry(self, e: Entry, blob_of: BlobOf, warns: Warns) -> CatalogRow:
        """``write`` for a validated packed Entry whose owners are mapped already; xattrs that
        cannot be set go to ``warns`` as (path, message)."""
        k, off = e.pack
        return self._put(e.path, k, off, e.size, e.h, e.mode, e.uid, e.gid, e.mtime_ns, blob_of, e.xattrs, warns)

    def _put(self, rel: bytes, k: int, off: int, size: int, want: Optional[bytes], mode: int, uid: int,
             gid: int, mt: int, blob_of: BlobOf, xattrs: Optional[Dict[str, bytes]] = None,
             warns: Optional[Warns] = None) -> CatalogRow:
        data = blob_of(k)[off:off + size]
        whole, sig = blockdiff.sign_small(data)
        if len(data) != size or whole != want:
            raise ManifestError(f"pack {k} does not hold the bytes the manifest announces for {show(rel)}")
        pfd = self.parent_fd(rel)
        fmode = mode & 0o777

        def body(fd: int) -> Tuple[int, List[Tuple[str, str]]]:
            pwrite_all(fd, data, 0)
            failed = self.meta.set_fd(fd, uid, gid, mode, mt, xattrs, fresh=True,
                                      mode_set=self.meta.created_with(fmode, mode))
            return os.fstat(fd).st_ino, failed
        ino, failed = create_file(pfd, basename(rel), fmode, body)
        if warns is not None:
            warns.extend((rel, xattr_warning(xn, why)) for xn, why in failed)
        self.dirty.add(parent(rel))
        return CatalogRow.file(rel, size, mt, ino, sig)

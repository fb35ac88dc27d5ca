"""What the source exports for one cycle: the snapshot tree plus the ``.discrep/`` control tree.

``make_view(root, cycle)`` returns a ``fuse_export.ExportView`` whose control
tree holds:

* ``cycle``        -- JSON header of the cycle (also line 1 of the manifest)
* ``manifest``     -- zstd JSON lines (see manifest.py)
* ``pack/<k>``     -- small files' bytes, concatenated, one ``blockdiff.framing`` frame
* ``sig/<idx>``    -- ``blockdiff.Signature`` bytes of manifest file ``idx`` (lazy)
* ``cdc/<idx>``    -- two-level chunk index of file ``idx`` (blockdiff.cdc_index, lazy)
* ``data/<idx>``   -- the bytes of file ``idx`` (an alias: no path lookup, no
  name encoding issue on the way through sshfs or SFTP)

A file the cycle reads live (``live``: the agent holds it open; the snapshot has a symlink to
that fd) is read through the given ``/proc/<pid>/fd/<n>`` path, the one symlink followed here;
the agent's ``verify`` checks afterwards that it did not change.
* ``z/<idx>.<tok>`` -- many ranges of file ``idx`` in one compressed frame (ranges.py)

Lazy files are computed once, on first read, in the export process; a
signature of a sparse file never reads its holes.

Thread-safety: objects here are read by FUSE worker threads; lazy files build
under their own lock (fuse_export.LazyFile); ``_FileAlias`` opens its fd once
under a lock and then only preads.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Dict, Optional, Tuple

import blockdiff
import fuse_export
from blockdiff import cdc_index, framing

from discrep.protocol import cbt
from discrep.protocol import ranges
from discrep.core.errors import ManifestError, SourceError
from discrep.protocol.manifest import read_lines
from discrep.core.paths import dec, join
from discrep.core.paths import state_dir
from discrep.source.cycles import cycle_dir
from discrep.source.catalog import SourceCatalog
from discrep.protocol import layout

log = logging.getLogger(__name__)


class _FileAlias:
    """A control file that reads through to a snapshot file (read-only, pread only)."""

    def __init__(self, path: bytes, size: int, follow: bool = False):
        self.path = path
        self.follow = follow
        self._size = size
        self._fd: Optional[int] = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = _open(self.path, self.follow)
            return self._fd

    def size(self) -> int:
        return self._size

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self._open(), size, offset)


def _open(path: bytes, follow: bool = False) -> int:
    """A read-only fd of ``path``; a symlink is followed only for a live file's ``/proc`` fd path."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))


def _sign(path: bytes, follow: bool = False) -> bytes:
    fd = _open(path, follow)
    try:
        return blockdiff.sign_fd(fd).to_bytes()
    finally:
        os.close(fd)


def _chunks(path: bytes, follow: bool = False) -> bytes:
    fd = _open(path, follow)
    try:
        return cdc_index.index_bytes(blockdiff.chunk_fd(fd))
    finally:
        os.close(fd)


def _ranges(path: bytes, size: int, token: str, follow: bool = False) -> bytes:
    rs = ranges.decode(token, size)
    fd = _open(path, follow)
    try:
        return framing.pack(b"".join(os.pread(fd, ln, off) for off, ln in rs))
    finally:
        os.close(fd)


def make_view(root: bytes, cycle: int, live: Optional[Dict[bytes, bytes]] = None) -> "fuse_export.ExportView":
    """The read-only view of built cycle ``cycle`` of source ``root``; ``live``: path -> the
    ``/proc/<pid>/fd/<n>`` path of a file read live (see the module doc)."""
    live = live or {}
    sd = os.fsdecode(state_dir(root))
    cat = SourceCatalog(sd)
    try:
        rec = cat.cycle(cycle)
    finally:
        cat.close()
    if rec is None or rec.state not in ("built", "acked"):
        raise SourceError(f"cycle {cycle} of {os.fsdecode(root)} is not available for export "
                          f"({rec.state if rec else 'unknown'})",
                          hint="run 'discrep snapshot SRC' first; it prints the cycle number")
    cdir = cycle_dir(root, cycle)
    with open(join(cdir, layout.MANIFEST_FILE), "rb") as f:
        manifest = f.read()
    header, entries = read_lines(manifest)
    files: Dict[int, Tuple[bytes, int, bool]] = {}
    for e in entries:
        if e.get("op") == "file":
            p = dec(e["path"])
            held = live.get(p) if e.get("live") else None
            files[int(e["idx"])] = (held, int(e["size"]), True) if held else \
                (join(rec.snapshot, p), int(e["size"]), False)
    npacks = 0
    while os.path.exists(join(cdir, layout.PACK_FILE % npacks)):
        npacks += 1

    def resolver(rel: bytes):
        d, _, name = rel.partition(b"/")
        if d == layout.Z:
            num, _, token = name.partition(b".")
            if not num.isdigit() or int(num) not in files:
                return None
            path, size, follow = files[int(num)]
            try:
                ranges.decode(token.decode("ascii"), size)
            except (ValueError, UnicodeDecodeError, ManifestError):
                return None  # a malformed request is simply not there (ENOENT)
            return fuse_export.LazyFile(lambda: _ranges(path, size, token.decode("ascii"), follow))
        if not name.isdigit():
            return None
        i = int(name)
        if d == layout.PACK:
            if i >= npacks:
                return None
            p = join(cdir, layout.PACK_FILE % i)
            return _FileAlias(p, os.path.getsize(p))
        if i not in files:
            return None
        path, size, follow = files[i]
        if d == layout.DATA:
            return _FileAlias(path, size, follow)
        if d == layout.SIG:
            return fuse_export.LazyFile(lambda: _sign(path, follow))
        if d == layout.CDC:
            return fuse_export.LazyFile(lambda: _chunks(path, follow))
        if d == layout.CBT:
            side = join(cdir, layout.CBT_FILE % i)
            if not os.path.exists(side):
                return None
            with open(side) as f:
                rs = [tuple(r) for r in json.load(f)]
            return fuse_export.LazyFile(lambda: cbt.build(path, header["base"], rs))
        return None

    control = fuse_export.DictControlTree(
        {layout.CYCLE: fuse_export.BytesFile(json.dumps(header).encode() + b"\n"),
         layout.MANIFEST: fuse_export.BytesFile(manifest)},
        resolver=resolver, dynamic_dirs=layout.DYNAMIC_DIRS)
    source = fuse_export.DirectorySource(rec.snapshot)
    return fuse_export.ExportView(source, control)

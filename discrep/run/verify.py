"""``discrep verify SRC DEST``: does the replica equal the source, content and metadata?

Walks SRC (never following symlinks, skipping ``.discrep``) and DEST side by
side and compares type, mode, owner, mtime_ns, size, bytes, symlink targets,
xattrs and hard-link structure.  It reads both trees in full: it is the
expensive, independent answer, not the catalog's opinion.

With filter rules, only what they select is compared: SRC is walked as a cycle's scan walks it
(source.filtering), DEST without the entries the rules exclude there (they may be kept files
the rules protect; replica.protect reads DEST's own merge files).

``scrub(DEST)`` (``verify DEST --scrub``) needs no source: it checks the replica's files
against the signatures its own catalog recorded (hand edits, bit rot).

Thread-safety: single-threaded.
"""
from __future__ import annotations

import os
import stat as statmod
from typing import Dict, List, Optional, Tuple

import blockdiff

from discrep.core.errors import DestinationError
from discrep.core.paths import join, show, state_dir
from discrep.core.walk import walk
from discrep.core.xattrs import only_replicated, read_xattrs
from discrep.protocol.filterspec import FilterSpec
from discrep.replica.catalog import ReplicaCatalog
from discrep.replica.protect import Protection
from discrep.source.filtering import SourceFilter
from discrep.replica.sync import replica_lock


def _same_bytes(a: bytes, b: bytes) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def compare_trees(src: bytes, dest: bytes, *, limit: int = 100, filters: Optional[FilterSpec] = None) -> List[str]:
    """Human-readable differences (empty when DEST replicates SRC exactly, as ``filters`` select it)."""
    if filters is None or not filters.active:
        return _compare(src, dest, limit, None, None)
    sflt, prot = SourceFilter(src, filters), Protection(dest, filters)
    try:
        return _compare(src, dest, limit, sflt.keep,
                        lambda rel, st: prot.flt.walk_allows(rel, statmod.S_ISDIR(st.st_mode)))
    finally:
        sflt.close()
        prot.close()


def _compare(src: bytes, dest: bytes, limit: int, keep_src, keep_dest) -> List[str]:
    diffs: List[str] = []
    seen = set()
    links_src: Dict[Tuple[int, int], bytes] = {}
    links_dst: Dict[Tuple[int, int], bytes] = {}
    priv = os.geteuid() == 0      # xattrs: the names the replica manages (core.xattrs.replicated)
    for rel, st in walk(src, keep=keep_src):
        if len(diffs) >= limit:
            break
        seen.add(rel)
        d = join(dest, rel)
        try:
            dt = os.lstat(d)
        except FileNotFoundError:
            diffs.append(f"missing on replica: {show(rel)}")
            continue
        if statmod.S_IFMT(st.st_mode) != statmod.S_IFMT(dt.st_mode):
            diffs.append(f"type differs: {show(rel)}")
            continue
        if statmod.S_ISLNK(st.st_mode):
            if os.readlink(join(src, rel)) != os.readlink(d):
                diffs.append(f"symlink target differs: {show(rel)}")
        elif statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode):
            if st.st_mode != dt.st_mode:
                diffs.append(f"mode differs: {show(rel)} {oct(st.st_mode)} != {oct(dt.st_mode)}")
            if only_replicated(read_xattrs(join(src, rel)), priv) != only_replicated(read_xattrs(d), priv):
                diffs.append(f"xattrs differ: {show(rel)}")
        else:
            continue  # special files are not replicated
        if (st.st_uid, st.st_gid) != (dt.st_uid, dt.st_gid):
            diffs.append(f"owner differs: {show(rel)}")
        if st.st_mtime_ns != dt.st_mtime_ns:
            diffs.append(f"mtime differs: {show(rel)}")
        if statmod.S_ISREG(st.st_mode):
            if st.st_size != dt.st_size:
                diffs.append(f"size differs: {show(rel)} {st.st_size} != {dt.st_size}")
            elif not _same_bytes(join(src, rel), d):
                diffs.append(f"content differs: {show(rel)}")
            if st.st_nlink > 1 or dt.st_nlink > 1:
                a = links_src.setdefault((st.st_dev, st.st_ino), rel)
                b = links_dst.setdefault((dt.st_dev, dt.st_ino), rel)
                if a != b:
                    diffs.append(f"hard links differ: {show(rel)}")
    for rel, st in walk(dest, keep=keep_dest):
        if len(diffs) >= limit:
            break
        if rel not in seen:
            try:
                sst = os.lstat(join(src, rel))
                if not (statmod.S_ISREG(sst.st_mode) or statmod.S_ISDIR(sst.st_mode) or statmod.S_ISLNK(sst.st_mode)):
                    continue
            except FileNotFoundError:
                pass
            diffs.append(f"extra on replica: {show(rel)}")
    return diffs


def scrub(dest: bytes, *, limit: int = 100) -> Tuple[int, List[str]]:
    """``verify DEST --scrub``: sign every file the replica's catalog records, from its actual
    bytes in DEST, and compare with the catalog's signature (hand edits, bit rot); no source
    needed.  Returns (files checked, damaged paths, at most ``limit``).  Reads only; holds DEST's
    lock so that no cycle changes files under it."""
    if not os.path.exists(join(state_dir(dest), b"replica.db")):
        raise DestinationError(f"{os.fsdecode(dest)} is not a discrep replica")
    damaged: List[str] = []
    n = 0
    with replica_lock(dest):
        cat = ReplicaCatalog(os.fsdecode(state_dir(dest)))
        try:
            rows = cat.con.execute("SELECT path, sig FROM files WHERE kind = 'file' AND sig IS NOT NULL "
                                   "ORDER BY path").fetchall()
        finally:
            cat.close()
        for path, sig in rows:
            n += 1
            why = _scrub_one(join(dest, bytes(path)), blockdiff.Signature.from_bytes(bytes(sig)))
            if why:
                damaged.append(f"{why}: {show(bytes(path))}")
                if len(damaged) >= limit:
                    break
    return n, damaged


def _scrub_one(full: bytes, known: "blockdiff.Signature") -> Optional[str]:
    """What is wrong with the file at ``full`` against its recorded signature (None: nothing)."""
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "not a readable file"
    try:
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            return "not a file"
        if st.st_size != known.file_size:
            return "size differs"
        actual = blockdiff.sign_fd(fd, st.st_size, known.block_size, known.factor)
        return None if actual.whole_digest() == known.whole_digest() else "content differs"
    finally:
        os.close(fd)

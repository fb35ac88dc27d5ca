"""Every recovery point's version of the paths that match a pattern (``discrep find``).

A replica holds its newest cycle in DEST and each older cycle as reverse deltas (``history``).  To
see an older cycle's version of a path, this module replays those reverse deltas with the very
undo code that ``restore`` and ``recover`` use (``history.walk_back``), so what it reports is what
``restore --cycle N --path P`` would produce, after renames, deletes and replacements.

It does so in two passes over a scratch copy in DEST's state dir, so it never copies the whole
replica:

1. a *skeleton*: every directory and symlink of DEST, and every regular file as an empty
   placeholder (hard links kept); the undo records move, remove and restore entries on it exactly as
   on a real copy (a patch record writes its old blocks into the placeholder, which is harmless).
   At each point the entries that match are noted; a matching placeholder names the DEST file it
   stands for.
2. the same replay on a skeleton where just those DEST files are real copies (reflinks where the
   filesystem allows): at each point every matching entry is hashed.  Objects that the history
   brings back (``keep/``) are always real copies.

The digest is xxh3-128 of the bytes as they would be restored (a symlink: of its target),
computed here from the replica's own bytes and history, not taken from the source's manifest or the
replica's catalog: a digest that differs between two points means the bytes did.

Patterns are rsync's (as ``--exclude`` takes them): ``*.txt`` matches the name at any depth,
``/docs/*.txt`` is anchored at the tree's top, ``docs/**`` matches everything below any ``docs``.

Thread-safety: runs in the caller's thread; the caller holds the replica's lock.
"""
from __future__ import annotations

import os
import shutil
import stat as statmod
import tempfile
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Tuple

import xxhash

from discrep.core import platform
from discrep.core.errors import DestinationError, UsageError
from discrep.core.paths import join
from discrep.core.walk import walk
from discrep.protocol.filters import FilterRules
from discrep.replica.history import walk_back

SCRATCH_PREFIX = "find."
_CHUNK = 1 << 20


class Version(NamedTuple):
    """One path as it is in one recovery point."""
    cycle: int
    path: bytes
    kind: str                   # file, dir, symlink, fifo, socket, chardev, blockdev
    size: int
    mtime_ns: int
    mode: int
    digest: Optional[str]       # xxh3-128 hex of the content (a symlink: of its target); None for others


def matcher(pattern: str) -> Callable[[bytes, bool], bool]:
    """``pattern`` (rsync syntax) as a test of (relative path, is a directory)."""
    if not pattern or "\0" in pattern:
        raise UsageError("find: the pattern is empty or holds a NUL byte")
    rules = FilterRules.parse([("exclude", pattern)])
    if rules.is_empty():
        raise UsageError(f"find: {pattern!r} is not a pattern")
    return rules.excluded


def _kind(mode: int) -> str:
    for test, name in ((statmod.S_ISREG, "file"), (statmod.S_ISDIR, "dir"), (statmod.S_ISLNK, "symlink"),
                       (statmod.S_ISFIFO, "fifo"), (statmod.S_ISSOCK, "socket"), (statmod.S_ISCHR, "chardev"),
                       (statmod.S_ISBLK, "blockdev")):
        if test(mode):
            return name
    return "other"


def _digest(path: bytes, st: os.stat_result) -> Optional[str]:
    if statmod.S_ISLNK(st.st_mode):
        return xxhash.xxh3_128_hexdigest(os.readlink(path))
    if not statmod.S_ISREG(st.st_mode):
        return None
    h = xxhash.xxh3_128()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while True:
            b = os.read(fd, _CHUNK)
            if not b:
                break
            h.update(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def skeleton(src: bytes, dst: bytes, real: Set[bytes], meta: bool = True) -> Dict[int, bytes]:
    """Copy DEST ``src`` (without its .discrep) to the new directory ``dst``: directories, symlinks
    and special files as they are, regular files in ``real`` as real copies, the others as empty
    placeholders (hard links kept; metadata copied when ``meta``, never onto a placeholder: nobody
    looks at it); returns placeholder inode -> DEST path."""
    os.mkdir(dst, 0o700)
    placeholders: Dict[int, bytes] = {}
    links: Dict[Tuple[int, int], bytes] = {}
    dirs: List[Tuple[bytes, os.stat_result]] = []
    for rel, st in walk(src):
        s_, d_ = join(src, rel), join(dst, rel)
        if statmod.S_ISDIR(st.st_mode):
            os.mkdir(d_, 0o700)
            dirs.append((rel, st))
            continue
        if statmod.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(s_), d_)
        elif statmod.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], d_)
                continue
            if st.st_nlink > 1:
                links[key] = d_
            if rel not in real:
                os.mknod(d_, statmod.S_IFREG | 0o600)
                placeholders[os.lstat(d_).st_ino] = rel
                continue
            platform.clone_file(s_, d_)
        else:
            os.mknod(d_, st.st_mode, st.st_rdev)
        if meta:
            platform.copy_metadata(s_, d_, st)
    for rel, st in reversed(dirs if meta else []):
        platform.copy_metadata(join(src, rel), join(dst, rel), st)
    return placeholders


def _matches(work: bytes, test: Callable[[bytes, bool], bool]) -> List[Tuple[bytes, bytes, os.stat_result]]:
    """(relative path, full path, lstat) of every entry of the tree ``work`` that matches."""
    out = []
    for rel, st in walk(work):
        if test(rel, statmod.S_ISDIR(st.st_mode)):
            out.append((rel, join(work, rel), st))
    return out


def find_versions(dest: bytes, state: bytes, committed: List[int], pattern: str) -> Tuple[List[Version], List[int]]:
    """Every restorable recovery point's version of the entries matching ``pattern``, oldest point
    first and by path; and the restorable points looked at (newest first)."""
    test = matcher(pattern)
    if not committed:
        return [], []
    for name in os.listdir(state):          # scratch left by a find that was killed
        if name.startswith(SCRATCH_PREFIX.encode()):
            shutil.rmtree(join(state, name), ignore_errors=True)
    tmp = os.fsencode(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=os.fsdecode(state)))
    try:
        # pass 1: placeholders only; which DEST files ever match
        wanted: Set[bytes] = set()
        holders: Dict[int, bytes] = {}

        def clone1(src: bytes, dst: bytes) -> None:
            holders.update(skeleton(src, dst, set(), meta=False))

        def note(cycle: int, work: bytes) -> None:
            for _rel, _full, st in _matches(work, test):
                if statmod.S_ISREG(st.st_mode) and st.st_ino in holders:
                    wanted.add(holders[st.st_ino])
        walk_back(dest, state, committed, join(tmp, b"pass1"), clone1, note)
        # pass 2: the wanted files real; hash every match
        versions: List[Version] = []
        holders2: Dict[int, bytes] = {}

        def clone2(src: bytes, dst: bytes) -> None:
            holders2.update(skeleton(src, dst, wanted))

        def record(cycle: int, work: bytes) -> None:
            for rel, full, st in _matches(work, test):
                if statmod.S_ISREG(st.st_mode) and st.st_ino in holders2:
                    raise DestinationError(f"find: {os.fsdecode(rel)} of cycle {cycle} matched only in the "
                                           f"second pass (DEST changed while find ran?)")
                versions.append(Version(cycle, rel, _kind(st.st_mode), st.st_size, st.st_mtime_ns,
                                        statmod.S_IMODE(st.st_mode), _digest(full, st)))
        seen = walk_back(dest, state, committed, join(tmp, b"pass2"), clone2, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    versions.sort(key=lambda v: (v.cycle, v.path))
    return versions, seen

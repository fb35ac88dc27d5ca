"""``replicate -n/--dry-run`` of a local pair: what a cycle would apply, itemized like ``rsync -i``.

A dry run changes nothing on either side: it builds no cycle (the source's journal, catalog and
snapshots are not touched -- SRC/.discrep is not even read) and writes nothing in DEST, its
``.discrep`` included (the replica's catalog is opened read-only, no lock is taken: a run
going on meanwhile only makes the answer stale).  It compares SRC as it is now with DEST:

* ``>f+++++++++`` created (``cd``/``cL`` for directories and symlinks); a new file with the
  bytes of a deleted one is shown ``renamed from`` it;
* ``>fcst......`` content changed, with the bytes a cycle would fetch (the fine blocks whose
  digests differ from the replica catalog's signature; the whole file without one);
* ``.f...pogtx.`` metadata only (perms, owner, group, time, xattrs);
* ``*deleting  `` deleted (a directory's contents as DEST holds them).

With filter rules (``FilterSpec``) it compares what a cycle would: SRC as the rules select it
(excluded directories not walked, dir-merge files read from SRC), and DEST without the entries
the rules protect (unless --delete-excluded), as the replica's cycle does (replica.protect).

Thread-safety: runs in the caller's thread.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import stat as statmod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import blockdiff

from discrep.core.paths import join, show, state_dir
from discrep.core.walk import walk
from discrep.core.xattrs import only_replicated, read_xattrs
from discrep.protocol.filterspec import FilterSpec
from discrep.replica.protect import protection
from discrep.source.filtering import SourceFilter

Sigs = Dict[bytes, bytes]


@dataclass
class DryRun:
    """The itemized lines and the totals."""
    lines: List[str] = field(default_factory=list)
    created: int = 0
    changed: int = 0
    meta_only: int = 0
    deleted: int = 0
    renamed: int = 0
    fetch_bytes: int = 0

    def result(self) -> Dict[str, object]:
        return {"dry_run": True, "items": self.lines, "created": self.created, "changed": self.changed,
                "metadata_only": self.meta_only, "deleted": self.deleted, "renamed": self.renamed,
                "bytes_to_fetch": self.fetch_bytes}


def catalog_sigs(dest: bytes) -> Sigs:
    """The replica catalog's file signatures (empty: none), read without writing a byte in DEST:
    SQLite opens the database ``immutable`` (no -shm/-wal files made); when a write-ahead log is
    there (a run going on, or one that crashed), a private copy of both is read instead."""
    db = join(state_dir(dest), b"replica.db")
    if not os.path.exists(db):
        return {}
    wal = db + b"-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        with tempfile.TemporaryDirectory(prefix="discrep-dryrun-") as tmp:
            copy = os.path.join(tmp, "replica.db")
            shutil.copyfile(db, copy)
            shutil.copyfile(wal, copy + "-wal")
            return _read_sigs(f"file:{copy}")
    return _read_sigs(f"file:{os.fsdecode(db)}?mode=ro&immutable=1")


def _read_sigs(uri: str) -> Sigs:
    con = sqlite3.connect(uri, uri=True)
    try:
        return {bytes(p): bytes(s) for p, s in
                con.execute("SELECT path, sig FROM files WHERE kind = 'file' AND sig IS NOT NULL")}
    finally:
        con.close()


def dry_run(src: bytes, dest: bytes, filters: Optional[FilterSpec] = None) -> DryRun:
    """What a cycle SRC -> DEST would apply with ``filters`` (see module doc)."""
    spec = filters or FilterSpec()
    sflt = SourceFilter(src, spec) if spec.active else None
    prot = protection(dest, spec) if os.path.isdir(dest) else None
    try:
        return _dry_run(src, dest, sflt.keep if sflt is not None else None,
                        (lambda rel, st: prot.flt.walk_allows(rel, statmod.S_ISDIR(st.st_mode)))
                        if prot is not None else None)
    finally:
        if sflt is not None:
            sflt.close()
        if prot is not None:
            prot.close()


def _dry_run(src: bytes, dest: bytes, keep_src, keep_dest) -> DryRun:
    out = DryRun()
    sigs = catalog_sigs(dest) if os.path.isdir(dest) else {}
    seen = set()
    created: List[Tuple[bytes, os.stat_result]] = []
    for rel, st in walk(src, keep=keep_src):
        seen.add(rel)
        if not (statmod.S_ISREG(st.st_mode) or statmod.S_ISDIR(st.st_mode) or statmod.S_ISLNK(st.st_mode)):
            continue
        try:
            dt: Optional[os.stat_result] = os.lstat(join(dest, rel))
        except (FileNotFoundError, NotADirectoryError):
            dt = None
        if dt is None or statmod.S_IFMT(dt.st_mode) != statmod.S_IFMT(st.st_mode):
            created.append((rel, st))
            continue
        _compare(out, src, dest, rel, st, dt, sigs)
    gone = [rel for rel, _st in walk(dest, keep=keep_dest) if rel not in seen] if os.path.isdir(dest) else []
    renamed = _renames(src, created, gone, sigs)
    for rel, st in created:
        kind = "cd" if statmod.S_ISDIR(st.st_mode) else "cL" if statmod.S_ISLNK(st.st_mode) else ">f"
        if rel in renamed:
            out.renamed += 1
            out.lines.append(f"{kind}R+++++++++ {show(rel)} (renamed from {show(renamed[rel])})")
            continue
        out.created += 1
        if statmod.S_ISREG(st.st_mode):
            out.fetch_bytes += st.st_size
        out.lines.append(f"{kind}+++++++++ {show(rel)}" + (f" ({st.st_size} bytes)" if kind == ">f" else ""))
    moved_away = set(renamed.values())
    for rel in gone:
        if rel in moved_away or any(rel.startswith(g + b"/") for g in moved_away):
            continue
        out.deleted += 1
        out.lines.append(f"*deleting   {show(rel)}")
    return out


def _compare(out: DryRun, src: bytes, dest: bytes, rel: bytes, st: os.stat_result, dt: os.stat_result,
             sigs: Sigs) -> None:
    """An object present on both sides: content changed, metadata only, or nothing."""
    flags = ["."] * 9
    content = False
    if statmod.S_ISLNK(st.st_mode):
        content = os.readlink(join(src, rel)) != os.readlink(join(dest, rel))
    elif statmod.S_ISREG(st.st_mode) and (st.st_size != dt.st_size or st.st_mtime_ns != dt.st_mtime_ns):
        fetch = _fetch_estimate(join(src, rel), st.st_size, sigs.get(rel))
        if fetch or st.st_size != dt.st_size:
            content = True
            flags[0], flags[1] = "c", "s" if st.st_size != dt.st_size else "."
            out.fetch_bytes += fetch
    if not statmod.S_ISLNK(st.st_mode) and statmod.S_IMODE(st.st_mode) != statmod.S_IMODE(dt.st_mode):
        flags[3] = "p"
    if st.st_uid != dt.st_uid:
        flags[4] = "o"
    if st.st_gid != dt.st_gid:
        flags[5] = "g"
    if st.st_mtime_ns != dt.st_mtime_ns and not statmod.S_ISDIR(st.st_mode):
        flags[2] = "t"
    priv = os.geteuid() == 0      # the names the replica manages (core.xattrs.replicated)
    if not statmod.S_ISLNK(st.st_mode) and \
            only_replicated(read_xattrs(join(src, rel)), priv) != only_replicated(read_xattrs(join(dest, rel)), priv):
        flags[6] = "x"
    kind = "d" if statmod.S_ISDIR(st.st_mode) else "L" if statmod.S_ISLNK(st.st_mode) else "f"
    if content:
        out.changed += 1
        extra = f" (~{fetch} bytes to fetch)" if kind == "f" else ""
        out.lines.append(f">{kind}{''.join(flags)} {show(rel)}{extra}")
    elif flags[3:7] != ["."] * 4 or flags[2] == "t":
        out.meta_only += 1
        out.lines.append(f".{kind}{''.join(flags)} {show(rel)}")


def _fetch_estimate(path: bytes, size: int, sig: Optional[bytes]) -> int:
    """Bytes a cycle would fetch for file ``path``: its blocks that differ from ``sig``."""
    if sig is None:
        return size
    old = blockdiff.Signature.from_bytes(sig)
    with open(path, "rb", buffering=0) as f:
        new = blockdiff.sign_fd(f.fileno(), size, old.block_size, old.factor)
    if new.whole_digest() == old.whole_digest() and new.file_size == old.file_size:
        return 0
    bs = old.block_size
    n = 0
    for b in range(new.n_blocks):
        if b >= old.n_blocks or new.fine[b * 8:b * 8 + 8] != old.fine[b * 8:b * 8 + 8]:
            n += min(bs, size - b * bs)
    return n


def _renames(src: bytes, created: List[Tuple[bytes, os.stat_result]], gone: List[bytes],
             sigs: Sigs) -> Dict[bytes, bytes]:
    """New file path -> the deleted path whose recorded bytes it has (same size and whole digest)."""
    by_size: Dict[int, List[Tuple[bytes, "blockdiff.Signature"]]] = {}
    for rel in gone:
        if rel in sigs:
            s = blockdiff.Signature.from_bytes(sigs[rel])
            by_size.setdefault(s.file_size, []).append((rel, s))
    found: Dict[bytes, bytes] = {}
    for rel, st in created:
        cands = by_size.get(st.st_size) if statmod.S_ISREG(st.st_mode) else None
        if not cands:
            continue
        for old_rel, s in cands:
            with open(join(src, rel), "rb", buffering=0) as f:
                if blockdiff.sign_fd(f.fileno(), st.st_size, s.block_size, s.factor).whole_digest() == \
                        s.whole_digest():
                    found[rel] = old_rel
                    cands.remove((old_rel, s))
                    break
    return found

"""``replicate -n/--dry-run``: what a cycle would apply, itemized like ``rsync -i``.

A dry run changes nothing on either side: it builds no cycle (the source's journal, catalog and
snapshots are not touched -- SRC/.discrep is not even read) and writes nothing in DEST, its
``.discrep`` included (the replica's catalog is opened read-only, no lock is taken: a run
going on meanwhile only makes the answer stale).  It compares SRC as it is now with DEST,
reading SRC through a ``SourceView`` (protocol.sourceview): the local one
(source.dryview.LocalSourceView) for ``dry_run``, the source agent in dry-run mode over one SSH
connection (transport.dryview_client) for ``dry_run_remote`` -- the comparison is the same code:

* ``>f+++++++++`` created (``cd``/``cL`` for directories and symlinks); a new file with the
  bytes of a deleted one is shown ``renamed from`` it;
* ``>fcst......`` content changed, with the bytes a cycle would fetch (the fine blocks whose
  digests differ from the replica catalog's signature; the whole file without one);
* ``.f...pogtx.`` metadata only (perms, owner, group, time, xattrs);
* ``*deleting  `` deleted (a directory's contents as DEST holds them).

With filter rules (``FilterSpec``) it compares what a cycle would: SRC as the rules select it
(excluded directories not walked, dir-merge files read from SRC), and DEST without the entries
the rules protect (unless --delete-excluded), as the replica's cycle does (replica.protect).
The source view is asked to sign only files whose size or mtime differ and that have a catalog
signature (with its old fine digests: the answer is a byte count), and new files whose size
matches a deleted file's signature (rename detection: whole digests).  DEST is looked at only
beneath directories that are directories on both sides, so no path the source names leads
through a symlink in DEST.

Thread-safety: runs in the caller's thread.
"""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import tempfile
import stat as statmod
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import blockdiff

from discrep.core.errors import TransportError
from discrep.core.paths import join, parent, show, state_dir
from discrep.core.walk import walk
from discrep.core.xattrs import read_xattrs
from discrep.protocol.agent_messages import dry_signable
from discrep.protocol.filterspec import FilterSpec
from discrep.protocol.sourceview import SignAnswer, SignRequest, SourceView, SrcEntry, xattr_digest
from discrep.replica.protect import protection
from discrep.run.options import CycleOptions
from discrep.source.dryview import LocalSourceView

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
    """What a cycle SRC -> DEST (SRC on this host) would apply with ``filters`` (see module doc)."""
    spec = filters or FilterSpec()
    view = LocalSourceView(src, spec)
    try:
        return compare(view, dest, spec)
    finally:
        view.close()


def dry_run_remote(opts: CycleOptions) -> DryRun:
    """The dry run of ``[USER@]HOST:SRC DEST`` over one SSH connection (ssh config, host keys,
    --timeout and --bwlimit as a real cycle's: run.remote)."""
    from discrep.transport.dryview_client import RemoteSourceView
    from discrep.transport.ssh import Connection, parse_remote, resolve
    user, host, rpath = parse_remote(opts.src)
    cfg = resolve(user, host, opts.ssh.ssh_config)
    cfg.io_timeout = float(opts.ssh.timeout)
    spec = opts.replica.filter_spec()
    conn = Connection(cfg, bwlimit=int(opts.ssh.bwlimit or 0))
    try:
        conn.connect()
        view = RemoteSourceView(conn, opts.ssh.remote_discrep or "discrep", rpath, spec, timeout=cfg.io_timeout)
        try:
            return compare(view, os.fsencode(os.path.abspath(opts.dest)), spec)
        finally:
            view.close()
    except (socket.error, EOFError) as e:
        raise TransportError(f"the SSH connection to {cfg.describe()} failed: {e}",
                             hint="nothing was changed; run again") from None
    finally:
        conn.close()


def compare(view: SourceView, dest: bytes, spec: FilterSpec) -> DryRun:
    """What a cycle from ``view`` into ``dest`` would apply with ``spec`` (see module doc)."""
    prot = protection(dest, spec) if os.path.isdir(dest) else None
    try:
        return _compare_all(view, dest, (lambda rel, st: prot.flt.walk_allows(rel, statmod.S_ISDIR(st.st_mode)))
                            if prot is not None else None)
    finally:
        if prot is not None:
            prot.close()


@dataclass
class _Both:
    """An object on both sides, its content check pending (``req``: the fetch estimate to ask)."""
    e: SrcEntry
    dt: os.stat_result
    sig: Optional[bytes] = None
    req: Optional[SignRequest] = None


def _compare_all(view: SourceView, dest: bytes, keep_dest) -> DryRun:
    out = DryRun()
    sigs = catalog_sigs(dest) if os.path.isdir(dest) else {}
    seen = set()
    both_dirs = {b""}                 # directories on both sides: DEST is looked at only below them
    created: List[SrcEntry] = []
    both: List[_Both] = []
    for e in view.entries():
        seen.add(e.path)
        if not (e.is_reg or e.is_dir or e.is_link):
            continue
        dt: Optional[os.stat_result] = None
        if parent(e.path) in both_dirs:
            try:
                dt = os.lstat(join(dest, e.path))
            except (FileNotFoundError, NotADirectoryError):
                dt = None
        if dt is None or statmod.S_IFMT(dt.st_mode) != statmod.S_IFMT(e.mode):
            created.append(e)
            continue
        if e.is_dir:
            both_dirs.add(e.path)
        both.append(_job(e, dt, sigs.get(e.path)))
    asks = [b.req for b in both if b.req is not None]
    answers = iter(view.sign(asks) if asks else [])
    for b in both:
        _compare(out, dest, b, next(answers) if b.req is not None else None)
    gone = [rel for rel, _st in walk(dest, keep=keep_dest) if rel not in seen] if os.path.isdir(dest) else []
    renamed = _renames(view, created, gone, sigs)
    for e in created:
        kind = "cd" if e.is_dir else "cL" if e.is_link else ">f"
        if e.path in renamed:
            out.renamed += 1
            out.lines.append(f"{kind}R+++++++++ {show(e.path)} (renamed from {show(renamed[e.path])})")
            continue
        out.created += 1
        if e.is_reg:
            out.fetch_bytes += e.size
        out.lines.append(f"{kind}+++++++++ {show(e.path)}" + (f" ({e.size} bytes)" if kind == ">f" else ""))
    moved_away = set(renamed.values())
    for rel in gone:
        if rel in moved_away or any(rel.startswith(g + b"/") for g in moved_away):
            continue
        out.deleted += 1
        out.lines.append(f"*deleting   {show(rel)}")
    return out


def _job(e: SrcEntry, dt: os.stat_result, sig: Optional[bytes]) -> _Both:
    """The pending comparison of ``e``; a file whose size or mtime differ asks for an estimate
    when the catalog has its signature (without one, the whole file would be fetched)."""
    b = _Both(e, dt, sig)
    if e.is_reg and sig is not None and (e.size != dt.st_size or e.mtime_ns != dt.st_mtime_ns):
        old = blockdiff.Signature.from_bytes(sig)
        if dry_signable(e.size, old.block_size) and dry_signable(old.file_size, old.block_size):
            b.req = SignRequest(e.path, e.size, old.block_size, old.factor, old.fine)
    return b


def _compare(out: DryRun, dest: bytes, b: _Both, ans: Optional[SignAnswer]) -> None:
    """An object present on both sides: content changed, metadata only, or nothing."""
    e, dt = b.e, b.dt
    flags = ["."] * 9
    content = False
    fetch = 0
    if e.is_link:
        content = e.target != os.readlink(join(dest, e.path))
    elif e.is_reg and (e.size != dt.st_size or e.mtime_ns != dt.st_mtime_ns):
        fetch = _estimate(e, b.sig, ans)
        if fetch or e.size != dt.st_size:
            content = True
            flags[0], flags[1] = "c", "s" if e.size != dt.st_size else "."
            out.fetch_bytes += fetch
    if not e.is_link and statmod.S_IMODE(e.mode) != statmod.S_IMODE(dt.st_mode):
        flags[3] = "p"
    if e.uid != dt.st_uid:
        flags[4] = "o"
    if e.gid != dt.st_gid:
        flags[5] = "g"
    if e.mtime_ns != dt.st_mtime_ns and not e.is_dir:
        flags[2] = "t"
    priv = os.geteuid() == 0      # the names the replica manages (core.xattrs.replicated)
    if not e.is_link and e.xattrs != xattr_digest(read_xattrs(join(dest, e.path)), priv):
        flags[6] = "x"
    kind = "d" if e.is_dir else "L" if e.is_link else "f"
    if content:
        out.changed += 1
        extra = f" (~{fetch} bytes to fetch)" if kind == "f" else ""
        out.lines.append(f">{kind}{''.join(flags)} {show(e.path)}{extra}")
    elif flags[3:7] != ["."] * 4 or flags[2] == "t":
        out.meta_only += 1
        out.lines.append(f".{kind}{''.join(flags)} {show(e.path)}")


def _estimate(e: SrcEntry, sig: Optional[bytes], ans: Optional[SignAnswer]) -> int:
    """Bytes a cycle would fetch for file ``e``: its blocks that differ from ``sig`` (the whole
    file without a signature or an answer)."""
    if sig is None or ans is None or ans.whole is None or ans.differ is None:
        return e.size
    old = blockdiff.Signature.from_bytes(sig)
    if ans.whole == old.whole_digest() and e.size == old.file_size:
        return 0
    return ans.differ


def _renames(view: SourceView, created: List[SrcEntry], gone: List[bytes], sigs: Sigs) -> Dict[bytes, bytes]:
    """New file path -> the deleted path whose recorded bytes it has (same size and whole digest)."""
    by_size: Dict[int, List[Tuple[bytes, "blockdiff.Signature"]]] = {}
    for rel in gone:
        if rel in sigs:
            s = blockdiff.Signature.from_bytes(sigs[rel])
            by_size.setdefault(s.file_size, []).append((rel, s))
    asks: Dict[Tuple[bytes, int, int], SignRequest] = {}
    for e in created:
        for _old, s in (by_size.get(e.size, []) if e.is_reg else []):
            if not dry_signable(e.size, s.block_size):
                continue
            asks.setdefault((e.path, s.block_size, s.factor), SignRequest(e.path, e.size, s.block_size, s.factor))
    wholes = dict(zip(asks, view.sign(list(asks.values())))) if asks else {}
    found: Dict[bytes, bytes] = {}
    for e in created:
        cands = by_size.get(e.size) if e.is_reg else None
        for old_rel, s in cands or []:
            ans = wholes.get((e.path, s.block_size, s.factor))
            if ans is not None and ans.whole == s.whole_digest():
                found[e.path] = old_rel
                cands.remove((old_rel, s))
                break
    return found

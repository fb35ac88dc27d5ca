"""One whole cycle on one host: build, export on a private FUSE mount, sync, ack.

``replicate_local(src, dest)`` is what ``discrep replicate SRC DEST`` runs when
SRC is a local path.  It first settles leftovers of an earlier run (a cycle the
replica committed but the source never saw acknowledged), decides whether the
source's base matches the replica (else a full comparison), builds the next
cycle, serves it read-only through FUSE from a child process, reads it back
through that mount exactly as a remote replica reads sshfs, and acknowledges.
The mount and the child are gone on every path out (finally).

The source's side (build, export, FUSE bindings) is imported by ``replicate_local`` itself: a
remote cycle imports this module for ``prepare_dest`` alone and must not pay for it.

Thread-safety: runs in the caller's thread.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

from discrep.core.errors import DestinationError, FuseUnavailableError, UsageError, WarningList
from discrep.core.paths import STATE_DIR, nested, state_dir
from discrep.protocol.replicaid import check_replica_id
from discrep.replica.runlock import run_lock
from discrep.replica.catalog import ReplicaCatalog
from discrep.run.options import CycleOptions

log = logging.getLogger(__name__)


def check_pair(src: str, dest: str) -> None:
    if not os.path.isdir(src):
        raise UsageError(f"source {src} does not exist or is not a directory", hint="check the SRC path")
    if nested(dest, src):
        raise UsageError(f"replica {dest} lies inside source {src}", hint="put the replica outside the source tree")
    if os.path.exists(dest) and nested(src, dest):
        raise UsageError(f"source {src} lies inside replica {dest}", hint="choose a replica directory outside SRC")


def prepare_dest(dest: str, *, force: bool) -> int:
    """Create DEST if needed; return the replica's last committed cycle."""
    return _prepare(dest, force, with_id=False)[0]


def prepare_replica(dest: str, *, force: bool) -> Tuple[int, str]:
    """``prepare_dest``, and DEST's replica id (made once; one catalog open for both)."""
    return _prepare(dest, force, with_id=True)


def _prepare(dest: str, force: bool, with_id: bool) -> Tuple[int, str]:
    if not os.path.exists(dest):
        par = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(par):
            raise DestinationError(f"cannot create replica {dest}: {par} does not exist",
                                   hint="create the parent directory first")
        try:
            os.mkdir(dest, 0o755)
        except FileExistsError:
            pass                # a second run started at the same moment made it: the run lock decides
        except PermissionError:
            raise DestinationError(f"cannot create replica {dest}: permission denied") from None
    if not os.path.isdir(dest):
        raise DestinationError(f"replica {dest} is not a directory")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise DestinationError(f"replica {dest} is not writable", hint="fix its permissions or run as its owner")
    has_state = os.path.exists(os.path.join(dest, STATE_DIR.decode(), "replica.db"))
    if not has_state:
        others = [n for n in os.listdir(dest) if n != STATE_DIR.decode()]
        if others and not force:
            raise DestinationError(f"replica {dest} is not empty and was not made by discrep "
                                   f"({len(others)} entries)",
                                   hint="use an empty directory, or --force to make it an exact copy "
                                        "(entries not in SRC are deleted)")
        if not with_id:
            return 0, ""
    cat = ReplicaCatalog(os.fsdecode(state_dir(os.fsencode(dest))))
    try:
        rid = check_replica_id(cat.replica_id(), f"the replica id in {dest}/.discrep") if with_id else ""
        return cat.last_committed(), rid
    finally:
        cat.close()


def need_fuse() -> None:
    """FuseUnavailableError unless libfuse loads and /dev/fuse exists (a local export needs both)."""
    import fuse_export
    try:
        fuse_export.load_fuse()
    except fuse_export.FuseUnavailable as e:
        raise FuseUnavailableError(f"FUSE is not available: {e}") from None
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailableError("/dev/fuse is missing")


def replicate_local(opts: CycleOptions, warnings: Optional[WarningList] = None,
                    progress=None) -> Dict[str, Any]:
    """One whole cycle of a local pair (``opts.src`` and ``opts.dest`` on this host)."""
    warnings = warnings if warnings is not None else WarningList()
    t0 = time.monotonic()
    src, dest = os.path.abspath(opts.src), os.path.abspath(opts.dest)
    check_pair(src, dest)
    if opts.ssh.bwlimit:
        log.info("--bwlimit paces SSH connections: a local cycle has no wire and is not limited")
    bsrc, bdest = os.fsencode(src), os.fsencode(dest)
    need_fuse()
    prepare_dest(dest, force=opts.replica.force)
    with run_lock(bdest):     # the whole run: a second one into DEST is refused, not raced
        return _cycle(opts, src, bsrc, dest, bdest, warnings, progress, t0)


def _cycle(opts: CycleOptions, src: str, bsrc: bytes, dest: str, bdest: bytes, warnings: WarningList,
           progress, t0: float) -> Dict[str, Any]:
    import fuse_export

    from discrep.source import cycles, positions
    from discrep.source.export import make_view
    from discrep.source.hooks import build_with_hooks, load_hook_file
    from discrep.source.filtering import prepare_filters
    from discrep.replica.sync import result_fields, sync
    from discrep.transport.mount_reader import MountReader
    rcycle, rid = prepare_replica(dest, force=opts.replica.force)   # what DEST committed, now that we hold it
    rid = opts.replica_id or rid
    store = positions.store_for(bsrc, rid, rcycle)      # this replica's own position on the source
    cycles.settle_source(bsrc, rcycle, store)
    rescan = prepare_filters(bsrc, opts.replica.filter_spec(), store)   # the rules changed: scan, or compare all
    if opts.replica.checksum and rcycle:
        cycles.reset(bsrc, store)      # --checksum: a full cycle, so that every file is compared
    with cycles.disk_full_said(bsrc):
        hooks = opts.hooks if opts.hooks is not None else load_hook_file(bsrc)
        built = build_with_hooks(bsrc, hooks, snapshot_kind=opts.snapshot, min_cycle=rcycle + 1,
                                 warnings=warnings, force_scan=rescan, filters=opts.replica.filter_spec(),
                                 store=store)
    mnt = tempfile.mkdtemp(prefix="discrep-export-")
    try:
        view = make_view(bsrc, built.cycle, store=store)
        try:
            export = fuse_export.BackgroundExport(view, mnt).start()
        except fuse_export.MountError as e:
            raise FuseUnavailableError(f"cannot mount the export: {e}") from None
        try:
            reader = MountReader(mnt)
            try:
                stats = sync(reader, bdest, opts.replica, warnings=warnings, progress=progress)
            finally:
                reader.close()
        finally:
            export.stop()
    finally:
        shutil.rmtree(mnt, ignore_errors=True)
    cycles.ack_cycle(bsrc, built.cycle, store)
    return {
        "replica_id": rid,
        "cycle": built.cycle, "base": built.base, "change_source": built.change_source,
        "snapshot": built.provider, "entries": built.entries, **result_fields(stats),
        "duration_s": round(time.monotonic() - t0, 3), "warnings": len(warnings),
    }

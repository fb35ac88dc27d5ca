"""``discrep replicate SRC DEST``: one whole cycle (or continuous mode with ``--every``)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import UsageError, WarningList
from discrep.run.options import CycleOptions

NAME = "replicate"
HELP = "run one cycle: SRC -> DEST (the first run is the full copy)"
DESCRIPTION = ("Run one whole cycle: catch-up scan (or journal), snapshot, FUSE export on a private mount, "
               "sync DEST through it, acknowledge. The first run is the initial full copy (cycle 1).")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC", help="source directory")
    sp.add_argument("dest", metavar="DEST", help="replica directory (created if missing); [USER@]HOST:DEST pushes "
                                                 "to a replica on HOST over SSH")
    common.add_snapshot_arg(sp, "snapshot provider (default auto: btrfs subvolume > reflink clones > verified copy)")
    common.add_replica_args(sp, "allow a first cycle into a non-empty DEST (entries not in SRC are deleted)")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="print what a cycle would apply, itemized like rsync -i, and change nothing: no cycle "
                         "is built on the source, nothing is written in DEST (local or remote SRC; not with --every)")
    sp.add_argument("--every", type=float, metavar="SECONDS",
                    help="continuous mode: run a cycle every SECONDS (sooner when the journal has entries)")
    common.add_hook_args(sp)
    common.add_filter_args(sp)
    common.add_ssh_args(sp)


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.daemon import run_every
    from discrep.run.local import replicate_local
    from discrep.run.remote import replicate_remote
    from discrep.transport.options import is_remote
    opts = common.cycle_options(a)
    if is_remote(opts.dest):          # push: local SRC, remote replica
        from discrep.run.push import replicate_push
        return replicate_push(opts, warnings)
    if opts.replica.dry_run:
        return _dry_run(opts)
    if opts.replica.checksum and opts.remote_source:
        raise UsageError("--checksum works for a local SRC for now",
                         hint="run 'discrep verify DEST --scrub' on the replica host to find damaged files")
    prog = common.progress_printer(a)
    if opts.every is not None:
        return run_every(opts, warnings, prog)
    if opts.remote_source:
        return {**replicate_remote(opts, warnings, prog), "direction": "pull"}
    return replicate_local(opts, warnings, prog)


def _dry_run(opts: CycleOptions) -> Dict[str, Any]:
    from discrep.run.dryrun import dry_run, dry_run_remote
    from discrep.run.local import check_pair
    if opts.every is not None:
        raise UsageError("--dry-run shows what one cycle would apply: it cannot run --every",
                         hint="drop --every for the dry run; run continuously without -n")
    if opts.remote_source:
        return dry_run_remote(opts).result()
    src, dest = os.path.abspath(opts.src), os.path.abspath(opts.dest)
    check_pair(src, dest)
    return dry_run(os.fsencode(src), os.fsencode(dest), opts.replica.filter_spec()).result()


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    if res.get("dry_run"):
        for line in res["items"]:
            print(common.printable(line))
        print(f"dry run: {res['created']} created, {res['changed']} changed (~{res['bytes_to_fetch']} bytes "
              f"to fetch), {res['metadata_only']} metadata only, {res['deleted']} deleted, {res['renamed']} "
              f"renamed; nothing was changed")
        return
    print(common.summary(res))

"""``discrep replicate SRC DEST``: one whole cycle (or continuous mode with ``--every``)."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import WarningList

NAME = "replicate"
HELP = "run one cycle: SRC -> DEST (the first run is the full copy)"
DESCRIPTION = ("Run one whole cycle: catch-up scan (or journal), snapshot, FUSE export on a private mount, "
               "sync DEST through it, acknowledge. The first run is the initial full copy (cycle 1).")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC", help="source directory")
    sp.add_argument("dest", metavar="DEST", help="replica directory (created if missing)")
    common.add_snapshot_arg(sp, "snapshot provider (default auto: btrfs subvolume > reflink clones > verified copy)")
    common.add_replica_args(sp, "allow a first cycle into a non-empty DEST (entries not in SRC are deleted)")
    sp.add_argument("--every", type=float, metavar="SECONDS",
                    help="continuous mode: run a cycle every SECONDS (sooner when the journal has entries)")
    common.add_ssh_args(sp)


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.daemon import run_every
    from discrep.run.local import replicate_local
    from discrep.run.remote import replicate_remote
    opts = common.cycle_options(a)
    prog = common.progress_printer(a)
    if opts.every is not None:
        return run_every(opts, warnings, prog)
    if opts.remote_source:
        return replicate_remote(opts, warnings, prog)
    return replicate_local(opts, warnings, prog)


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(common.summary(res))

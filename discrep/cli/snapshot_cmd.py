"""``discrep snapshot SRC``: build the next cycle of SRC (journal cut, snapshot, manifest)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import UsageError, WarningList

NAME = "snapshot"
HELP = "build the next cycle of SRC (journal cut, snapshot, manifest)"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")
    common.add_snapshot_arg(sp)
    sp.add_argument("--scan", action="store_true", help="run a catch-up scan even if the journal is whole")
    sp.add_argument("--replica-cycle", type=int, metavar="R",
                    help="the replica's last committed cycle: acknowledge it if it is the pending one, "
                         "compare everything if the source's base differs, number the new cycle above R")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.source.hooks import build_with_hooks, load_hook_file
    from discrep.source.cycles import settle_source
    src = os.fsencode(os.path.abspath(a.src))
    if not os.path.isdir(src):
        raise UsageError(f"source {a.src} does not exist or is not a directory")
    min_cycle = 1
    if a.replica_cycle is not None:
        settle_source(src, a.replica_cycle)
        min_cycle = a.replica_cycle + 1
    b = build_with_hooks(src, load_hook_file(src), snapshot_kind=a.snapshot, warnings=warnings, force_scan=a.scan,
                         min_cycle=min_cycle)
    return {"cycle": b.cycle, "base": b.base, "entries": b.entries, "snapshot": b.provider,
            "change_source": b.change_source, "path": os.fsdecode(b.snapshot)}


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(res["cycle"])

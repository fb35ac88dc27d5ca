"""``discrep prune DEST``: drop history that no kept recovery point needs."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import WarningList
from discrep.run.options import parse_duration

NAME = "prune"
HELP = "drop history that no kept recovery point needs"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")
    common.add_keep_args(sp, "keep the last N cycles (default 10)", "also keep cycles committed within e.g. 7d, 12h")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import prune_points
    gone = prune_points(a.dest, a.keep_last, parse_duration(a.keep_within) if a.keep_within else None)
    if not a.json:
        print(f"history of cycle(s) {', '.join(map(str, gone)) or 'none'} pruned")
    return {"pruned": gone}

"""``discrep prune DEST``: drop history that no kept recovery point needs (``--dry-run``: list the plan)."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import WarningList
from discrep.run.options import parse_duration

NAME = "prune"
HELP = "drop history that no kept recovery point needs"
DESCRIPTION = ("Keep the newest N points (--keep-last), those younger than --keep-within, and the newest point "
               "of each period of a grid (--keep \"24x1h, 30x1d, 12x30d\": the last 24 hours, 30 days, 12 "
               "thirty-day periods; UTC-aligned). History is reverse deltas chained to the newest point, so "
               "only the points older than the oldest kept one are dropped; a point in between that no rule "
               "keeps stays restorable (shown as 'needed by N'). --dry-run lists every point and changes nothing.")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")
    common.add_keep_args(sp, "keep the last N cycles (default 10)", "also keep cycles committed within e.g. 7d, 12h")
    sp.add_argument("-n", "--dry-run", action="store_true",
                    help="list every recovery point, kept or dropped and the rule that keeps it; change nothing")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import prune_plan, prune_points
    within = parse_duration(a.keep_within) if a.keep_within else None
    grid = common.keep_grid(a)
    if a.dry_run:
        plan = prune_plan(a.dest, a.keep_last, within, grid)
        if not a.json:
            for p in plan:
                print(f"{p['cycle']:>6}  {p['source_time']}  {p['action']:<14}  {', '.join(p['rules'])}")
            print(f"dry run: {sum(p['action'] == 'drop' for p in plan)} point(s) would be dropped; nothing changed")
        return {"dry_run": True, "points": plan}
    gone = prune_points(a.dest, a.keep_last, within, grid)
    if not a.json:
        print(f"history of cycle(s) {', '.join(map(str, gone)) or 'none'} pruned")
    return {"pruned": gone}

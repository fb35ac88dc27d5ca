"""``discrep replicas SRC``: the replicas a source keeps an acknowledged position for, and their lag."""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, Optional

from discrep.core.errors import WarningList

NAME = "replicas"
HELP = "list the replicas of a source with their last acknowledged cycle and lag"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("--hold-cap", type=int, metavar="N", default=None,
                    help="set how many journal entries one lagging replica may hold back before its "
                         "next cycle becomes a catch-up scan (default 1000000)")


def _age(s: Optional[float]) -> str:
    return "-" if s is None else f"{s:.0f}s"


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.source import positions
    root = os.fsencode(os.path.abspath(a.src))
    if a.hold_cap is not None:
        positions.set_hold_cap(root, a.hold_cap)
    rows = [p.as_dict() for p in positions.positions(root)]
    if not a.json:
        print(f"{'replica':32}  {'acked cycle':>11}  {'acked at':19}  {'lag':>8}  {'entries':>8}  next cycle")
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["acked_ns"] / 1e9)) if r["acked_ns"] else "-"
            nxt = "journal" if r["journal_covers"] else ("full" if not r["acked_cycle"] else "scan")
            print(f"{r['id']:32}  {r['acked_cycle']:>11}  {when:19}  {_age(r['lag_s']):>8}  "
                  f"{r['lag_entries']:>8}  {nxt}")
    return {"replicas": rows}

"""``discrep history DEST``: list the committed cycles (recovery points) of a replica."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "history"
HELP = "list the committed cycles (recovery points) of a replica"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import list_points
    out, applying = list_points(a.dest)
    if not a.json:
        print(f"{'cycle':>5}  {'source snapshot time':19}  {'files':>7}  {'read':>12}  {'written':>12}  "
              f"{'history':>10}  {'consistency':14}  restorable")
        for r in out:
            print(f"{r['cycle']:>5}  {r['source_time']:19}  {r['files_changed'] or 0:>7}  "
                  f"{r['bytes_transferred'] or 0:>12}  {r['bytes_written'] or 0:>12}  {r['history_bytes']:>10}  {r['consistency']:14}  "
                  f"{'yes' if r['restorable'] else 'no (history pruned)'}")
        if applying:
            print(f"cycle {applying} was interrupted: run 'discrep recover {a.dest}'")
    return {"cycles": out, "interrupted": applying}

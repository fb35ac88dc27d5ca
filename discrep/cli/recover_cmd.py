"""``discrep recover DEST``: roll an interrupted cycle back to the last committed one."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "recover"
HELP = "roll an interrupted cycle back: DEST returns to its last committed cycle"
DESCRIPTION = ("Undo what an interrupted cycle changed, from the write-ahead history records. "
               "'replicate' and 'sync' do this by themselves first; run it after a crash to have a usable "
               "replica at once (for instance when the source is lost).")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import recover_replica
    res = recover_replica(a.dest)
    if res is None:
        if not a.json:
            print(f"{a.dest}: no interrupted cycle; nothing to do")
        return {"rolled_back": None}
    if not a.json:
        print(f"{a.dest}: interrupted cycle {res[0]} rolled back ({res[1]} changes undone); "
              f"the replica is at its last committed cycle")
    return {"rolled_back": res[0], "changes_undone": res[1]}

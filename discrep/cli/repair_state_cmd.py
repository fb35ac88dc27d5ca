"""``discrep repair-state DEST``: rebuild a lost or damaged replica catalog, keeping the recovery points."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "repair-state"
HELP = "rebuild DEST's damaged or lost catalog from DEST and its history (recovery points are kept)"
DESCRIPTION = ("Move DEST/.discrep/replica.db aside and build a new one: the committed cycles are the "
               "recovery points in DEST's history store, the file list comes from a walk of DEST with fresh "
               "block signatures (DEST is taken as its newest cycle). Run it when a command reports the "
               "replica catalog as damaged or lost; the next 'replicate' then continues from the newest cycle.")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import repair_state
    res = repair_state(a.dest)
    if not a.json:
        cycles = res["cycles"]
        aside = f"; the old file is .discrep/{res['moved_aside']}" if res["moved_aside"] else ""
        print(f"{a.dest}: catalog rebuilt with {res['rows']} entries and {len(cycles)} recovery point(s)"
              f"{' (newest: cycle ' + str(cycles[-1]) + ')' if cycles else ''}{aside}")
    return res

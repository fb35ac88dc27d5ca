"""``discrep forget SRC ID``: drop one replica's position on the source (a local admin command)."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "forget"
HELP = "drop a replica's position on the source, releasing the journal and snapshots only it held"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("replica_id", metavar="ID", help="a replica id from 'discrep replicas SRC' (or 'legacy')")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.source.cycles import forget_replica
    store = forget_replica(os.fsencode(os.path.abspath(a.src)), a.replica_id)
    if not a.json:
        print(f"replica {a.replica_id} forgotten; if it comes back, its next cycle compares everything")
    return {"forgotten": a.replica_id, "store": store}

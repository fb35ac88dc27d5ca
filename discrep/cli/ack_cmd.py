"""``discrep ack SRC CYCLE``: tell the source the replica committed CYCLE."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "ack"
HELP = "tell the source the replica committed CYCLE"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("cycle", metavar="CYCLE", type=int)


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.source.cycles import ack_cycle
    ack_cycle(os.fsencode(os.path.abspath(a.src)), a.cycle)
    return {"acked": a.cycle}

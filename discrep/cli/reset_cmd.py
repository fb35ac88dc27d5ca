"""``discrep reset SRC``: forget what the source replicated; the next cycle compares everything."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "reset"
HELP = "forget what the source replicated: the next cycle compares everything"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.source.cycles import reset
    reset(os.fsencode(os.path.abspath(a.src)))
    return {"reset": a.src}

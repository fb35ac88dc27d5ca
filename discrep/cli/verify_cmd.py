"""``discrep verify SRC DEST``: compare content and metadata; exit 0 only if identical."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.core.errors import UsageError, VerifyMismatchError, WarningList

NAME = "verify"
HELP = "compare SRC and DEST: content and metadata; exit 0 only if identical"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dest", metavar="DEST")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.verify import compare_trees
    for p in (a.src, a.dest):
        if not os.path.isdir(p):
            raise UsageError(f"{p} is not a directory")
    diffs = compare_trees(os.fsencode(os.path.abspath(a.src)), os.fsencode(os.path.abspath(a.dest)))
    if diffs:
        for d in diffs:
            print(d)
        raise VerifyMismatchError(f"{len(diffs)}{'+' if len(diffs) >= 100 else ''} differences between "
                                  f"{a.src} and {a.dest}")
    return {"identical": True}


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print("identical")

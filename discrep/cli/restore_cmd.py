"""``discrep restore DEST --cycle N --to DIR``: materialize a recovery point."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.core.errors import WarningList

NAME = "restore"
HELP = "materialize committed cycle N of DEST into a new directory"
DESCRIPTION = ("Rebuild recovery point N exactly (content and metadata) in DIR: a clone of the replica "
               "(reflinks where the filesystem allows) with the reverse deltas of the later cycles applied.")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--cycle", type=int, required=True, metavar="N")
    sp.add_argument("--to", required=True, metavar="DIR", help="new or empty directory to restore into")
    sp.add_argument("--path", metavar="P", help="restore only this file or subtree (relative to the tree root)")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import restore_point
    restore_point(a.dest, a.cycle, a.to, a.path)
    return {"restored": a.cycle, "to": a.to, "path": a.path}

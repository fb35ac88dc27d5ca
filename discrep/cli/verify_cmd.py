"""``discrep verify SRC DEST``: compare content and metadata; exit 0 only if identical."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import UsageError, VerifyMismatchError, WarningList

NAME = "verify"
HELP = "compare SRC and DEST: content and metadata; exit 0 only if identical (--scrub: DEST alone)"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC", help="the source tree (with --scrub: DEST)")
    sp.add_argument("dest", metavar="DEST", nargs="?")
    sp.add_argument("--scrub", action="store_true",
                    help="check DEST's files against its own catalog's signatures, without the source "
                         "(hand edits, bit rot); exit 17 with the damaged paths")
    common.add_filter_args(sp, delete_excluded=False)


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.verify import compare_trees
    if a.scrub:
        return _scrub(a.dest or a.src) if not (a.dest and a.src) else _usage()
    if a.dest is None:
        raise UsageError("verify needs SRC and DEST (or DEST --scrub)")
    for p in (a.src, a.dest):
        if not os.path.isdir(p):
            raise UsageError(f"{p} is not a directory")
    diffs = compare_trees(os.fsencode(os.path.abspath(a.src)), os.fsencode(os.path.abspath(a.dest)),
                          filters=common.filter_spec(a))
    if diffs:
        for d in diffs:
            print(d)
        raise VerifyMismatchError(f"{len(diffs)}{'+' if len(diffs) >= 100 else ''} differences between "
                                  f"{a.src} and {a.dest}")
    return {"identical": True}


def _usage() -> Dict[str, Any]:
    raise UsageError("verify --scrub takes DEST only", hint="discrep verify DEST --scrub")


def _scrub(dest: str) -> Dict[str, Any]:
    from discrep.run.verify import scrub
    if not os.path.isdir(dest):
        raise UsageError(f"{dest} is not a directory")
    n, damaged = scrub(os.fsencode(os.path.abspath(dest)))
    if damaged:
        for d in damaged:
            print(d)
        raise VerifyMismatchError(f"{len(damaged)}{'+' if len(damaged) >= 100 else ''} of {n} files of {dest} "
                                  f"differ from the replica's catalog",
                                  hint="'discrep replicate SRC DEST --checksum' repairs them from the source")
    return {"scrubbed": n, "damaged": 0}


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(f"{res['scrubbed']} files match the replica's catalog" if "scrubbed" in res else "identical")

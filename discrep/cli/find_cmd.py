"""``discrep find DEST PATTERN``: every recovery point's version of the matching paths."""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

from discrep.cli.common import printable
from discrep.core.errors import WarningList

NAME = "find"
HELP = "show every recovery point's version of the paths matching PATTERN (before 'restore --cycle N --path P')"
DESCRIPTION = ("Replay DEST's history and list, for every recovery point that can still be restored, the "
               "entries whose path at that point matches PATTERN: type, size, mtime and an xxh3-128 digest of "
               "the bytes as 'restore' would produce them (computed from the replica, not taken from the "
               "source). PATTERN is an rsync pattern, as --exclude takes it: '*.db' matches the name at any "
               "depth, '/etc/app.conf' is anchored at the tree's top, 'logs/**' matches everything below a "
               "'logs' directory. In the text output '*' marks a point where that path's content or type "
               "differs from the point before; 'app' marks application-consistent points ('crf': its pre_snapshot "
               "hook failed and a crash-consistent point was taken).")


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("pattern", metavar="PATTERN")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.points import find_points
    res = find_points(a.dest, a.pattern)
    if not a.json:
        _show(res)
    return res


def _show(res: Dict[str, Any]) -> None:
    by_path: Dict[str, List[Dict[str, Any]]] = {}
    for v in res["versions"]:
        by_path.setdefault(v["path"], []).append(v)
    if not by_path:
        print(f"no entry matches {res['pattern']!r} in recovery points {_span(res['points'])}")
    for path in sorted(by_path):
        print(printable(path))
        prev: Optional[Dict[str, Any]] = None
        last_cycle: Optional[int] = None
        for v in by_path[path]:
            gap = last_cycle is not None and res["points"].index(v["cycle"]) != res["points"].index(last_cycle) + 1
            changed = prev is None or gap or (v["type"], v["digest"]) != (prev["type"], prev["digest"])
            print(f"  {'*' if changed else ' '} cycle {v['cycle']:>5}  {v['source_time']}  "
                  f"{_CONS.get(v['consistency'], '   ')}  {v['type']:<7} {v['size']:>12}  {v['mode']}  "
                  f"{(v['digest'] or '-')[:16]}")
            prev, last_cycle = v, v["cycle"]
    if res["not_restorable"]:
        print(f"(cycles {_span(res['not_restorable'])} are not shown: their history was pruned)")


_CONS = {"app": "app", "crash-fallback": "crf"}


def _span(cycles: List[int]) -> str:
    if not cycles:
        return "none"
    return f"{cycles[0]}" if len(cycles) == 1 else f"{cycles[0]}-{cycles[-1]}"

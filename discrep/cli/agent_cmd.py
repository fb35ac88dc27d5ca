"""``discrep agent SRC`` (hidden): the source side of a remote cycle, spoken to over SSH."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import WarningList

NAME = "agent"
HELP = argparse.SUPPRESS
HIDDEN = True


def register(sp: argparse.ArgumentParser) -> None:
    sp.set_defaults(json=False, quiet=True)
    sp.add_argument("src")
    sp.add_argument("--replica-cycle", type=int, help="serve this first cycle at once")
    common.add_snapshot_arg(sp)
    sp.add_argument("--stream", action="store_true", help="announce manifest segments while building")
    sp.add_argument("--timeout", type=float, default=None,
                    help="say alive every timeout/4 s; end after this many seconds without a word from the replica")
    sp.add_argument("--read-live", action="store_true",
                    help="the replica verifies before it commits: a copy snapshot reads large files live")
    sp.add_argument("--export-on-demand", action="store_true",
                    help="export a built cycle only when the replica asks (it reads the cycle directory first)")
    sp.add_argument("--no-totals", dest="totals", action="store_false",
                    help="a streamed first copy starts at once instead of counting the tree first")
    sp.add_argument("--dry-run", action="store_true",
                    help="read-only: walk SRC and sign files for a replica's dry run (source.dryview)")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.source.agent import run_agent
    if a.dry_run:
        from discrep.source.dryview import serve_dry_run
        rc = serve_dry_run(a.src, warnings, timeout=a.timeout)
    else:
        rc = run_agent(a.src, a.replica_cycle, a.snapshot, warnings, stream=a.stream, totals=a.totals,
                       timeout=a.timeout, read_live=a.read_live, export_on_demand=a.export_on_demand)
    # no interpreter shutdown: it would wait for a stuck export child forever (its cleanup is bounded)
    common.exit_now(rc)

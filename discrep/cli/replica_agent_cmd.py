"""``discrep replica-agent DEST`` (hidden): the replica side of push mode, spoken to over SSH."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import UsageError, WarningList

NAME = "replica-agent"
HELP = argparse.SUPPRESS
HIDDEN = True


def register(sp: argparse.ArgumentParser) -> None:
    sp.set_defaults(json=False, quiet=True)
    sp.add_argument("dest", nargs="?")
    common.add_replica_args(sp, "allow a first cycle into a non-empty DEST")
    sp.add_argument("--timeout", type=float, default=None,
                    help="say alive every timeout/4 s; end after this many seconds without a word from the source")
    sp.add_argument("--sftp-relay", metavar="SOCKET",
                    help="copy stdin/stdout to and from the replica agent's SFTP socket")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.replica_agent import run_replica_agent, run_sftp_relay
    if a.sftp_relay:
        rc = run_sftp_relay(a.sftp_relay)
    elif not a.dest:
        raise UsageError("replica-agent needs DEST or --sftp-relay")
    else:
        rc = run_replica_agent(a.dest, common.replica_options(a), warnings, a.timeout)
    common.exit_now(rc)

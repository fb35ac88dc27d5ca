"""``discrep daemon [-c FILE] [--state-dir DIR]``: run every job of the jobs file on its schedule."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli.configcheck_cmd import add_config_arg
from discrep.core.errors import WarningList
from discrep.run.jobstate import DEFAULT_STATE_DIR

NAME = "daemon"
HELP = "run every job of the jobs file on its schedule (the service; systemd: scripts/discrep.service)"
DESCRIPTION = """\
Run every job of the jobs file on its schedule until SIGTERM: each cycle in a child process
('discrep run JOB'), jobs with different DESTs at once up to max_concurrent, a watcher per local
source root, failed cycles retried with backoff. SIGHUP reloads the jobs file (a running cycle goes
on; a bad file is logged and the old jobs kept). Tells systemd when it is ready (Type=notify).

Metrics for Prometheus at metrics_listen (jobs file); per-job state in STATE_DIR/state.json,
shown by 'discrep status -c FILE'. Log lines go to stderr (the journal under systemd); -v shows
every cycle."""


def add_state_dir_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                    help=f"where the daemon keeps its state (default {DEFAULT_STATE_DIR}; created 0700)")


def register(sp: argparse.ArgumentParser) -> None:
    add_config_arg(sp)
    add_state_dir_arg(sp)


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.service import serve
    return serve(a.config, a.state_dir)


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    c = res["cycles"]
    print(f"daemon stopped ({res['stopped']}): {c['ok']} cycle(s) ok, {c['warning']} with warnings, "
          f"{c['error']} failed")

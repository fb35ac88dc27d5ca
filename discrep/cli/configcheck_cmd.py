"""``discrep configcheck [-c FILE]``: check the jobs file; exit 0, or every problem at once."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.core.errors import WarningList
from discrep.run.config import DEFAULT_PATH

NAME = "configcheck"
HELP = "check the jobs file (TOML): every job, key and value"
DESCRIPTION = """\
Read the jobs file and check every key and value. Exit 0 when it is valid; otherwise one line
per problem naming the job and the key, and exit 3.

example jobs file:
  every = "15m"                      # a job key at the top level is a default for every job
  keep_last = 48

  [jobs.home]
  source = "/home"
  dest = "/backup/home"
  rpo = "1h"                         # how stale is too stale
  exclude = ["*.tmp", "/.cache/"]    # rsync filter rules: filter, then include, then exclude

  [jobs.web]
  source = "backup@web1:/srv/www"    # a remote source: [user@]host:path
  dest = "/backup/www"
  schedule = "0 * * * *"             # cron syntax instead of 'every'
  keep_within = "7d"

job keys: source, dest, every | schedule, rpo, snapshot, transport, ssh_config, remote_discrep, bwlimit,
keep_last, keep_within, numeric_ids, nosuid, filter, include, exclude (lists of rsync rules), delete_excluded.
top level only: metrics_listen, max_concurrent."""


def add_config_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-c", "--config", metavar="FILE", default=DEFAULT_PATH,
                    help=f"the jobs file (default {DEFAULT_PATH})")


def register(sp: argparse.ArgumentParser) -> None:
    add_config_arg(sp)


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.config import load
    cfg = load(a.config)
    jobs = {n: {"source": j.options.src, "dest": j.options.dest,
                "every_s": j.every_s, "schedule": j.schedule, "rpo_s": j.rpo_s} for n, j in cfg.jobs.items()}
    return {"config": cfg.path, "jobs": jobs}


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(f"{res['config']}: ok, {len(res['jobs'])} job(s): {', '.join(sorted(res['jobs']))}")

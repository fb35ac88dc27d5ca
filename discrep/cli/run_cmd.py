"""``discrep run [-c FILE] JOB``: run one cycle of a job of the jobs file now."""
from __future__ import annotations

import argparse
from typing import Any, Dict

from discrep.cli import common
from discrep.cli.configcheck_cmd import add_config_arg
from discrep.core.errors import UsageError, WarningList

NAME = "run"
HELP = "run one cycle of a job of the jobs file now"


def register(sp: argparse.ArgumentParser) -> None:
    add_config_arg(sp)
    sp.add_argument("job", metavar="JOB", help="the job's name ([jobs.NAME] in the jobs file)")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.config import load
    from discrep.run.local import replicate_local
    from discrep.run.remote import replicate_remote
    cfg = load(a.config)
    job = cfg.jobs.get(a.job)
    if job is None:
        raise UsageError(f"no job {a.job!r} in {cfg.path}",
                         hint=f"jobs there: {', '.join(sorted(cfg.jobs)) or 'none'}")
    prog = common.progress_printer(a)
    if job.options.remote_source:
        return dict(replicate_remote(job.options, warnings, prog), job=job.name)
    return dict(replicate_local(job.options, warnings, prog), job=job.name)


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(f"job {res['job']}: " + common.summary(res))

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
    """One cycle; its figures (or its error) are recorded in the replica catalog as continuous mode
    records them, so ``discrep status DEST`` shows them."""
    from discrep.run.config import load
    from discrep.run.daemon import error_text, record_error, record_result
    from discrep.run.local import replicate_local
    from discrep.run.remote import replicate_remote
    cfg = load(a.config)
    job = cfg.jobs.get(a.job)
    if job is None:
        raise UsageError(f"no job {a.job!r} in {cfg.path}",
                         hint=f"jobs there: {', '.join(sorted(cfg.jobs)) or 'none'}")
    prog = common.progress_printer(a)
    cycle = replicate_remote if job.options.remote_source else replicate_local
    try:
        res = cycle(job.options, warnings, prog)
    except Exception as e:         # not KeyboardInterrupt: an interrupted cycle is no failure
        record_error(job.options.dest, error_text(e))
        raise
    record_result(job.options.dest, res, len(warnings))
    return dict(res, job=job.name)


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(f"job {res['job']}: " + common.summary(res))

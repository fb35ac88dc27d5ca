"""The jobs file: named replication jobs in TOML, read into typed options.

Default path ``/etc/discrep/discrep.toml`` (``-c FILE`` everywhere).  Shape::

    metrics_listen = "127.0.0.1:9811"   # optional: where `discrep daemon` serves Prometheus metrics
    max_concurrent = 2                   # optional: jobs with different DESTs run at once, at most this many
    every = "5m"                         # any job key at the top level is a default for every job

    [jobs.home]
    source = "/home"                     # [user@]host:path for a remote source
    dest = "/backup/home"
    every = "15m"                        # or: schedule = "*/15 * * * *"  (cron syntax, croniter)
    rpo = "1h"                           # how stale is too stale (status and the lag metric)
    keep_last = 48
    keep_within = "7d"
    exclude = ["*.tmp", "/cache/"]       # rsync filter rules (see README): filter, then include, then
    include = []                         # exclude, each in list order; filter = ["- PAT", "+ PAT",
    filter = ["dir-merge .discrepignore"]   # "dir-merge NAME"]; first match wins
    delete_excluded = false              # true: excluded files are deleted from DEST too

Every key is checked: an unknown key, a value of the wrong type or out of range is a
``ConfigError`` naming the file, the job and the key, and saying what is allowed.  ``load``
returns a ``JobsConfig`` of ``Job`` objects, each holding the ``CycleOptions`` the CLI would
build for the same pair; ``discrep configcheck`` prints every problem at once.

Library: the standard ``tomllib`` (Python >= 3.11) and ``croniter`` for cron schedules -- a
maintained library instead of a cron parser of our own.

Thread-safety: pure functions and immutable values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from discrep.core.errors import UsageError
from discrep.replica.options import ReplicaOptions
from discrep.replica.retention import GridRule, parse_grid
from discrep.run.options import SNAPSHOT_KINDS, CycleOptions, parse_duration
from discrep.source.options import DEFAULT_HOOK_TIMEOUT, HOOK_FAILURES, MAX_HOOK_TIMEOUT, HookOptions
from discrep.transport.options import TRANSPORTS, SshOptions, is_remote
from discrep.transport.pace import parse_rate

DEFAULT_PATH = "/etc/discrep/discrep.toml"
MAX_JOBS = 1000


class ConfigError(UsageError):
    """The jobs file is missing, not TOML, or has bad keys or values (one line per problem)."""

    def __init__(self, path: str, problems: List[str]):
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems) if len(problems) == 1 else
                         f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems),
                         hint="fix the jobs file; 'discrep configcheck -c FILE' lists every problem")


@dataclass(frozen=True)
class Job:
    """One named job: the pair and how often to run it."""
    name: str
    options: CycleOptions
    every_s: Optional[float] = None        # run every so many seconds (sooner when the journal has entries)
    schedule: Optional[str] = None         # or on a cron schedule
    rpo_s: Optional[float] = None          # staleness limit

    def next_run(self, after: float) -> float:
        """Unix time of the next scheduled run after ``after``."""
        if self.schedule is not None:
            from croniter import croniter
            return float(croniter(self.schedule, after).get_next(float))
        return after + (self.every_s or 0.0)


@dataclass(frozen=True)
class JobsConfig:
    path: str
    jobs: Dict[str, Job] = field(default_factory=dict)
    metrics_listen: Optional[Tuple[str, int]] = None
    max_concurrent: int = 2


# -- value checkers: (value) -> parsed value, or ValueError with what is allowed -----------------
def _str(v: Any) -> str:
    if not isinstance(v, str) or not v or "\0" in v:
        raise ValueError("a non-empty string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _duration(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError('a duration such as "30s", "5m", "1h", "7d" or a number of seconds')
    try:
        s = float(v) if not isinstance(v, str) else parse_duration(v)
    except UsageError:
        raise ValueError('a duration such as "30s", "5m", "1h", "7d"') from None
    if not 0 < s <= 10 * 365 * 86400:
        raise ValueError("a positive duration of at most 10 years")
    return s


def _count(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1_000_000:
        raise ValueError("a whole number from 1 to 1000000")
    return v


MAX_RULES = 4096                          # (protocol.filters.MAX_RULES; imported only when rules are built)


def _str_list(v: Any) -> List[str]:
    if not isinstance(v, list) or len(v) > MAX_RULES or \
            not all(isinstance(x, str) and x and "\0" not in x for x in v):
        raise ValueError(f"a list of non-empty strings (at most {MAX_RULES})")
    return list(v)


def _choice(options: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("one of " + ", ".join(repr(o) for o in options))
        return v
    return check


def _cron(v: Any) -> str:
    from croniter import croniter
    if not isinstance(v, str) or not croniter.is_valid(v):
        raise ValueError('a cron expression such as "*/15 * * * *" (minute hour day month weekday)')
    return v


def _rate(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError('a rate like rsync\'s --bwlimit: KiB/s (500) or "2M"')
    try:
        return parse_rate(str(v))
    except ValueError:
        raise ValueError('a rate like rsync\'s --bwlimit: KiB/s (500) or "2M"') from None


def _listen(v: Any) -> Tuple[str, int]:
    if not isinstance(v, str) or ":" not in v:
        raise ValueError('"HOST:PORT", e.g. "127.0.0.1:9811"')
    host, _, port = v.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError('"HOST:PORT" with a port from 1 to 65535')
    return host.strip("[]"), int(port)


def _grid(v: Any) -> Tuple[GridRule, ...]:
    if not isinstance(v, str):
        raise ValueError('a grid such as "24x1h, 30x1d, 12x30d"')
    try:
        return parse_grid(v)
    except UsageError as e:
        raise ValueError(f'a grid such as "24x1h, 30x1d, 12x30d" ({e})') from None


def _hook_timeout(v: Any) -> float:
    s = _duration(v)
    if s > MAX_HOOK_TIMEOUT:
        raise ValueError(f"a duration of at most {MAX_HOOK_TIMEOUT:.0f}s")
    return s


def _hooks(v: Dict[str, Any], where: str, problems: List[str]) -> Optional[HookOptions]:
    """The job's snapshot hooks (None: the source's own SRC/.discrep/hooks.toml applies)."""
    if "pre_snapshot" not in v and "post_snapshot" not in v:
        return None
    if is_remote(v["source"]):
        problems.append(f"{where}: pre_snapshot/post_snapshot run on this host; for the remote source "
                        f"{v['source']!r} configure them on the source host in SRC/.discrep/hooks.toml")
        return None
    return HookOptions(pre_snapshot=v.get("pre_snapshot"), post_snapshot=v.get("post_snapshot"),
                       timeout_s=v.get("hook_timeout", DEFAULT_HOOK_TIMEOUT),
                       on_failure=v.get("hook_failure", "fail"))


# job key -> checker; the keys a job (or the top level, as a default) may have
JOB_KEYS: Dict[str, Callable[[Any], Any]] = {
    "source": _str, "dest": _str,
    "every": _duration, "schedule": _cron, "rpo": _duration,
    "snapshot": _choice(SNAPSHOT_KINDS), "transport": _choice(TRANSPORTS),
    "ssh_config": _str, "remote_discrep": _str, "bwlimit": _rate,
    "keep_last": _count, "keep_within": _duration, "numeric_ids": _bool,
    "nosuid": _bool,
    "keep": _grid, "pre_snapshot": _str, "post_snapshot": _str, "hook_timeout": _hook_timeout,
    "hook_failure": _choice(HOOK_FAILURES),
    "filter": _str_list, "include": _str_list, "exclude": _str_list, "delete_excluded": _bool,
}
FILTER_KEYS = ("filter", "include", "exclude")     # the order their rules apply in
TOP_KEYS: Dict[str, Callable[[Any], Any]] = {"metrics_listen": _listen, "max_concurrent": _count}


def _check_table(table: Dict[str, Any], where: str, allowed: Dict[str, Callable[[Any], Any]],
                 problems: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in table.items():
        check = allowed.get(key)
        if check is None:
            problems.append(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
            continue
        try:
            out[key] = check(value)
        except ValueError as e:
            problems.append(f"{where}: {key} = {value!r} is not valid: expected {e}")
    return out


def _job(name: str, v: Dict[str, Any], where: str, problems: List[str]) -> Optional[Job]:
    for need in ("source", "dest"):
        if need not in v:
            problems.append(f"{where}: missing key {need!r}")
    if "every" in v and "schedule" in v:
        problems.append(f"{where}: 'every' and 'schedule' exclude each other: keep one")
    if "every" not in v and "schedule" not in v:
        problems.append(f"{where}: needs 'every' (e.g. \"15m\") or 'schedule' (cron syntax)")
    if any(p.startswith(where + ":") for p in problems):
        return None
    from discrep.protocol.filters import FilterRules
    from discrep.protocol.filterspec import FilterSpec
    try:
        rules = FilterRules.parse([(k, r) for k in FILTER_KEYS for r in v.get(k, [])])
    except UsageError as e:
        problems.append(f"{where}: filter rules ({', '.join(k for k in FILTER_KEYS if k in v)}): {e}")
        return None
    replica = ReplicaOptions(keep_last=v.get("keep_last", 10), keep_within_s=v.get("keep_within"),
                             numeric_ids=v.get("numeric_ids", False), nosuid=v.get("nosuid", False),
                             keep_grid=v.get("keep", ()),
                             filters=FilterSpec(rules, v.get("delete_excluded", False)))
    ssh = SshOptions(remote_discrep=v.get("remote_discrep", "discrep"), ssh_config=v.get("ssh_config"),
                     transport=v.get("transport", "auto"), bwlimit=v.get("bwlimit", 0))
    hooks = _hooks(v, where, problems)
    if any(p.startswith(where + ":") for p in problems):
        return None
    opts = CycleOptions(src=v["source"], dest=v["dest"], snapshot=v.get("snapshot", "auto"),
                        replica=replica, ssh=ssh, hooks=hooks)
    return Job(name=name, options=opts, every_s=v.get("every"), schedule=v.get("schedule"),
               rpo_s=v.get("rpo"))


def parse(doc: Dict[str, Any], path: str) -> JobsConfig:
    """A parsed TOML document -> ``JobsConfig``; every problem at once in one ``ConfigError``."""
    problems: List[str] = []
    jobs_table = doc.get("jobs", {})
    top = {k: v for k, v in doc.items() if k != "jobs"}
    top_only = {k: v for k, v in top.items() if k in TOP_KEYS}
    defaults = _check_table({k: v for k, v in top.items() if k not in TOP_KEYS}, "top level",
                            {k: c for k, c in JOB_KEYS.items() if k not in ("source", "dest")}, problems)
    settings = _check_table(top_only, "top level", TOP_KEYS, problems)
    if not isinstance(jobs_table, dict) or not jobs_table:
        problems.append("no jobs: add a table [jobs.NAME] with source, dest and every or schedule")
        jobs_table = {}
    if len(jobs_table) > MAX_JOBS:
        problems.append(f"{len(jobs_table)} jobs: at most {MAX_JOBS}")
    jobs: Dict[str, Job] = {}
    dests: Dict[str, str] = {}
    for name, table in jobs_table.items():
        where = f"job {name!r}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table [jobs.{name}]")
            continue
        before = len(problems)
        own = _check_table(table, where, JOB_KEYS, problems)
        if len(problems) > before:
            continue                       # no follow-on complaints about a job with a bad key
        base = dict(defaults)
        if "every" in own or "schedule" in own:     # a job's own timing replaces the default timing
            base.pop("every", None)
            base.pop("schedule", None)
        job = _job(name, dict(base, **own), where, problems)
        if job is None:
            continue
        key = job.options.dest if ":" in job.options.dest else os.path.abspath(job.options.dest)
        if key in dests:
            problems.append(f"{where}: dest {job.options.dest!r} is also the dest of job {dests[key]!r}; "
                            f"two jobs never share a DEST")
        dests[key] = name
        jobs[name] = job
    if problems:
        raise ConfigError(path, problems)
    return JobsConfig(path=path, jobs=jobs, metrics_listen=settings.get("metrics_listen"),
                      max_concurrent=settings.get("max_concurrent", 2))


def load(path: Optional[str] = None) -> JobsConfig:
    """Read and check the jobs file at ``path`` (default ``DEFAULT_PATH``)."""
    import tomllib
    path = path or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, ["no such file (write one: 'discrep configcheck --help' shows an example)"]) from None
    except OSError as e:
        raise ConfigError(path, [f"cannot read it: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    return parse(doc, path)


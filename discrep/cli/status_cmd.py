"""``discrep status PATH``: the state of a source (watcher, journal) and/or a replica;
``discrep status -c FILE``: every job of the jobs file as the daemon sees it."""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, Optional

from discrep.core.errors import UsageError, WarningList
from discrep.run.jobstate import DEFAULT_STATE_DIR

NAME = "status"
HELP = ("show the state of a source (watcher backend, journal), a replica (lag, last cycle, last error), "
        "or with -c every job of the jobs file")
DESCRIPTION = """\
discrep status ROOT_OR_DEST     the state of a source and/or a replica
discrep status -c FILE          every job of the jobs file as 'discrep daemon' sees it: last success,
                                lag against its rpo, last cycle's figures, last error, next run.
                                Exit 1 when something needs a look (RPO breached, a failing job,
                                no daemon running); the problems are listed."""


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("path", metavar="ROOT_OR_DEST", nargs="?")
    sp.add_argument("-c", "--config", metavar="FILE", help="the jobs file: show its jobs")
    sp.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                    help=f"the daemon's state directory (default {DEFAULT_STATE_DIR}; with -c)")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.status import jobs_status, path_status
    if (a.path is None) == (a.config is None):
        raise UsageError("give either ROOT_OR_DEST or -c FILE", hint="see 'discrep status --help'")
    if a.config is not None:
        out = jobs_status(a.config, a.state_dir)
        for p in out["problems"]:
            warnings.add(a.config, p)
        if not a.json:
            _print_jobs(out)
        return out
    out = path_status(a.path)
    if not a.json:
        _print(out)
    return out


def _fmt_age(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"


def _print(out: Dict[str, Any]) -> None:
    s = out.get("source")
    if s:
        w = s["watcher"] + (f" ({s['backend']}, pid {s['watcher_pid']}, for {_fmt_age(s['watcher_since_s'])}), "
                            + ("caught up" if s.get("caught_up") else "catching up")
                            if s["watcher"] == "running" else "")
        print(f"source {out['path']}")
        print(f"  watcher:   {w}")
        print(f"  journal:   last seq {s['journal_last_seq']}, {s['pending_entries']} entries since acknowledged "
              f"cycle {s['acked_cycle']}")
        print(f"  gap:       {s['gap'] or 'none'}")
        print(f"  next cycle uses: {s['next_change_source']}")
    r = out.get("replica")
    if r:
        print(f"replica {out['path']}")
        if r["last_cycle"]:
            print(f"  last committed cycle: {r['last_cycle']}, lag {_fmt_age(r['lag_s'])} "
                  f"(source time {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['source_time_ns'] / 1e9))})")
        else:
            print("  no committed cycle yet")
        st = r.get("last_cycle_stats") or {}
        if st:
            print(f"  last cycle: {st.get('files_changed')} files changed, {st.get('files_renamed')} renamed, "
                  f"{st.get('files_deleted')} deleted, {st.get('bytes_transferred')} bytes read"
                  + (f", {st.get('change_source')}" if st.get("change_source") else "")
                  + (f", {st.get('duration_s')}s" if st.get("duration_s") is not None else ""))
        app = r.get("last_app_consistent_cycle")
        if r.get("last_consistency") not in (None, "crash") or app:
            print(f"  consistency: last point {r['last_consistency']}; last application-consistent "
                  f"point: {app or 'none'}")
        print(f"  daemon:    {r['daemon']}")
        if r["last_error"]:
            print(f"  last error ({_fmt_age(r['last_error_age_s'])} ago): {r['last_error']}")
        if r["interrupted_cycle"]:
            print(f"  cycle {r['interrupted_cycle']} was interrupted: run 'discrep recover {out['path']}'")


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "never"
    age = time.time() - t
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{when} (in {_fmt_age(-age)})" if age < 0 else f"{when} ({_fmt_age(age)} ago)"


def _print_job(name: str, j: Dict[str, Any]) -> None:
    timing = f"every {_fmt_age(j['every_s'])}" if j["every_s"] else f"schedule {j['schedule']!r}"
    print(f"job {name}: {j['source']} -> {j['dest']} ({timing})")
    rpo = "no rpo" if j["rpo_s"] is None else (
        f"rpo {_fmt_age(j['rpo_s'])}: " + ("BREACHED" if j["rpo_breached"] else "ok" if j["rpo_breached"] is False
                                           else "unknown"))
    print(f"  last success: {_fmt_time(j['last_success'])}; lag {_fmt_age(j['lag_s'])}, {rpo}")
    r = j["last_result"] or {}
    good = j["last_status"] in ("ok", "warning")
    if j["last_status"] and not good:
        print(f"  last cycle:   {j['last_status']}")
    if r:
        print(f"  {'last cycle:  ' if good else 'last good:   '} cycle {r.get('cycle')}"
              + (" (with warnings)" if j["last_status"] == "warning" else "")
              + f": {r.get('files_changed')} files changed, {r.get('files_deleted')} deleted, "
              f"{r.get('bytes_transferred')} bytes read, {r.get('bytes_written')} written, "
              f"{r.get('change_source')}, {r.get('duration_s')}s")
    print(f"  replica:      last committed cycle {j['last_cycle'] or '-'}"
          + (f" ({j['last_consistency']})" if j.get("last_consistency") not in (None, "crash") else "")
          + (f"; last application-consistent: {j['last_app_consistent_cycle']}"
             if j.get("last_app_consistent_cycle") else "")
          + (f"; cycle {j['interrupted_cycle']} was interrupted" if j["interrupted_cycle"] else ""))
    c = j["cycles"]
    print(f"  cycles:       {c['ok']} ok, {c['warning']} with warnings, {c['error']} failed")
    if j["last_error"]:
        print(f"  last error:   {_fmt_time(j['last_error_time'])}: {j['last_error']}"
              + (f" ({j['consecutive_failures']} in a row)" if j["consecutive_failures"] else ""))
    print("  next run:     " + ("running now" if j["running"] else _fmt_time(j["next_run"])))


def _print_jobs(out: Dict[str, Any]) -> None:
    print(f"daemon: {out['daemon']}" + (f" (pid {out['daemon_pid']})" if out["daemon_pid"] else "")
          + f", jobs file {out['config']}, state {out['state_dir']}")
    for name, j in out["jobs"].items():
        _print_job(name, j)

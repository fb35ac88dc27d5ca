"""``discrep status PATH``: the state of a source (watcher, journal) and/or a replica."""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, Optional

from discrep.core.errors import WarningList

NAME = "status"
HELP = "show the state of a source (watcher backend, journal) or a replica (lag, last cycle, last error)"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("path", metavar="ROOT_OR_DEST")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.run.status import path_status
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
        w = s["watcher"] + (f" ({s['backend']}, pid {s['watcher_pid']}, for {_fmt_age(s['watcher_since_s'])})"
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
        print(f"  daemon:    {r['daemon']}")
        if r["last_error"]:
            print(f"  last error ({_fmt_age(r['last_error_age_s'])} ago): {r['last_error']}")
        if r["interrupted_cycle"]:
            print(f"  cycle {r['interrupted_cycle']} was interrupted: run 'discrep recover {out['path']}'")

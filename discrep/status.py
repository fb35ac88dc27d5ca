"""``discrep status PATH``: the state of a source (watcher, journal) and/or a replica.

Source (``PATH/.discrep/journal.db``): is a watcher running (its flock), which
backend, since when, the journal's last seq, entries beyond the last
acknowledged cut, and the open gap if any (then the next cycle scans).

Replica (``PATH/.discrep/replica.db``): last committed cycle, its source
(snapshot) time and commit time, lag = now - source time, the last cycle's
figures (meta ``last_cycle_stats`` written by continuous mode, else the cycle
row's stats), the last error (meta ``last_error``/``last_error_ns``), an
interrupted cycle, and whether a continuous daemon holds ``daemon.lock``.

Read-only; thread-safety: runs in the caller's thread.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from .errors import UsageError, WarningList


def _fmt_age(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"


def source_status(root: str) -> Dict[str, Any]:
    from .journal import Journal
    from .source import watcher_alive
    from .source import acked_cycle as acked_record
    sd = os.path.join(root, ".discrep")
    j = Journal(sd)
    try:
        alive = watcher_alive(os.fsencode(root))
        last = j.last_seq()
        a = acked_record(os.fsencode(root))
        acked_cut, acked_cycle = (a.cut_seq, a.cycle) if a else (0, 0)
        started = j.get("watcher_started_ns") or ""
        out = {
            "watcher": "running" if alive else "stopped",
            "backend": (j.get("watcher_backend") or None) if alive else None,
            "last_backend": j.get("watcher_backend") or None,
            "watcher_pid": (int(j.get("watcher_pid") or 0) or None) if alive else None,
            "watcher_since_s": round(time.time() - int(started) / 1e9, 1) if alive and started else None,
            "journal_last_seq": last,
            "acked_cycle": acked_cycle,
            "pending_entries": j.count(acked_cut),
            "gap": j.gap(),
        }
        out["next_change_source"] = "journal" if (alive and out["gap"] is None and acked_cycle > 0) else "scan"
        return out
    finally:
        j.close()


def replica_status(dest: str) -> Dict[str, Any]:
    from .daemon import daemon_running
    from .replica_catalog import ReplicaCatalog
    cat = ReplicaCatalog(os.path.join(dest, ".discrep"))
    try:
        hist = cat.history()
        applying = cat.applying()
        stats_meta = cat.get_meta("last_cycle_stats")
        err = cat.get_meta("last_error") or None
        err_ns = int(cat.get_meta("last_error_ns") or 0) or None
    finally:
        cat.close()
    now = time.time_ns()
    out: Dict[str, Any] = {"last_cycle": 0, "source_time_ns": None, "committed_ns": None, "lag_s": None,
                           "last_cycle_stats": None, "last_error": err, "last_error_ns": err_ns,
                           "last_error_age_s": None if err_ns is None else round((now - err_ns) / 1e9, 1),
                           "interrupted_cycle": applying, "daemon": "running" if daemon_running(dest) else "stopped"}
    if hist:
        c, src_ns, com_ns, st = hist[-1]
        out.update(last_cycle=c, source_time_ns=src_ns or None, committed_ns=com_ns or None,
                   lag_s=round((now - src_ns) / 1e9, 3) if src_ns else None,
                   since_commit_s=round((now - com_ns) / 1e9, 3) if com_ns else None)
        stats = st
        if stats_meta:
            try:
                m = json.loads(stats_meta)
                if m.get("cycle") == c:
                    stats = m
            except ValueError:
                pass
        out["last_cycle_stats"] = stats
    return out


def cmd_status(a, warnings: WarningList) -> Dict[str, Any]:
    path = os.path.abspath(a.path)
    sd = os.path.join(path, ".discrep")
    is_src = os.path.exists(os.path.join(sd, "journal.db"))
    is_rep = os.path.exists(os.path.join(sd, "replica.db"))
    if not os.path.isdir(path):
        raise UsageError(f"{a.path} is not a directory")
    if not (is_src or is_rep):
        raise UsageError(f"{a.path} is neither a discrep source nor a replica (no .discrep/journal.db or "
                         f"replica.db)", hint="run 'discrep watch' or 'discrep replicate' first")
    out: Dict[str, Any] = {"path": path}
    if is_src:
        out["source"] = source_status(path)
    if is_rep:
        out["replica"] = replica_status(path)
    if not getattr(a, "json", False):
        _print(out)
    return out


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

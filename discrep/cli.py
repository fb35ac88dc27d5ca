"""The ``discrep`` command line: argument parsing, logging set-up, the one error handler.

Only this module configures logging and writes to stdout/stderr.  Every
subcommand returns a result; ``main`` maps ``errors.Error`` subclasses to their
exit codes (0 ok, 1 warnings, 2 error, 3-99 specific) and prints one line
saying what went wrong and what to do.

Thread-safety: the CLI runs in the main thread.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

from . import __version__
from .errors import (EXIT_OK, EXIT_WARNINGS, Error, Interrupted, UsageError, VerifyMismatchError,
                     WarningList)

log = logging.getLogger("discrep")

EPILOG = """\
examples:
  discrep replicate /srv/data /backup/data        one cycle (the first is the full copy)
  discrep replicate --json /srv/data /backup/data  ... and print figures as JSON
  discrep verify /srv/data /backup/data            exit 0 only when content and metadata agree

manual workflow (the steps 'replicate' runs for you):
  discrep snapshot /srv/data                       -> prints the new cycle number N
  discrep export /srv/data /mnt/export             serve cycle N read-only over FUSE (foreground)
  discrep sync /mnt/export /backup/data            patch the replica from the mounted export
  discrep ack /srv/data N                          the source trims its journal, frees old snapshots

exit codes: 0 ok, 1 finished with warnings, 2 error, 3-99 specific errors (see README).
"""


def _progress_printer(enabled: bool):
    if not enabled:
        return None
    last = [0.0]

    def show(done: int, total: int, nbytes: int, done_bytes: int = 0, total_bytes: int = 0) -> None:
        """files and file bytes done of the manifest's fixed totals; bytes actually read so far."""
        now = time.monotonic()
        if now - last[0] < 0.2 and done != total:
            return
        last[0] = now
        pct = 100 * done_bytes / total_bytes if total_bytes else 100.0
        sys.stderr.write(f"\r  files {done}/{total}  data {done_bytes / 1e6:.1f}/{total_bytes / 1e6:.1f} MB "
                         f"({pct:.0f}%)  read through the export {nbytes / 1e6:.1f} MB ")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def _summary(res: Dict[str, Any]) -> str:
    return (f"cycle {res['cycle']} (base {res['base']}, {res.get('change_source', '?')}, "
            f"{res.get('snapshot', '?')} snapshot): {res['files_changed']} files changed, "
            f"{res['files_renamed']} renamed, {res['files_deleted']} deleted, "
            f"{res['bytes_transferred']} bytes read through the export, "
            f"{res['bytes_written']} bytes written, {res['duration_s']:.2f}s")


def cmd_replicate(a, warnings: WarningList) -> Dict[str, Any]:
    from .local import replicate_local
    prog = _progress_printer(sys.stderr.isatty() and not a.quiet and not a.json)
    if a.every is not None:
        from .daemon import run_every
        return run_every(a, warnings, prog)
    if is_remote(a.src):
        from .remote import replicate_remote
        return replicate_remote(a, warnings, prog)
    return replicate_local(a.src, a.dest, snapshot_kind=a.snapshot, warnings=warnings, progress=prog,
                           **replica_options(a))


def replica_options(a) -> Dict[str, Any]:
    """The replica-side options replicate and sync share (history retention, owners, --force)."""
    return {"keep_last": getattr(a, "keep_last", 10),
            "keep_within_s": parse_duration(a.keep_within) if getattr(a, "keep_within", None) else None,
            "numeric_ids": bool(getattr(a, "numeric_ids", False)),
            "force": bool(getattr(a, "force", False))}


def is_remote(src: str) -> bool:
    """rsync's rule: HOST:PATH or USER@HOST:PATH is remote unless a '/' comes before the ':'."""
    head = src.split("/", 1)[0]
    return ":" in head and not head.startswith(".")


def cmd_snapshot(a, warnings: WarningList) -> Dict[str, Any]:
    from .source import build_cycle
    src = os.fsencode(os.path.abspath(a.src))
    if not os.path.isdir(src):
        raise UsageError(f"source {a.src} does not exist or is not a directory")
    min_cycle = 1
    if a.replica_cycle is not None:
        from .local import settle_source
        settle_source(src, a.replica_cycle)
        min_cycle = a.replica_cycle + 1
    b = build_cycle(src, snapshot_kind=a.snapshot, warnings=warnings, force_scan=a.scan, min_cycle=min_cycle)
    return {"cycle": b.cycle, "base": b.base, "entries": b.entries, "snapshot": b.provider,
            "change_source": b.change_source, "path": os.fsdecode(b.snapshot)}


def cmd_export(a, warnings: WarningList) -> Dict[str, Any]:
    import fuse_export
    from .errors import FuseUnavailableError
    from .export import make_view
    from .source import pending_cycle
    src = os.fsencode(os.path.abspath(a.src))
    n = a.cycle
    if n is None:
        p = pending_cycle(src)
        if p is None:
            raise UsageError("no built cycle to export", hint="run 'discrep snapshot SRC' first")
        n = p.cycle
    view = make_view(src, n)
    if not os.path.isdir(a.mountpoint):
        raise UsageError(f"mount point {a.mountpoint} is not a directory")
    log.warning("exporting cycle %d of %s on %s (read-only); stop with Ctrl-C or 'fusermount3 -u %s'",
                n, a.src, a.mountpoint, a.mountpoint)
    try:
        fuse_export.serve(view, a.mountpoint, allow_other=a.allow_other)
    except fuse_export.FuseUnavailable as e:
        raise FuseUnavailableError(str(e)) from None
    return {"cycle": n, "exported": a.mountpoint}


def cmd_sync(a, warnings: WarningList) -> Dict[str, Any]:
    from .local import prepare_dest
    from .reader import MountReader
    from .replica import sync
    if not os.path.isfile(os.path.join(a.mountpoint, ".discrep", "cycle")):
        raise UsageError(f"{a.mountpoint} does not look like a discrep export (no .discrep/cycle)",
                         hint="mount the export there first ('discrep export' or sshfs)")
    prepare_dest(a.dest, force=a.force)
    reader = MountReader(a.mountpoint)
    try:
        prog = _progress_printer(sys.stderr.isatty() and not a.quiet and not a.json)
        st = sync(reader, os.fsencode(os.path.abspath(a.dest)), warnings=warnings, progress=prog, **replica_options(a))
    finally:
        reader.close()
    return {"cycle": st.cycle, "base": st.base, "files_changed": st.files_changed,
            "files_deleted": st.files_deleted, "files_renamed": st.files_renamed,
            "bytes_transferred": st.bytes_transferred, "bytes_written": st.bytes_written,
            "duration_s": round(st.duration_s, 3), "already_committed": st.already_committed}


def cmd_ack(a, warnings: WarningList) -> Dict[str, Any]:
    from .source import ack_cycle
    ack_cycle(os.fsencode(os.path.abspath(a.src)), a.cycle)
    return {"acked": a.cycle}


def cmd_verify(a, warnings: WarningList) -> Dict[str, Any]:
    from .verify import compare_trees
    for p in (a.src, a.dest):
        if not os.path.isdir(p):
            raise UsageError(f"{p} is not a directory")
    diffs = compare_trees(os.fsencode(os.path.abspath(a.src)), os.fsencode(os.path.abspath(a.dest)))
    if diffs:
        for d in diffs:
            print(d)
        raise VerifyMismatchError(f"{len(diffs)}{'+' if len(diffs) >= 100 else ''} differences between "
                                  f"{a.src} and {a.dest}")
    return {"identical": True}


def cmd_history(a, warnings: WarningList) -> Dict[str, Any]:
    from .replica_catalog import ReplicaCatalog
    sd = os.path.join(a.dest, ".discrep")
    if not os.path.exists(os.path.join(sd, "replica.db")):
        raise UsageError(f"{a.dest} is not a discrep replica")
    cat = ReplicaCatalog(sd)
    try:
        rows = cat.history()
        applying = cat.applying()
    finally:
        cat.close()
    from .history import available, hist_dir, size_of
    have = set(available(os.fsencode(a.dest)))
    committed = [c for c, *_ in rows]
    out = []
    for c, s, _cm, st in rows:
        restorable = all(x in have for x in committed if x > c)
        out.append({"cycle": c, "source_time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s / 1e9)),
                    "files_changed": st.get("files_changed"), "bytes_transferred": st.get("bytes_transferred"),
                    "bytes_written": st.get("bytes_written"),
                    "history_bytes": size_of(hist_dir(os.fsencode(a.dest), c)) if c in have else 0,
                    "restorable": restorable})
    if not a.json:
        print(f"{'cycle':>5}  {'source snapshot time':19}  {'files':>7}  {'read':>12}  {'written':>12}  "
              f"{'history':>10}  restorable")
        for r in out:
            print(f"{r['cycle']:>5}  {r['source_time']:19}  {r['files_changed'] or 0:>7}  "
                  f"{r['bytes_transferred'] or 0:>12}  {r['bytes_written'] or 0:>12}  {r['history_bytes']:>10}  "
                  f"{'yes' if r['restorable'] else 'no (history pruned)'}")
        if applying:
            print(f"cycle {applying} was interrupted: run 'discrep recover {a.dest}'")
    return {"cycles": out, "interrupted": applying}


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise UsageError(f"bad duration {text!r}", hint="use a number with s, m, h, d or w, e.g. 7d") from None


def cmd_recover(a, warnings: WarningList) -> Dict[str, Any]:
    from .replica import recover
    res = recover(os.fsencode(os.path.abspath(a.dest)))
    if res is None:
        if not a.json:
            print(f"{a.dest}: no interrupted cycle; nothing to do")
        return {"rolled_back": None}
    if not a.json:
        print(f"{a.dest}: interrupted cycle {res[0]} rolled back ({res[1]} changes undone); "
              f"the replica is at its last committed cycle")
    return {"rolled_back": res[0], "changes_undone": res[1]}


def cmd_restore(a, warnings: WarningList) -> Dict[str, Any]:
    from .history import clone_replica, restore
    from .paths import check_rel
    from .replica_catalog import ReplicaCatalog
    dest = os.fsencode(os.path.abspath(a.dest))
    sd = os.path.join(a.dest, ".discrep")
    if not os.path.exists(os.path.join(sd, "replica.db")):
        raise UsageError(f"{a.dest} is not a discrep replica")
    from .replica import replica_lock
    with replica_lock(dest):
        cat = ReplicaCatalog(sd)
        try:
            if cat.applying() is not None:
                raise UsageError(f"{a.dest} holds an interrupted cycle", hint=f"run 'discrep recover {a.dest}' first")
            committed = [c for c, *_ in cat.history()]
        finally:
            cat.close()
        sub = check_rel(os.fsencode(a.path.strip("/"))) if a.path else None
        restore(dest, a.cycle, committed, os.fsencode(os.path.abspath(a.to)), sub, clone_replica)
    return {"restored": a.cycle, "to": a.to, "path": a.path}


def cmd_prune(a, warnings: WarningList) -> Dict[str, Any]:
    from .replica import apply_retention, replica_lock
    from .replica_catalog import ReplicaCatalog
    dest = os.fsencode(os.path.abspath(a.dest))
    with replica_lock(dest):
        cat = ReplicaCatalog(os.path.join(a.dest, ".discrep"))
        try:
            gone = apply_retention(dest, cat, a.keep_last, parse_duration(a.keep_within) if a.keep_within else None)
        finally:
            cat.close()
    if not a.json:
        print(f"history of cycle(s) {', '.join(map(str, gone)) or 'none'} pruned")
    return {"pruned": gone}


def cmd_agent(a, warnings: WarningList) -> Dict[str, Any]:
    from .agent import run_agent
    rc = run_agent(a.src, a.replica_cycle, a.snapshot, warnings, stream=a.stream, totals=a.totals)
    raise SystemExit(rc)


def cmd_reset(a, warnings: WarningList) -> Dict[str, Any]:
    from .source import reset
    reset(os.fsencode(os.path.abspath(a.src)))
    return {"reset": a.src}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="discrep", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Replicate a directory tree in discrete cycles: journal what changed, snapshot it, "
                    "export the snapshot read-only over FUSE, and patch the replica with only the "
                    "blocks that changed.")
    p.add_argument("--version", action="version", version=f"discrep {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def add(name, func, help_, desc=None):
        sp = sub.add_parser(name, help=help_, description=desc or help_,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        return sp

    sp = add("replicate", cmd_replicate, "run one cycle: SRC -> DEST (the first run is the full copy)",
             "Run one whole cycle: catch-up scan (or journal), snapshot, FUSE export on a private mount, "
             "sync DEST through it, acknowledge. The first run is the initial full copy (cycle 1).")
    sp.add_argument("src", metavar="SRC", help="source directory")
    sp.add_argument("dest", metavar="DEST", help="replica directory (created if missing)")
    sp.add_argument("--snapshot", default="auto", choices=["auto", "btrfs", "reflink", "copy"],
                    help="snapshot provider (default auto: btrfs subvolume > reflink clones > verified copy)")
    sp.add_argument("--force", action="store_true",
                    help="allow a first cycle into a non-empty DEST (entries not in SRC are deleted)")
    sp.add_argument("--keep-last", type=int, default=10, metavar="N",
                    help="recovery points to keep history for (default 10; older history is pruned)")
    sp.add_argument("--keep-within", metavar="DURATION", help="also keep recovery points younger than this (7d, 12h)")
    sp.add_argument("--numeric-ids", action="store_true",
                    help="keep owner and group numbers as they are (default: map by name, like rsync)")
    sp.add_argument("--every", type=float, metavar="SECONDS",
                    help="continuous mode: run a cycle every SECONDS (sooner when the journal has entries)")
    g = sp.add_argument_group("remote sources ([USER@]HOST:PATH)")
    g.add_argument("--remote-discrep", default="discrep", metavar="PATH",
                   help="discrep executable on the source host (like rsync's --rsync-path)")
    g.add_argument("-F", "--ssh-config", metavar="FILE", help="OpenSSH client config (default ~/.ssh/config)")
    g.add_argument("--transport", default="auto", choices=["auto", "sshfs", "sftp"],
                   help="how the replica reads the export: sshfs mount, or built-in paramiko SFTP reader "
                        "(default auto: sshfs when available)")

    sp = add("snapshot", cmd_snapshot, "build the next cycle of SRC (journal cut, snapshot, manifest)")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("--snapshot", default="auto", choices=["auto", "btrfs", "reflink", "copy"])
    sp.add_argument("--scan", action="store_true", help="run a catch-up scan even if the journal is whole")
    sp.add_argument("--replica-cycle", type=int, metavar="R",
                    help="the replica's last committed cycle: acknowledge it if it is the pending one, "
                         "compare everything if the source's base differs, number the new cycle above R")

    sp = add("export", cmd_export, "serve a built cycle read-only over FUSE (foreground)")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--cycle", type=int, help="cycle to export (default: the last built one)")
    sp.add_argument("--allow-other", action="store_true", help="let other users read the mount (sshfs as non-root)")

    sp = add("sync", cmd_sync, "apply the cycle exported at MOUNTPOINT to DEST")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--keep-last", type=int, default=10, metavar="N",
                    help="recovery points to keep history for (default 10; older history is pruned)")
    sp.add_argument("--keep-within", metavar="DURATION", help="also keep recovery points younger than this (7d, 12h)")
    sp.add_argument("--numeric-ids", action="store_true",
                    help="keep owner and group numbers as they are (default: map by name, like rsync)")
    sp.add_argument("--force", action="store_true", help="allow a first cycle into a non-empty DEST")

    sp = add("ack", cmd_ack, "tell the source the replica committed CYCLE")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("cycle", metavar="CYCLE", type=int)

    sp = add("verify", cmd_verify, "compare SRC and DEST: content and metadata; exit 0 only if identical")
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("dest", metavar="DEST")

    sp = add("history", cmd_history, "list the committed cycles (recovery points) of a replica")
    sp.add_argument("dest", metavar="DEST")

    sp = add("watch", lambda a, w: __import__("discrep.watcher", fromlist=["cmd_watch"]).cmd_watch(a, w),
             "journal every change under ROOT as it happens (foreground; Ctrl-C stops)")
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--backend", default="auto", choices=["auto", "fanotify", "inotify"],
                    help="change source (default auto: fanotify filesystem mark when permitted, else inotify)")

    sp = add("status", lambda a, w: __import__("discrep.status", fromlist=["cmd_status"]).cmd_status(a, w),
             "show the state of a source (watcher backend, journal) or a replica (lag, last cycle, last error)")
    sp.add_argument("path", metavar="ROOT_OR_DEST")

    sp = add("recover", cmd_recover, "roll an interrupted cycle back: DEST returns to its last committed cycle",
             "Undo what an interrupted cycle changed, from the write-ahead history records. "
             "'replicate' and 'sync' do this by themselves first; run it after a crash to have a usable "
             "replica at once (for instance when the source is lost).")
    sp.add_argument("dest", metavar="DEST")

    sp = add("restore", cmd_restore, "materialize committed cycle N of DEST into a new directory",
             "Rebuild recovery point N exactly (content and metadata) in DIR: a clone of the replica "
             "(reflinks where the filesystem allows) with the reverse deltas of the later cycles applied.")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--cycle", type=int, required=True, metavar="N")
    sp.add_argument("--to", required=True, metavar="DIR", help="new or empty directory to restore into")
    sp.add_argument("--path", metavar="P", help="restore only this file or subtree (relative to the tree root)")

    sp = add("prune", cmd_prune, "drop history that no kept recovery point needs")
    sp.add_argument("dest", metavar="DEST")
    sp.add_argument("--keep-last", type=int, default=10, metavar="N", help="keep the last N cycles (default 10)")
    sp.add_argument("--keep-within", metavar="DURATION", help="also keep cycles committed within e.g. 7d, 12h")

    sp = sub.add_parser("agent", help=argparse.SUPPRESS)   # the source side of a remote cycle (agent.py)
    sp.set_defaults(func=cmd_agent, json=False, quiet=True)
    sp.add_argument("src")
    sp.add_argument("--replica-cycle", type=int, help="serve this first cycle at once")
    sp.add_argument("--snapshot", default="auto", choices=["auto", "btrfs", "reflink", "copy"])
    sp.add_argument("--stream", action="store_true", help="announce manifest segments while building")
    sp.add_argument("--no-totals", dest="totals", action="store_false",
                    help="a streamed first copy starts at once instead of counting the tree first")

    sp = add("reset", cmd_reset, "forget what the source replicated: the next cycle compares everything")
    sp.add_argument("src", metavar="SRC")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "func", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(a.verbose, 2)
    logging.basicConfig(level=level, format="discrep: %(message)s" if a.verbose < 2 else
                        "%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    warnings = WarningList()
    try:
        res = a.func(a, warnings)
    except KeyboardInterrupt:
        err = Interrupted("interrupted; the replica stays at its last committed cycle")
        print(f"discrep: error: {err}", file=sys.stderr)
        return err.exit_code
    except Error as e:
        print(f"discrep: error: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps({"error": str(e), "exit_code": e.exit_code, "kind": type(e).__name__}))
        return e.exit_code
    except Exception as e:  # a bug, or an OS error nobody mapped: say so in one line, details with -v
        log.debug("unexpected error", exc_info=True)
        print(f"discrep: error: unexpected {type(e).__name__}: {e} (run with -vv for the traceback; "
              f"the replica stays at its last committed cycle)", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"discrep: warning: {w}", file=sys.stderr)
    if a.json:
        res = dict(res, warnings=len(warnings))
        print(json.dumps(res))
    elif a.cmd == "replicate":
        print(_summary(res))
    elif a.cmd == "snapshot":
        print(res["cycle"])
    elif a.cmd == "sync":
        print(f"cycle {res['cycle']}: {res['files_changed']} files changed, {res['bytes_transferred']} bytes "
              f"read, {res['bytes_written']} written" + (" (already committed)" if res["already_committed"] else ""))
    elif a.cmd == "verify":
        print("identical")
    return EXIT_WARNINGS if len(warnings) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""What several commands share: progress output, option groups, argparse -> typed options.

Thread-safety: main thread only (writes to stderr).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

from discrep.core.errors import UsageError
from discrep.replica.options import ReplicaOptions
from discrep.run.options import SNAPSHOT_KINDS, CycleOptions, parse_duration
from discrep.transport.options import DEFAULT_TIMEOUT, TRANSPORTS, SshOptions

Progress = Callable[..., None]


def progress_printer(a: argparse.Namespace) -> Optional[Progress]:
    """A progress line on stderr when it is a terminal and the user did not ask for quiet/JSON."""
    if not sys.stderr.isatty() or a.quiet or a.json:
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


def add_snapshot_arg(sp: argparse.ArgumentParser, helptext: Optional[str] = None) -> None:
    sp.add_argument("--snapshot", default="auto", choices=list(SNAPSHOT_KINDS), help=helptext)


def add_replica_args(sp: argparse.ArgumentParser, force_help: str) -> None:
    """The replica-side options replicate and sync share (history retention, owners, --force)."""
    sp.add_argument("--force", action="store_true", help=force_help)
    add_keep_args(sp, "recovery points to keep history for (default 10; older history is pruned)",
                  "also keep recovery points younger than this (7d, 12h)")
    sp.add_argument("--numeric-ids", action="store_true",
                    help="keep owner and group numbers as they are (default: map by name, like rsync)")
    sp.add_argument("--max-delete", metavar="N[%]",
                    help="refuse a cycle (exit 19, nothing changed) that would delete more than N entries, or "
                         "N%% of the replica's entries; a deleted directory counts its contents (-1: no limit)")
    sp.add_argument("-c", "--checksum", action="store_true",
                    help="compare every file's actual bytes in DEST with the source (not the catalog's "
                         "signatures) and repair what differs, like rsync -c (a full cycle with replicate; "
                         "the cycle's files with sync). Without it, a file changed in DEST with its size and "
                         "mtime kept is not noticed; 'verify DEST --scrub' finds such files")
    sp.add_argument("--nosuid", action="store_true",
                    help="strip setuid/setgid bits and file capabilities (security.capability) from the replica's "
                         "files, like the nosuid mount option (default: kept, like rsync -a; see README, Safety)")


def add_keep_args(sp: argparse.ArgumentParser, last_help: str, within_help: str) -> None:
    sp.add_argument("--keep-last", type=int, default=10, metavar="N", help=last_help)
    sp.add_argument("--keep-within", metavar="DURATION", help=within_help)


def replica_options(a: argparse.Namespace) -> ReplicaOptions:
    count, pct = parse_max_delete(getattr(a, "max_delete", None))
    return ReplicaOptions(keep_last=a.keep_last,
                          keep_within_s=parse_duration(a.keep_within) if a.keep_within else None,
                          numeric_ids=a.numeric_ids, force=a.force, max_delete=count, max_delete_pct=pct,
                          checksum=bool(getattr(a, "checksum", False)), dry_run=bool(getattr(a, "dry_run", False)),
                          nosuid=bool(getattr(a, "nosuid", False)))


def parse_max_delete(text: Optional[str]) -> Tuple[Optional[int], Optional[float]]:
    """'--max-delete' as (count, percent): '100' -> (100, None), '5%' -> (None, 5.0), '-1'/None -> no limit."""
    if text is None:
        return None, None
    t = text.strip()
    try:
        if t.endswith("%"):
            pct = float(t[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return None, pct
        n = int(t)
    except ValueError:
        raise UsageError(f"bad --max-delete {text!r}", hint="use a count (100), a percentage (5%) or -1") from None
    if n < -1:
        raise UsageError(f"bad --max-delete {text!r}", hint="use a count (100), a percentage (5%) or -1")
    return (None if n == -1 else n), None


def add_ssh_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("remote sources ([USER@]HOST:PATH)")
    g.add_argument("--remote-discrep", default="discrep", metavar="PATH",
                   help="discrep executable on the source host (like rsync's --rsync-path)")
    g.add_argument("-F", "--ssh-config", metavar="FILE", help="OpenSSH client config (default ~/.ssh/config)")
    g.add_argument("--transport", default="auto", choices=list(TRANSPORTS),
                   help="how the replica reads the export: sshfs mount, or built-in paramiko SFTP reader "
                        "(default auto: sshfs when available)")
    g.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="fail the cycle (exit 11) when a connection to the source makes no progress for this "
                        f"long (like rsync's --timeout; default {DEFAULT_TIMEOUT:.0f})")


def _seconds(text: str) -> float:
    v = parse_duration(text)
    if not 1 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 second and 1 day")
    return v


def cycle_options(a: argparse.Namespace) -> CycleOptions:
    return CycleOptions(src=a.src, dest=a.dest, snapshot=a.snapshot, replica=replica_options(a),
                        ssh=SshOptions(remote_discrep=a.remote_discrep, ssh_config=a.ssh_config,
                                       transport=a.transport, timeout=a.timeout),
                        every=a.every)


def summary(res: Dict[str, Any]) -> str:
    return (f"cycle {res['cycle']} (base {res['base']}, {res.get('change_source', '?')}, "
            f"{res.get('snapshot', '?')} snapshot): {res['files_changed']} files changed, "
            f"{res['files_renamed']} renamed, {res['files_deleted']} deleted, "
            + (f"{res['files_repaired']} repaired, " if res.get("files_repaired") else "") +
            f"{res['bytes_transferred']} bytes read through the export, "
            f"{res['bytes_written']} bytes written, {res['duration_s']:.2f}s")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control and format characters (ESC, CR, BEL, bidi overrides,
    undecodable bytes of a file name...) are shown escaped (``\\x1b``), never sent raw -- messages
    may carry text from the other host (remote errors, warnings, file names)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)

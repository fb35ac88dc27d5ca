"""What several commands share: progress output, option groups, argparse -> typed options.

Thread-safety: main thread only (writes to stderr).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple

from discrep.core.errors import UsageError
from discrep.replica.options import ReplicaOptions
from discrep.replica.retention import GridRule, parse_grid
from discrep.run.options import SNAPSHOT_KINDS, CycleOptions, parse_duration
from discrep.source.options import DEFAULT_HOOK_TIMEOUT, HOOK_FAILURES, MAX_HOOK_TIMEOUT, HookOptions
from discrep.transport.options import DEFAULT_TIMEOUT, TRANSPORTS, SshOptions, is_remote
from discrep.transport.pace import parse_rate

if TYPE_CHECKING:
    from discrep.protocol.filterspec import FilterSpec

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
    sp.add_argument("--keep", metavar="GRID",
                    help='also keep the newest point of each period: "24x1h, 30x1d, 12x30d" (the last 24 hours, '
                         '30 days, 12 thirty-day periods; units m, h, d, w)')


def keep_grid(a: argparse.Namespace) -> Tuple[GridRule, ...]:
    text = getattr(a, "keep", None)
    return parse_grid(text) if text else ()


class _RuleAction(argparse.Action):
    """Collects every filter option, in command-line order, as (option, value) in ``filter_rules``."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        got = list(getattr(ns, "filter_rules", None) or [])
        got.append((self.dest, values))
        setattr(ns, "filter_rules", got)


def add_filter_args(sp: argparse.ArgumentParser, delete_excluded: bool = True) -> None:
    """rsync's filter options; rules apply in the order given, the first matching one wins."""
    g = sp.add_argument_group("filters (rsync's FILTER RULES: first match wins; /PAT anchors at SRC, "
                              "a trailing / matches directories, * ? [..] ** and dir/***)")
    sp.set_defaults(filter_rules=[])
    g.add_argument("--exclude", dest="exclude", action=_RuleAction, metavar="PATTERN",
                   help="exclude paths matching PATTERN (an excluded directory is not descended)")
    g.add_argument("--include", dest="include", action=_RuleAction, metavar="PATTERN",
                   help="include paths matching PATTERN (put it before the exclude it overrides)")
    g.add_argument("--exclude-from", dest="exclude-from", action=_RuleAction, metavar="FILE",
                   help="read exclude patterns from FILE, one per line (# and ; start comments)")
    g.add_argument("--include-from", dest="include-from", action=_RuleAction, metavar="FILE",
                   help="read include patterns from FILE, one per line")
    g.add_argument("-f", "--filter", dest="filter", action=_RuleAction, metavar="RULE",
                   help="a filter rule: '- PATTERN', '+ PATTERN', 'dir-merge .discrepignore' (per-directory "
                        "rule files, read from the source tree), or '!' to clear the rules so far")
    if delete_excluded:
        g.add_argument("--delete-excluded", action="store_true",
                       help="also delete excluded files from DEST (default: excluded files already in DEST "
                            "are kept untouched); they count toward --max-delete")


def filter_spec(a: argparse.Namespace) -> "FilterSpec":
    """The filter options of ``a`` as one ``FilterSpec`` (rules in command-line order)."""
    from discrep.protocol.filters import FilterRules
    from discrep.protocol.filterspec import FilterSpec
    rules = FilterRules.parse(getattr(a, "filter_rules", None) or [])
    return FilterSpec(rules, bool(getattr(a, "delete_excluded", False)))


def replica_options(a: argparse.Namespace) -> ReplicaOptions:
    count, pct = parse_max_delete(getattr(a, "max_delete", None))
    return ReplicaOptions(keep_last=a.keep_last,
                          keep_within_s=parse_duration(a.keep_within) if a.keep_within else None,
                          keep_grid=keep_grid(a),
                          numeric_ids=a.numeric_ids, force=a.force, max_delete=count, max_delete_pct=pct,
                          checksum=bool(getattr(a, "checksum", False)), dry_run=bool(getattr(a, "dry_run", False)),
                          filters=filter_spec(a), nosuid=bool(getattr(a, "nosuid", False)))


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
    g.add_argument("--bwlimit", type=_rate, default=0, metavar="RATE",
                   help="limit the SSH connection to RATE KiB/s, both directions and every byte together "
                        "(like rsync's --bwlimit: K, M, G suffixes; 0 = no limit)")


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_hook_args(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("application-consistent recovery points (local SRC; a remote SRC's hooks are "
                              "configured on its host in SRC/.discrep/hooks.toml)")
    g.add_argument("--pre-snapshot", metavar="CMD",
                   help="run CMD (/bin/sh -c, in SRC) before the snapshot: quiesce the application, e.g. "
                        "'fsfreeze -f /srv', a database's backup-start call")
    g.add_argument("--post-snapshot", metavar="CMD",
                   help="run CMD after the snapshot; it always runs once --pre-snapshot ran")
    g.add_argument("--hook-timeout", type=_hook_seconds, default=DEFAULT_HOOK_TIMEOUT, metavar="SECONDS",
                   help=f"kill a hook (its process group) that runs longer (default {DEFAULT_HOOK_TIMEOUT:.0f})")
    g.add_argument("--hook-failure", choices=list(HOOK_FAILURES), default="fail",
                   help="when --pre-snapshot fails or times out: fail the cycle (default, exit 9), or take a "
                        "crash-consistent recovery point and mark it so")


def _hook_seconds(text: str) -> float:
    v = parse_duration(text)
    if not 0 < v <= MAX_HOOK_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and {MAX_HOOK_TIMEOUT:.0f} seconds")
    return v


def hook_options(a: argparse.Namespace) -> Optional[HookOptions]:
    """The snapshot hooks of the command line, or None (then SRC/.discrep/hooks.toml applies)."""
    pre, post = getattr(a, "pre_snapshot", None), getattr(a, "post_snapshot", None)
    if not pre and not post:
        return None
    if is_remote(a.src):
        raise UsageError("--pre-snapshot/--post-snapshot run on this host: for a remote SRC configure the hooks on "
                         "the source host, in SRC/.discrep/hooks.toml",
                         hint="see README, 'Application-consistent recovery points'")
    return HookOptions(pre_snapshot=pre, post_snapshot=post, timeout_s=a.hook_timeout, on_failure=a.hook_failure)


def _seconds(text: str) -> float:
    v = parse_duration(text)
    if not 1 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 1 second and 1 day")
    return v


def cycle_options(a: argparse.Namespace) -> CycleOptions:
    return CycleOptions(src=a.src, dest=a.dest, snapshot=a.snapshot, replica=replica_options(a),
                        ssh=SshOptions(remote_discrep=a.remote_discrep, ssh_config=a.ssh_config,
                                       transport=a.transport, timeout=a.timeout, bwlimit=a.bwlimit),
                        every=a.every, hooks=hook_options(a))


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


def exit_now(rc: int) -> None:
    """End the process at once: log handlers and standard streams flushed, no interpreter teardown
    (which costs time, and in an agent would wait for a stuck export child forever)."""
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)

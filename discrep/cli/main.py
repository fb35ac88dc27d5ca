"""``discrep`` entry point: the parser built from the command modules, logging, the one error handler.

``COMMANDS`` names each command and its module; a run imports only the module of the command it
runs (start-up time: ``discrep agent`` runs once per remote cycle), ``--help`` and a bad command
import them all.

Every command returns a result; ``main`` maps ``errors.Error`` subclasses to their exit codes
(0 ok, 1 warnings, 2 error, 3-99 specific) and prints one line saying what went wrong and
what to do.

Thread-safety: the CLI runs in the main thread.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

from discrep import __version__
from discrep.cli import common
from discrep.cli.common import printable
from discrep.core.errors import EXIT_OK, EXIT_WARNINGS, Error, Interrupted, WarningList

log = logging.getLogger("discrep")

# (command name, its module in discrep.cli), in the order of `discrep --help`; each module's NAME is its name
COMMANDS: List[Tuple[str, str]] = [
    ("replicate", "replicate_cmd"), ("snapshot", "snapshot_cmd"), ("export", "export_cmd"), ("sync", "sync_cmd"),
    ("ack", "ack_cmd"), ("verify", "verify_cmd"), ("history", "history_cmd"), ("find", "find_cmd"),
    ("watch", "watch_cmd"),
    ("status", "status_cmd"), ("recover", "recover_cmd"), ("restore", "restore_cmd"), ("prune", "prune_cmd"),
    ("repair-state", "repair_state_cmd"), ("configcheck", "configcheck_cmd"), ("run", "run_cmd"),
    ("daemon", "daemon_cmd"), ("agent", "agent_cmd"), ("reset", "reset_cmd"), ("replicas", "replicas_cmd"),
    ("forget", "forget_cmd"), ("replica-agent", "replica_agent_cmd")]


# one-shot cycle commands: once their result is printed nothing is left to release (every file, mount,
# child process and connection is closed in a finally), so the console script ends the process without
# the interpreter's teardown of its ~370 modules (40-160 ms measured on the replica, per cycle)
FAST_EXIT = frozenset({"replicate", "run"})


def command_module(name: str) -> ModuleType:
    """The module of command ``name`` (imported now)."""
    return importlib.import_module("discrep.cli." + dict(COMMANDS)[name])


def _named_command(argv: Sequence[str]) -> Optional[str]:
    """The command ``argv`` runs when it is plainly one of ours (options before it are only -v and
    --verbose), else None (help, --version, a typo: the full parser says what is wrong)."""
    known = dict(COMMANDS)
    for arg in argv:
        if arg in known:
            return arg
        if arg == "--verbose" or (arg.startswith("-v") and set(arg[1:]) == {"v"}):
            continue
        return None
    return None

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


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; given the ``argv`` it will parse, only the command that names is registered."""
    p = argparse.ArgumentParser(
        prog="discrep", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Replicate a directory tree in discrete cycles: journal what changed, snapshot it, "
                    "export the snapshot read-only over FUSE, and patch the replica with only the "
                    "blocks that changed.")
    p.add_argument("--version", action="version", version=f"discrep {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    only = _named_command(argv) if argv is not None else None
    for name, _module in COMMANDS:
        if only is not None and name != only:
            continue
        mod = command_module(name)
        if getattr(mod, "HIDDEN", False):
            sp = sub.add_parser(mod.NAME, help=mod.HELP)
        else:
            sp = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
            sp.add_argument("--json", action="store_true",
                            help="print one JSON object as the last line of stdout")
            sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        sp.set_defaults(command=mod)
        mod.register(sp)
    return p


class _SafeFormatter(logging.Formatter):
    """Log lines may quote the other host (its errors, file names): never raw control characters."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _run(a: argparse.Namespace, warnings: WarningList) -> int:
    """Run the command; map what it raised to an exit code, print its result."""
    try:
        res = a.command.run(a, warnings)
    except KeyboardInterrupt:
        err = Interrupted("interrupted; the replica stays at its last committed cycle")
        print(f"discrep: error: {err}", file=sys.stderr)
        return err.exit_code
    except Error as e:
        print(f"discrep: error: {printable(str(e))}", file=sys.stderr)
        if a.json:
            print(json.dumps({"error": str(e), "exit_code": e.exit_code, "kind": type(e).__name__}))
        return e.exit_code
    except Exception as e:  # a bug, or an OS error nobody mapped: say so in one line, details with -v
        log.debug("unexpected error", exc_info=True)
        print(f"discrep: error: unexpected {type(e).__name__}: {printable(str(e))} (run with -vv for the traceback; "
              f"the replica stays at its last committed cycle)", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"discrep: warning: {printable(str(w))}", file=sys.stderr)
    if a.json:
        print(json.dumps(dict(res, warnings=len(warnings))))
    elif hasattr(a.command, "show"):
        a.command.show(a, res)
    return EXIT_WARNINGS if len(warnings) else EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    """The console script (``argv`` None: the process's own arguments; a FAST_EXIT command ends the
    process here) or an in-process call (returns the exit code)."""
    console = argv is None
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    a = parser.parse_args(argv)
    if not getattr(a, "command", None):
        parser.print_help()
        return 2
    level = logging.WARNING - 10 * min(a.verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("discrep: %(message)s" if a.verbose < 2 else
                                        "%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    rc = _run(a, WarningList())
    if console and a.cmd in FAST_EXIT:
        common.exit_now(rc)
    return rc



if __name__ == "__main__":
    sys.exit(main())

"""Snapshot hooks: application-consistent recovery points.

``build_with_hooks`` wraps ``source.build.build_cycle``: it runs ``pre_snapshot`` (quiesce: flush
and hold writes, e.g. ``fsfreeze -f``, a database's backup-start call) before the journal cut,
builds the cycle, and runs ``post_snapshot`` (release) as soon as the snapshot is captured -- and in
any case once ``pre_snapshot`` ran, whatever happened after (a failed build, a failed hook, a timeout).
The cycle header records ``consistency``: ``"app"`` when ``pre_snapshot`` succeeded,
``"crash-fallback"`` when it failed and the job asked for a crash-consistent point instead
(``on_failure = "crash-consistent"``; otherwise the cycle fails with ``HookFailedError``); the
replica keeps it with the recovery point (``history``, ``status`` and ``find`` show it).  While hooks
are active a streamed cycle defers no large file (they are all captured before the release).

A hook is ``/bin/sh -c COMMAND`` in its own session (process group), cwd the source root, stdin
``/dev/null``, stdout and stderr to a temporary file (the last ``MAX_OUTPUT`` bytes are logged or
reported), environment plus ``DISCREP_HOOK`` (``pre_snapshot``/``post_snapshot``) and
``DISCREP_SOURCE``.  After ``timeout_s`` the whole process group is killed (SIGKILL) and the hook
counts as failed.  A failing ``post_snapshot`` is a warning (the point is taken; the application may
still be held: the warning says so).

Who decides which commands run: a local cycle takes them from the command line or the jobs file
(the user running discrep configures their own host).  A remote cycle's agent runs only the hooks
of ``SRC/.discrep/hooks.toml`` (``load_hook_file``): configured on the source host, in its checked
state directory, by the user the agent runs as.  The replica never sends a command string, so
a replica host gains no new power to run commands on the source through discrep (see README,
Safety).

Thread-safety: runs in the caller's thread; one ``SnapshotHooks`` per cycle.
"""
from __future__ import annotations

import logging
import os
import signal
import stat as statmod
import subprocess
import tempfile
from typing import Any, Dict, Optional, Tuple

from discrep.core.errors import HookFailedError, SourceError, WarningList
from discrep.core.paths import STATE_DIR
from discrep.core.statedir import StateDir
from discrep.source.build import BuiltCycle, build_cycle
from discrep.source.options import HOOK_FAILURES, MAX_HOOK_TIMEOUT, HookOptions

log = logging.getLogger(__name__)

HOOK_FILE = "hooks.toml"
MAX_HOOK_FILE = 64 * 1024
MAX_COMMAND = 8192
MAX_OUTPUT = 2048
APP = "app"
CRASH_FALLBACK = "crash-fallback"
CONSISTENCIES = ("", APP, CRASH_FALLBACK)


def run_hook(name: str, command: str, root: bytes, timeout_s: float) -> Tuple[bool, str]:
    """Run one hook; (succeeded, what happened: exit status and the tail of its output)."""
    env = dict(os.environ, DISCREP_HOOK=name, DISCREP_SOURCE=os.fsdecode(root))
    with tempfile.TemporaryFile() as out:
        try:
            p = subprocess.Popen(["/bin/sh", "-c", command], cwd=root, env=env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return False, f"cannot start it: {e.strerror}"
        try:
            rc = p.wait(timeout=timeout_s)
            what = f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, what = -1, f"still running after {timeout_s:g}s: killed"
        except BaseException:
            _kill_group(p)
            raise
        out.seek(max(0, out.seek(0, os.SEEK_END) - MAX_OUTPUT))
        tail = out.read().decode("utf-8", "replace").strip()
    if tail:
        what += f"; output: {tail}"
    if rc == 0:
        log.info("%s hook ran: %s", name, what)
    return rc == 0, what


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


class SnapshotHooks:
    """The hooks of one cycle: ``pre`` once, ``post`` at most once and always once ``pre`` ran."""

    def __init__(self, opts: HookOptions, root: bytes, warnings: WarningList):
        self.opts, self.root, self.warnings = opts, root, warnings
        self.pre_ran = self.post_ran = False

    def pre(self) -> str:
        """Run pre_snapshot; the cycle's consistency (``APP``, ``CRASH_FALLBACK``, or "" without a
        pre hook).  A failure with on_failure "fail" runs post_snapshot, then raises."""
        if not self.opts.pre_snapshot:
            return ""
        self.pre_ran = True
        ok, what = run_hook("pre_snapshot", self.opts.pre_snapshot, self.root, self.opts.timeout_s)
        if ok:
            return APP
        if self.opts.on_failure == "crash-consistent":
            log.warning("pre_snapshot hook failed (%s): taking a crash-consistent recovery point", what)
            self.warnings.add(os.fsdecode(self.root), f"pre_snapshot hook failed ({what}): this recovery point "
                                                      f"is crash-consistent only")
            return CRASH_FALLBACK
        self.post()
        raise HookFailedError(f"the pre_snapshot hook failed: {what}; no cycle was built",
                              hint="fix the hook, or take a crash-consistent point when it fails: "
                                   "--hook-failure crash-consistent (jobs file: hook_failure; hooks.toml: "
                                   "on_failure)")

    def post(self) -> None:
        """Run post_snapshot (once; not when a configured pre_snapshot never ran)."""
        if self.post_ran or not self.opts.post_snapshot or (self.opts.pre_snapshot and not self.pre_ran):
            return
        self.post_ran = True
        ok, what = run_hook("post_snapshot", self.opts.post_snapshot, self.root, self.opts.timeout_s)
        if not ok:
            log.error("post_snapshot hook failed (%s): the application may still be quiesced", what)
            self.warnings.add(os.fsdecode(self.root), f"post_snapshot hook failed ({what}): check that the "
                                                      f"application was released")


def build_with_hooks(root: bytes, hooks: Optional[HookOptions], *, warnings: WarningList,
                     **build_args: Any) -> BuiltCycle:
    """``build_cycle(root, **build_args)`` bracketed by the hooks (see the module doc)."""
    if hooks is None or not hooks.active:
        return build_cycle(root, warnings=warnings, **build_args)
    h = SnapshotHooks(hooks, root, warnings)
    consistency = h.pre()
    try:
        return build_cycle(root, warnings=warnings, consistency=consistency, on_captured=h.post, defer=False,
                           **build_args)
    finally:
        h.post()


def load_hook_file(root: bytes) -> Optional[HookOptions]:
    """The hooks configured on the source host in ``ROOT/.discrep/hooks.toml``, or None.  The file
    is read through the checked state directory, must be owned by this user and writable by no
    one else, and every key is checked (unknown keys are errors)."""
    import tomllib
    if not os.path.isdir(os.path.join(root, STATE_DIR)):
        return None
    where = f"{os.fsdecode(root)}/.discrep/{HOOK_FILE}"
    with StateDir(root, create=False, error=SourceError) as sd:
        try:
            fd = os.open(HOOK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sd.fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SourceError(f"cannot open {where}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not statmod.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise SourceError(f"{where} must be a regular file owned by uid {os.geteuid()}, writable by no one "
                                  f"else", hint=f"chown and 'chmod 600 {where}'")
            data = os.read(fd, MAX_HOOK_FILE + 1)
        finally:
            os.close(fd)
    if len(data) > MAX_HOOK_FILE:
        raise SourceError(f"{where} is larger than {MAX_HOOK_FILE} bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SourceError(f"{where} is not valid TOML: {e}") from None
    return hook_options(doc, where)


def hook_options(doc: Dict[str, Any], where: str) -> HookOptions:
    """``pre_snapshot``, ``post_snapshot``, ``timeout`` (seconds), ``on_failure`` -> HookOptions."""
    problems = []
    for k in doc:
        if k not in ("pre_snapshot", "post_snapshot", "timeout", "on_failure"):
            problems.append(f"unknown key {k!r} (allowed: on_failure, post_snapshot, pre_snapshot, timeout)")
    for k in ("pre_snapshot", "post_snapshot"):
        v = doc.get(k)
        if v is not None and (not isinstance(v, str) or not v.strip() or "\0" in v or len(v) > MAX_COMMAND):
            problems.append(f"{k} must be a non-empty command of at most {MAX_COMMAND} characters")
    t = doc.get("timeout", 60)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= MAX_HOOK_TIMEOUT:
        problems.append(f"timeout must be a positive number of seconds, at most {MAX_HOOK_TIMEOUT:g}")
    f = doc.get("on_failure", "fail")
    if f not in HOOK_FAILURES:
        problems.append(f"on_failure must be one of {', '.join(HOOK_FAILURES)}")
    if problems:
        raise SourceError(f"{where}: " + "; ".join(problems))
    return HookOptions(pre_snapshot=doc.get("pre_snapshot"), post_snapshot=doc.get("post_snapshot"),
                       timeout_s=float(t), on_failure=f)

"""The service's child processes: one ``discrep run`` per cycle, one ``discrep watch`` per root.

Every child runs in its own session (``start_new_session``): a terminal's Ctrl-C reaches only the
daemon, which forwards SIGTERM; SIGKILL after the grace period goes to the child's whole process
group (ssh, sshfs ...).  The CLI maps SIGTERM to an interrupt: a cycle child cleans up (export
unmounted, agent and SSH session closed) and the replica stays at its last committed cycle.

A cycle child gets its own temporary directory (``TMPDIR``) under the state directory, so its
export and sshfs mountpoints are known: after the child is gone, anything still mounted there
(only after a SIGKILL) is unmounted and the empty directories removed -- never a recursive delete,
which could descend into a mount.

A cycle's outcome comes from the child's exit code and its last stdout line (``--json``):
0 ok, 1 warning (per-file problems), 130 interrupted, anything else an error whose message is the
JSON ``error`` or the last stderr line.

Thread-safety: ``CycleChild.wait`` blocks and is called from one worker thread per child; ``start``,
``terminate`` and ``kill`` may be called from the main thread meanwhile (signals and the reaping
are serialised by the child's lock).
``WatcherChild`` belongs to the main thread.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
STDERR_TAIL = 20
WATCHER_BACKOFF_MIN = 1.0
WATCHER_BACKOFF_MAX = 60.0
OUT, ERR = ".stdout", ".stderr"      # the cycle child's output, in its temporary directory
WATCHER_STABLE_S = 60.0        # a watcher that ran this long restarts without backoff


def child_env(tmpdir: Optional[str] = None) -> Dict[str, str]:
    """The daemon's environment minus what is only the daemon's (systemd's notify socket)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")}
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    return env


def discrep_argv(*args: str) -> List[str]:
    return [sys.executable, "-m", "discrep", *args]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- mounts ------------------------------------------------------------------------------------------
def _unescape(field_: str) -> str:
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit():
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounts_under(path: str) -> List[str]:
    """Mountpoints at or below ``path`` (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields_ = line.split(" - ")[0].split()
                if len(fields_) >= 5:
                    mp = _unescape(fields_[4])
                    if (mp + "/").startswith(prefix):
                        found.append(mp)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def clean_tmpdir(path: str) -> List[str]:
    """Unmount what is mounted under ``path`` (lazily), then remove its empty directories.
    Returns the mountpoints that could not be unmounted."""
    left = []
    for mp in mounts_under(path):
        for cmd in (["fusermount3", "-uz", mp], ["umount", "-l", mp]):
            try:
                subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if mp not in mounts_under(mp):
                log.warning("unmounted %s, left by a killed cycle", mp)
                break
        else:
            left.append(mp)
    if not left:
        for dirpath, _dirs, _files in sorted(os.walk(path, topdown=False), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
    return left


# -- cycles ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How one cycle ended."""
    status: str                                  # ok | warning | error | interrupted
    figures: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    exit_code: Optional[int] = None
    started: float = 0.0
    ended: float = 0.0
    stderr_tail: List[str] = field(default_factory=list)
    reported: bool = False                       # the child printed its result or error itself


class CycleChild:
    """``discrep run -c CONFIG --json -q JOB`` as a child process.

    Its stdout and stderr go to files in its temporary directory (no pipe a surviving grandchild
    could hold open).  ``wait`` waits for its exit without reaping it (``waitid`` with WNOWAIT),
    SIGKILLs what is left of its process group, then reaps it: until then its pid cannot be reused,
    so ``terminate`` and ``kill`` (under ``_lock``) never signal a stranger."""

    def __init__(self, job: str, config_path: str, tmpdir: str):
        self.job, self.config_path, self.tmpdir = job, config_path, tmpdir
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0
        self.stop_requested = False
        self._lock = threading.Lock()
        self._reaped = False

    def start(self) -> None:
        os.makedirs(self.tmpdir, mode=0o700, exist_ok=True)
        self.started = time.time()
        with open(os.path.join(self.tmpdir, OUT), "wb") as out, open(os.path.join(self.tmpdir, ERR), "wb") as err:
            self.proc = subprocess.Popen(discrep_argv("run", "-c", self.config_path, "--json", "-q", self.job),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True, env=child_env(self.tmpdir))

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def _signal(self, sig: int, group: bool) -> None:
        with self._lock:
            if self.proc is None or self._reaped:
                return
            try:
                os.killpg(self.proc.pid, sig) if group else os.kill(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def terminate(self) -> None:
        """SIGTERM: the child interrupts its cycle and cleans up."""
        self.stop_requested = True
        self._signal(signal.SIGTERM, group=False)

    def kill(self) -> None:
        """SIGKILL to the child's whole process group (it did not stop in time)."""
        self.stop_requested = True
        self._signal(signal.SIGKILL, group=True)

    def wait(self) -> Outcome:
        """Block until the child ends; its outcome.  Cleans the child's temporary directory."""
        assert self.proc is not None
        while True:
            try:
                os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
                break
            except ChildProcessError:          # already reaped (cannot happen: only we reap)
                break
            except InterruptedError:
                continue
        self._signal(signal.SIGKILL, group=True)     # nothing of the cycle outlives it
        with self._lock:
            self.proc.wait()
            self._reaped = True
        out, err = _tail(os.path.join(self.tmpdir, OUT)), _tail(os.path.join(self.tmpdir, ERR))
        left = clean_tmpdir(self.tmpdir)
        o = parse_outcome(self.proc.returncode, out, err, self.stop_requested)
        o.started, o.ended = self.started, time.time()
        if left:
            o.stderr_tail.append(f"could not unmount {', '.join(left)}")
        return o


def _tail(path: str, limit: int = 1 << 20) -> bytes:
    """The last ``limit`` bytes of a file, which is then removed."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - limit))
            data = f.read()
        os.unlink(path)
    except OSError:
        return b""
    return data


def _last_json(out: bytes) -> Dict[str, Any]:
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.strip():
            try:
                doc = json.loads(line)
            except ValueError:
                return {}
            return doc if isinstance(doc, dict) else {}
    return {}


def parse_outcome(rc: int, out: bytes, err: bytes, stop_requested: bool) -> Outcome:
    """A child's exit code and output -> its ``Outcome`` (see the module doc)."""
    doc = _last_json(out)
    tail = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()][-STDERR_TAIL:]
    if rc in (0, 1) and "cycle" in doc:
        return Outcome("ok" if rc == 0 else "warning", figures=doc, exit_code=rc, stderr_tail=tail, reported=True)
    if rc == EXIT_INTERRUPTED or stop_requested:      # stopped by us: whatever it says, no failure of its own
        return Outcome("interrupted", exit_code=rc, error="interrupted by the daemon's stop", stderr_tail=tail)
    if rc < 0:
        msg = f"the cycle process was killed by signal {-rc} ({signal.Signals(-rc).name})"
    elif isinstance(doc.get("error"), str):
        return Outcome("error", exit_code=rc, error=doc["error"], stderr_tail=tail, reported=True)
    else:
        last = tail[-1] if tail else "no output"
        msg = f"the cycle process exited with {rc}: {last.removeprefix('discrep: error: ')}"
    return Outcome("error", exit_code=rc, error=msg, stderr_tail=tail)


# -- watchers ----------------------------------------------------------------------------------------
class WatcherChild:
    """``discrep watch ROOT`` kept running: restarted with backoff when it dies."""

    def __init__(self, root: str):
        self.root = root
        self.proc: Optional[subprocess.Popen] = None
        self.started = 0.0
        self.restart_at = 0.0
        self.failures = 0
        self.starts = 0

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def supervise(self, now: float, external: bool) -> None:
        """Start it when due; notice and schedule a restart when it ended.  ``external``: another
        process (say a discrep-watch@ unit) holds the root's watcher lock -- nothing to start."""
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                return
            ran = now - self.started
            self.proc = None
            self.failures = 0 if ran >= WATCHER_STABLE_S else self.failures + 1
            delay = 0.0 if self.failures == 0 else min(WATCHER_BACKOFF_MAX,
                                                       WATCHER_BACKOFF_MIN * 2 ** (self.failures - 1))
            self.restart_at = now + delay
            log.warning("watcher of %s exited (%s) after %.1fs; restarting in %.0fs", self.root, rc, ran, delay)
        if external or now < self.restart_at:
            return
        self.started = now
        self.starts += 1
        try:
            self.proc = subprocess.Popen(discrep_argv("watch", self.root), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, start_new_session=True, env=child_env())
        except OSError as e:                 # no process could be made now: try again later
            self.failures += 1
            self.restart_at = now + min(WATCHER_BACKOFF_MAX, WATCHER_BACKOFF_MIN * 2 ** (self.failures - 1))
            log.error("cannot start a watcher of %s: %s", self.root, e)
            return
        log.info("watcher of %s started (pid %d)", self.root, self.proc.pid)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:    # not reaped: its pid is still its own
            _signal_group(self.proc.pid, signal.SIGKILL)

    def reap(self) -> bool:
        """True when it is gone (reaped)."""
        return self.proc is None or self.proc.poll() is not None

"""A ``discrep daemon`` under test: the real CLI in a subprocess, observed from outside.

``DaemonProc(work_dir, config)`` starts ``discrep -v daemon -c CONFIG --state-dir STATE`` with its
own ``NOTIFY_SOCKET`` (a datagram socket the test reads: READY=1, STOPPING=1 ...) and ``TMPDIR``
inside the test directory, its log in ``daemon.log``.  A background thread records every
descendant process (pid, start time, command line) while it runs, so after the stop the test can
check by pid that none survived -- even ones that lived only for one cycle.

``scrape(port)`` reads the metrics endpoint over HTTP and parses it with
``prometheus_client.parser.text_string_to_metric_families``.

Threading: the pid tracker is one daemon thread writing a dict the test reads after ``join``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
DISCREP = str(REPO / ".venv" / "bin" / "discrep")


def committed(dest: Path) -> int:
    """The replica's last committed cycle (0 before the first); read through its catalog, only to
    wait for cycles -- the tests check replicas with the independent oracle of helpers.py."""
    from discrep.replica.catalog import ReplicaCatalog
    if not (dest / ".discrep" / "replica.db").exists():
        return 0
    c = ReplicaCatalog(str(dest / ".discrep"))
    try:
        return c.last_committed()
    finally:
        c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], object], timeout: float = 30.0, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return False


def _stat_fields(pid: int) -> Optional[List[str]]:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def running(pid: int, start: str) -> bool:
    """Is the process ``pid`` that started at ``start`` still there (and not a zombie)?"""
    f = _stat_fields(pid)
    return f is not None and f[19] == start and f[0] != "Z"


def descendants(pid: int) -> List[int]:
    kids: Dict[int, List[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            f = _stat_fields(int(p.name))
            if f is not None:
                kids.setdefault(int(f[1]), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def scrape(port: int) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from http://127.0.0.1:PORT/metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: Dict, name: str, **labels: str) -> Optional[float]:
    return m.get((name, tuple(sorted(labels.items()))))


class DaemonProc:
    def __init__(self, work_dir: Path, config: Path, *, env: Optional[Dict[str, str]] = None):
        self.work_dir, self.config = work_dir, config
        self.state = work_dir / "state"
        self.log = work_dir / "daemon.log"
        self.tmp = work_dir / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.notify_path = str(work_dir / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.2)
        self.messages: List[str] = []
        e = dict(os.environ, NOTIFY_SOCKET=self.notify_path, TMPDIR=str(self.tmp))
        e.update(env or {})
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([DISCREP, "-v", "daemon", "-c", str(config), "--state-dir", str(self.state)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._logf, env=e)
        self.seen: Dict[int, Tuple[str, str]] = {}
        self.left: List[str] = []         # descendants still running right after the daemon exited
        self._stop_tracking = threading.Event()
        self._tracker = threading.Thread(target=self._track, daemon=True)
        self._tracker.start()

    def _track(self) -> None:
        while not self._stop_tracking.is_set():
            for pid in descendants(self.proc.pid):
                if pid not in self.seen:
                    f = _stat_fields(pid)
                    if f is not None:
                        self.seen[pid] = (f[19], cmdline(pid))
            self._stop_tracking.wait(0.03)

    def wait_notify(self, what: str, timeout: float = 30.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(what in m.split("\n") for m in self.messages):
                return True
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except socket.timeout:
                if self.proc.poll() is not None:
                    return False
        return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def diagnose(self) -> str:
        """For a failure message: the daemon's thread stacks (SIGUSR1 -> faulthandler), its log and
        what each descendant process waits in."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        procs = []
        for pid in descendants(self.proc.pid):
            try:
                wchan = Path(f"/proc/{pid}/wchan").read_text()
            except OSError:
                wchan = "?"
            procs.append(f"{pid} [{wchan}] {cmdline(pid)[:120]}")
        return self.log_text() + "\ndescendants:\n" + "\n".join(procs)

    def state_doc(self) -> Dict:
        try:
            return json.loads((self.state / "state.json").read_text())
        except (OSError, ValueError):
            return {"jobs": {}}

    def status(self) -> Tuple[int, Dict]:
        p = subprocess.run([DISCREP, "status", "-c", str(self.config), "--state-dir", str(self.state), "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> Tuple[int, float, str]:
        """SIGTERM; (exit code, seconds it took, stdout)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.proc.communicate()
        took = time.monotonic() - t0
        self._stop_tracking.set()
        self._tracker.join(5)
        self.left = self.leftovers()      # before close() kills them (a failing test must not leak)
        self.wait_notify("STOPPING=1", timeout=0.5)
        return self.proc.returncode, took, out.decode(errors="replace")

    def leftovers(self) -> List[str]:
        """Descendants seen while it ran that still run now."""
        return [f"{pid}: {cmd}" for pid, (start, cmd) in sorted(self.seen.items()) if running(pid, start)]

    def kill(self) -> None:
        """Last resort in a failing test: SIGKILL every recorded descendant still running, then the daemon."""
        for pid, (start, _cmd) in self.seen.items():
            if running(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        """Stop it if the test did not; then kill whatever it left (recorded in ``left`` first)."""
        if self.proc.poll() is None:
            self.stop()
        self.kill()
        self._stop_tracking.set()
        self.notify.close()
        self._logf.close()

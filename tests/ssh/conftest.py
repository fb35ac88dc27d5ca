"""Fixtures for the ssh tier: a real sshd on 127.0.0.1 (or in a network namespace) per test.

``Sshd(base)`` generates an ed25519 host key and a user key with ssh-keygen in
``base``, writes its own sshd_config (HostKey, AuthorizedKeysFile, PidFile,
StrictModes no, UsePAM no, PermitRootLogin prohibit-password, no passwords)
and a client ssh_config with the Host alias ``discrep-src`` (HostName, Port,
User root, IdentityFile, UserKnownHostsFile holding the generated host key,
StrictHostKeyChecking yes).  ``start()`` runs ``sshd -D -e -f CFG`` (optionally
under a wrapper such as ``ip netns exec A unshare -m sh -c ...``); ``stop()``
and ``kill_all()`` end the listener and its session children by pid.

``REMOTE_DISCREP`` is the venv's discrep, found from this file's location.

Threading: fixtures run in pytest's main thread.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import helpers

REPO = Path(__file__).resolve().parents[2]
REMOTE_DISCREP = str(REPO / ".venv" / "bin" / "discrep")
ALIAS = "discrep-src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> List[int]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            out.append(int(p.name))
    return out


def descendants(pid: int) -> List[int]:
    todo, out = [pid], []
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class Sshd:
    def __init__(self, base: Path, *, listen: str = "127.0.0.1", port: Optional[int] = None):
        self.base = base
        self.listen = listen
        self.port = port or free_port()
        self.sshd = helpers.require_tool("sshd")
        keygen = helpers.require_tool("ssh-keygen")
        d = base / "ssh"
        d.mkdir(exist_ok=True)
        self.dir = d
        self.host_key = d / "host_ed25519"
        self.user_key = d / "id_ed25519"
        for k in (self.host_key, self.user_key):
            if not k.exists():
                helpers.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "discrep-test", "-f", str(k)])
        self.authorized_keys = d / "authorized_keys"
        shutil.copy(str(self.user_key) + ".pub", self.authorized_keys)
        self.pidfile = d / "sshd.pid"
        self.log = d / "sshd.log"
        self.sshd_config = d / "sshd_config"
        # remote temp dirs (the export's mountpoint) and local ones (the sshfs mountpoint) live in the
        # test's own directory, so leftover checks never see what a concurrent session does
        self.remote_tmp = base / "rtmp"
        self.local_tmp = base / "ltmp"
        self.remote_tmp.mkdir(exist_ok=True)
        self.local_tmp.mkdir(exist_ok=True)
        sftp = "/usr/lib/openssh/sftp-server" if os.path.exists("/usr/lib/openssh/sftp-server") else "internal-sftp"
        self.sshd_config.write_text(
            f"Port {self.port}\nListenAddress {listen}\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\nPidFile {self.pidfile}\nStrictModes no\nUsePAM no\n"
            f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"Subsystem sftp {sftp}\nSetEnv TMPDIR={self.remote_tmp}\nLogLevel INFO\nMaxStartups 100\nMaxSessions 100\n")
        self.known_hosts = d / "known_hosts"
        hk = (str(self.host_key) + ".pub")
        typ, b64 = Path(hk).read_text().split()[:2]
        name = listen if self.port == 22 else f"[{listen}]:{self.port}"
        self.known_hosts.write_text(f"{name} {typ} {b64}\n")
        self.client_config = d / "ssh_config"
        self.client_config.write_text(
            f"Host {ALIAS}\n  HostName {listen}\n  Port {self.port}\n  User root\n  IdentityFile {self.user_key}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {self.known_hosts}\n  GlobalKnownHostsFile /dev/null\n"
            f"  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> List[str]:
        return [self.sshd, "-D", "-e", "-f", str(self.sshd_config)]

    def start(self, wrapper: Optional[List[str]] = None, *, connect_via: Optional[List[str]] = None,
              timeout: float = 10.0) -> "Sshd":
        os.makedirs("/run/sshd", exist_ok=True)
        cmd = (wrapper or []) + self.command() if wrapper is None or "{sshd}" not in " ".join(wrapper) else \
            [w.replace("{sshd}", " ".join(self.command())) for w in wrapper]
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=self._logf)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            if self._listening(connect_via):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not listen on {self.listen}:{self.port}: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def _listening(self, connect_via: Optional[List[str]]) -> bool:
        if connect_via is None:
            try:
                with socket.create_connection((self.listen, self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        r = subprocess.run(connect_via + ["ss", "-Hltn", f"sport = :{self.port}"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        return str(self.port) in r.stdout

    def listener_pid(self) -> Optional[int]:
        """The sshd listener (the wrapper may have exec'd into it, or be its parent)."""
        if self.proc is None:
            return None
        try:
            pid = int(self.pidfile.read_text().split()[0])
            if _comm(pid) == "sshd":
                return pid
        except (OSError, ValueError, IndexError):
            pass
        for pid in [self.proc.pid] + descendants(self.proc.pid):
            if _comm(pid) == "sshd":
                return pid
        return None

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Kill the listener and every sshd session process below it (by pid)."""
        if self.proc is None:
            return
        pids = [self.proc.pid] + descendants(self.proc.pid)
        for pid in pids:
            if _comm(pid).startswith("sshd"):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = [self.proc.pid] + descendants(self.proc.pid)
        for pid in pids:
            if _comm(pid).startswith("sshd") or pid == self.proc.pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None
        self._logf.close()

    def ssh(self, command: str, *, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``command`` on the test host through OpenSSH with the client config."""
        return helpers.run(["ssh", "-F", str(self.client_config), "-o", "BatchMode=yes", ALIAS, command],
                           check=check)


@pytest.fixture
def sshd(work_dir: Path) -> Iterator[Sshd]:
    helpers.require_tool("sshd")
    s = Sshd(work_dir)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def discrep_cmd(*args: str) -> List[str]:
    return [REMOTE_DISCREP, *args]


def client_env(sshd: Sshd) -> dict:
    return dict(os.environ, TMPDIR=str(sshd.local_tmp))


def replicate(sshd: Sshd, src: str, dst: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(discrep_cmd("replicate", "--json", "-F", str(sshd.client_config),
                                      "--remote-discrep", REMOTE_DISCREP, *extra, f"{ALIAS}:{src}", dst),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                          env=client_env(sshd))


def mounts_under(path) -> List[str]:
    prefix = os.path.realpath(str(path)).rstrip("/") + "/"
    return [m for m, _fstype, _src in helpers.mounts() if (m + "/").startswith(prefix)]

"""SSH control connection to a source host: OpenSSH config, host keys, remote commands.

``resolve(user, host, config_file)`` reads the OpenSSH client configuration the
way ``ssh`` does (Host aliases, HostName, Port, User, IdentityFile,
IdentitiesOnly, UserKnownHostsFile, GlobalKnownHostsFile, StrictHostKeyChecking,
ProxyCommand, ProxyJump, ConnectTimeout, ServerAliveInterval) and returns a
``HostConfig``.  ``Connection(cfg)`` opens ONE paramiko client for it; every
remote command of a cycle runs as an exec channel on that client
(``run``/``start``), and the SFTP reader and passive sshfs (transport.passive) open its
``sftp`` subsystem on it too.  ``Connection(cfg, bwlimit=B)`` paces every byte of the
connection, both directions together, through one token bucket (transport.pace) under the
paramiko transport, with channel windows of a fraction of a second of the rate.

Host keys are verified against the known_hosts files of the configuration.  An
unknown key is refused with ``HostKeyError`` unless StrictHostKeyChecking is
``no`` or ``accept-new`` (then it is appended to the first UserKnownHostsFile);
a changed key is refused unless StrictHostKeyChecking is ``no``.  No password is
ever taken: authentication uses ssh-agent and key files only.

Liveness (``--timeout``, ``HostConfig.io_timeout``): a watchdog thread per connection asks
the server for an answer every few seconds; no answer for ``io_timeout`` seconds closes the
connection, so every read on it fails (exit 11) instead of waiting on a stalled network.

Thread-safety: a ``Connection`` may run commands from several threads (paramiko
channels are independent); ``close`` must be called once, from the owner; the watchdog
thread (and its probe threads) only read the transport and may close it.
"""
from __future__ import annotations

import logging
import os
import shlex
import socket
import threading
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from discrep.core.errors import HostKeyError, TransportError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "~/.ssh/config"
DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
WINDOW = 16 * 1024 * 1024     # paramiko channel window: keeps SFTP pipelines full
MAX_PACKET = 256 * 1024


def parse_remote(spec: str) -> Tuple[Optional[str], str, str]:
    """``[USER@]HOST:PATH`` (HOST may be ``[v6addr]``) -> (user, host, path)."""
    user = None
    rest = spec
    at, colon = spec.find("@"), spec.find(":")
    if at > 0 and (colon < 0 or at < colon):
        user, rest = spec[:at], spec[at + 1:]
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1:end + 2] != ":":
            raise TransportError(f"cannot parse remote source {spec!r}", hint="write it as [USER@]HOST:PATH")
        host, path = rest[1:end], rest[end + 2:]
    else:
        host, sep, path = rest.partition(":")
        if not sep:
            raise TransportError(f"cannot parse remote source {spec!r}", hint="write it as [USER@]HOST:PATH")
    if not host:
        raise TransportError(f"no host in remote source {spec!r}", hint="write it as [USER@]HOST:PATH")
    return user or None, host, path or "."


@dataclass
class HostConfig:
    """What the OpenSSH configuration says about one destination."""

    alias: str                      # the host as the user wrote it (ssh/sshfs get this)
    hostname: str                   # where to connect (HostName)
    port: int = 22
    user: Optional[str] = None      # user from the spec, else User, else the local user
    spec_user: Optional[str] = None  # user written in the spec (for sshfs: user@alias)
    identity_files: List[str] = field(default_factory=list)
    identities_only: bool = False
    known_hosts: List[str] = field(default_factory=list)
    global_known_hosts: List[str] = field(default_factory=list)
    strict: str = "ask"             # yes | no | accept-new | ask (ask refuses: we never prompt)
    proxy_command: Optional[str] = None
    connect_timeout: float = 15.0
    server_alive_interval: int = 15
    io_timeout: float = 60.0        # --timeout: seconds without an answer that declare the connection dead
    config_file: Optional[str] = None  # the file read (passed as -F to ssh/sshfs), None if none

    @property
    def known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        u = f"{self.user}@" if self.user else ""
        return f"{u}{self.alias}" + (f" ({self.hostname}:{self.port})" if self.alias != self.hostname
                                     or self.port != 22 else "")


def _yes(v: Optional[str]) -> bool:
    return str(v).lower() in ("yes", "true", "1")


def resolve(user: Optional[str], host: str, config_file: Optional[str] = None) -> HostConfig:
    """Apply the OpenSSH client configuration to ``[user@]host``."""
    import paramiko

    path = None
    if config_file:
        path = os.path.expanduser(config_file)
        if not os.path.isfile(path):
            raise TransportError(f"ssh config {config_file} does not exist", hint="check the -F/--ssh-config path")
    elif os.path.isfile(os.path.expanduser(DEFAULT_CONFIG)):
        path = os.path.expanduser(DEFAULT_CONFIG)
    try:
        sc = paramiko.SSHConfig.from_path(path) if path else paramiko.SSHConfig()
        o = sc.lookup(host)
    except Exception as e:  # paramiko raises several kinds on a bad file
        raise TransportError(f"cannot read ssh config {path}: {e}") from None
    cfg = HostConfig(alias=host, hostname=o.get("hostname", host), config_file=path, spec_user=user)
    try:
        cfg.port = int(o.get("port", 22))
    except ValueError:
        raise TransportError(f"bad Port {o.get('port')!r} for {host} in {path}") from None
    cfg.user = user or o.get("user") or _local_user()
    if user and o.get("user") != user:
        # tokens like %r were expanded with the config's user; lookup again is not needed for
        # the fields we use except IdentityFile/ProxyCommand, which we re-expand below.
        pass
    cfg.identity_files = [os.path.expanduser(p) for p in o.get("identityfile", [])]
    cfg.identities_only = _yes(o.get("identitiesonly"))
    khs = o.get("userknownhostsfile")
    cfg.known_hosts = [os.path.expanduser(p) for p in (khs.split() if khs else DEFAULT_KNOWN_HOSTS)]
    gkh = o.get("globalknownhostsfile")
    cfg.global_known_hosts = [os.path.expanduser(p) for p in (gkh.split() if gkh else DEFAULT_GLOBAL_KNOWN_HOSTS)]
    cfg.strict = str(o.get("stricthostkeychecking", "ask")).lower()
    if cfg.strict in ("off", "false"):
        cfg.strict = "no"
    elif cfg.strict in ("on", "true"):
        cfg.strict = "yes"
    pc = o.get("proxycommand")
    if pc and pc.lower() != "none":
        cfg.proxy_command = pc
    elif o.get("proxyjump") and o.get("proxyjump").lower() != "none":
        jump = o["proxyjump"].split(",")[0]
        f = f"-F {shlex.quote(path)} " if path else ""
        cfg.proxy_command = f"ssh {f}-W [{cfg.hostname}]:{cfg.port} {shlex.quote(jump)}"
    if cfg.proxy_command and user:
        cfg.proxy_command = cfg.proxy_command.replace("%r", user)
    try:
        if o.get("connecttimeout"):
            cfg.connect_timeout = float(o["connecttimeout"])
        if o.get("serveraliveinterval"):
            cfg.server_alive_interval = int(o["serveraliveinterval"])
    except ValueError:
        pass
    return cfg


def _local_user() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "root")


def _fp(key) -> str:
    import base64
    import hashlib
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _Policy:
    """paramiko MissingHostKeyPolicy honoring StrictHostKeyChecking."""

    def __init__(self, cfg: HostConfig, bwlimit: int = 0):
        self.cfg = cfg
        self.bwlimit = int(bwlimit or 0)     # bytes/s for both directions together (0: none), see pace
        self.bucket = None
        self.window, self.max_packet = WINDOW, MAX_PACKET
        if self.bwlimit:
            from discrep.transport.pace import TokenBucket, max_packet_for, window_for
            self.bucket = TokenBucket(self.bwlimit)
            self.window, self.max_packet = window_for(self.bwlimit), max_packet_for(self.bwlimit)

    def missing_host_key(self, client, hostname, key) -> None:
        cfg = self.cfg
        if cfg.strict == "no":
            log.warning("accepting unknown host key %s %s of %s (StrictHostKeyChecking no)",
                        key.get_name(), _fp(key), cfg.describe())
            return
        if cfg.strict == "accept-new":
            kh = cfg.known_hosts[0] if cfg.known_hosts else os.path.expanduser(DEFAULT_KNOWN_HOSTS[0])
            try:
                os.makedirs(os.path.dirname(kh) or ".", mode=0o700, exist_ok=True)
                with open(kh, "a") as f:
                    f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
                log.warning("added host key %s %s of %s to %s (StrictHostKeyChecking accept-new)",
                            key.get_name(), _fp(key), hostname, kh)
            except OSError as e:
                raise HostKeyError(f"cannot record the new host key of {cfg.describe()} in {kh}: {e.strerror}") \
                    from None
            return
        raise HostKeyError(
            f"host key of {cfg.describe()} is unknown ({key.get_name()} {_fp(key)})",
            hint=f"connect once with 'ssh{_f_opt(cfg)} {cfg.alias}' to check and accept the key, or add it to "
                 f"{cfg.known_hosts[0] if cfg.known_hosts else '~/.ssh/known_hosts'}")


def _f_opt(cfg: HostConfig) -> str:
    return f" -F {shlex.quote(cfg.config_file)}" if cfg.config_file and \
        cfg.config_file != os.path.expanduser(DEFAULT_CONFIG) else ""


class RemoteResult:
    def __init__(self, rc: int, out: bytes, err: bytes):
        self.rc, self.out, self.err = rc, out, err

    @property
    def err_text(self) -> str:
        return self.err.decode(errors="replace").strip()


class Connection:
    """One paramiko SSH client to the source; remote commands run as exec channels on it."""

    def __init__(self, cfg: HostConfig, bwlimit: int = 0):
        self.cfg = cfg
        self.bwlimit = int(bwlimit or 0)     # bytes/s for both directions together (0: none), see pace
        self.bucket = None
        self.window, self.max_packet = WINDOW, MAX_PACKET
        if self.bwlimit:
            from discrep.transport.pace import TokenBucket, max_packet_for, window_for
            self.bucket = TokenBucket(self.bwlimit)
            self.window, self.max_packet = window_for(self.bwlimit), max_packet_for(self.bwlimit)
        self.client = None
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.dead: Optional[str] = None     # why the watchdog closed the connection

    # -- connect -----------------------------------------------------
    def connect(self) -> "Connection":
        import paramiko
        cfg = self.cfg
        client = paramiko.SSHClient()
        for p in cfg.global_known_hosts + cfg.known_hosts:
            if os.path.isfile(p):
                try:
                    client.load_system_host_keys(p)
                except (IOError, paramiko.SSHException) as e:
                    log.warning("cannot read known hosts file %s: %s", p, e)
        client.set_missing_host_key_policy(_Policy(cfg))
        sock = None
        if cfg.proxy_command:
            cmd = (cfg.proxy_command.replace("%h", cfg.hostname).replace("%p", str(cfg.port))
                   .replace("%r", cfg.user or "").replace("%n", cfg.alias).replace("%%", "%"))
            # as OpenSSH does: "exec <line>" goes to the user's shell (pipes, quotes, && work);
            # paramiko splits its argument like a shell would, so hand it "<shell> -c <line>"
            shell = os.environ.get("SHELL") or "/bin/sh"
            if not os.access(shell, os.X_OK):
                shell = "/bin/sh"
            sock = paramiko.ProxyCommand(f"{shlex.quote(shell)} -c " + shlex.quote("exec " + cmd))
        keys = [p for p in cfg.identity_files if os.path.isfile(p)]

        def transport_factory(s, **kw):
            if self.bucket is not None:     # --bwlimit: every byte of the connection passes the one bucket
                from discrep.transport.pace import PacedSocket
                s = PacedSocket(s, self.bucket)
            t = paramiko.Transport(s, default_window_size=self.window, default_max_packet_size=self.max_packet,
                                   **kw)
            opts = t.get_security_options()
            have = list(opts.ciphers)
            opts.ciphers = tuple([c for c in FAST_CIPHERS if c in have] + [c for c in have if c not in FAST_CIPHERS])
            return t
        try:
            client.connect(cfg.hostname, port=cfg.port, username=cfg.user, key_filename=keys or None,
                           allow_agent=True, look_for_keys=not cfg.identities_only, timeout=cfg.connect_timeout,
                           banner_timeout=cfg.connect_timeout, auth_timeout=cfg.connect_timeout,
                           sock=sock, compress=False, transport_factory=transport_factory)
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            if cfg.strict == "no":
                raise HostKeyError(f"host key of {cfg.describe()} has CHANGED ({e.key.get_name()} {_fp(e.key)}); "
                                   f"refusing to connect even with StrictHostKeyChecking no") from None
            raise HostKeyError(
                f"host key of {cfg.describe()} has CHANGED: known_hosts has {e.expected_key.get_name()} "
                f"{_fp(e.expected_key)}, the server offers {e.key.get_name()} {_fp(e.key)} "
                f"(the host was reinstalled, or someone is intercepting the connection)",
                hint=f"if the change is expected, remove the old key with 'ssh-keygen -R "
                     f"{shlex.quote(cfg.known_hosts_name)}"
                     f"{' -f ' + shlex.quote(cfg.known_hosts[0]) if cfg.known_hosts else ''}' and connect once "
                     f"with 'ssh{_f_opt(cfg)} {cfg.alias}' to check and accept the new key") from None
        except paramiko.AuthenticationException as e:
            client.close()
            raise TransportError(f"authentication to {cfg.describe()} as {cfg.user} failed: {e}",
                                 hint="discrep uses ssh-agent and key files only (IdentityFile), never passwords; "
                                      "load your key with ssh-add or set IdentityFile") from None
        except (paramiko.SSHException, socket.error, OSError, EOFError) as e:
            client.close()
            msg = str(e) or type(e).__name__
            raise TransportError(f"cannot connect to {cfg.describe()}: {msg}",
                                 hint=f"check that 'ssh{_f_opt(cfg)} {cfg.alias}' works") from None
        self.client = client
        self._watch = threading.Thread(target=self._watchdog, args=(client.get_transport(),), daemon=True,
                                       name="discrep-ssh-watchdog")
        self._watch.start()
        return self

    def alive_interval(self) -> float:
        """Seconds between two liveness probes: a dead peer is noticed within ``io_timeout`` + this."""
        return max(0.5, min(float(self.cfg.server_alive_interval or 15), self.cfg.io_timeout / 4))

    def _watchdog(self, t) -> None:
        """Ask the server for an answer (``keepalive@openssh.com``, which it must answer) every
        ``alive_interval`` s; no answer within ``io_timeout`` s closes the connection, which every
        channel read then reports (paramiko's own keepalive never declares a peer dead)."""
        while not self._closed and t.is_active():
            answered = threading.Event()

            def probe() -> None:
                try:
                    t.global_request("keepalive@openssh.com", wait=True)
                except Exception:  # the transport is closing: the loop ends
                    pass
                answered.set()
            threading.Thread(target=probe, daemon=True, name="discrep-ssh-probe").start()
            if not answered.wait(self.cfg.io_timeout):
                if not self._closed:
                    self.dead = f"no answer from {self.cfg.describe()} for {self.cfg.io_timeout:.0f}s"
                    log.warning("%s: closing the connection", self.dead)
                    t.close()
                return
            self._stop.wait(self.alive_interval())

    def transport(self):
        t = self.client.get_transport() if self.client else None
        if t is None or not t.is_active():
            raise TransportError(f"the SSH connection to {self.cfg.describe()} was lost"
                                 + (f" ({self.dead})" if self.dead else ""),
                                 hint="the replica stays at its last committed cycle; run again")
        return t

    # -- commands ----------------------------------------------------
    def start(self, command: str):
        """Open an exec channel running ``command`` (a shell command line); returns the channel."""
        import paramiko
        try:
            ch = self.transport().open_session(timeout=self.cfg.connect_timeout)
            ch.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise TransportError(f"cannot run a command on {self.cfg.describe()}: {e}",
                                 hint="the replica stays at its last committed cycle; run again") from None
        return ch

    def run(self, command: str, *, timeout: Optional[float] = None, stdin: Optional[bytes] = None) -> RemoteResult:
        """Run ``command`` remotely, collecting stdout/stderr; rc -1 when the connection dropped."""
        ch = self.start(command)
        try:
            if stdin is not None:
                ch.sendall(stdin)
            ch.shutdown_write()
            out, err = _drain(ch, timeout)
            if not ch.exit_status_ready() and not ch.closed:
                ch.status_event.wait(5)
            rc = ch.recv_exit_status() if ch.exit_status_ready() else -1
        finally:
            ch.close()
        if rc == -1 and not self.transport_alive():
            raise TransportError(f"the SSH connection to {self.cfg.describe()} was lost while running a "
                                 f"remote command", hint="the replica stays at its last committed cycle; run again")
        return RemoteResult(rc, out, err)

    def transport_alive(self) -> bool:
        t = self.client.get_transport() if self.client else None
        return bool(t and t.is_active())

    def sftp(self):
        import paramiko
        try:
            ch = self.transport().open_session(window_size=self.window, max_packet_size=self.max_packet)
            ch.invoke_subsystem("sftp")
            return paramiko.SFTPClient(ch)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise TransportError(f"cannot open SFTP on {self.cfg.describe()}: {e}",
                                 hint="the server must allow the sftp subsystem") from None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # closing a dead transport may raise; nothing to do
                pass


def _drain(ch, timeout: Optional[float]) -> Tuple[bytes, bytes]:
    """All of stdout and stderr of ``ch`` until EOF (stderr read in a helper thread)."""
    errbuf: List[bytes] = []
    ch.settimeout(timeout)

    def read_err() -> None:
        try:
            errbuf.append(ch.makefile_stderr("rb").read())
        except Exception:  # a dropped connection: what we have is enough
            pass
    t = threading.Thread(target=read_err, daemon=True, name="discrep-ssh-stderr")
    t.start()
    try:
        out = ch.makefile("rb").read()
    except socket.timeout:
        raise TransportError("a remote command timed out") from None
    t.join(timeout if timeout is not None else 30)
    return out, b"".join(errbuf)


def q(s) -> str:
    """Shell-quote for the remote POSIX shell (bytes are decoded with surrogateescape)."""
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    return shlex.quote(str(s))

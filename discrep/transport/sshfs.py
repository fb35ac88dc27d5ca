"""Mount a remote directory read-only with sshfs, tuned for bulk reads; unmount on every path.

``SshfsMount(cfg, remote_dir, local_dir).start()`` runs ``sshfs -f`` as a child
process (so we own its pid), with the same OpenSSH configuration file as the
paramiko side (``-F``), the connection's user and host alias, and:

* ``Ciphers=aes128-gcm@openssh.com``, ``Compression=no`` (541 vs 364 MB/s),
* ``BatchMode=yes`` (never a password prompt), ``ServerAliveInterval`` so a dead
  peer is noticed, no ``reconnect`` (a dropped connection must fail the cycle),
* ``ro``, ``kernel_cache`` (the export is an immutable snapshot),
* ``follow_symlinks``: a streamed first copy's snapshot holds large files as symlinks
  to the live files (read live, verified afterwards: snapshot.settle_deferred),
* the mount's bdi ``read_ahead_kb`` raised to 1024 (sshfs 541 -> 1000 MB/s).

``stop()`` unmounts with ``fusermount3 -u``, then ``-uz`` (lazy) if busy or
the connection is gone, then waits for / kills the child by pid.

Thread-safety: one owner thread calls start/stop.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from typing import List, Optional, Sequence

from fuse_export.adapter import mount_entry, mounted

from discrep.core.errors import FuseUnavailableError, HostKeyError, TransportError
from discrep.transport.ssh import HostConfig

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024


def available() -> Optional[str]:
    """Why sshfs cannot be used here (None when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("sshfs"):
        return "the sshfs program is not installed (apt-get install sshfs)"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    try:
        ent = mount_entry(mountpoint)
        if ent is None:
            return False
        os.stat(mountpoint)  # the kernel has processed INIT (which clamps read-ahead) once stat returns
        with open(f"/sys/class/bdi/{ent['dev'].decode()}/read_ahead_kb", "w") as f:
            f.write(str(kb))
        return True
    except OSError as e:
        log.info("could not raise read_ahead_kb of %s: %s", mountpoint, e)
        return False


class SshfsMount:
    def __init__(self, cfg: HostConfig, remote_dir: str, local_dir: str, *,
                 extra_opts: Sequence[str] = ()):
        self.cfg = cfg
        self.remote_dir = remote_dir
        self.local_dir = local_dir
        self.extra_opts = list(extra_opts)
        self.proc: Optional[subprocess.Popen] = None
        self._err = None

    def command(self) -> List[str]:
        cfg = self.cfg
        exe = shutil.which("sshfs") or "sshfs"
        cmd = [exe, "-f"]
        # no answer for about io_timeout seconds (--timeout) ends ssh, and sshfs fails its reads
        alive = max(1, min(cfg.server_alive_interval or 15, int(cfg.io_timeout // 3)))
        count = max(1, int(cfg.io_timeout // alive))
        if cfg.config_file:
            cmd += ["-F", cfg.config_file]
        target = (f"{cfg.spec_user}@" if cfg.spec_user else "") + \
            (f"[{cfg.alias}]" if ":" in cfg.alias else cfg.alias) + ":" + self.remote_dir
        opts = ["ro", "kernel_cache", "Ciphers=^aes128-gcm@openssh.com",
                "Compression=no", "BatchMode=yes", f"ServerAliveInterval={alive}",
                f"ServerAliveCountMax={count}", f"ConnectTimeout={int(cfg.connect_timeout)}",
                "entry_timeout=60", "attr_timeout=60", "dcache_timeout=60",
                "follow_symlinks"]
        if not cfg.config_file:
            # no configuration file: tell ssh what paramiko was told
            opts += [f"Port={cfg.port}", f"User={cfg.user}"] if cfg.user else [f"Port={cfg.port}"]
        opts += self.extra_opts
        # libfuse splits -o at commas: a comma (or backslash) inside a value, e.g. a user name, is escaped
        return cmd + [target, self.local_dir, "-o", ",".join(o.replace("\\", "\\\\").replace(",", "\\,")
                                                             for o in opts)]

    def start(self, timeout: float = 30.0) -> "SshfsMount":
        why = available()
        if why:
            raise FuseUnavailableError(f"cannot use sshfs: {why}", hint="install sshfs and fuse3, or use --transport sftp")
        self._err = tempfile.TemporaryFile()
        cmd = self.command()
        log.debug("sshfs: %s", " ".join(cmd))
        self.proc = self.spawn(cmd, self._err)
        deadline = time.monotonic() + timeout
        while not mounted(self.local_dir):
            if self.proc.poll() is not None:
                err = self.stderr()
                self.proc = None
                self._raise(err)
            if time.monotonic() > deadline:
                self.stop()
                raise TransportError(f"sshfs did not mount {self.cfg.describe()}:{self.remote_dir} within "
                                     f"{timeout:.0f}s")
            time.sleep(0.005)
        # sshfs mounts first and checks the remote directory afterwards (exiting if it is missing):
        # the mount is only usable once a request through it has been answered
        try:
            os.listdir(self.local_dir)
        except OSError:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            err = self.stderr()
            self.stop()
            self._raise(err)
        set_read_ahead(self.local_dir)
        return self

    def spawn(self, cmd: List[str], stderr) -> subprocess.Popen:
        """Start the sshfs child (a subclass may give it other stdio)."""
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                close_fds=True, start_new_session=True)

    def _raise(self, err: str) -> None:
        line = err.strip().splitlines()[-1] if err.strip() else "sshfs exited"
        if "Host key verification failed" in err or "REMOTE HOST IDENTIFICATION HAS CHANGED" in err:
            raise HostKeyError(f"sshfs: host key of {self.cfg.describe()} was refused by ssh: {line}",
                               hint=f"connect once with 'ssh {self.cfg.alias}' to check and accept the key")
        raise TransportError(f"sshfs could not mount {self.cfg.describe()}:{self.remote_dir}: {line}",
                             hint="check that sshfs works with the same ssh config, or use --transport sftp")

    def stderr(self) -> str:
        if self._err is None:
            return ""
        try:
            self._err.seek(0)
            return self._err.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Unmount (-u, then lazy -uz) and reap the sshfs child; never raises."""
        mp = self.local_dir
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        try:
            if mounted(mp) and tool:
                # a dead connection makes -u fail ("Transport endpoint is not connected") or busy
                for args in (["-u", "-q"], ["-uz", "-q"]):
                    try:
                        subprocess.run([tool, *args, mp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       timeout=10)
                    except (OSError, subprocess.TimeoutExpired):
                        pass
                    if not mounted(mp):
                        break
            if mounted(mp):
                subprocess.run(["umount", "-l", mp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=10)
        except Exception as e:  # cleanup must go on
            log.warning("could not unmount %s: %s", mp, e)
        p = self.proc
        if p is not None:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.warning("sshfs pid %d does not exit", p.pid)
            self.proc = None
        if self._err is not None:
            self._err.close()
            self._err = None

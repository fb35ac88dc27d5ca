"""sshfs in passive mode over a channel of the session's one SSH connection.

``PassiveSshfsMount(conn, remote_dir, local_dir).start()`` opens a session channel on the
paramiko ``Connection`` and asks the server for its ``sftp`` subsystem (the remote sshd starts
its configured ``sftp-server``), then runs ``sshfs -f -o passive`` with its stdin and stdout on
one end of a local socketpair; ``ChannelPump`` copies bytes between the other end and the
channel.  No second SSH connection, no second handshake: what ``--bwlimit`` paces and what the
watchdog watches is the one connection.  A lost connection closes the channel, the pump ends,
sshfs sees EOF and exits, and every read on the mount fails.

``passive_supported()`` probes the installed sshfs (``sshfs --help`` lists ``-o passive`` from
3.7 on); without it the caller falls back to the two-connection ``SshfsMount``.

Threading: the owner thread calls start/stop.  ``ChannelPump`` runs two daemon threads, one per
direction; each owns its direction (the socket end and the channel are shared, each thread only
reads one and writes the other); ``close()`` (owner) closes both and joins them.
"""
from __future__ import annotations

import functools
import logging
import shutil
import socket
import subprocess
import threading
from typing import List, Optional

from discrep.core.errors import TransportError
from discrep.transport.ssh import Connection
from discrep.transport.sshfs import SshfsMount

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


@functools.lru_cache(maxsize=1)
def passive_supported() -> bool:
    """Whether the installed sshfs has ``-o passive`` (SFTP on stdin/stdout, sshfs >= 3.7)."""
    exe = shutil.which("sshfs")
    if not exe:
        return False
    try:
        r = subprocess.run([exe, "--help"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"-o passive" in r.stdout


class ChannelPump:
    """Copies bytes both ways between a local socket and a paramiko channel until either ends."""

    def __init__(self, sock: socket.socket, ch) -> None:
        self.sock, self.ch = sock, ch
        self.threads = [threading.Thread(target=self._up, daemon=True, name="discrep-pump-up"),
                        threading.Thread(target=self._down, daemon=True, name="discrep-pump-down")]
        for t in self.threads:
            t.start()

    def _up(self) -> None:
        """local (sshfs's requests) -> channel; EOF is passed on as the channel's EOF."""
        try:
            while True:
                d = self.sock.recv(CHUNK)
                if not d:
                    self.ch.shutdown_write()
                    return
                self.ch.sendall(d)
        except Exception as e:  # socket or SSH errors: the connection or sshfs is gone
            log.debug("pump up ended: %s", e)
            self._abort()

    def _down(self) -> None:
        """channel (sftp-server's answers) -> local; EOF is passed on as the socket's EOF."""
        try:
            while True:
                d = self.ch.recv(CHUNK)
                if not d:
                    break
                self.sock.sendall(d)
            self.sock.shutdown(socket.SHUT_WR)
        except Exception as e:
            log.debug("pump down ended: %s", e)
            self._abort()

    def _abort(self) -> None:
        for close in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.ch.close):
            try:
                close()
            except Exception:  # already closed
                pass

    def close(self, timeout: float = 10.0) -> None:
        self._abort()
        for t in self.threads:
            t.join(timeout)
            if t.is_alive():
                log.warning("the sshfs channel pump %s does not end", t.name)
        try:
            self.sock.close()
        except OSError:
            pass


class PassiveSshfsMount(SshfsMount):
    """``SshfsMount`` whose SFTP runs on a channel of ``conn`` (``sshfs -o passive``)."""

    def __init__(self, conn: Connection, remote_dir: str, local_dir: str) -> None:
        super().__init__(conn.cfg, remote_dir, local_dir)
        self.conn = conn
        self.pump: Optional[ChannelPump] = None

    def command(self) -> List[str]:
        exe = shutil.which("sshfs") or "sshfs"
        opts = ["passive", "ro", "kernel_cache", "entry_timeout=60", "attr_timeout=60", "dcache_timeout=60",
                "follow_symlinks", *self.extra_opts]
        # the host part is a label only in passive mode; the path is the remote directory
        return [exe, "-f", f"discrep-source:{self.remote_dir}", self.local_dir, "-o",
                ",".join(o.replace("\\", "\\\\").replace(",", "\\,") for o in opts)]

    def spawn(self, cmd: List[str], stderr) -> subprocess.Popen:
        import paramiko
        try:
            ch = self.conn.transport().open_session(window_size=self.conn.window,
                                                    max_packet_size=self.conn.max_packet)
            ch.invoke_subsystem("sftp")
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise TransportError(f"cannot open SFTP on {self.cfg.describe()}: {e}",
                                 hint="the server must allow the sftp subsystem") from None
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(cmd, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=stderr,
                                    close_fds=True, start_new_session=True)
        except OSError:
            ours.close()
            ch.close()
            raise
        finally:
            theirs.close()
        self.pump = ChannelPump(ours, ch)
        return proc

    def stop(self) -> None:
        """Unmount and reap sshfs (SshfsMount.stop), then end the channel and join the pump."""
        try:
            super().stop()
        finally:
            pump, self.pump = self.pump, None
            if pump is not None:
                pump.close()

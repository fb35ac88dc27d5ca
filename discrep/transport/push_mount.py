"""The replica host's mount of a pushing source's export: ``sshfs -o passive`` on a given socket.

``SocketSshfsMount(sock, local_dir).start()`` runs ``sshfs -f -o passive,ro`` with its stdin and
stdout on ``sock`` (the SFTP relay's connection, run.replica_agent), which carries SFTP to the
source's confined server (transport.sftp_serve) over the one SSH connection.  Symlinks are not
followed (the server never follows one either: a link is read as its text).  ``stop()`` unmounts
and reaps sshfs (SshfsMount.stop) and closes the socket.

Threading: one owner thread calls start/stop.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
from typing import List

from discrep.transport.ssh import HostConfig
from discrep.transport.sshfs import SshfsMount


class SocketSshfsMount(SshfsMount):
    """``SshfsMount`` whose SFTP comes in on a connected socket (``sshfs -o passive``)."""

    def __init__(self, sock: socket.socket, local_dir: str) -> None:
        super().__init__(HostConfig(alias="the pushing source", hostname="the pushing source"), "/", local_dir)
        self.sock = sock

    def command(self) -> List[str]:
        exe = shutil.which("sshfs") or "sshfs"
        opts = ["passive", "ro", "kernel_cache", "entry_timeout=60", "attr_timeout=60", "dcache_timeout=60"]
        return [exe, "-f", "discrep-source:/", self.local_dir, "-o", ",".join(opts)]

    def spawn(self, cmd: List[str], stderr) -> subprocess.Popen:
        try:
            return subprocess.Popen(cmd, stdin=self.sock.fileno(), stdout=self.sock.fileno(), stderr=stderr,
                                    close_fds=True, start_new_session=True)
        finally:
            self.sock.close()       # sshfs has its own copy: its exit ends the stream

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.sock.close()

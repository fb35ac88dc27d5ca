"""Typed options of the transport: how the replica reaches a remote source.

Thread-safety: immutable values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRANSPORTS = ("auto", "sshfs", "sftp")
DEFAULT_TIMEOUT = 60.0    # rsync's --timeout: seconds a connection may make no progress


@dataclass(frozen=True)
class SshOptions:
    """The SSH side of a remote cycle."""
    remote_discrep: str = "discrep"        # discrep executable on the source host (rsync's --rsync-path)
    ssh_config: Optional[str] = None       # OpenSSH client config (default ~/.ssh/config)
    transport: str = "auto"                # how the export is read: sshfs mount or paramiko SFTP
    timeout: float = DEFAULT_TIMEOUT       # seconds without progress on a connection that fail the cycle
    bwlimit: int = 0                       # bytes/s on the wire, both directions together (0: no limit)
    passive: bool = True                   # sshfs over a channel of the one connection when sshfs can


def is_remote(spec: str) -> bool:
    """rsync's rule: HOST:PATH or USER@HOST:PATH is remote unless a '/' comes before the ':'."""
    head = spec.split("/", 1)[0]
    return ":" in head and not head.startswith(".")

"""Typed options of one replication pair: what ``replicate`` and a job describe.

``CycleOptions`` composes the options of each side (``ReplicaOptions``, ``SshOptions``) with the
pair itself and the source's snapshot provider.  The CLI builds them from argparse results; a
jobs file will build them from its tables.  ``parse_duration`` reads "90s", "30m", "12h", "7d".

Thread-safety: immutable values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from discrep.core.errors import UsageError
from discrep.replica.options import ReplicaOptions
from discrep.source.options import HookOptions
from discrep.transport.options import SshOptions, is_remote

SNAPSHOT_KINDS = ("auto", "btrfs", "reflink", "copy")


@dataclass(frozen=True)
class CycleOptions:
    """One pair SRC -> DEST and how to run its cycles."""
    src: str
    dest: str
    snapshot: str = "auto"                 # source snapshot provider
    replica: ReplicaOptions = field(default_factory=ReplicaOptions)
    ssh: SshOptions = field(default_factory=SshOptions)
    every: Optional[float] = None          # continuous mode: seconds between cycles
    hooks: Optional[HookOptions] = None    # snapshot hooks of a local source (None: SRC/.discrep/hooks.toml)

    @property
    def remote_source(self) -> bool:
        return is_remote(self.src)


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise UsageError(f"bad duration {text!r}", hint="use a number with s, m, h, d or w, e.g. 7d") from None

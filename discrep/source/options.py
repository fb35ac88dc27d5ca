"""Typed options of the source side: the snapshot hooks that make a recovery point
application-consistent.

Built by the CLI (``replicate --pre-snapshot``), by the jobs file (``pre_snapshot`` ...), and by
``source.hooks.load_hook_file`` from ``SRC/.discrep/hooks.toml`` (the only hooks a remote agent
runs); library code takes these, never an argparse namespace.

Thread-safety: immutable values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

HOOK_FAILURES = ("fail", "crash-consistent")
DEFAULT_HOOK_TIMEOUT = 60.0
MAX_HOOK_TIMEOUT = 3600.0


@dataclass(frozen=True)
class HookOptions:
    """Commands run on the source host around the snapshot (``/bin/sh -c``, cwd: the source root)."""
    pre_snapshot: Optional[str] = None     # quiesce: flush and hold writes (fsfreeze -f, a DB's backup start)
    post_snapshot: Optional[str] = None    # release: runs once pre_snapshot ran, whatever happened after
    timeout_s: float = DEFAULT_HOOK_TIMEOUT  # each hook is killed (its process group) after this long
    on_failure: str = "fail"               # pre_snapshot failed: fail the cycle, or take a crash-consistent point

    @property
    def active(self) -> bool:
        return bool(self.pre_snapshot or self.post_snapshot)

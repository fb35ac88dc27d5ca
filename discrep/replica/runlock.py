"""The run lock of a replica directory: one whole replicate run into DEST at a time.

A module of its own so that a remote cycle takes the lock before it imports the replica's
apply path (``replica.sync``), which it imports while the source's agent starts and builds.
No threads; the lock is held by the calling thread's ``with`` block.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from discrep.core import locks
from discrep.core.statedir import StateDir


@contextmanager
def run_lock(dest: bytes) -> Iterator[None]:
    """One whole replicate run into DEST (the source builds, DEST applies, the source is told):
    a second run started meanwhile is refused at once (LockedError, exit 13) instead of racing the
    first for the source's cycle -- which made the run that committed fail its acknowledgement."""
    with StateDir(dest) as sd, locks.holding(
            sd.file("run.lock"), f"another 'discrep replicate' into {os.fsdecode(dest)} is running; this run "
                                 f"changed nothing",
            hint="wait for it to finish (it replicates the same changes); two runs never share a DEST"):
        yield

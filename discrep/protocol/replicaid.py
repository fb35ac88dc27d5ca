"""Replica ids: the token a replica names itself with when it asks a source for a cycle.

A replica makes its id once (``uuid4().hex``, kept in ``DEST/.discrep/replica.db``'s meta) and
sends it with every cycle (in-process through ``run.options``; over SSH in the agent's ``cycle``
and ``ack`` commands).  The source keys its acknowledged position by it and names a file after
it, so an id that crosses is checked here first: exactly 32 lowercase hex digits -- never a
path, never empty, bounded.

Thread-safety: pure functions.
"""
from __future__ import annotations

import re

from discrep.core.errors import ManifestError

ID_LEN = 32
_ID = re.compile(r"[0-9a-f]{32}")


def is_replica_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == ID_LEN and _ID.fullmatch(value) is not None


def check_replica_id(value: object, what: str = "the replica id") -> str:
    """``value`` if it is a replica id, else ManifestError (named ``what``)."""
    if not is_replica_id(value):
        raise ManifestError(f"{what} is not 32 lowercase hex digits ({value!r:.40})",
                            hint="a replica id is made by discrep itself (DEST/.discrep)")
    return str(value)

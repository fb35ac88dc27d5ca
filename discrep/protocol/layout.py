"""Names of the export's control tree and of a cycle's files on the source: the contract.

The export of cycle N shows the snapshot tree plus ``.discrep/`` (``CONTROL``):

====================  ==============================================================
``cycle``             the cycle header (JSON): ids, base, seq range, provider, times
``manifest``          the manifest (zstd JSON lines, protocol.manifest)
``sig/<idx>``         block signatures of file ``idx`` (blockdiff framing)
``cdc/<idx>``         content-defined chunk index of file ``idx``
``cbt/<idx>``         changed-block map of file ``idx`` against the base (protocol.cbt)
``data/<idx>``        the bytes of file ``idx``
``z/<idx>.<token>``   batched, compressed range reads of file ``idx`` (protocol.ranges)
``pack/<k>``          pack ``k``: small files' bytes, back to back
====================  ==============================================================

On the source, cycle N's directory (``SRC/.discrep/cycles/N``) holds ``manifest.zst``,
``pack-<k>``, ``cbt-<idx>.json``, ``seg-<s>.zst`` (a streamed cycle's manifest segments) and, for a live file that changed while it was read,
``redo-<idx>``.  A streamed cycle's files are read by the replica under ``CYCLE_DIR``.

Every name a side builds or parses comes from here.  Thread-safety: constants and pure functions.
"""
from __future__ import annotations

CONTROL = b".discrep"
CYCLE = b"cycle"
MANIFEST = b"manifest"
SIG, CDC, CBT, DATA, Z, PACK = b"sig", b"cdc", b"cbt", b"data", b"z", b"pack"
DYNAMIC_DIRS = (PACK, SIG, CDC, DATA, Z, CBT)          # per-file directories of the control tree
RANDOM_ACCESS_DIRS = (SIG, CDC, CBT)                   # read whole, at random: no read-ahead

# reader names (relative to the export's root)
CYCLE_REL = CONTROL + b"/" + CYCLE
MANIFEST_REL = CONTROL + b"/" + MANIFEST
DATA_PREFIX = CONTROL + b"/" + DATA + b"/"
RANDOM_ACCESS_PREFIXES = tuple(CONTROL + b"/" + d + b"/" for d in RANDOM_ACCESS_DIRS)
PACK_REL = CONTROL + b"/" + PACK + b"/%d"             # % k
CYCLE_DIR = CONTROL + b"/cycledir/"                    # a streamed cycle's own directory, as the replica names it

# files in the source's cycle directory (``<state dir>/CYCLES/<N>``)
CYCLES = b"cycles"
MANIFEST_FILE = b"manifest.zst"
PACK_FILE = b"pack-%d"                                 # % k
CBT_FILE = b"cbt-%d.json"                              # % idx
REDO_FILE = b"redo-%d"                                 # % idx
SEGMENT_FILE = b"seg-%d.zst"                           # % segment number (a streamed cycle)


def cycle_dir_rel(n: int) -> bytes:
    """Cycle ``n``'s directory relative to the source's state directory."""
    return b"%s/%d" % (CYCLES, int(n))


def per_file(kind: bytes, idx: int) -> bytes:
    """Reader name of ``.discrep/<kind>/<idx>`` (``kind`` one of SIG, CDC, CBT, DATA)."""
    return b"%s/%s/%d" % (CONTROL, kind, idx)


def range_request(idx: int, token: str) -> bytes:
    """Reader name of a batched range read of file ``idx`` (``token`` from protocol.ranges)."""
    return b"%s/%s/%d.%s" % (CONTROL, Z, idx, token.encode())

"""Packs of a cycle (many small files in one framed blob), read in order with read-ahead.

Packs are consumed in order: while one pack's files are written, the next ones are already
being read in the reader's pool (I/O and decompression release the GIL).  Read-ahead is on
only when every packed file is needed (a first copy); otherwise a pack is read when a file
in it is.  A streamed cycle learns of packs as the source writes them (``packs_known``), and
may hand some to the second applying process (``hand_over``: never read here).

Thread-safety: used by the applying thread; only the pack reads run in the reader's pool.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Callable, Dict, Set


from discrep.protocol import layout
from discrep.protocol.manifest import FRAME_SLACK, MAX_PACK_BYTES, unpack_frame
from discrep.replica.reader import Reader

PACK_AHEAD = 3               # packs read ahead on a first copy


class PackSource:
    """Decoded packs of one cycle (see module doc)."""

    def __init__(self, reader: Reader, n_packs: int, prefetch: bool):
        self.reader = reader
        self.n_packs = n_packs                        # packs of the manifest (a streamed cycle: so far)
        self.prefetch = prefetch
        self.pack_rel = layout.PACK_REL               # where pack k is read (a streamed cycle: elsewhere)
        self.packs_known: Callable[[], int] = lambda: 0   # a streamed cycle: packs written so far
        self._have: Dict[int, bytes] = {}             # the pack being consumed
        self._ahead: Dict[int, "Future[bytes]"] = {}  # pack k -> its read in flight
        self._cur = -1
        self._foreign: Set[int] = set()               # packs the second process reads

    def get(self, k: int) -> bytes:
        """Pack ``k``, decoded; starts reading the next ones."""
        data = self._have.get(k)
        if data is None:
            fut = self._ahead.pop(k, None)
            self._have.clear()
            data = fut.result() if fut is not None else self._read(k)
            self._have[k] = data
            self._cur = k
            self.read_ahead(k + 1)
        return data

    def read_ahead(self, k: int) -> None:
        """Start reading packs ``k`` .. ``k + PACK_AHEAD - 1`` that exist yet (prefetching on):
        several reads in flight keep the mount busy while files are written."""
        if not self.prefetch:
            return
        for j in range(k, min(k + PACK_AHEAD, max(self.n_packs, self.packs_known()))):
            if j not in self._ahead and j not in self._have and j not in self._foreign:
                self._ahead[j] = self.reader.pool.submit(self._read, j)

    def read_ahead_next(self) -> None:
        """Read ahead after the pack being consumed (more may have been written meanwhile)."""
        self.read_ahead(self._cur + 1)

    def hand_over(self, lo: int, hi: int) -> None:
        """Packs ``lo`` .. ``hi - 1`` are read by the second applying process, not here."""
        for k in range(lo, hi):
            self._foreign.add(k)
            self._ahead.pop(k, None)

    def _read(self, k: int) -> bytes:
        return unpack_frame(self.reader.read_all(self.pack_rel % k, MAX_PACK_BYTES + FRAME_SLACK), MAX_PACK_BYTES,
                            f"pack {k}")

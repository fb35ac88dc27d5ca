"""What a watcher backend reports into: journal rows (a ``Batch``), gaps, the cycle barrier.

Role: the one interface between the event sources (backends.py) and the ``Watcher``
(watcher.py).  A backend calls ``touch`` / ``rename`` (rows), ``mark`` (events are queued:
start the batch clock), ``gap`` (changes may have been missed) and ``barrier`` (a cycle
touched ``ROOT/.discrep``).  The watcher owns the ``Sink``, hands it to its backend, and
drains it into the journal: ``write_rows`` then ``write_gap`` (rows seen before a gap are
written before it), and clears ``barrier_pending`` once the barrier is acknowledged.

``Batch`` holds the rows of one journal transaction, deduplicated; see its docstring.

Thread-safety: a ``Sink`` and its ``Batch`` are used by the watcher's one thread.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Iterator, List, Optional, Tuple

from discrep.core.paths import STATE_DIR
from discrep.journal.store import Journal

log = logging.getLogger(__name__)

Row = Tuple[str, bytes, Optional[bytes], None]


def is_state(rel: bytes) -> bool:
    """True for ``.discrep`` and what is below it (never journaled)."""
    return rel == STATE_DIR or rel.startswith(STATE_DIR + b"/")


class Batch:
    """Rows of one journal transaction, deduplicated.

    Renames are kept in order and start a new *segment*; inside a segment each
    path has at most three ops (``delete`` resets, a repeated op or a
    modify/meta after a create/modify is dropped)."""

    def __init__(self) -> None:
        self.items: List[list] = []       # ["rename", new, old] or [ops list, path]
        self.idx: Dict[bytes, list] = {}
        self.first = 0.0
        self.nrows = 0

    def __len__(self) -> int:
        return self.nrows

    def mark(self) -> None:
        """Start the batch clock (``first``) unless the batch already holds rows."""
        if not self.items:
            self.first = time.monotonic()

    def touch(self, op: str, path: bytes) -> None:
        if not path or is_state(path):
            return
        it = self.idx.get(path)
        if it is None:
            self.mark()
            it = [[op], path]
            self.items.append(it)
            self.idx[path] = it
            self.nrows += 1
            return
        ops = it[0]
        last = ops[-1]
        if op == "delete":
            if ops != ["delete"]:
                self.nrows -= len(ops) - 1
                it[0] = ["delete"]
        elif op == "create":
            if last != "create":
                ops.append(op)
                self.nrows += 1
        elif last == "delete":
            ops.append(op)
            self.nrows += 1

    def rename(self, old: bytes, new: bytes) -> None:
        self.mark()
        self.items.append(["rename", new, old])
        self.idx = {}
        self.nrows += 1

    def rows(self) -> Iterator[Row]:
        for it in self.items:
            if it[0] == "rename":
                yield ("rename", it[1], it[2], None)
            else:
                for op in it[0]:
                    yield (op, it[1], None, None)


class Sink:
    """The current ``Batch``, the gaps of this run and the barrier flag (see the module doc)."""

    def __init__(self) -> None:
        self.batch = Batch()
        self.gaps: List[str] = []                 # every gap reason of this run
        self.pending_gap: Optional[str] = None    # the first one not written yet
        self.barrier_pending = False

    # -- what a backend calls ------------------------------------------
    def touch(self, op: str, path: bytes) -> None:
        self.batch.touch(op, path)

    def rename(self, old: bytes, new: bytes) -> None:
        self.batch.rename(old, new)

    def mark(self) -> None:
        """Events are queued but not in the batch yet: start its clock."""
        self.batch.mark()

    def gap(self, reason: str) -> None:
        """Open a journal gap after the rows gathered so far are written."""
        if self.pending_gap is None:
            self.pending_gap = reason
        self.gaps.append(reason)
        log.warning("journal gap: %s", reason)

    def barrier(self) -> None:
        """A cycle touched ROOT/.discrep (see source.wait_for_watcher): everything seen before that
        event must be committed before the cycle reads its journal cut."""
        self.barrier_pending = True

    # -- what the watcher calls ----------------------------------------
    def write_rows(self, journal: Journal) -> int:
        """Append the batch's rows in one transaction and start a new batch; returns the count."""
        if not self.batch.items:
            return 0
        rows = list(self.batch.rows())
        journal.append_many(rows)
        self.batch = Batch()
        return len(rows)

    def write_gap(self, journal: Journal) -> None:
        """Mark the pending gap in the journal (after ``write_rows``)."""
        if self.pending_gap is not None:
            journal.mark_gap(self.pending_gap)
            self.pending_gap = None

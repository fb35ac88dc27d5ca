"""The source's change journal: which paths changed, at the logical file level.

Stored in ``ROOT/.discrep/journal.db`` (SQLite, WAL mode, ``synchronous=FULL``:
an entry is durable once the transaction that appended it has committed; the
watcher commits in small batches, a catch-up scan in one transaction per
scan).  Writers: the catch-up scan (``discrep replicate`` / ``snapshot``) and the
live watcher (``discrep watch``), possibly in different processes; SQLite's
locking serialises them (``busy_timeout`` 30 s).

Operations (``op`` column):

* ``create``, ``modify``, ``meta``, ``delete`` -- ``path`` changed (current namespace)
* ``rename`` -- sequential rename ``old_path`` -> ``path`` (the watcher's view)
* ``scan`` -- a catch-up scan began; everything before it in the same interval is
  superseded by the scan's own entries, which follow as
* ``move`` (set semantics: base-cycle path ``old_path`` is now at ``path``) and
  ``touch`` (``path`` differs from the base cycle: look at it).

The *cut* of a cycle is the highest seq read before its snapshot is taken;
entries with a higher seq belong to the next cycle.  ``trim(seq)`` drops what an
acknowledged cycle covered.  A *gap* (watcher not running, queue overflow,
unclean stop) is recorded with ``mark_gap``; the journal is trusted again only
after a scan that began after the gap (``gap_generation`` compare-and-clear).

Thread-safety: one ``Journal`` object per thread (sqlite3 connections are not
shared); several processes may open the same file.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Tuple, Union

from discrep.core.errors import JournalError
from discrep.core.statedir import StateDir
from discrep.core.store import META_SCHEMA, get_meta, open_store, set_meta, state_of, transaction

log = logging.getLogger(__name__)

OPS = ("create", "modify", "meta", "delete", "rename", "scan", "move", "touch")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    path BLOB NOT NULL,
    old_path BLOB,
    ino INTEGER,
    ts_ns INTEGER NOT NULL
);
""" + META_SCHEMA


@dataclass(frozen=True)
class Entry:
    seq: int
    op: str
    path: bytes
    old_path: Optional[bytes]
    ino: Optional[int]
    ts_ns: int


class Journal:
    """Append / read / trim journal entries and the gap marker."""

    def __init__(self, state: "Union[StateDir, str]"):
        self.state = state_of(state, JournalError)
        self._owns_state = self.state is not state
        try:
            self.path, self.con = open_store(
                self.state, "journal.db", _SCHEMA, JournalError, "journal",
                hint="move it aside; the next run rebuilds it with a catch-up scan")
        except BaseException:
            if self._owns_state:
                self.state.close()
            raise

    def close(self) -> None:
        self.con.close()
        if self._owns_state:
            self.state.close()

    # -- writing -------------------------------------------------------
    def append(self, op: str, path: bytes, old_path: Optional[bytes] = None,
               ino: Optional[int] = None) -> int:
        return self.append_many([(op, path, old_path, ino)])

    def append_many(self, items: Iterable[Tuple[str, bytes, Optional[bytes], Optional[int]]]) -> int:
        """Append entries in one transaction; returns the last seq written (0 if none)."""
        now = time.time_ns()
        last = 0
        with transaction(self.con) as con:
            cur = con.cursor()
            for op, path, old_path, ino in items:
                if op not in OPS:
                    raise ValueError(f"unknown journal op {op!r}")
                cur.execute("INSERT INTO entries(op, path, old_path, ino, ts_ns) VALUES (?,?,?,?,?)",
                            (op, bytes(path), None if old_path is None else bytes(old_path), ino, now))
                last = cur.lastrowid or last
        return last

    # -- reading -------------------------------------------------------
    def last_seq(self) -> int:
        row = self.con.execute("SELECT MAX(seq) FROM entries").fetchone()
        seq = row[0] or 0
        return max(seq, int(self.get("trimmed_seq", "0")))

    def entries(self, after: int, upto: Optional[int] = None) -> Iterator[Entry]:
        q = "SELECT seq, op, path, old_path, ino, ts_ns FROM entries WHERE seq > ?"
        args: List[object] = [after]
        if upto is not None:
            q += " AND seq <= ?"
            args.append(upto)
        for row in self.con.execute(q + " ORDER BY seq", args):
            yield Entry(row[0], row[1], bytes(row[2]), None if row[3] is None else bytes(row[3]),
                        row[4], row[5])

    def count(self, after: int, upto: Optional[int] = None) -> int:
        if upto is None:
            return self.con.execute("SELECT COUNT(*) FROM entries WHERE seq > ?", (after,)).fetchone()[0]
        return self.con.execute("SELECT COUNT(*) FROM entries WHERE seq > ? AND seq <= ?",
                                (after, upto)).fetchone()[0]

    def trim(self, upto: int) -> None:
        """Drop entries an acknowledged cycle covered."""
        with transaction(self.con) as con:
            con.execute("DELETE FROM entries WHERE seq <= ?", (upto,))
            self.set("trimmed_seq", str(max(upto, int(self.get("trimmed_seq", "0")))))

    # -- meta / gap ----------------------------------------------------
    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return get_meta(self.con, key, default)

    def set(self, key: str, value: str) -> None:
        set_meta(self.con, key, value)

    def mark_gap(self, reason: str) -> int:
        """Record that changes may have been missed; returns the new gap generation."""
        with transaction(self.con):
            gen = int(self.get("gap_generation", "0")) + 1
            self.set("gap_generation", str(gen))
            self.set("gap_reason", reason)
            self.set("gap_open", "1")
        log.info("journal gap marked (%s)", reason)
        return gen

    def gap(self) -> Optional[str]:
        """The reason the journal cannot be trusted, or None when it is whole."""
        if self.get("gap_open", "1") == "1":  # a new journal has never been closed by a scan
            return self.get("gap_reason", "no catch-up scan has run yet")
        return None

    def gap_generation(self) -> int:
        return int(self.get("gap_generation", "0"))

    def close_gap(self, generation: int) -> bool:
        """A scan that began at ``generation`` finished: clear the gap unless a newer one opened."""
        with transaction(self.con):
            if int(self.get("gap_generation", "0")) != generation:
                return False
            self.set("gap_open", "0")
            self.set("gap_reason", "")
            return True

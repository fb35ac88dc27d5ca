"""The replica's catalog: what it wrote, so it never rereads its own files to compare.

``DEST/.discrep/replica.db`` (SQLite WAL, FULL sync).  ``files`` maps each
replicated path to its kind, size, mtime_ns, the inode the replica gave it and,
for regular files, the ``blockdiff.Signature`` bytes of its content.  A row is
trusted only while the file still has that inode, size and mtime (a file
edited on the replica is compared from scratch).  ``cycles`` lists committed
cycles (recovery points) and the one being applied.

Thread-safety: one object per thread.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from discrep.core.errors import DestinationError
from discrep.core.store import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, kind TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, ino INTEGER, sig BLOB
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cycles (
    cycle INTEGER PRIMARY KEY, base INTEGER, state TEXT NOT NULL, source_time_ns INTEGER,
    committed_ns INTEGER, stats TEXT
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
"""


@dataclass(frozen=True)
class FileRow:
    kind: str
    size: int
    mtime_ns: int
    ino: int
    sig: Optional[bytes]


def _hi(prefix: bytes) -> bytes:
    return prefix + b"0"


class ReplicaCatalog:
    def __init__(self, state_dir: str):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "replica.db")
        try:
            self.con = connect(self.path)
            self.con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DestinationError(f"replica catalog {self.path} is unreadable: {e}") from e

    def close(self) -> None:
        self.con.close()

    def get(self, path: bytes) -> Optional[FileRow]:
        r = self.con.execute("SELECT kind, size, mtime_ns, ino, sig FROM files WHERE path = ?",
                             (path,)).fetchone()
        return None if r is None else FileRow(r[0], r[1], r[2], r[3], None if r[4] is None else bytes(r[4]))

    def last_committed(self) -> int:
        r = self.con.execute("SELECT MAX(cycle) FROM cycles WHERE state = 'committed'").fetchone()
        return r[0] or 0

    def applying(self) -> Optional[int]:
        r = self.con.execute("SELECT cycle FROM cycles WHERE state = 'applying'").fetchone()
        return None if r is None else r[0]

    def history(self) -> List[Tuple[int, int, int, dict]]:
        return [(r[0], r[1] or 0, r[2] or 0, json.loads(r[3] or "{}")) for r in self.con.execute(
            "SELECT cycle, source_time_ns, committed_ns, stats FROM cycles WHERE state = 'committed' "
            "ORDER BY cycle")]

    def begin(self, cycle: int, base: int, source_time_ns: int) -> None:
        self.con.execute("INSERT OR REPLACE INTO cycles(cycle, base, state, source_time_ns) VALUES (?,?,?,?)",
                         (cycle, base, "applying", source_time_ns))

    def commit(self, cycle: int, *, full: bool, moves: Iterable[Tuple[bytes, bytes]],
               deletes: Iterable[bytes], rows: Iterable[Tuple[bytes, str, int, int, int, Optional[bytes]]],
               stats: dict) -> None:
        """Apply the cycle's catalog changes and mark it committed, in one transaction (the one
        ``stage`` opened, if rows were staged)."""
        con = self.con
        staged = con.in_transaction
        if staged and not full:
            raise ValueError("rows are staged only for a full cycle")
        if not staged:
            con.execute("BEGIN IMMEDIATE")
        try:
            if full:
                if not staged:
                    con.execute("DELETE FROM files")
            else:
                moves = list(moves)
                lifted = [con.execute("SELECT * FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                                      (o, o + b"/", _hi(o))).fetchall() for o, _n in moves]
                for o, _n in moves:
                    con.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)", (o, o + b"/", _hi(o)))
                for (o, n), items in zip(moves, lifted):
                    con.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)", (n, n + b"/", _hi(n)))
                    con.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                                    ((n + bytes(r[0])[len(o):],) + tuple(r[1:]) for r in items))
                for p in deletes:
                    con.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)", (p, p + b"/", _hi(p)))
            con.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)", rows)
            con.execute("UPDATE cycles SET state = 'committed', committed_ns = ?, stats = ? WHERE cycle = ?",
                        (time.time_ns(), json.dumps(stats), cycle))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def stage(self, rows: Iterable[Tuple[bytes, str, int, int, int, Optional[bytes]]]) -> None:
        """Rows of a full cycle being applied, written ahead of ``commit`` inside the transaction
        that ``commit`` ends (nothing is visible or kept unless it commits; ``unstage`` drops them).
        A long first copy stages as it goes, so its commit does not insert every row at the end."""
        con = self.con
        if not con.in_transaction:
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM files")
        con.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)", rows)

    def unstage(self) -> None:
        """Drop staged rows (the cycle failed)."""
        if self.con.in_transaction:
            self.con.execute("ROLLBACK")

    def abandon(self, cycle: int) -> None:
        self.con.execute("DELETE FROM cycles WHERE cycle = ? AND state = 'applying'", (cycle,))

    def get_meta(self, k: str, default: Optional[str] = None) -> Optional[str]:
        r = self.con.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return default if r is None else r[0]

    def set_meta(self, k: str, v: str) -> None:
        self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))

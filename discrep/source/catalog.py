"""The source's catalog of what was last replicated, and its cycle table.

``ROOT/.discrep/catalog.db`` (SQLite WAL).  ``files`` holds, for every entry of
the last acknowledged cycle, the *live* stat taken before that cycle's snapshot
(inode, size, mtime_ns, ctime_ns, mode): the catch-up scan compares the tree
against it.  ``cycles`` records each cycle the source built (base cycle, journal
cut, snapshot provider and location, state ``built`` -> ``acked`` ->
``released``).  ``pending`` holds the catalog updates a built cycle will apply
when the replica acknowledges it.

Thread-safety: one object per thread; several processes may open the file.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from discrep.core.errors import SourceError
from discrep.core.store import connect

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
    mode INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cycles (
    cycle INTEGER PRIMARY KEY, base INTEGER NOT NULL, cut_seq INTEGER NOT NULL,
    state TEXT NOT NULL, provider TEXT, snapshot BLOB, created_ns INTEGER, info TEXT
);
CREATE TABLE IF NOT EXISTS pending (
    cycle INTEGER NOT NULL, kind TEXT NOT NULL, path BLOB NOT NULL, old_path BLOB,
    ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, mode INTEGER
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);
"""


@dataclass(frozen=True)
class Row:
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Row":
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


@dataclass
class CycleRec:
    cycle: int
    base: int
    cut_seq: int
    state: str
    provider: str
    snapshot: bytes
    created_ns: int
    info: dict


def _range_hi(prefix: bytes) -> bytes:
    return prefix + b"0"  # '0' follows '/' in byte order: [prefix/, prefix0) is the subtree


class SourceCatalog:
    def __init__(self, state_dir: str):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, "catalog.db")
        try:
            self.con = connect(self.path)
            self.con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise SourceError(f"source catalog {self.path} is unreadable: {e}",
                              hint="move it aside; the next cycle becomes a full comparison") from e

    def close(self) -> None:
        self.con.close()

    def source_id(self) -> str:
        """A random id made once per source tree: the replica checks it is fed by the same source."""
        r = self.con.execute("SELECT v FROM meta WHERE k = 'source_id'").fetchone()
        if r is not None:
            return r[0]
        import uuid
        sid = uuid.uuid4().hex
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('source_id', ?)", (sid,))
        return self.con.execute("SELECT v FROM meta WHERE k = 'source_id'").fetchone()[0]

    # -- files ---------------------------------------------------------
    def load_all(self) -> Dict[bytes, Row]:
        return {bytes(r[0]): Row(r[1], r[2], r[3], r[4], r[5])
                for r in self.con.execute("SELECT path, ino, size, mtime_ns, ctime_ns, mode FROM files")}

    def get(self, path: bytes) -> Optional[Row]:
        r = self.con.execute("SELECT ino, size, mtime_ns, ctime_ns, mode FROM files WHERE path = ?",
                             (path,)).fetchone()
        return None if r is None else Row(*r)

    def exists(self, path: bytes) -> bool:
        return path == b"" or self.con.execute("SELECT 1 FROM files WHERE path = ?", (path,)).fetchone() is not None

    def count(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    # -- cycles --------------------------------------------------------
    def last_cycle(self) -> Optional[CycleRec]:
        r = self.con.execute("SELECT * FROM cycles ORDER BY cycle DESC LIMIT 1").fetchone()
        return None if r is None else self._rec(r)

    def last_acked(self) -> Optional[CycleRec]:
        r = self.con.execute("SELECT * FROM cycles WHERE state IN ('acked','released') "
                             "ORDER BY cycle DESC LIMIT 1").fetchone()
        return None if r is None else self._rec(r)

    def cycle(self, n: int) -> Optional[CycleRec]:
        r = self.con.execute("SELECT * FROM cycles WHERE cycle = ?", (n,)).fetchone()
        return None if r is None else self._rec(r)

    def cycles(self, states: Iterable[str]) -> List[CycleRec]:
        st = list(states)
        q = "SELECT * FROM cycles WHERE state IN (%s) ORDER BY cycle" % ",".join("?" * len(st))
        return [self._rec(r) for r in self.con.execute(q, st)]

    @staticmethod
    def _rec(r) -> CycleRec:
        return CycleRec(r[0], r[1], r[2], r[3], r[4] or "", bytes(r[5] or b""), r[6] or 0,
                        json.loads(r[7] or "{}"))

    def add_cycle(self, rec: CycleRec, pending: Iterable[Tuple]) -> None:
        """Record a built cycle and the catalog updates its ack will apply, in one transaction."""
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            # a cycle built earlier but never acknowledged is superseded by this one
            for (old,) in con.execute("SELECT cycle FROM cycles WHERE state = 'built'").fetchall():
                con.execute("UPDATE cycles SET state = 'abandoned' WHERE cycle = ?", (old,))
                con.execute("DELETE FROM pending WHERE cycle = ?", (old,))
            con.execute("INSERT INTO cycles VALUES (?,?,?,?,?,?,?,?)",
                        (rec.cycle, rec.base, rec.cut_seq, rec.state, rec.provider, rec.snapshot,
                         rec.created_ns or time.time_ns(), json.dumps(rec.info)))
            con.executemany("INSERT INTO pending VALUES (?,?,?,?,?,?,?,?,?)",
                            ((rec.cycle,) + tuple(p) for p in pending))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def set_state(self, n: int, state: str) -> None:
        self.con.execute("UPDATE cycles SET state = ? WHERE cycle = ?", (state, n))

    def ack(self, n: int) -> None:
        """Apply cycle n's pending catalog updates and mark it acknowledged (one transaction)."""
        con = self.con
        con.execute("BEGIN IMMEDIATE")
        try:
            if con.execute("SELECT 1 FROM pending WHERE cycle = ? AND kind != 'upsert' LIMIT 1",
                           (n,)).fetchone() is None:    # only upserts (a first copy): one statement
                con.execute("INSERT OR REPLACE INTO files SELECT path, ino, size, mtime_ns, ctime_ns, mode "
                            "FROM pending WHERE cycle = ? ORDER BY rowid", (n,))
                rows = []
            else:
                rows = con.execute("SELECT kind, path, old_path, ino, size, mtime_ns, ctime_ns, mode "
                                   "FROM pending WHERE cycle = ? ORDER BY rowid", (n,)).fetchall()
            moves = [(bytes(r[2]), bytes(r[1])) for r in rows if r[0] == "move"]
            # moves are set-valued: lift every source subtree out first, then drop them in place
            lifted = []
            for i, (old, new) in enumerate(moves):
                lifted.append(con.execute(
                    "SELECT path, ino, size, mtime_ns, ctime_ns, mode FROM files WHERE path = ? "
                    "OR (path >= ? AND path < ?)", (old, old + b"/", _range_hi(old))).fetchall())
            for old, _new in moves:
                con.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                            (old, old + b"/", _range_hi(old)))
            for (old, new), items in zip(moves, lifted):
                con.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                            (new, new + b"/", _range_hi(new)))
                con.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                                ((new + bytes(p)[len(old):],) + tuple(rest) for p, *rest in items))
            for kind, path, _old, ino, size, mtime, ctime, mode in rows:
                path = bytes(path)
                if kind == "gone":
                    con.execute("DELETE FROM files WHERE path = ? OR (path >= ? AND path < ?)",
                                (path, path + b"/", _range_hi(path)))
                elif kind == "upsert":
                    con.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                                (path, ino, size, mtime, ctime, mode))
            con.execute("DELETE FROM pending WHERE cycle = ?", (n,))
            con.execute("UPDATE cycles SET state = 'acked' WHERE cycle = ?", (n,))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

"""The replica's catalog: what it wrote, so it never rereads its own files to compare.

``DEST/.discrep/replica.db`` (a ``core.store`` SQLite store: WAL, FULL sync).  ``files``
holds a ``CatalogRow`` for each replicated path: its kind, size, mtime_ns, the inode the
replica gave it and, for regular files, the ``blockdiff.Signature`` bytes of its content.
A row is trusted only while the file still has that inode, size and mtime (a file edited on
the replica is compared from scratch).  ``cycles`` lists committed cycles (recovery points,
``HistoryRow``) and the one being applied.

Thread-safety: one object per thread.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

from discrep.core.errors import DestinationError
from discrep.core.statedir import StateDir
from discrep.core.store import get_meta, open_store, prefix_end, set_meta, state_of, transaction

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
_SUBTREE = "path = ? OR (path >= ? AND path < ?)"
_INSERT = "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)"


class CatalogRow(NamedTuple):
    """One replicated object as the replica wrote it (a row of ``files``)."""
    path: bytes
    kind: str                 # "file", "dir" or "symlink"
    size: int
    mtime_ns: int
    ino: int                  # 0 for a symlink
    sig: Optional[bytes]      # a regular file's blockdiff.Signature bytes

    @classmethod
    def file(cls, path: bytes, size: int, mtime_ns: int, ino: int, sig: Optional[bytes]) -> "CatalogRow":
        return cls(path, "file", size, mtime_ns, ino, sig)

    @classmethod
    def dir(cls, path: bytes, mtime_ns: int, ino: int) -> "CatalogRow":
        return cls(path, "dir", 0, mtime_ns, ino, None)

    @classmethod
    def symlink(cls, path: bytes, mtime_ns: int) -> "CatalogRow":
        return cls(path, "symlink", 0, mtime_ns, 0, None)


class HistoryRow(NamedTuple):
    """A committed cycle (a recovery point)."""
    cycle: int
    source_time_ns: int
    committed_ns: int
    stats: Dict[str, Any]


class _Unstage(Exception):
    """Ends the staged transaction with a rollback."""


def _subtree(path: bytes) -> Tuple[bytes, bytes, bytes]:
    return path, path + b"/", prefix_end(path)


REPAIR_HINT = "run 'discrep repair-state DEST': it rebuilds the catalog from DEST and keeps its recovery points"


class ReplicaCatalog:
    """``replica.db`` in DEST's checked state dir; ``state`` is that StateDir (or its path
    ``DEST/.discrep``: then the catalog opens and owns it).  History and stage are reached
    through ``self.state``."""

    def __init__(self, state: Union[StateDir, str]):
        self.state = state_of(state, DestinationError)
        self._owns_state = self.state is not state
        try:
            self.path, self.con = open_store(self.state, "replica.db", _SCHEMA, DestinationError,
                                             "replica catalog", hint=REPAIR_HINT)
        except BaseException:
            if self._owns_state:
                self.state.close()
            raise
        self._staged: Optional[ExitStack] = None    # the open transaction of staged rows

    def close(self) -> None:
        self.con.close()
        if self._owns_state:
            self.state.close()

    def get(self, path: bytes) -> Optional[CatalogRow]:
        r = self.con.execute("SELECT path, kind, size, mtime_ns, ino, sig FROM files WHERE path = ?",
                             (path,)).fetchone()
        return None if r is None else CatalogRow(bytes(r[0]), r[1], r[2], r[3], r[4],
                                                 None if r[5] is None else bytes(r[5]))

    def is_empty(self) -> bool:
        """No object recorded (nothing replicated yet, or only an empty tree)."""
        return self.con.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None

    def last_committed(self) -> int:
        r = self.con.execute("SELECT MAX(cycle) FROM cycles WHERE state = 'committed'").fetchone()
        return r[0] or 0

    def applying(self) -> Optional[int]:
        r = self.con.execute("SELECT cycle FROM cycles WHERE state = 'applying'").fetchone()
        return None if r is None else r[0]

    def history(self) -> List[HistoryRow]:
        return [HistoryRow(r[0], r[1] or 0, r[2] or 0, json.loads(r[3] or "{}")) for r in self.con.execute(
            "SELECT cycle, source_time_ns, committed_ns, stats FROM cycles WHERE state = 'committed' "
            "ORDER BY cycle")]

    def begin(self, cycle: int, base: int, source_time_ns: int) -> None:
        if cycle <= self.last_committed():
            raise ValueError(f"cycle {cycle} is not after the last committed cycle")
        self.con.execute("INSERT INTO cycles(cycle, base, state, source_time_ns) VALUES (?,?,?,?)",
                         (cycle, base, "applying", source_time_ns))

    def commit(self, cycle: int, *, full: bool, moves: Iterable[Tuple[bytes, bytes]],
               deletes: Iterable[bytes], rows: Iterable[CatalogRow], stats: dict) -> None:
        """Apply the cycle's catalog changes and mark it committed, in one transaction (the one
        ``stage`` opened, if rows were staged)."""
        staged = self._staged is not None
        if staged and not full:
            raise ValueError("rows are staged only for a full cycle")
        with self._transaction():
            if full:
                if not staged:
                    self.con.execute("DELETE FROM files")
            else:
                self._move_and_delete(list(moves), deletes)
            self.con.executemany(_INSERT, rows)
            self.con.execute("UPDATE cycles SET state = 'committed', committed_ns = ?, stats = ? "
                             "WHERE cycle = ?", (time.time_ns(), json.dumps(stats), cycle))

    def _move_and_delete(self, moves: List[Tuple[bytes, bytes]], deletes: Iterable[bytes]) -> None:
        """Rows of moved subtrees follow them (all lifted first: chains and swaps work); deleted
        subtrees go."""
        con = self.con
        lifted = [con.execute(f"SELECT * FROM files WHERE {_SUBTREE}", _subtree(o)).fetchall()
                  for o, _n in moves]
        for o, _n in moves:
            con.execute(f"DELETE FROM files WHERE {_SUBTREE}", _subtree(o))
        for (o, n), items in zip(moves, lifted):
            con.execute(f"DELETE FROM files WHERE {_SUBTREE}", _subtree(n))
            con.executemany(_INSERT, ((n + bytes(r[0])[len(o):],) + tuple(r[1:]) for r in items))
        for p in deletes:
            con.execute(f"DELETE FROM files WHERE {_SUBTREE}", _subtree(p))

    def _transaction(self) -> ExitStack:
        """The cycle's transaction: the one ``stage`` opened, else a new one; leaving the
        with-block commits it (rolls it back on an exception)."""
        stack, self._staged = self._staged, None
        if stack is None:
            stack = ExitStack()
            stack.enter_context(transaction(self.con))
        return stack

    def stage(self, rows: Iterable[CatalogRow]) -> None:
        """Rows of a full cycle being applied, written ahead of ``commit`` inside the transaction
        that ``commit`` ends (nothing is visible or kept unless it commits; ``unstage`` drops them).
        A long first copy stages as it goes, so its commit does not insert every row at the end."""
        if self._staged is None:
            self._staged = self._transaction()
            self.con.execute("DELETE FROM files")
        self.con.executemany(_INSERT, rows)

    def unstage(self) -> None:
        """Drop staged rows (the cycle failed)."""
        stack, self._staged = self._staged, None
        if stack is not None:
            try:
                with stack:
                    raise _Unstage()
            except _Unstage:
                pass

    def rebuild(self, cycles: Iterable[Tuple[int, int]], rows: Iterable[CatalogRow]) -> None:
        """Fill an empty catalog (``repair-state``): committed ``(cycle, committed_ns)`` and rows."""
        with transaction(self.con):
            if self.con.execute("SELECT 1 FROM cycles LIMIT 1").fetchone() is not None or not self.is_empty():
                raise ValueError("the catalog to rebuild is not empty")
            self.con.executemany("INSERT INTO cycles(cycle, base, state, source_time_ns, committed_ns, stats) "
                                 "VALUES (?, NULL, 'committed', 0, ?, '{\"repaired\": true}')", cycles)
            self.con.executemany(_INSERT, rows)

    def abandon(self, cycle: int) -> None:
        self.con.execute("DELETE FROM cycles WHERE cycle = ? AND state = 'applying'", (cycle,))

    def get_meta(self, k: str, default: Optional[str] = None) -> Optional[str]:
        return get_meta(self.con, k, default)

    def set_meta(self, k: str, v: str) -> None:
        set_meta(self.con, k, v)

    def replica_id(self) -> str:
        """This replica's id (protocol.replicaid), made once: the source keeps a position per id."""
        rid = get_meta(self.con, "replica_id")
        if rid is not None:
            return rid
        import uuid
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('replica_id', ?)", (uuid.uuid4().hex,))
        return str(get_meta(self.con, "replica_id"))

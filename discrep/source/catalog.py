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
import stat
import time
import uuid
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

from discrep.core.errors import SourceError
from discrep.core.statedir import StateDir
from discrep.core.store import META_SCHEMA, get_meta, open_store, prefix_end, state_of, transaction

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
""" + META_SCHEMA

_SUBTREE = "path = ? OR (path >= ? AND path < ?)"     # a path and everything below it


def _subtree(path: bytes) -> Tuple[bytes, bytes, bytes]:
    """The parameters of ``_SUBTREE`` for ``path``."""
    return path, path + b"/", prefix_end(path)


def _below(path: bytes) -> Tuple[bytes, bytes]:
    """Bounds of the paths strictly below ``path``."""
    return path + b"/", prefix_end(path)


@dataclass(frozen=True)
class Row:
    """A ``files`` row: the live stat of a replicated entry, as the last acknowledged cycle saw it."""
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Row":
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


class PendingRow(NamedTuple):
    """A ``pending`` row (without its cycle): one catalog update a built cycle applies when acked.

    ``upsert`` (path, live stat), ``gone`` (path and its subtree leave ``files``) or ``move``
    (``old_path``'s subtree becomes ``path``'s)."""
    kind: str
    path: bytes
    old_path: Optional[bytes] = None
    ino: Optional[int] = None
    size: Optional[int] = None
    mtime_ns: Optional[int] = None
    ctime_ns: Optional[int] = None
    mode: Optional[int] = None

    @classmethod
    def upsert(cls, path: bytes, st: os.stat_result) -> "PendingRow":
        return cls("upsert", path, None, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)

    @classmethod
    def gone(cls, path: bytes) -> "PendingRow":
        return cls("gone", path)

    @classmethod
    def move(cls, new: bytes, old: bytes) -> "PendingRow":
        return cls("move", new, old)


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


class SourceCatalog:
    def __init__(self, state: "Union[StateDir, str]"):
        self.state = state_of(state, SourceError)
        self._owns_state = self.state is not state
        try:
            self.path, self.con = open_store(self.state, "catalog.db", _SCHEMA, SourceError, "source catalog",
                                             hint="move it aside; the next cycle becomes a full comparison")
        except BaseException:
            if self._owns_state:
                self.state.close()
            raise

    def close(self) -> None:
        self.con.close()
        if self._owns_state:
            self.state.close()

    def source_id(self) -> str:
        """A random id made once per source tree: the replica checks it is fed by the same source."""
        sid = get_meta(self.con, "source_id")
        if sid is not None:
            return sid
        # another process may make one at the same time: the first one written wins
        self.con.execute("INSERT OR IGNORE INTO meta VALUES ('source_id', ?)", (uuid.uuid4().hex,))
        return str(get_meta(self.con, "source_id"))

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

    def paths_below(self, path: bytes) -> List[bytes]:
        """The replicated paths strictly below ``path``."""
        return [bytes(p) for (p,) in self.con.execute("SELECT path FROM files WHERE path >= ? AND path < ?",
                                                      _below(path))]

    def count(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def empty(self) -> bool:
        """Nothing was replicated (yet, or since a reset)."""
        return self.con.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None

    def paths_with_ino(self, ino: int) -> List[bytes]:
        """The replicated paths whose inode was ``ino`` (the members of a hard-link group)."""
        return [bytes(p) for (p,) in self.con.execute("SELECT path FROM files WHERE ino = ?", (ino,))]

    def forget(self) -> None:
        """Forget what was replicated: no files, no pending updates, no acknowledged cycle."""
        with transaction(self.con) as con:
            con.execute("DELETE FROM files")
            con.execute("DELETE FROM pending")
            con.execute("UPDATE cycles SET state = 'forgotten' WHERE state IN ('acked', 'released')")

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

    def add_cycle(self, rec: CycleRec, pending: Iterable[PendingRow]) -> None:
        """Record a built cycle and the catalog updates its ack will apply, in one transaction."""
        with transaction(self.con) as con:
            # a cycle built earlier but never acknowledged is superseded by this one
            for (old,) in con.execute("SELECT cycle FROM cycles WHERE state = 'built'").fetchall():
                con.execute("UPDATE cycles SET state = 'abandoned' WHERE cycle = ?", (old,))
                con.execute("DELETE FROM pending WHERE cycle = ?", (old,))
            con.execute("INSERT INTO cycles VALUES (?,?,?,?,?,?,?,?)",
                        (rec.cycle, rec.base, rec.cut_seq, rec.state, rec.provider, rec.snapshot,
                         rec.created_ns or time.time_ns(), json.dumps(rec.info)))
            con.executemany("INSERT INTO pending VALUES (?,?,?,?,?,?,?,?,?)",
                            ((rec.cycle,) + tuple(p) for p in pending))

    def settle_pending(self, n: int, fresh: Iterable[Tuple[bytes, Row]], gone: Iterable[bytes]) -> None:
        """Cycle ``n``'s pending upserts after its live files were checked: ``fresh`` ones get the
        stat of their copy, ``gone`` ones leave the cycle (one transaction)."""
        with transaction(self.con) as con:
            con.executemany("UPDATE pending SET ino=?, size=?, mtime_ns=?, ctime_ns=?, mode=? "
                            "WHERE cycle=? AND path=? AND kind='upsert'",
                            [(r.ino, r.size, r.mtime_ns, r.ctime_ns, r.mode, n, p) for p, r in fresh])
            con.executemany("DELETE FROM pending WHERE cycle=? AND path=? AND kind='upsert'",
                            [(n, p) for p in gone])

    def set_state(self, n: int, state: str) -> None:
        self.con.execute("UPDATE cycles SET state = ? WHERE cycle = ?", (state, n))

    def ack(self, n: int) -> None:
        """Apply cycle n's pending catalog updates and mark it acknowledged (one transaction)."""
        with transaction(self.con) as con:
            if con.execute("SELECT 1 FROM pending WHERE cycle = ? AND kind != 'upsert' LIMIT 1",
                           (n,)).fetchone() is None:    # only upserts (a first copy): one statement
                if con.execute("SELECT 1 FROM files LIMIT 1").fetchone() is not None:
                    self._drop_below_non_dirs(n)
                con.execute("INSERT OR REPLACE INTO files SELECT path, ino, size, mtime_ns, ctime_ns, mode "
                            "FROM pending WHERE cycle = ? ORDER BY rowid", (n,))
            else:
                rows = [PendingRow(r[0], bytes(r[1]), None if r[2] is None else bytes(r[2]), *r[3:])
                        for r in con.execute("SELECT kind, path, old_path, ino, size, mtime_ns, ctime_ns, mode "
                                             "FROM pending WHERE cycle = ? ORDER BY rowid", (n,))]
                self._apply_moves([(r.old_path, r.path) for r in rows if r.kind == "move"])
                self._apply_rows(rows)
            con.execute("DELETE FROM pending WHERE cycle = ?", (n,))
            con.execute("UPDATE cycles SET state = 'acked' WHERE cycle = ?", (n,))

    def _apply_moves(self, moves: List[Tuple[bytes, bytes]]) -> None:
        """Move each (old, new) subtree of ``files``.  Moves are set-valued: every source subtree
        is lifted out first, then dropped in place."""
        con = self.con
        lifted = [con.execute("SELECT path, ino, size, mtime_ns, ctime_ns, mode FROM files WHERE " + _SUBTREE,
                              _subtree(old)).fetchall() for old, _new in moves]
        for old, _new in moves:
            con.execute("DELETE FROM files WHERE " + _SUBTREE, _subtree(old))
        for (old, new), items in zip(moves, lifted):
            con.execute("DELETE FROM files WHERE " + _SUBTREE, _subtree(new))
            con.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                            ((new + bytes(p)[len(old):],) + tuple(rest) for p, *rest in items))

    def _apply_rows(self, rows: List[PendingRow]) -> None:
        """Apply the ``gone`` and ``upsert`` rows, in order (moves are applied before)."""
        con = self.con
        for r in rows:
            if r.kind == "gone":
                con.execute("DELETE FROM files WHERE " + _SUBTREE, _subtree(r.path))
            elif r.kind == "upsert":
                if r.mode is not None and not stat.S_ISDIR(r.mode):     # no longer a directory
                    con.execute("DELETE FROM files WHERE path >= ? AND path < ?", _below(r.path))
                con.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                            (r.path, r.ino, r.size, r.mtime_ns, r.ctime_ns, r.mode))

    def _drop_below_non_dirs(self, n: int) -> None:
        """Rows below the paths that cycle ``n`` upserts as non-directories: a directory replaced by
        a file or symlink took its subtree with it (stale rows would be looked up through it)."""
        con = self.con
        for (p,) in con.execute("SELECT path FROM pending WHERE cycle = ? AND kind = 'upsert' "
                                "AND (mode & ?) != ?", (n, 0o170000, stat.S_IFDIR)).fetchall():
            con.execute("DELETE FROM files WHERE path >= ? AND path < ?", _below(bytes(p)))

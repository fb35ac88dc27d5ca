"""SQLite stores of discrep (journal, source catalog, replica catalog): one way to open and use them.

Every store is a WAL database with ``synchronous=FULL`` and a long busy timeout, opened in
autocommit mode (``isolation_level=None``: each store issues its own transactions, through
``transaction``).  ``open_store`` creates the state directory, opens the file, applies the
schema, and turns a damaged file into the caller's error class with a hint.  Every store has a
``meta (k TEXT PRIMARY KEY, v TEXT)`` table; ``get_meta``/``set_meta`` read and write it.
``prefix_end`` bounds a subtree in a path-keyed table.

Thread-safety: a connection is made with ``check_same_thread=False``; its owner serializes use.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator, Optional, Type

from discrep.core.errors import Error

SQLITE_FULL = 13                 # sqlite3 result code: database or disk is full
META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);"


def connect(db_path: str) -> sqlite3.Connection:
    """Open an SQLite db the way every discrep store wants it (WAL, FULL sync)."""
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    return con


def open_store(state_dir: str, filename: str, schema: str, error: Type[Error], what: str,
               hint: Optional[str] = None) -> "tuple[str, sqlite3.Connection]":
    """(path, connection) of ``state_dir/filename`` with ``schema`` applied; a file SQLite cannot
    read raises ``error("<what> <path> is unreadable: ...", hint=hint)``."""
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, filename)
    try:
        con = connect(path)
        con.executescript(schema)
    except sqlite3.DatabaseError as e:
        if is_disk_full(e):       # a full disk is not a damaged file: say what to do about it
            raise error(f"{what} {path} cannot be written: the disk is full",
                        hint="free space on that filesystem, then run again") from e
        raise error(f"{what} {path} is unreadable: {e}", hint=hint) from e
    return path, con


def is_disk_full(e: BaseException) -> bool:
    """Whether an SQLite (or OS) error means the filesystem is out of space."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(e, "sqlite_errorcode", None) == SQLITE_FULL or "disk is full" in str(e)


@contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` when the body raises."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def get_meta(con: sqlite3.Connection, key: str, default: Optional[str] = None) -> Optional[str]:
    row = con.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
    return default if row is None else row[0]


def set_meta(con: sqlite3.Connection, key: str, value: str) -> None:
    con.execute("INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)", (key, value))


def prefix_end(prefix: bytes) -> bytes:
    """Upper bound of the subtree ``prefix/``: ``'0'`` follows ``'/'`` in byte order, so
    ``[prefix + b"/", prefix_end(prefix))`` is exactly the subtree."""
    return prefix + b"0"

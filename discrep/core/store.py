"""SQLite stores of discrep (journal, source catalog, replica catalog): one way to open and use them.

Every store is a WAL database with ``synchronous=FULL`` and a long busy timeout, opened in
autocommit mode (``isolation_level=None``: each store issues its own transactions, through
``transaction``).  ``open_store`` opens the file inside a checked state directory
(``core.statedir.StateDir``, or the path of one: ``ROOT/.discrep``), created ``0600``, runs
``PRAGMA quick_check`` on it (a truncated or damaged file is found at once, not as an odd
error later), applies the schema, and turns a damaged file into the caller's error class with a
hint that names the file; a full disk is said as such.  Every store has a
``meta (k TEXT PRIMARY KEY, v TEXT)`` table; ``get_meta``/``set_meta`` read and write it.
``prefix_end`` bounds a subtree in a path-keyed table.

Thread-safety: a connection is made with ``check_same_thread=False``; its owner serializes use.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import contextmanager
from typing import Iterator, Optional, Type, Union

from discrep.core.errors import Error
from discrep.core.statedir import StateDir

SQLITE_FULL = 13                 # sqlite3 result code: database or disk is full
META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT);"


def connect(db_path: str) -> sqlite3.Connection:
    """Open an SQLite db the way every discrep store wants it (WAL, FULL sync)."""
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    return con


def state_of(state: Union[StateDir, str], error: Type[Error]) -> StateDir:
    """``state`` itself, or the StateDir opened from its path ``ROOT/.discrep`` (the caller owns it)."""
    if isinstance(state, StateDir):
        return state
    return StateDir(os.fsencode(os.path.dirname(os.path.abspath(state))), error=error)


def open_store(state: StateDir, filename: str, schema: str, error: Type[Error], what: str,
               hint: Optional[str] = None) -> "tuple[str, sqlite3.Connection]":
    """(path, connection) of ``filename`` in the checked state dir with ``schema`` applied; a file
    SQLite cannot read raises ``error("<what> <file> is damaged: ...", hint=hint)``."""
    path = state.file(filename)
    shown = os.path.join(os.fsdecode(state.root), ".discrep", filename)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if is_disk_full(e):
            raise error(f"{what} {shown} cannot be written: the disk is full",
                        hint="free space on that filesystem, then run again") from e
        raise error(f"{what} {shown} cannot be opened: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    con = None
    try:
        con = connect(path)
        check = con.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check[0] if check else '?'}")
        con.executescript(schema)
    except sqlite3.DatabaseError as e:
        if con is not None:
            con.close()
        if is_disk_full(e):       # a full disk is not a damaged file: say what to do about it
            raise error(f"{what} {shown} cannot be written: the disk is full",
                        hint="free space on that filesystem, then run again") from e
        raise error(f"{what} {shown} is damaged ({e})", hint=hint) from e
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

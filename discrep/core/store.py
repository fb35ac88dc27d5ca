"""SQLite stores of discrep (journal, source catalog, replica catalog): one way to open them.

Every store is a WAL database with ``synchronous=FULL`` and a long busy timeout, opened in
autocommit mode (``isolation_level=None``: each store issues its own BEGIN/COMMIT).

Thread-safety: a connection is made with ``check_same_thread=False``; its owner serializes use.
"""
from __future__ import annotations

import sqlite3


def connect(db_path: str) -> sqlite3.Connection:
    """Open an SQLite db the way every discrep store wants it (WAL, FULL sync)."""
    con = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    return con

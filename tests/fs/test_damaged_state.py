"""Damaged or lost state is reported, never silently restarted, and ``repair-state`` brings the
replica back with its recovery points (issue 14 item 8; tier: fs, hand-made exports).

Exit codes: a damaged or lost replica catalog -> 5 (DestinationError, naming the file and
'discrep repair-state DEST'); a full disk under a catalog -> the store's error class with
"the disk is full", not "damaged"."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from discrep.core.errors import DestinationError, SourceError
from test_hostile_manifest import make_export, meta, sync_export

pytestmark = pytest.mark.fs


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "discrep", *args], capture_output=True, text=True, timeout=120)


def _cycle(work_dir: Path, n: int, text: str) -> Path:
    return make_export(work_dir / f"c{n}-{text}-{len(list(work_dir.glob(f'c{n}-*')))}", [dict(meta(op="dir", path="d")),
                                            dict(meta(op="symlink", path="d/s", target=text))],
                       cycle=n, base=n - 1, full=(n == 1))


def _replica(work_dir: Path) -> Path:
    dst = work_dir / "dst"
    dst.mkdir()
    for n in (1, 2, 3):
        sync_export(_cycle(work_dir, n, f"v{n}"), dst)
    db = dst / ".discrep" / "replica.db"
    con = sqlite3.connect(db)        # fold the WAL in, so damaging the file damages the catalog
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return dst


def _truncate(db: Path) -> None:
    os.truncate(db, 0)


def _zero_middle(db: Path) -> None:
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * max(4096, size - 8192))


def _half(db: Path) -> None:
    os.truncate(db, db.stat().st_size // 2)


@pytest.mark.parametrize("damage", [_truncate, _zero_middle, _half, Path.unlink])
def test_damaged_catalog_is_refused_then_repaired(work_dir: Path, damage):
    dst = _replica(work_dir)
    damage(dst / ".discrep" / "replica.db")
    with pytest.raises(DestinationError, match="replica.db|replica catalog"):
        sync_export(_cycle(work_dir, 4, "v4"), dst)
    assert os.readlink(dst / "d/s") == "v3", "the replica was changed or restarted"
    p = run("history", str(dst))
    assert p.returncode == 5, p.stderr
    assert "repair-state" in p.stderr and p.stderr.count("repair-state") == 1, p.stderr
    p = run("repair-state", str(dst))
    assert p.returncode == 0, p.stderr
    p = run("history", str(dst))
    assert p.returncode == 0, p.stderr
    for n in ("1", "2", "3"):
        assert n in p.stdout
    to = work_dir / "restored"
    p = run("restore", str(dst), "--cycle", "1", "--to", str(to))
    assert p.returncode == 0, p.stderr
    assert os.readlink(to / "d/s") == "v1"
    sync_export(_cycle(work_dir, 4, "v4"), dst)
    assert os.readlink(dst / "d/s") == "v4"
    assert sorted(os.listdir(dst)) == [".discrep", "d"] and os.listdir(dst / "d") == ["s"]


def test_full_disk_under_a_catalog_is_not_called_damaged(work_dir: Path, monkeypatch):
    from discrep.core import store
    from discrep.source.catalog import SourceCatalog
    real = store.connect

    def full(path):
        con = real(path)
        con.close()
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(store, "connect", full)
    (work_dir / "src").mkdir()
    with pytest.raises(SourceError) as ei:
        SourceCatalog(str(work_dir / "src" / ".discrep"))
    assert "the disk is full" in str(ei.value) and "damaged" not in str(ei.value)

"""The source's per-replica positions (source.positions) read their registry like input (tier: fs).

An id that is not 32 hex digits never names a file; a planted registry row that names another
file of the state directory (or a path) is refused before anything is opened or deleted.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from discrep.core.errors import SourceError
from discrep.source import cycles, positions

GOOD = "0123456789abcdef" * 2


@pytest.mark.parametrize("bad", ["../../etc/passwd", "x" * 32, GOOD.upper(), GOOD + "0", "/" + GOOD[1:]])
def test_a_bad_id_names_no_file(work_dir: Path, bad: str) -> None:
    src = work_dir / "src"
    src.mkdir()
    with pytest.raises(SourceError):
        positions.store_for(bytes(src), bad, 0)
    sd = src / ".discrep"
    assert not sd.exists() or not any(p.name.startswith("catalog-") for p in sd.iterdir())


def test_a_planted_registry_row_is_refused(work_dir: Path) -> None:
    src = work_dir / "src"
    src.mkdir()
    victim = work_dir / "victim"
    victim.write_bytes(b"keep me")
    other = "f" * 32
    assert positions.store_for(bytes(src), GOOD, 0) == "catalog.db"            # the first one adopts it
    assert positions.store_for(bytes(src), other, 0) == f"catalog-{other}.db"
    con = sqlite3.connect(src / ".discrep" / "replicas.db")
    con.execute("UPDATE replicas SET store = '../../victim' WHERE id = ?", (other,))
    con.commit()
    con.close()
    with pytest.raises(SourceError, match="bad replica or store"):
        cycles.forget_replica(bytes(src), other)
    with pytest.raises(SourceError, match="bad replica or store"):
        positions.store_for(bytes(src), other, 0)
    assert victim.read_bytes() == b"keep me"


def test_forget_an_unknown_id_is_a_usage_error(work_dir: Path) -> None:
    from discrep.core.errors import UsageError
    src = work_dir / "src"
    src.mkdir()
    positions.store_for(bytes(src), GOOD, 0)
    with pytest.raises(UsageError):
        cycles.forget_replica(bytes(src), "e" * 32)

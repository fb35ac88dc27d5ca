"""Large files of a streamed first copy are read live and checked afterwards (source side).

A streamed build (``on_segment``) with the copy provider does not copy large files: the
snapshot holds a symlink to the live file and the manifest describes it by its stat before.
``source.settle_deferred`` then checks each: unchanged -> nothing; changed -> a verified copy
in the cycle directory and a fresh entry, the pending catalog row updated; gone -> dropped
from the cycle (pending row removed) and journaled for the next one.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from discrep.source import build as srcmod
from discrep.source import cycles, deferred
from discrep.core.errors import WarningList
from discrep.protocol.manifest import Entry

pytestmark = pytest.mark.fs

BIG = 300 * 1024          # over source.SMALL_MAX: read live in a streamed first copy


def _tree(root: Path) -> None:
    root.mkdir()
    (root / "a").mkdir()
    (root / "a" / "big1").write_bytes(b"1" * BIG)
    (root / "a" / "big2").write_bytes(b"2" * BIG)
    (root / "a" / "big3").write_bytes(b"3" * BIG)
    (root / "small").write_bytes(b"s" * 100)


def _build(root: Path) -> srcmod.BuiltCycle:
    segs: list = []
    b = srcmod.build_cycle(os.fsencode(root), snapshot_kind="copy", on_segment=segs.append)
    assert segs, "a streamed build announces segments"
    return b


def _pending(root: Path, cycle: int) -> dict:
    con = sqlite3.connect(root / ".discrep" / "catalog.db")
    try:
        rows = con.execute("SELECT path, size, mtime_ns FROM pending WHERE cycle = ? AND kind = 'upsert'",
                           (cycle,)).fetchall()
    finally:
        con.close()
    return {bytes(p): (s, m) for p, s, m in rows}


def _journal_paths(root: Path) -> list:
    con = sqlite3.connect(root / ".discrep" / "journal.db")
    try:
        return [bytes(p) for (p,) in con.execute("SELECT path FROM entries WHERE op = 'touch'")]
    finally:
        con.close()


def test_large_files_are_symlinks_to_live_files_until_settled(tmp_path: Path) -> None:
    root = tmp_path / "src"
    _tree(root)
    b = _build(root)
    snap = Path(os.fsdecode(b.snapshot))
    assert set(b.deferred) == {b"a/big1", b"a/big2", b"a/big3"}
    for name in ("big1", "big2", "big3"):   # a symlink to the file held open, not to its path
        target = os.readlink(snap / "a" / name)
        assert target.startswith(f"/proc/{os.getpid()}/fd/")
        assert os.readlink(target) == str(root / "a" / name)
    assert not (snap / "small").exists(), "small files travel in packs"
    redo, gone = deferred.settle_deferred(os.fsencode(root), b, WarningList())
    assert (redo, gone) == ([], [])


def test_changed_and_vanished_files_are_copied_or_dropped(tmp_path: Path) -> None:
    root = tmp_path / "src"
    _tree(root)
    b = _build(root)
    before = _pending(root, b.cycle)
    idx1 = b.deferred[b"a/big1"][0]
    (root / "a" / "big1").write_bytes(b"X" * (BIG + 7))     # changed while "read"
    os.unlink(root / "a" / "big2")                          # gone
    warnings = WarningList()
    redo, gone = deferred.settle_deferred(os.fsencode(root), b, warnings)
    assert gone == [b"a/big2"]
    assert len(redo) == 1
    e = Entry(redo[0])
    assert (e.path, e.idx, e.size) == (b"a/big1", idx1, BIG + 7)
    st = os.stat(root / "a" / "big1")
    assert e.mtime_ns == st.st_mtime_ns
    copy = root / ".discrep" / "cycles" / str(b.cycle) / f"redo-{idx1}"
    assert copy.read_bytes() == b"X" * (BIG + 7)
    after = _pending(root, b.cycle)
    assert after[b"a/big1"] == (BIG + 7, st.st_mtime_ns) != before[b"a/big1"]
    assert b"a/big2" in before and b"a/big2" not in after
    assert after[b"a/big3"] == before[b"a/big3"]
    assert b"a/big2" in _journal_paths(root), "a dropped file is looked at again next cycle"
    # settled once: a second call finds nothing more to do
    assert deferred.settle_deferred(os.fsencode(root), b, warnings) == ([], [])


def test_a_path_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    """Between the scan and the read, a user swaps a large file for a symlink to a file they may
    not read: the replica still reads the file the scan saw, never the symlink's target, and the
    settle drops it (it is gone) for the next cycle to look at."""
    root = tmp_path / "src"
    _tree(root)
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET" * 100000)
    b = _build(root)
    snap = Path(os.fsdecode(b.snapshot))
    os.unlink(root / "a" / "big1")
    os.symlink(secret, root / "a" / "big1")
    assert (snap / "a" / "big1").read_bytes() == b"1" * BIG
    redo, gone = deferred.settle_deferred(os.fsencode(root), b, WarningList())
    assert redo == [] and gone == [b"a/big1"]


def test_materialize_turns_symlinks_into_verified_copies(tmp_path: Path) -> None:
    root = tmp_path / "src"
    _tree(root)
    b = _build(root)
    snap = Path(os.fsdecode(b.snapshot))
    (root / "a" / "big3").write_bytes(b"Z" * 10)
    redo, gone = deferred.settle_deferred(os.fsencode(root), b, WarningList(), materialize=True)
    assert [Entry(r).path for r in redo] == [b"a/big3"] and gone == []
    for name, want in (("big1", b"1" * BIG), ("big2", b"2" * BIG), ("big3", b"Z" * 10)):
        p = snap / "a" / name
        assert not p.is_symlink() and p.read_bytes() == want


def _manifest(root: Path, totals: bool) -> tuple:
    import shutil
    from discrep.protocol.manifest import read_lines
    shutil.rmtree(root / ".discrep", ignore_errors=True)
    segs: list = []
    b = srcmod.build_cycle(os.fsencode(root), on_segment=segs.append, totals=totals)
    cdir = Path(os.fsdecode(cycles.cycle_dir(os.fsencode(root), b.cycle)))
    _hdr, ents = read_lines((cdir / "manifest.zst").read_bytes())
    return list(ents), segs


def test_walking_build_writes_the_same_manifest(tmp_path: Path) -> None:
    """Without totals a first streamed cycle is walked, captured and written in one pass (its first
    segment comes before the tree is walked whole); the manifest must be the one the counted build
    writes: same order, hard links, packs, sparse extents, symlinks, xattrs, odd names."""
    import helpers
    root = tmp_path / "src"
    helpers.make_sample_tree(root)
    for i in range(3):
        (root / "dir_a" / f"bigger{i}").write_bytes(bytes([i]) * BIG)
    counted, segs_c = _manifest(root, True)
    walked, segs_w = _manifest(root, False)
    assert segs_c[0].totals is not None and segs_w[0].totals is None
    assert [e["path"] for e in walked] == [e["path"] for e in counted]
    assert walked == counted
    assert any("link" in e for e in walked) and any(e.get("live") for e in walked)
    assert any("extents" in e for e in walked) and any(e.get("op") == "symlink" for e in walked)

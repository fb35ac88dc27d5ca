"""source.filtering: a coalesced journal interval pruned by the replica's rules (excluded paths
dropped, excluded paths the catalog holds turned into deletes, directories renamed in from an
excluded path walked), and when the journal alone cannot answer (needs_scan)."""
from __future__ import annotations

import os

import pytest

from discrep.journal.changes import coalesce
from discrep.journal.store import Entry
from discrep.protocol.filters import FilterRules
from discrep.protocol.filterspec import FilterSpec
from discrep.source.filtering import SourceFilter

pytestmark = pytest.mark.unit


def _e(seq: int, op: str, path: bytes, old: bytes = None) -> Entry:
    return Entry(seq, op, path, old, None, 0)


def _flt(root, *opts) -> SourceFilter:
    return SourceFilter(os.fsencode(str(root)), FilterSpec(FilterRules.parse(list(opts))))


def test_prune(tmp_path):
    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "f").write_bytes(b"f")
    (tmp_path / "data" / "x.o").write_bytes(b"o")
    (tmp_path / "cache").mkdir()
    (tmp_path / "keep.txt").write_bytes(b"k")
    base = {b"data", b"keep.txt", b"old.txt"}
    ents = [_e(1, "modify", b"cache/blob"), _e(2, "create", b"data/x.o"), _e(3, "modify", b"keep.txt"),
            _e(4, "rename", b"data/in", b"cache/in"),          # an excluded directory renamed in
            _e(5, "rename", b"cache/moved.txt", b"old.txt")]   # an included file renamed out
    cs = coalesce(ents, base.__contains__)
    flt = _flt(tmp_path, ("--exclude", "/cache/"), ("--exclude", "*.o"))
    try:
        gone = flt.prune(cs, base.__contains__)
    finally:
        flt.close()
    assert gone == []                                           # old.txt: still touched, absent -> delete
    assert cs.touched >= {b"keep.txt", b"data/in", b"old.txt"}
    assert not {p for p in cs.touched if p.startswith(b"cache") or p.endswith(b".o")}
    assert b"data/in" in cs.expand and not cs.moves


def test_excluded_path_the_catalog_holds_becomes_a_delete(tmp_path):
    (tmp_path / "x").mkdir()              # was a file (replicated), now a directory the rule excludes
    cs = coalesce([_e(1, "create", b"x")], {b"x"}.__contains__)
    flt = _flt(tmp_path, ("--exclude", "x/"))
    try:
        assert flt.prune(cs, {b"x"}.__contains__) == [b"x"] and b"x" not in cs.touched
    finally:
        flt.close()


def test_needs_scan(tmp_path):
    (tmp_path / "d").mkdir()
    flt = _flt(tmp_path, ("--filter", "dir-merge .discrepignore"))
    try:
        assert not flt.needs_scan([_e(1, "modify", b"a"), _e(2, "rename", b"b", b"a")])
        assert flt.needs_scan([_e(1, "rename", b"d", b"c")])                 # a directory renamed
        assert flt.needs_scan([_e(1, "modify", b"d/.discrepignore")])        # a merge file changed
    finally:
        flt.close()

"""Path validation, byte-path encoding and the journal coalescer (tier: unit)."""
from __future__ import annotations

import pytest

from discrep.journal.changes import coalesce
from discrep.core.errors import UnsafePathError
from discrep.journal.store import Entry
from discrep.core.paths import check_rel, dec, enc

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("p", [b"/a", b"..", b"a/..", b"a/../b", b"a\x00", b"", b"a//b", b"./a", b".discrep",
                               b".discrep/journal.db", b"a/"])
def test_check_rel_refuses(p):
    with pytest.raises(UnsafePathError):
        check_rel(p)


@pytest.mark.parametrize("p", [b"a", b"a/b", b"caf\xe9", b"new\nline", b"..a", b"a..", b"x/.discrep"])
def test_check_rel_accepts(p):
    assert check_rel(p) == p


@pytest.mark.parametrize("p", [b"caf\xe9", b"\xff\xfe", b"ok", b"new\nline", "日本".encode()])
def test_enc_dec_round_trip(p):
    import json
    assert dec(json.loads(json.dumps(enc(p)))) == p


def E(seq, op, path, old=None, ino=None):
    return Entry(seq, op, path, old, ino, 0)


def test_sequential_renames_become_set_moves():
    base = {b"a", b"b", b"d", b"d/x"}
    cs = coalesce([E(1, "rename", b"tmp", b"a"), E(2, "rename", b"a", b"b"), E(3, "rename", b"b", b"tmp"),
                   E(4, "rename", b"e", b"d"), E(5, "modify", b"e/x")], base.__contains__)
    assert cs.moves == {b"b": b"a", b"a": b"b", b"e": b"d"}
    assert b"e/x" in cs.touched


def test_create_then_delete_leaves_no_move():
    cs = coalesce([E(1, "create", b"n"), E(2, "delete", b"n")], set().__contains__)
    assert cs.moves == {} and b"n" in cs.touched


def test_rename_into_moved_dir_rekeys_touched():
    base = {b"d", b"d/f"}
    cs = coalesce([E(1, "modify", b"d/f"), E(2, "rename", b"e", b"d")], base.__contains__)
    assert b"e/f" in cs.touched and b"d/f" not in cs.touched
    assert cs.moves == {b"e": b"d"}


def test_scan_supersedes_earlier_entries_but_keeps_racing_ones():
    ents = [E(1, "modify", b"old"), E(5, "modify", b"raced"), E(6, "scan", b"", ino=4),
            E(7, "move", b"n", b"o"), E(8, "touch", b"t")]
    cs = coalesce(ents, {b"o"}.__contains__)
    assert cs.scanned
    assert b"old" not in cs.touched
    assert b"raced" in cs.expand and b"raced" in cs.touched
    assert cs.moves == {b"n": b"o"} and b"t" in cs.touched


def test_deleting_a_scan_moves_target_still_deletes_its_base():
    """A scan found o moved to d/n (set semantics: o itself is not touched); a later live delete of
    d/n drops the move, so o must be looked at (absent: deleted) -- else the replica keeps it.  A
    base path below a directory that moved too is looked at where that directory is now."""
    base = {b"o", b"x", b"x/f"}
    ents = [E(1, "scan", b"", ino=0), E(2, "move", b"d/n", b"o"), E(3, "delete", b"d/n")]
    cs = coalesce(ents, base.__contains__)
    assert cs.moves == {} and b"o" in cs.touched and b"d/n" in cs.touched
    ents = [E(1, "scan", b"", ino=0), E(2, "move", b"y", b"x"), E(3, "move", b"g", b"x/f"),
            E(4, "rename", b"h", b"g"), E(5, "delete", b"h")]
    cs = coalesce(ents, base.__contains__)
    assert cs.moves == {b"y": b"x"} and b"y/f" in cs.touched


def test_drop_foreign_scans_keeps_only_the_positions_own_block():
    """Scan blocks journaled before the plan are other positions' and are dropped (marker and the
    move/touch entries of its transaction), except the block at ``own`` (the position's own
    catch-up scan); entries of other transactions, and anything after the plan, stay."""
    from discrep.source.positions import drop_foreign_scans
    ents = [Entry(1, "modify", b"a", None, None, 10),
            Entry(2, "scan", b"", None, 0, 20), Entry(3, "touch", b"x", None, None, 20),
            Entry(4, "scan", b"", None, 1, 30), Entry(5, "move", b"n", b"o", None, 30),
            Entry(6, "touch", b"y", None, None, 30), Entry(7, "touch", b"z", None, None, 40),
            Entry(8, "scan", b"", None, 7, 50)]
    assert [e.seq for e in drop_foreign_scans(ents, 7)] == [1, 7, 8]
    assert [e.seq for e in drop_foreign_scans(ents, 7, own=4)] == [1, 4, 5, 6, 7, 8]
    assert [e.seq for e in drop_foreign_scans(ents, 7, own=2)] == [1, 2, 3, 7, 8]

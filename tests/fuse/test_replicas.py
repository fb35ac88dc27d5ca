"""One source, many replicas: a position per replica id (tier: fuse).

Three replicas of one watched source are cycled in turn with changes between them (create,
modify, rename, delete); each cycle must hold exactly the changes since THAT replica's last
cycle, read from the journal (no scan, no reset after the first cycle), and leave the replica
identical to the source by the independent check (rsync -aHAXnci and a Python walk).  Then
``replicas`` lists them, ``forget`` drops one and releases the journal and the cycle
directories only it held, and a replica that falls behind the hold cap gets a catch-up scan.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import helpers
from discrep.journal.store import Journal

pytestmark = pytest.mark.fuse

_spec = importlib.util.spec_from_file_location(
    "ws", Path(__file__).parent.parent / "fs" / "test_watcher_inotify.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)

DISCREP = [sys.executable, "-m", "discrep"]


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def cli(*args: str) -> dict:
    p = subprocess.run(DISCREP + [args[0], "--json", *args[1:]], capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), f"discrep {args} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def replicate(src: Path, dst: Path) -> dict:
    return cli("replicate", str(src), str(dst))


def identical(src: Path, dst: Path) -> None:
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def change(src: Path, k: int) -> Dict[str, int]:
    """Round ``k``'s changes, disjoint from every other round's: one create, one modify, one
    rename, one delete.  Returns what a replica that saw none of them must apply."""
    (src / f"new{k}").write_bytes(os.urandom(3000 + k))
    with open(src / "d0" / f"f{k}", "r+b") as f:
        f.write(b"changed in round %d" % k)
    os.rename(src / "d1" / f"f{k}", src / "d1" / f"renamed{k}")
    os.unlink(src / "d2" / f"f{k}")
    return {"created": 1, "modified": 1, "renamed": 1, "deleted": 1}


def _journal(src: Path) -> Journal:
    return Journal(str(src / ".discrep"))


def _trimmed(src: Path) -> int:
    j = _journal(src)
    try:
        return int(j.get("trimmed_seq", "0"))
    finally:
        j.close()


def test_three_replicas_in_turn_forget_and_fall_behind(work_dir):
    src = work_dir / "src"
    src.mkdir()
    S.fill(src, nfiles=32)                        # d0..d4, f0..f31 in each
    dests = {name: work_dir / name for name in ("a", "b", "c")}
    p = S.start_watcher(src, "inotify")
    try:
        S.sync_point(src)
        last: Dict[str, int] = {}
        for name, dst in dests.items():           # first cycles: full comparisons of their own
            r = replicate(src, dst)
            assert r["base"] == 0 and r["change_source"] == "scan", r
            last[name] = r["cycle"]
            identical(src, dst)
        ids = cli("replicas", str(src))["replicas"]
        assert len(ids) == 3 and len({r["id"] for r in ids}) == 3, ids

        # rounds of changes; replicas cycle in turn, each seeing every round since its last cycle
        pending: Dict[str, List[int]] = {n: [] for n in dests}
        order = ["a", "b", "c", "a", "c", "b", "a"]
        for k, name in enumerate(order):
            change(src, k)
            for n in pending:
                pending[n].append(k)
            S.sync_point(src)
            r = replicate(src, dests[name])
            rounds = len(pending[name])
            assert r["change_source"] == "journal", r
            assert r["base"] == last[name], (name, r)
            # created + modified + the sync marker; every rename and delete of those rounds
            assert r["files_changed"] == 2 * rounds + 1, (name, rounds, r)
            assert r["files_renamed"] == rounds, (name, rounds, r)
            assert r["files_deleted"] == rounds, (name, rounds, r)
            last[name] = r["cycle"]
            pending[name] = []
            identical(src, dests[name])

        listed = {r["id"]: r for r in cli("replicas", str(src))["replicas"]}
        assert sorted(r["acked_cycle"] for r in listed.values()) == sorted(last.values())
        assert all(r["journal_covers"] for r in listed.values()), listed

        # c is the furthest behind: it alone holds the journal after its cut
        c_pos = next(r for r in listed.values() if r["acked_cycle"] == last["c"])
        others_cut = min(r["cut_seq"] for r in listed.values() if r is not c_pos)
        assert _trimmed(src) == c_pos["cut_seq"] < others_cut
        store = src / ".discrep" / c_pos["store"]
        assert store.exists()
        out = cli("forget", str(src), c_pos["id"])
        assert out["forgotten"] == c_pos["id"]
        assert not store.exists()
        assert not (src / ".discrep" / "cycles" / str(last["c"])).exists()
        assert not (src / ".discrep" / "snapshots" / str(last["c"])).exists()
        assert _trimmed(src) == others_cut
        assert sorted(r["id"] for r in cli("replicas", str(src))["replicas"]) == \
            sorted(i for i in listed if i != c_pos["id"])

        # b falls more than the hold cap behind while a cycles on: its next cycle catches up by scanning
        cli("replicas", str(src), "--hold-cap", "5")
        for k in range(20, 24):
            change(src, k)
            S.sync_point(src)
            r = replicate(src, dests["a"])
            assert r["change_source"] == "journal", r
            identical(src, dests["a"])
        b_before = last["b"]
        r = replicate(src, dests["b"])
        assert r["change_source"] == "scan" and r["base"] == b_before, r   # a catch-up, not a reset
        identical(src, dests["b"])
        change(src, 30)
        S.sync_point(src)
        r = replicate(src, dests["b"])
        assert r["change_source"] == "journal", r
        identical(src, dests["b"])

        # the forgotten replica comes back: a full comparison, identical again
        r = replicate(src, dests["c"])
        assert r["base"] == 0, r
        identical(src, dests["c"])
    finally:
        S.stop_watcher(p)


def test_an_existing_pair_keeps_its_position(work_dir):
    """A source and replica from before replica ids (one position in catalog.db, no id in DEST):
    the replica's new id takes over that position -- no full comparison; one catch-up scan,
    since the old cycle recorded no gap generation -- and the journal serves it after that."""
    import sqlite3
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    S.fill(src)
    p = S.start_watcher(src, "inotify")
    try:
        S.sync_point(src)
        first = replicate(src, dst)
        sd = src / ".discrep"
        (store,) = [r["store"] for r in cli("replicas", str(src))["replicas"]]
        # the state an older version left: the position in catalog.db, no registry, no replica id
        os.rename(sd / store, sd / "catalog.db")
        (sd / "replicas.db").unlink()
        con = sqlite3.connect(sd / "catalog.db")
        con.execute("UPDATE cycles SET info = json_remove(info, '$.gap_gen')")
        con.commit()
        con.close()
        con = sqlite3.connect(dst / ".discrep" / "replica.db")
        con.execute("DELETE FROM meta WHERE k = 'replica_id'")
        con.commit()
        con.close()
        change(src, 0)
        S.sync_point(src)
        r = replicate(src, dst)
        assert r["base"] == first["cycle"] and r["change_source"] == "scan", r
        identical(src, dst)
        (pos,) = cli("replicas", str(src))["replicas"]
        assert pos["store"] == "catalog.db" and pos["acked_cycle"] == r["cycle"], pos
        change(src, 1)
        S.sync_point(src)
        r2 = replicate(src, dst)
        assert r2["base"] == r["cycle"] and r2["change_source"] == "journal", r2
        identical(src, dst)
    finally:
        S.stop_watcher(p)


def test_two_replicas_with_different_filters(work_dir):
    """Each position records its own rules: a replica with --exclude and one without, cycled in
    turn, both from the journal, each equal to the source as its rules select it."""
    src = work_dir / "src"
    src.mkdir()
    S.fill(src)
    full, part = work_dir / "full", work_dir / "part"
    p = S.start_watcher(src, "inotify")
    try:
        S.sync_point(src)
        replicate(src, full)
        cli("replicate", "--exclude=d3/", str(src), str(part))
        for k in range(3):
            change(src, k)
            (src / "d3" / f"only-full{k}").write_bytes(b"x" * 100)
            S.sync_point(src)
            r = replicate(src, full)
            assert r["change_source"] == "journal", r
            identical(src, full)
            r = cli("replicate", "--exclude=d3/", str(src), str(part))
            assert r["change_source"] == "journal", r
            assert not (part / "d3").exists()
            diff = helpers.tree_equal(src, part)
            assert [d for d in diff if "d3" not in d] == [], diff
    finally:
        S.stop_watcher(p)

"""Paths that move or vanish while a cycle is built (issue 14 item 6), injected deterministically.

A directory renamed while the source's catch-up scan walks the tree, or between the scan (or the
journal cut) and the snapshot, must never be silently missing from the committed cycle under both
names: the cycle warns (exit 1), the replica keeps what it had for that path, the path is journaled,
and the next cycle (no injection) makes the replica equal the source (independent check: rsync
-aHAXnci --delete and the Python walk of tests/helpers.py).

The rename is injected in-process, with no timing: the cycle runs through ``run.local.replicate_local``
(a real FUSE export and a real replica) with the walk the scan uses, or the snapshot step, wrapped
so that the rename happens at one chosen point.  Without the fix each of these cycles exited 0 with
the renamed directory's files absent from DEST under both names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

import helpers
from discrep.core.errors import WarningList
from discrep.run.local import replicate_local
from discrep.run.options import CycleOptions
from discrep.source import build as buildmod
from discrep.source import scan as scanmod
from discrep.source import snapshot as snapmod

pytestmark = [pytest.mark.fuse]


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


@pytest.fixture
def pair(work_dir: Path, monkeypatch):
    tmp = work_dir / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    src = work_dir / "src"
    src.mkdir()
    yield src, work_dir / "dst"
    assert not [m for m in helpers.mounts() if m[0].startswith(str(work_dir))], "mounts left behind"


def cycle(src: Path, dst: Path, snapshot: str = "copy") -> Tuple[dict, List[Tuple[str, str]]]:
    """One cycle in-process: (its result, its warnings as (path, message))."""
    w = WarningList()
    res = replicate_local(CycleOptions(str(src), str(dst), snapshot=snapshot), warnings=w)
    return res, [(x.path, x.message) for x in w]


def same(src: Path, dst: Path) -> None:
    diff = helpers.tree_equal(src, dst) + helpers.python_tree_diff(src, dst)
    assert diff == [], diff[:20]


def make_tree(src: Path) -> None:
    (src / "a").mkdir()
    (src / "a" / "one").write_bytes(b"1" * 100)
    (src / "m").mkdir()
    for i in range(3):
        (src / "m" / f"f{i}").write_bytes(bytes([65 + i]) * (500 + i))
    (src / "m" / "sub").mkdir()
    (src / "m" / "sub" / "deep").write_bytes(b"deep\n" * 1000)
    (src / "z").write_bytes(b"z")


def held_under_some_name(dst: Path, names=("m", "b")) -> bool:
    """The directory's files are in DEST under one of its names (old or new)."""
    want = {"f0", "f1", "f2", "sub/deep"}
    return any(all((dst / n / w).is_file() for w in want) for n in names)


def walk_renaming(after: bytes, do: Callable[[], None]) -> Callable[..., Iterator]:
    """The scan's walk, with ``do()`` run once right after the walk yields ``after``."""
    real = scanmod.walk

    def walk(root: bytes, **kw) -> Iterator:
        done = False
        for rel, st in real(root, **kw):
            yield rel, st
            if rel == after and not done:
                done = True
                do()
    return walk


@pytest.mark.parametrize("after", [b"a", b"m"], ids=["gone-before-its-stat", "gone-before-its-listing"])
def test_directory_renamed_while_the_scan_walks(pair, monkeypatch, after):
    """m is renamed to b (a name the walk has passed) after the root was listed: the walk finds m
    gone (or its listing fails) and never sees b.  Before the fix: m (or what was below it) deleted
    on the replica, b absent, exit 0."""
    src, dst = pair
    make_tree(src)
    cycle(src, dst)
    same(src, dst)
    (src / "m" / "f1").write_bytes(b"changed")      # something for the cycle to carry as well
    monkeypatch.setattr(scanmod, "walk", walk_renaming(after, lambda: os.rename(src / "m", src / "b")))
    res, w = cycle(src, dst)
    monkeypatch.undo()
    assert held_under_some_name(dst), sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert res["warnings"] >= 1 and any("m" == k or k.startswith("m/") for k, _v in w), w
    res, w = cycle(src, dst)
    assert res["warnings"] == 0, w
    same(src, dst)


def test_directory_moved_into_a_part_walked_later(pair, monkeypatch):
    """m is moved below z2 (listed after m) once the walk has passed m: the scan meets the same
    directory twice.  The cycle warns; the replica holds it (at least) once; the next cycle is exact."""
    src, dst = pair
    make_tree(src)
    (src / "z2").mkdir()
    cycle(src, dst)
    monkeypatch.setattr(scanmod, "walk", walk_renaming(b"m/sub/deep", lambda: os.rename(src / "m", src / "z2" / "m")))
    res, w = cycle(src, dst)
    monkeypatch.undo()
    assert held_under_some_name(dst, ("m", "z2/m"))
    assert res["warnings"] >= 1, w
    res, w = cycle(src, dst)
    assert res["warnings"] == 0, w
    same(src, dst)


def snapshot_renaming(do: Callable[[], None]) -> Callable[..., object]:
    """The cycle's snapshot step, with ``do()`` run just before it (after the scan and the cut)."""
    real = snapmod.take

    def take(*a, **kw):
        do()
        return real(*a, **kw)
    return take


def test_directory_renamed_between_scan_and_snapshot(pair, monkeypatch):
    """The scan saw m/f1 changed; m is renamed to b before the snapshot: m/f1 cannot be captured.
    Before the fix: m/f1 deleted on the replica (under neither name), exit 0."""
    src, dst = pair
    make_tree(src)
    cycle(src, dst)
    (src / "m" / "f1").write_bytes(b"changed")
    (src / "m" / "sub" / "new").write_bytes(b"new")
    monkeypatch.setattr(buildmod.snapmod, "take", snapshot_renaming(lambda: os.rename(src / "m", src / "b")))
    res, w = cycle(src, dst)
    monkeypatch.undo()
    assert held_under_some_name(dst)
    assert res["warnings"] >= 1, w
    res, w = cycle(src, dst)
    assert res["warnings"] == 0, w
    same(src, dst)


def test_journal_directory_renamed_between_cut_and_snapshot(pair, monkeypatch):
    """With the live journal: m/f1 changed before the cut, m renamed to b after it (before the
    snapshot).  Before the fix: m/f1 deleted on the replica, exit 0; the rename comes next cycle."""
    import test_model_regressions as reg
    src, dst = pair
    make_tree(src)
    cycle(src, dst)
    w = reg.start_watcher(src)
    try:
        assert cycle(src, dst)[0]["change_source"] == "scan"     # closes the watcher's start gap
        (src / "m" / "f1").write_bytes(b"changed")
        monkeypatch.setattr(buildmod.snapmod, "take", snapshot_renaming(lambda: os.rename(src / "m", src / "b")))
        res, warns = cycle(src, dst)
        monkeypatch.undo()
        assert res["change_source"] == "journal"
        assert held_under_some_name(dst)
        assert res["warnings"] >= 1, warns
        res, warns = cycle(src, dst)
        assert res["change_source"] == "journal" and res["warnings"] == 0, (res, warns)
        same(src, dst)
    finally:
        reg.stop_watcher(w)


# bug 8, fixed: the copy snapshot followed the symlink (touched paths were opened by their full path: small files
# by snapshot.read_verified from build._add_inline with O_NOFOLLOW on the last component only, larger ones by
# Capturer.add / _capture_file, lstat and clone by path) and the outside file's bytes landed in the cycle and in
# DEST as m/f1, exit 0.  Now live entries are named through an fd of their parent directory opened component by
# component with O_NOFOLLOW (snapshot.LivePaths): the swapped path vanished during the cycle (a warning).
@pytest.mark.parametrize("dir_changed", [False, True], ids=["file", "file-and-dir"])
@pytest.mark.parametrize("size", [200, 300 * 1024], ids=["packed", "copied"])
def test_directory_swapped_for_a_symlink_before_the_snapshot(pair, work_dir, monkeypatch, size, dir_changed):
    """m/f1 changed; before the snapshot m is renamed away and a symlink m -> a directory outside SRC
    takes its place (with m itself changed too: then the snapshot holds m as that symlink, and a
    lookup of m/f1 in the snapshot must not go through it).  Nothing outside SRC may be read into
    the cycle (threat model: a local user who owns part of SRC gains nothing)."""
    src, dst = pair
    outside = work_dir / "outside"
    outside.mkdir()
    (outside / "f1").write_bytes(b"SECRET outside SRC " * (size // 19 + 1))
    make_tree(src)
    cycle(src, dst)
    (src / "m" / "f1").write_bytes(b"c" * size)
    if dir_changed:     # m is in the cycle too: the snapshot captures m as the symlink it now is
        (src / "m" / "added").write_bytes(b"a")

    def swap() -> None:
        os.rename(src / "m", src / "m.old")
        os.symlink(str(outside), src / "m")
    monkeypatch.setattr(buildmod.snapmod, "take", snapshot_renaming(swap))
    try:
        res, w = cycle(src, dst)
        assert res["warnings"] >= 1, w                  # m/f1 vanished during the cycle
    finally:
        monkeypatch.undo()
        leaked = [str(p) for p in list(dst.rglob("*")) + list((src / ".discrep").rglob("*"))
                  if p.is_file() and not p.is_symlink() and b"SECRET" in p.read_bytes()]
        assert leaked == [], f"bytes of a file outside SRC were captured into {leaked}"
    res, w = cycle(src, dst)
    same(src, dst)


@pytest.mark.root
def test_directory_swapped_for_a_symlink_before_a_btrfs_snapshot(loopfs, work_dir, monkeypatch):
    """As above with a btrfs subvolume snapshot: the snapshot itself holds m as the symlink, and the
    lookup of m/f1 in the snapshot must not go through it (it pointed at the live outside file)."""
    helpers.require_tool("btrfs")
    mnt = loopfs("btrfs", 300)
    src, dst = mnt / "src", work_dir / "dst"
    helpers.run(["btrfs", "subvolume", "create", str(src)])
    monkeypatch.setenv("TMPDIR", str(work_dir))
    outside = mnt / "outside"
    outside.mkdir()
    (outside / "f1").write_bytes(b"SECRET outside SRC " * 20)
    make_tree(src)
    cycle(src, dst, "btrfs")
    (src / "m" / "f1").write_bytes(b"c" * 300)
    (src / "m" / "added").write_bytes(b"a")

    def swap() -> None:
        os.rename(src / "m", src / "m.old")
        os.symlink(str(outside), src / "m")
    monkeypatch.setattr(buildmod.snapmod, "take", snapshot_renaming(swap))
    try:
        res, w = cycle(src, dst, "btrfs")
        assert res["warnings"] >= 1, w
    finally:
        monkeypatch.undo()
        monkeypatch.setenv("TMPDIR", str(work_dir))
        leaked = [str(p) for p in dst.rglob("*") if p.is_file() and not p.is_symlink() and b"SECRET" in p.read_bytes()]
        leaked += [str(p) for p in (src / ".discrep" / "cycles").rglob("*")
                   if p.is_file() and not p.is_symlink() and b"SECRET" in p.read_bytes()]
        assert leaked == [], f"bytes of a file outside SRC were captured into {leaked}"
    cycle(src, dst, "btrfs")
    same(src, dst)

"""Regressions found by the model-based random test (tests/fuse/test_model_random.py).

Each test is the shrunk sequence of one failure, written out as plain steps: a tree, cycles of
``discrep replicate --json SRC DEST`` (the venv's discrep, a subprocess), changes between them,
and the independent check of tests/helpers.py after every cycle (rsync -aHAXnci --delete and the
Python walk) plus the exit code.  A test of a bug that is not fixed yet is marked
``xfail(strict=True)``: the suite stays green while it fails, and turns red once the bug is fixed
and the mark is still there (then remove the mark).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

import helpers

pytestmark = [pytest.mark.fuse]

REPO = Path(__file__).resolve().parents[2]
_EXE = REPO / ".venv" / "bin" / "discrep"
DISCREP = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "discrep"]


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


@pytest.fixture
def pair(work_dir: Path, monkeypatch):
    """(src, dst) in the test's directory; discrep's TMPDIR (export mountpoints) inside it too."""
    tmp = work_dir / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    src = work_dir / "src"
    src.mkdir()
    yield src, work_dir / "dst"
    assert not [m for m in helpers.mounts() if m[0].startswith(str(work_dir))], "mounts left behind"


def replicate(src: Path, dst: Path, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(DISCREP + ["replicate", "--json", str(src), str(dst)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **(env or {})))


def cycle_ok(src: Path, dst: Path) -> dict:
    """One cycle; it must exit 0 and the replica must equal the source."""
    p = replicate(src, dst)
    assert p.returncode == 0, f"replicate exited {p.returncode}: {p.stderr}"
    diff = helpers.tree_equal(src, dst) + helpers.python_tree_diff(src, dst)
    assert diff == [], diff
    return json.loads(p.stdout.strip().splitlines()[-1])


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --------------------------------------------------------------------------- bug 1

# bug 1, fixed: the siblings' base paths are mapped through the cycle's moves and nothing below a live non-
# directory is looked up (_add_related, _settle_paths in source/build.py).  It was: _add_link_siblings
# (source/build.py) adds the base-cycle paths of a link group unmapped by the cycle's moves; a base path that now
# runs through a file makes the snapshot warn 'cannot stat: Not a directory' and the cycle exit 1
def test_link_sibling_under_a_directory_swapped_with_a_file(pair):
    src, dst = pair
    write(src / "d1" / "b", b"x" * 3000)
    (src / "e").mkdir()
    os.link(src / "d1" / "b", src / "e" / "b-link")
    write(src / "c", b"c" * 10)
    cycle_ok(src, dst)
    os.rename(src / "e", src / "tmp")          # swap directory e and file c
    os.rename(src / "c", src / "e")
    os.rename(src / "tmp", src / "c")
    with open(src / "d1" / "b", "r+b") as f:   # a change to the link group: its siblings are looked at
        f.write(b"Y")
    cycle_ok(src, dst)                          # exit 1: "e/b-link: cannot stat: Not a directory"


# --------------------------------------------------------------------------- bug 2

def start_watcher(src: Path) -> subprocess.Popen:
    """``discrep watch --backend inotify SRC``, returned once its watches are in place."""
    from discrep.core import locks
    from discrep.journal.store import Journal
    p = subprocess.Popen(DISCREP + ["watch", "--backend", "inotify", "--no-catch-up", str(src)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    sd = str(src / ".discrep")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"watcher exited {p.returncode}: {p.stderr.read().decode(errors='replace')}")
        if locks.held(os.path.join(os.fsencode(sd), b"watcher.lock")) and os.path.exists(os.path.join(sd, "journal.db")):
            j = Journal(sd)
            try:
                if j.get("watcher_pid") == str(p.pid) and j.get("watcher_backend") == "inotify":
                    return p
            finally:
                j.close()
        time.sleep(0.05)
    stop_watcher(p)
    raise AssertionError("watcher did not start in 20 s")


def stop_watcher(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
    if p.stderr:
        p.stderr.close()


@pytest.fixture
def watched(pair):
    """``pair`` whose first cycle is done, with a watcher running and its start gap closed:
    call ``start()`` after building the tree; the watcher is stopped (by PID) at the end."""
    src, dst = pair
    procs = []

    def start() -> None:
        cycle_ok(src, dst)
        procs.append(start_watcher(src))
        assert cycle_ok(src, dst)["change_source"] == "scan"     # closes the watcher's start gap
    yield src, dst, start
    for p in procs:
        stop_watcher(p)


# bug 2, fixed: the siblings' base paths are mapped through the cycle's moves (_add_related, source/build.py).  It
# was: with the journal, a link group changed through one name drags in its siblings by their BASE paths
# (_add_link_siblings, source/build.py); a sibling whose directory was renamed is left out of the manifest, the
# replica rewrites the primary as a new file and the sibling keeps the old bytes, no longer linked
def test_journal_link_sibling_in_renamed_directory(watched):
    src, dst, start = watched
    write(src / "d1" / "b", b"x" * 3000)
    (src / "e").mkdir()
    os.link(src / "d1" / "b", src / "e" / "b-link")
    start()
    os.rename(src / "e", src / "f")
    with open(src / "d1" / "b", "r+b") as f:
        f.write(b"Y")
    r = cycle_ok(src, dst)        # f/b-link: old contents, not a link of d1/b
    assert r["change_source"] == "journal"


# --------------------------------------------------------------------------- bug 3

# bug 3: fixed (issue 13 item 4): the replica breaks a shared inode's link before changing it
def test_break_big_hard_link_by_an_edited_copy(pair):
    src, dst = pair
    data = bytes(range(256)) * (8 << 10)          # 2 MiB: above the pack size, patched by blocks
    write(src / "a", data)
    os.link(src / "a", src / "b")
    cycle_ok(src, dst)
    edited = bytearray(data)
    edited[1000:1010] = b"E" * 10
    write(src / "tmp", bytes(edited))
    os.rename(src / "tmp", src / "b")             # b: a new inode; a keeps the old bytes
    cycle_ok(src, dst)                            # replica: a holds b's edit, a and b still one inode


# bug 3b: fixed (issue 13 item 4): the replica breaks a shared inode's link before changing it
def test_break_hard_link_by_an_identical_copy(pair):
    src, dst = pair
    write(src / "a", b"same bytes\n")
    os.link(src / "a", src / "b")
    cycle_ok(src, dst)
    write(src / "tmp", b"same bytes\n")
    os.chmod(src / "tmp", 0o600)
    os.rename(src / "tmp", src / "b")
    cycle_ok(src, dst)                            # replica: a is 0600 too, a and b still one inode


# bug 7, fixed (found by the long model run, scan variant, seed 1207): as 3b, but the identical copy also has
# the same mode, xattrs and mtime: nothing about either name differs but the link.  FilePatcher.unchanged
# (replica/files.py) checked shared_elsewhere only when the metadata differed, so the replica's a and b stayed
# one inode (exit 0, the Python walk reported the hard-link groups differ).
def test_break_hard_link_by_an_identical_copy_same_metadata(pair):
    src, dst = pair
    write(src / "a", b"same bytes\n")
    os.link(src / "a", src / "b")
    cycle_ok(src, dst)
    st = os.stat(src / "a")
    write(src / "tmp", b"same bytes\n")
    os.chmod(src / "tmp", st.st_mode & 0o7777)
    os.utime(src / "tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(src / "tmp", src / "b")
    cycle_ok(src, dst)                            # replica: a and b still one inode


# --------------------------------------------------------------------------- bug 4

# bug 4a, fixed: an upsert of a non-directory drops the catalog rows below it (SourceCatalog.ack).  It was:
# SourceCatalog.ack (source/catalog.py) applies the upsert of a path that turned from a directory into a file
# without deleting the rows of the old directory's children; every later catch-up scan touches those stale paths
# and warns 'cannot stat: Not a directory': exit 1 forever
def test_directory_replaced_by_a_file_warns_forever(pair):
    src, dst = pair
    write(src / "d1" / "x", b"inside\n")
    cycle_ok(src, dst)
    (src / "d1" / "x").unlink()
    (src / "d1").rmdir()
    write(src / "d1", b"now a file\n")
    cycle_ok(src, dst)
    cycle_ok(src, dst)            # no change at all: exit 1, "d1/x: cannot stat: Not a directory"


# bug 4b, fixed: catalog rows as in 4a; and a touched path below a live non-directory is replaced by that non-
# directory (_settle_paths, source/build.py): nothing is looked up through a symlink.  It was: the stale rows of
# bug 4a under a directory replaced by a symlink to a directory: the scan touches d1/x, the snapshot reads it
# THROUGH the symlink (path-based lstat/open follow intermediate components), so a file outside SRC lands in the
# cycle's pack, and the replica refuses the manifest (exit 6) in every later cycle
def test_directory_replaced_by_a_symlink_to_an_outside_directory(pair, work_dir):
    src, dst = pair
    outside = work_dir / "outside"
    write(outside / "x", b"SECRET: outside the source tree\n")
    write(src / "d1" / "x", b"inside\n")
    cycle_ok(src, dst)
    (src / "d1" / "x").unlink()
    (src / "d1").rmdir()
    os.symlink(str(outside), src / "d1")
    cycle_ok(src, dst)
    try:
        cycle_ok(src, dst)        # exit 6: "refusing to write d1/x: d1 on the replica is not a directory"
    finally:
        leaked = [os.path.join(d, f) for d, _ds, fs in os.walk(src / ".discrep") for f in fs
                  if b"SECRET" in Path(d, f).read_bytes()]
        assert leaked == [], f"bytes of a file outside SRC were captured into {leaked}"


# bug 4c, fixed: a touched path below a live non-directory is replaced by it (_settle_paths, source/build.py).  It
# was: with the journal, a directory removed and replaced by a symlink to its parent: the journaled delete of d1/x
# is looked up through the symlink (it finds ./x), the manifest has both the symlink d1 and a file d1/x, and the
# replica fails with FileNotFoundError (exit 2) in every later cycle
def test_journal_directory_replaced_by_a_symlink_to_its_parent(watched):
    src, dst, start = watched
    write(src / "d1" / "x", b"inside\n")
    write(src / "x", b"top-level x\n")
    start()
    (src / "d1" / "x").unlink()
    (src / "d1").rmdir()
    os.symlink(".", src / "d1")
    cycle_ok(src, dst)            # exit 2: FileNotFoundError b'd1' in flush_installs


# --------------------------------------------------------------------------- bug 5

# bug 5, fixed: deletions are made top-most in the NEW namespace, covered only by an ancestor that is no longer a
# live directory (_deletions, source/scan.py).  It was: scan() (source/scan.py) journals only the top-most
# vanished paths; a file deleted inside a directory that was MOVED out of a deleted directory counts as covered by
# that deleted ancestor, so the replica carries it along with the move and keeps it for a cycle (exit 0)
def test_file_deleted_in_a_directory_moved_out_of_a_deleted_one(pair):
    src, dst = pair
    write(src / "x" / "y" / "z", b"z\n")
    write(src / "x" / "keep", b"k\n")
    cycle_ok(src, dst)
    os.rename(src / "x" / "y", src / "y2")
    (src / "y2" / "z").unlink()
    (src / "x" / "keep").unlink()
    (src / "x").rmdir()
    cycle_ok(src, dst)            # the replica still has y2/z


# --------------------------------------------------------------------------- bug 6

# bug 6, fixed (found while fixing bug 5): a directory deleted and made again under the same name kept the old
# directory's entries on the replica for a cycle, exit 0.  Scan: the new directory counted as covering the
# deletions below the old one (_deletions, source/scan.py).  Journal: a directory moved out of the tree is one
# delete event; with a new directory under its name only that name was looked at (now: a touched directory that
# is another inode than the catalog's row brings the catalog's entries below it, _add_related, source/build.py).
def test_directory_deleted_and_made_again(pair):
    src, dst = pair
    write(src / "d" / "f", b"f\n")
    write(src / "d" / "g" / "h", b"h\n")
    cycle_ok(src, dst)
    for p in (src / "d" / "g" / "h", src / "d" / "g", src / "d" / "f"):
        p.unlink() if p.is_file() else p.rmdir()
    (src / "d").rmdir()
    write(src / "d" / "new", b"new\n")
    cycle_ok(src, dst)            # the replica still had d/f and d/g/h


def test_journal_directory_moved_out_and_made_again(watched, work_dir):
    src, dst, start = watched
    write(src / "d" / "f", b"f\n")
    write(src / "d" / "g" / "h", b"h\n")
    start()
    os.rename(src / "d", work_dir / "moved-out")     # one IN_MOVED_FROM: a delete of d
    (src / "d").mkdir()
    r = cycle_ok(src, dst)        # the replica still had d/f and d/g/h
    assert r["change_source"] == "journal"


# --------------------------------------------------------------------------- bug 9

# bug 9 (found by the long model run, watch variant, seed 4242): with the journal, a hard-linked file changed
# through one name whose name is then removed (or replaced by another file, or lies below a directory replaced by
# a file): the journal names only that path; the live path no longer leads to the changed inode, so its other
# names were not looked at and the replica kept their old content (exit 0).
@pytest.mark.parametrize("then", ["unlink", "replace", "dir-to-file"])
def test_journal_link_changed_through_a_name_that_then_goes(watched, then):
    src, dst, start = watched
    write(src / "e" / "b-link", b"x" * 3000)
    write(src / "a" / "keep", b"k")
    os.link(src / "e" / "b-link", src / "a" / "d")
    start()
    with open(src / "a" / "d", "ab") as f:       # the shared inode changes through a/d
        f.write(b"appended")
    if then == "unlink":
        (src / "a" / "d").unlink()
    elif then == "replace":
        write(src / "a" / "tmp", b"another file")
        os.rename(src / "a" / "tmp", src / "a" / "d")
    else:
        shutil.rmtree(src / "a")
        write(src / "a", b"now a file")
    r = cycle_ok(src, dst)        # e/b-link: still 3000 bytes of x on the replica
    assert r["change_source"] == "journal"

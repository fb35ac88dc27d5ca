"""A replica inode is changed in place only when every name sharing it changes with it (issue 13
item 4): a hard link the source broke, and history ``keep/`` entries that share an inode with a
live file, are never rewritten through another name.  Checked independently of discrep."""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "discrep", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr}"
    return p


def _linked_pair(src: Path, dst: Path, size: int = 3 << 20) -> bytes:
    src.mkdir()
    data = os.urandom(size)
    (src / "a").write_bytes(data)
    os.link(src / "a", src / "b")
    run("replicate", str(src), str(dst))
    assert os.stat(dst / "a").st_ino == os.stat(dst / "b").st_ino
    return data


def test_metadata_of_a_broken_link_is_not_set_through_the_other_name(work_dir: Path):
    """b becomes a copy with the same bytes but another mode: a's mode must stay."""
    src, dst = work_dir / "src", work_dir / "dst"
    _linked_pair(src, dst)
    shutil.copy2(src / "a", src / "b.tmp")
    os.chmod(src / "b.tmp", 0o600)
    os.rename(src / "b.tmp", src / "b")
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def test_data_of_a_broken_link_is_not_patched_through_the_other_name(work_dir: Path):
    """b becomes an edited copy (same size, a few blocks differ): a keeps its bytes."""
    src, dst = work_dir / "src", work_dir / "dst"
    data = _linked_pair(src, dst)
    edited = bytearray(data)
    edited[5:15] = b"0123456789"
    (src / "b.tmp").write_bytes(bytes(edited))
    os.rename(src / "b.tmp", src / "b")
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def test_history_keeps_an_inode_a_live_file_shares(work_dir: Path):
    """b is replaced (its old inode, still a's, is kept in the history); then a is edited in place:
    a's patch must not rewrite the kept copy, so cycle 1 restores exactly."""
    src, dst, c1 = work_dir / "src", work_dir / "dst", work_dir / "c1"
    _linked_pair(src, dst)
    shutil.copytree(src, c1, copy_function=shutil.copy2)
    os.unlink(src / "b")
    (src / "b").write_bytes(b"")                # b: a new, empty file
    run("replicate", str(src), str(dst))
    with open(src / "a", "r+b") as f:           # a: edited in place (same inode, same size)
        f.seek(1 << 20)
        f.write(b"EDITEDEDIT")
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []
    to = work_dir / "to"
    run("restore", str(dst), "--cycle", "1", "--to", str(to))
    for name in ("a", "b"):
        assert filecmp.cmp(c1 / name, to / name, shallow=False), f"cycle 1's {name} was changed in the history"

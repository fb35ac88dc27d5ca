"""Edges where a replica could be silently wrong or its history rewritten (issue 13), checked
independently of discrep after each cycle."""
from __future__ import annotations

import json
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


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "discrep", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"exit {p.returncode}: {p.stderr}"
    return p


def test_breaking_a_hard_link_on_the_source_leaves_the_other_name_alone(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    data = os.urandom(3 << 20)
    (src / "a").write_bytes(data)
    os.link(src / "a", src / "b")
    run("replicate", str(src), str(dst))
    assert os.stat(dst / "a").st_ino == os.stat(dst / "b").st_ino
    # b is replaced by an edited copy: the link is broken, a keeps the old bytes
    edited = bytearray(data)
    edited[1 << 20:(1 << 20) + 10] = b"EDITEDEDIT"
    (src / "b.tmp").write_bytes(bytes(edited))
    os.rename(src / "b.tmp", src / "b")
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def test_restore_path_never_follows_a_replicated_symlink(work_dir: Path):
    """`restore --path` through a replicated symlink must not reach the replica host's own files."""
    src, dst, victim = work_dir / "src", work_dir / "dst", work_dir / "victim"
    victim.mkdir()
    (victim / "secret").write_bytes(b"replica host secret\n")
    src.mkdir()
    (src / "f").write_bytes(b"1")
    os.symlink(str(victim), src / "a")
    run("replicate", str(src), str(dst))
    (src / "f").write_bytes(b"2")
    run("replicate", str(src), str(dst))
    to = work_dir / "to"
    p = run("restore", str(dst), "--cycle", "1", "--to", str(to), "--path", "a/secret", check=False)
    assert (victim / "secret").exists() and (victim / "secret").read_bytes() == b"replica host secret\n", \
        "the victim file was moved or changed"
    if p.returncode == 0:
        for dirpath, _d, files in os.walk(to):
            for name in files:
                assert Path(dirpath, name).read_bytes() != b"replica host secret\n"
    shutil.rmtree(to, ignore_errors=True)


def test_state_is_private(work_dir: Path):
    """Names, xattrs and block digests of the tree are in the state files: no other user may read them."""
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 10000)
    r = json.loads(run("replicate", "--json", str(src), str(dst)).stdout.splitlines()[-1])
    assert r["cycle"] == 1
    for root in (src, dst):
        st = os.stat(root / ".discrep")
        assert st.st_mode & 0o077 == 0, f"{root}/.discrep is {oct(st.st_mode & 0o777)}"

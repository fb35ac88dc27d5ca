"""``--max-delete N`` / ``N%`` (issue 15 item 3): a cycle that would delete more is refused with
exit 19 before anything changes in DEST (checked with an independent digest of DEST, its
``.discrep`` included); a later run with a higher limit completes."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


run = helpers.discrep_cli


def digest(root: Path) -> str:
    return helpers.tree_digest(root, dir_mtimes=False, volatile=("lock", "run.lock"))


def _tree(src: Path, n_dirs: int = 4, per_dir: int = 5) -> None:
    for d in range(n_dirs):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(per_dir):
            (src / f"d{d}" / f"f{i}").write_bytes(os.urandom(100 + i))
    (src / "top").write_bytes(b"top")


def test_emptied_source_is_refused_then_allowed(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    _tree(src)
    run("replicate", str(src), str(dst))
    for p in [p for p in src.iterdir() if p.name != ".discrep"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = digest(dst)
    p = run("replicate", str(src), str(dst), "--max-delete", "10", code=19)
    assert "would delete 25 " in p.stderr and "d0" in p.stderr and "--max-delete" in p.stderr, p.stderr
    assert digest(dst) == before
    assert helpers.tree_equal(src, dst) != []          # still the old tree
    p = run("replicate", str(src), str(dst), "--max-delete", "10%", code=19)
    assert digest(dst) == before
    run("replicate", str(src), str(dst), "--max-delete", "25")
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def test_a_deleted_directory_counts_its_contents(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    _tree(src)
    run("replicate", str(src), str(dst))
    shutil.rmtree(src / "d1")
    before = digest(dst)
    p = run("replicate", str(src), str(dst), "--max-delete", "5", code=19)
    assert "would delete 6 " in p.stderr, p.stderr
    assert digest(dst) == before
    run("replicate", str(src), str(dst), "--max-delete", "6")
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def test_within_the_limit_and_no_limit(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    _tree(src)
    run("replicate", str(src), str(dst))
    (src / "top").unlink()
    run("replicate", str(src), str(dst), "--max-delete", "1")
    shutil.rmtree(src / "d2")
    run("replicate", str(src), str(dst), "--max-delete", "-1")
    assert helpers.tree_equal(src, dst) == []
    run("replicate", str(src), str(dst), "--max-delete", "x", code=3)

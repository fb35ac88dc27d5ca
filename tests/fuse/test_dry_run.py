"""``replicate -n/--dry-run`` (issue 15 item 3): one itemized line per change a cycle would
apply, and nothing written on either side (digests of SRC/.discrep and of DEST, its .discrep
included, are identical before and after); the next real run is as without it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


run = helpers.discrep_cli


def digest(root: Path) -> str:
    return helpers.tree_digest(root)


def test_dry_run_itemizes_and_changes_nothing(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d").mkdir(parents=True)
    big = os.urandom(2 << 20)
    (src / "d" / "big").write_bytes(big)
    (src / "keep").write_bytes(b"keep")
    (src / "meta").write_bytes(b"meta")
    (src / "gone").write_bytes(b"gone")
    (src / "old").write_bytes(os.urandom(10000))
    run("replicate", str(src), str(dst))
    with open(src / "d" / "big", "r+b") as f:   # one 64 KiB-ish block
        f.seek(1 << 20)
        f.write(b"X" * 100)
    os.chmod(src / "meta", 0o600)
    (src / "gone").unlink()
    os.rename(src / "old", src / "new")
    (src / "fresh").write_bytes(b"fresh")
    before_src, before_dst = digest(src / ".discrep"), digest(dst)
    p = run("replicate", "-n", str(src), str(dst))
    assert digest(src / ".discrep") == before_src
    assert digest(dst) == before_dst
    lines = p.stdout.strip().splitlines()
    by_path = {ln.split(None, 1)[1].split(" (")[0]: ln for ln in lines[:-1]}
    assert by_path["fresh"].startswith(">f+++++++++"), lines
    assert by_path["d/big"].startswith(">fc") and "bytes to fetch" in by_path["d/big"], lines
    fetch = int(by_path["d/big"].split("(~")[1].split(" ")[0])
    assert 0 < fetch < len(big) // 4
    assert by_path["meta"].startswith(".f") and "p" in by_path["meta"][:11], lines
    assert by_path["gone"].startswith("*deleting"), lines
    assert "renamed from old" in by_path["new"], lines
    assert set(by_path) == {"fresh", "d/big", "meta", "gone", "new"}, lines
    assert lines[-1].startswith("dry run: 1 created, 1 changed") and "1 deleted, 1 renamed" in lines[-1]
    # the next real run is as without the dry run
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []
    assert run("replicate", "-n", str(src), str(dst)).stdout.strip().splitlines()[-1].startswith(
        "dry run: 0 created, 0 changed")


def test_dry_run_into_a_missing_dest_creates_nothing(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    p = run("replicate", "--dry-run", str(src), str(dst))
    assert ">f+++++++++ a" in p.stdout
    assert not dst.exists() and not (src / ".discrep").exists()

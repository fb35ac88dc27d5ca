"""Hand edits or bit rot in DEST (issue 14 item 7): a same-size, same-mtime content edit in DEST
survives plain cycles (the replica trusts its catalog); ``replicate --checksum`` compares DEST's
actual bytes with the source and repairs them; ``verify DEST --scrub`` finds them without the
source.  Checked independently of discrep."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


run = helpers.discrep_cli


def rot(path: Path, off: int, data: bytes) -> None:
    """Change bytes in place, keeping inode, size and times (what bit rot or a careful edit does)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size


def test_checksum_repairs_and_scrub_finds_edits_in_dest(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(3 << 20))
    (src / "small").write_bytes(os.urandom(300))
    (src / "same").write_bytes(os.urandom(5000))
    run("replicate", str(src), str(dst))
    assert run("verify", str(dst), "--scrub").returncode == 0
    rot(dst / "d" / "big", 2 << 20, b"ROTROTROT")
    rot(dst / "small", 7, b"xx")
    p = run("verify", str(dst), "--scrub", code=17)
    assert "d/big" in p.stdout and "small" in p.stdout and "same" not in p.stdout, p.stdout
    # plain cycles trust the catalog: the damage survives (documented behaviour)
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) != []
    p = run("replicate", "--json", str(src), str(dst), "--checksum")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["files_repaired"] == 2, res
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []
    assert run("verify", str(dst), "--scrub").returncode == 0
    p = run("replicate", str(src), str(dst), "--checksum")
    assert "repaired" not in p.stdout
    # later source changes patch the repaired copy, not a mix
    with open(src / "d" / "big", "r+b") as f:
        f.write(b"SOURCE EDIT")
    run("replicate", str(src), str(dst))
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []

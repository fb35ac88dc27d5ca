"""``discrep find DEST PATTERN`` after renames, deletes, in-place edits and replacements (tier: fuse).

The oracle is the source tree itself: after each cycle the test records, with its own walk and
hashes (``fnmatch`` on the name, ``xxhash`` of the bytes), which paths match and what they hold;
find must report exactly that for every recovery point.  Each reported digest is also checked
against an independent hash of what ``restore --cycle N --path P`` produces.
"""
from __future__ import annotations

import fnmatch
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest
import xxhash

import helpers

pytestmark = pytest.mark.fuse

DISCREP = [sys.executable, "-m", "discrep"]


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)
    if check and p.returncode not in (0, 1):
        raise AssertionError(f"discrep {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def find(dst: Path, pattern: str) -> dict:
    return json.loads(run("find", "--json", str(dst), pattern).stdout.strip().splitlines()[-1])


def file_hash(path: Path) -> str:
    return xxhash.xxh3_128_hexdigest(path.read_bytes())


def matching(src: Path, name_glob: str) -> Dict[str, Tuple[str, int, str]]:
    """path -> (type, size, digest) of the regular files and symlinks whose name matches."""
    out = {}
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not (root == str(src) and d == ".discrep")]
        for n in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = Path(root) / n
            if not fnmatch.fnmatchcase(n, name_glob):
                continue
            rel = str(p.relative_to(src))
            if p.is_symlink():
                t = os.readlink(p)
                out[rel] = ("symlink", len(t), xxhash.xxh3_128_hexdigest(os.fsencode(t)))
            else:
                out[rel] = ("file", p.stat().st_size, file_hash(p))
    return out


def churn(src: Path, rnd: random.Random, n: int) -> None:
    """One cycle's changes: renames of files and of a directory, deletes, edits in place,
    replacements, a new file where an old one was."""
    def small() -> list:
        return sorted(p for p in src.rglob("*.txt") if p.is_file() and p.name != "big.txt")
    d = src / "d2" if (src / "d2").exists() else src / "d3"
    txt = small()
    a = txt[rnd.randrange(len(txt))]
    a.rename(a.with_name(f"renamed{n}.txt"))                       # rename (same name pattern)
    small()[0].rename(src / f"moved{n}.dat")                       # renamed out of the pattern
    with open(src / "d1" / "big.txt", "r+b") as f:                 # edit in place, same size
        f.seek(rnd.randrange(1 << 20))
        f.write(os.urandom(4096))
    (d / f"new{n}.txt").write_bytes(os.urandom(rnd.randrange(1, 9000)))
    small()[-1].unlink()                                           # delete
    (d / "again.txt").write_bytes(b"version %d\n" % n)             # rewritten each cycle
    if n == 3:
        shutil.move(str(src / "d2"), str(src / "d3"))             # a directory renamed
        (src / "d3" / "link.txt").unlink(missing_ok=True)
        os.symlink(f"target-{n}", src / "d3" / "link.txt")


def test_find_follows_renames_and_deletes(work_dir: Path):
    rnd = random.Random(16)
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d1").mkdir(parents=True)
    (src / "d2").mkdir()
    (src / "d1" / "big.txt").write_bytes(os.urandom(3 << 20))
    for i in range(6):
        (src / ("d1" if i % 2 else "d2") / f"f{i}.txt").write_bytes(os.urandom(rnd.randrange(1, 5000)))
    (src / "d2" / "other.bin").write_bytes(b"not matched")
    os.symlink("target-0", src / "d2" / "link.txt")
    expected: Dict[int, Dict[str, Tuple[str, int, str]]] = {}
    for n in range(1, 6):
        if n > 1:
            churn(src, rnd, n)
        run("replicate", str(src), str(dst))
        expected[n] = matching(src, "*.txt")

    res = find(dst, "*.txt")
    assert res["points"] == [1, 2, 3, 4, 5]
    got: Dict[int, Dict[str, Tuple[str, int, str]]] = {n: {} for n in expected}
    for v in res["versions"]:
        got[v["cycle"]][v["path"]] = (v["type"], v["size"], v["digest"])
    for n in expected:
        assert got[n] == expected[n], f"cycle {n}: find differs from the source as it was"

    # every digest is what restore produces (an independent hash of restore's output)
    for v in res["versions"]:
        if v["type"] != "file" or rnd.random() > 0.5:
            continue
        out = work_dir / f"r-{v['cycle']}-{v['path'].replace('/', '_')}"
        run("restore", str(dst), "--cycle", str(v["cycle"]), "--path", v["path"], "--to", str(out))
        assert file_hash(out / v["path"]) == v["digest"], (v["cycle"], v["path"])

    # an anchored pattern and a directory pattern
    res = find(dst, "/d1/big.txt")
    assert [v["cycle"] for v in res["versions"]] == [1, 2, 3, 4, 5]
    assert len({v["digest"] for v in res["versions"]}) == 5      # edited in place every cycle
    dirs = find(dst, "d3/")
    assert [(v["cycle"], v["type"]) for v in dirs["versions"]] == [(3, "dir"), (4, "dir"), (5, "dir")]

    # find neither changed the replica nor left scratch in its state dir
    assert helpers.tree_equal(src, dst) == []
    assert not [n for n in os.listdir(dst / ".discrep") if n.startswith("find.")]

    # after pruning, the pruned points are reported as such, the rest still found
    run("prune", str(dst), "--keep-last", "2")
    res = find(dst, "*.txt")
    assert res["points"] == [4, 5] and res["not_restorable"] == [1, 2, 3]
    assert {(v["cycle"], v["path"]) for v in res["versions"]} == \
        {(n, p) for n in (4, 5) for p in expected[n]}

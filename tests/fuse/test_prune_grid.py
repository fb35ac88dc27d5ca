"""``prune --keep GRID`` on a real history (tier: fuse): the dry run lists every point with the rule
that keeps it, changes nothing; the prune drops only what no kept point needs, and every kept point
restores byte-identical to the source as it was (checked with rsync and a Python walk)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse

DISCREP = [sys.executable, "-m", "discrep"]
S = 1_000_000_000
H = 3600 * S
D = 86400 * S


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def run(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), f"discrep {' '.join(args)}: exit {p.returncode}\n{p.stderr}"
    return p


def last_json(p: subprocess.CompletedProcess) -> dict:
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_prune_grid_keeps_every_kept_point_restorable(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    states = {}
    for n in range(1, 7):
        if n > 1:
            (src / f"file{n}.txt").write_text(f"new in {n}\n" * n)
            with open(src / helpers.SAMPLE_BIG, "r+b") as f:      # patched in place every cycle
                f.seek(n * 100_000)
                f.write(b"%d" % n * 4096)
            if n == 3:
                (src / "dir_a").rename(src / f"dir_a{n}")
            if n == 4:
                (src / "file2.txt").unlink()
        run("replicate", "--keep-last", "100", str(src), str(dst))
        states[n] = work_dir / f"state{n}"
        subprocess.run(["cp", "-a", str(src), str(states[n])], check=True)

    # give the points hand-chosen source times (the cycles above took seconds): D0 is today, UTC
    now = time.time_ns()
    d0 = now // D * D
    times = {1: d0 - 5 * D + H, 2: d0 - 3 * D + H, 3: d0 - 3 * D + 2 * H, 4: d0 - D + H, 5: d0 - D + 2 * H}
    con = sqlite3.connect(dst / ".discrep" / "replica.db")
    with con:
        for c, t in times.items():
            con.execute("UPDATE cycles SET source_time_ns = ? WHERE cycle = ?", (t, c))
    con.close()
    # 4x1d: today -> 6, yesterday -> 5, two days ago -> none, three days ago -> 3 (newer than 2);
    # 4 lies between kept points: its history is needed to restore 3
    plan = last_json(run("prune", "--json", "--dry-run", "--keep-last", "1", "--keep", "4x1d", str(dst)))["points"]
    assert [(p["cycle"], p["action"], p["rules"]) for p in plan] == [
        (1, "drop", []), (2, "drop", []), (3, "keep", ["4x1d"]), (4, "keep", ["needed by 3"]),
        (5, "keep", ["4x1d"]), (6, "keep", ["last 1", "4x1d"])]
    assert all(c["restorable"] for c in last_json(run("history", "--json", str(dst)))["cycles"])  # dry run

    gone = last_json(run("prune", "--json", "--keep-last", "1", "--keep", "4x1d", str(dst)))["pruned"]
    # history of 3 undoes 3 -> 2: no kept point needs it (a first copy may keep no history at all)
    assert gone in ([1, 2, 3], [2, 3])
    hist = {c["cycle"]: c["restorable"] for c in last_json(run("history", "--json", str(dst)))["cycles"]}
    assert hist == {1: False, 2: False, 3: True, 4: True, 5: True, 6: True}
    for n in (3, 4, 5):
        out = work_dir / f"restored{n}"
        run("restore", str(dst), "--cycle", str(n), "--to", str(out))
        assert helpers.tree_equal(states[n], out) == [], f"kept point {n} does not restore byte-identical"
        assert helpers.python_tree_diff(states[n], out) == []
    assert helpers.tree_equal(src, dst) == []
    # a second dry run: the pruned points are reported as such
    plan = last_json(run("prune", "--json", "--dry-run", "--keep-last", "1", "--keep", "4x1d", str(dst)))["points"]
    assert [p["action"] for p in plan] == ["pruned earlier", "pruned earlier", "keep", "keep", "keep", "keep"]

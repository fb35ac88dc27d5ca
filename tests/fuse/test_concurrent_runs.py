"""Two ``discrep replicate`` runs into one DEST started a moment apart (issue 14 item 8; tier: fuse).

Before the fix the runs raced for the source's cycle: the second one's start reset or
superseded the cycle the first was applying, so the run that committed a cycle exited 13 (its
acknowledgement found the source locked) or 4 (its cycle abandoned).  Now a run holds DEST's run
lock from start to end: whichever run commits a cycle exits 0, the other exits 13 at once with a
clear message and changes nothing; DEST equals SRC (independent check) and the next run completes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse

DISCREP = [sys.executable, "-m", "discrep"]


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def _start(src: Path, dst: Path) -> subprocess.Popen:
    return subprocess.Popen(DISCREP + ["replicate", "--json", str(src), str(dst)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _committed(dst: Path) -> set:
    p = subprocess.run(DISCREP + ["history", str(dst)], capture_output=True, text=True, timeout=60, check=True)
    return {int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s", p.stdout, re.M)}


def _churn(src: Path, k: int) -> None:
    for i in range(0, 200, 7):
        (src / "d" / f"f{i}").write_bytes(os.urandom(20_000))
    with open(src / "big", "r+b") as f:
        f.seek((k * 3 % 25) << 20)
        f.write(os.urandom(1 << 20))


@pytest.mark.parametrize("delays", [(0.0, 0.1, 0.2, 0.3, 0.5)])
def test_two_runs_one_dest(work_dir: Path, delays):
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d").mkdir(parents=True)
    for i in range(200):
        (src / "d" / f"f{i}").write_bytes(os.urandom(20_000))
    (src / "big").write_bytes(os.urandom(30 << 20))
    for k, delay in enumerate(delays):
        if k:
            _churn(src, k)
        before = _committed(dst) if dst.exists() else set()
        a = _start(src, dst)
        time.sleep(delay)
        b = _start(src, dst)
        outs = []
        try:
            for p in (a, b):
                out, err = p.communicate(timeout=300)
                outs.append((p.returncode, out, err))
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        reported = set()
        for rc, out, err in outs:
            assert rc in (0, 13), f"delay {delay}: exit {rc}\n{err}"
            if rc == 0:
                reported.add(json.loads(out.strip().splitlines()[-1])["cycle"])
            else:
                assert "another 'discrep replicate' into" in err and "changed nothing" in err, err
        assert reported, f"delay {delay}: neither run completed: {outs}"
        new = _committed(dst) - before
        assert new == reported, f"delay {delay}: committed {sorted(new)} but the runs that exited 0 " \
                                f"report {sorted(reported)}: {[(rc, err[-300:]) for rc, _o, err in outs]}"
        assert helpers.tree_equal(src, dst) == []
        assert helpers.python_tree_diff(src, dst) == []
        assert not any("discrep-export-" in m[1] for m in helpers.mounts())
    # the next run completes
    _churn(src, 99)
    p = subprocess.run(DISCREP + ["replicate", str(src), str(dst)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert helpers.tree_equal(src, dst) == []

"""All-or-nothing cycles, recovery points and restore (tier: fuse; fault injection).

Two kinds of crash, both seeded and repeatable:
* at every write-ahead barrier of the replica (DISCREP_CRASH_AFTER_BARRIERS=k makes the
  process SIGKILL itself right after its k-th durable undo record batch, i.e. between a
  record and the change it describes), k = 1, 2, ... until the cycle completes;
* ``kill -9`` of ``discrep replicate`` from outside at seeded random moments.
After each: ``discrep recover`` and the replica must equal one whole cycle (the
independent rsync check against a saved copy of the source), never a mix; the next
run completes and equals the source.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
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


@pytest.fixture(autouse=True)
def _own_tmpdir(monkeypatch):
    """A killed discrep cannot remove its export mountpoint: keep those under a dir of the test."""
    import tempfile
    d = tempfile.mkdtemp(prefix="discrep-crash-tmp-")
    monkeypatch.setenv("TMPDIR", d)
    try:
        yield d
    finally:
        helpers.unmount_under(d)
        helpers.remove_tree(d)


def run(*args, env=None, check=True):
    p = subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, **(env or {})))
    if check:
        assert p.returncode == 0, f"{args}: {p.returncode}\n{p.stderr}"
    return p


def save(src: Path, into: Path) -> Path:
    """A copy of the tree as it is now (cp -a: times in ns, hard links, xattrs), without .discrep."""
    subprocess.run(["cp", "-a", str(src), str(into)], check=True)
    if (into / ".discrep").exists():
        shutil.rmtree(into / ".discrep")
    subprocess.run(["touch", "-h", "-r", str(src), str(into)], check=True)
    return into


def equal(a: Path, b: Path) -> bool:
    return helpers.tree_equal(a, b) == []


def build(src: Path, rnd: random.Random) -> None:
    helpers.make_sample_tree(src)
    for d in range(6):
        (src / f"many{d}").mkdir()
        for i in range(60):
            (src / f"many{d}" / f"f{i}.txt").write_bytes(rnd.randbytes(rnd.randint(10, 3000)))
    (src / "vm.img").write_bytes(rnd.randbytes(6 << 20))


def churn(src: Path, rnd: random.Random, n: int) -> None:
    with open(src / "vm.img", "r+b") as f:
        for _ in range(20):
            f.seek(rnd.randrange(6 << 20))
            f.write(rnd.randbytes(4096))
    d = rnd.randrange(6)
    for i in rnd.sample(range(60), 10):
        p = src / f"many{d}" / f"f{i}.txt"
        if p.exists():
            p.write_bytes(rnd.randbytes(rnd.randint(10, 3000)))
    if (src / f"many{(d + 1) % 6}").exists():
        os.rename(src / f"many{(d + 1) % 6}", src / f"renamed{n}")
    victims = sorted((src / f"many{(d + 2) % 6}").glob("*")) if (src / f"many{(d + 2) % 6}").exists() else []
    for p in victims[:5]:
        p.unlink()
    (src / f"new{n}").mkdir()
    for i in range(20):
        (src / f"new{n}" / f"g{i}").write_bytes(rnd.randbytes(200))
    os.chmod(src / "dir_b" if (src / "dir_b").exists() else src / helpers.SAMPLE_EMPTY_DIR, 0o700 + n % 50)
    os.utime(src / helpers.SAMPLE_BIG, ns=(10**18 + n, 10**18 + n))


def no_export_mounts() -> bool:
    for _ in range(50):
        if not any("discrep-export-" in m[1] for m in helpers.mounts()):
            return True
        time.sleep(0.1)
    return False


def crash_at_each_barrier(src: Path, dst: Path, limit: int):
    """Run ``replicate`` with DISCREP_CRASH_AFTER_BARRIERS=k for k = 1, 2, ... until a run completes;
    after each kill (checked: SIGKILL, no export mount left) yield k, for the caller to inspect and
    recover the replica."""
    for k in range(1, limit):
        p = run("replicate", "--json", str(src), str(dst), env={"DISCREP_CRASH_AFTER_BARRIERS": str(k)}, check=False)
        if p.returncode == 0:
            return
        assert p.returncode == -signal.SIGKILL, p.stderr
        assert no_export_mounts(), "the FUSE export outlived the killed replicate"
        yield k


def recover_rolls_back(dst: Path) -> None:
    r = run("recover", "--json", str(dst))
    assert json.loads(r.stdout.strip().splitlines()[-1])["rolled_back"] is not None


def test_crash_at_every_barrier_then_recover(work_dir: Path):
    rnd = random.Random(6)
    src, dst = work_dir / "src", work_dir / "dst"
    build(src, rnd)
    run("replicate", str(src), str(dst))
    before = save(src, work_dir / "cycle1")
    churn(src, rnd, 1)
    after = save(src, work_dir / "cycle2")
    kills = 0
    for k in crash_at_each_barrier(src, dst, 60):
        kills += 1
        recover_rolls_back(dst)
        assert equal(before, dst), f"after a crash at barrier {k} and recover, the replica is not cycle 1"
    assert kills >= 5, "the cycle had too few write-ahead barriers to test"
    assert equal(after, dst) and equal(src, dst)
    # the replica's history knows both cycles and cycle 1 restores exactly
    run("restore", str(dst), "--cycle", "1", "--to", str(work_dir / "r1"))
    assert equal(before, work_dir / "r1")


def test_random_kill_9_from_outside(work_dir: Path):
    rnd = random.Random(1234)
    src, dst = work_dir / "src", work_dir / "dst"
    build(src, rnd)
    run("replicate", str(src), str(dst))
    committed = save(src, work_dir / "state0")
    t = time.monotonic()
    churn(src, rnd, 100)
    run("replicate", str(src), str(dst))
    duration = time.monotonic() - t
    committed = save(src, work_dir / "state1")
    outcomes = {"old": 0, "new": 0}
    for i in range(2, 12):
        churn(src, rnd, i)
        newest = save(src, work_dir / f"state{i}")
        proc = subprocess.Popen(DISCREP + ["replicate", str(src), str(dst)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.05, max(0.3, duration)))
        proc.kill()
        proc.wait(timeout=60)
        assert no_export_mounts()
        run("recover", str(dst))
        if equal(newest, dst):
            outcomes["new"] += 1
            committed = newest
        else:
            assert equal(committed, dst), f"kill {i}: the replica is neither the last committed cycle nor the new one"
            outcomes["old"] += 1
    run("replicate", str(src), str(dst))
    assert equal(src, dst)
    assert outcomes["old"] + outcomes["new"] == 10


def crashed_cycle(work_dir: Path, seed: int, barrier: int):
    """A first cycle, churn, then a second cycle killed right after its ``barrier``-th undo barrier."""
    rnd = random.Random(seed)
    src, dst = work_dir / "src", work_dir / "dst"
    build(src, rnd)
    run("replicate", str(src), str(dst))
    churn(src, rnd, 1)
    p = run("replicate", str(src), str(dst), env={"DISCREP_CRASH_AFTER_BARRIERS": str(barrier)}, check=False)
    assert p.returncode == -signal.SIGKILL
    return src, dst


def test_replicate_recovers_by_itself(work_dir: Path):
    src, dst = crashed_cycle(work_dir, 7, 4)
    run("replicate", "--json", str(src), str(dst))
    assert equal(src, dst)


def test_corrupt_history_record_is_reported_not_used(work_dir: Path):
    src, dst = crashed_cycle(work_dir, 8, 5)
    hist = dst / ".discrep" / "history"
    (cyc,) = [d for d in hist.iterdir() if d.is_dir() and int(d.name) > 1]
    log = cyc / "undo.log"
    data = bytearray(log.read_bytes())
    data[12] ^= 0x55                      # inside the first record's payload
    log.write_bytes(bytes(data))
    snapshot = save(dst, work_dir / "before-recover")
    p = run("recover", str(dst), check=False)
    assert p.returncode == 16, p.stderr
    assert "checksum" in p.stderr and "not used" in p.stderr
    assert equal(snapshot, dst), "a corrupt history was partly applied"


def test_restore_first_cycle_after_several_and_prune(work_dir: Path):
    rnd = random.Random(9)
    src, dst = work_dir / "src", work_dir / "dst"
    build(src, rnd)
    states = []
    for n in range(1, 5):
        if n > 1:
            churn(src, rnd, n)
        run("replicate", str(src), str(dst))
        states.append(save(src, work_dir / f"state{n}"))
    for n in (1, 3):
        out = work_dir / f"restored{n}"
        run("restore", str(dst), "--cycle", str(n), "--to", str(out))
        assert equal(states[n - 1], out), f"restore of cycle {n} differs from the source as it was"
        assert helpers.python_tree_diff(states[n - 1], out) == []
    # a single subtree
    out = work_dir / "one"
    run("restore", str(dst), "--cycle", "1", "--to", str(out), "--path", "many2")
    assert helpers.tree_equal(states[0] / "many2", out / "many2") == []
    assert sorted(os.listdir(out)) == ["many2"]
    # the replica itself was not touched by restores
    assert equal(src, dst)
    h = json.loads(run("history", "--json", str(dst)).stdout.strip().splitlines()[-1])
    assert [c["cycle"] for c in h["cycles"]] == [1, 2, 3, 4]
    assert all(c["restorable"] for c in h["cycles"])
    # retention: keep the last 2 recovery points; cycle 1 and 2 can no longer be restored, 3 can
    run("prune", str(dst), "--keep-last", "2")
    p = run("restore", str(dst), "--cycle", "1", "--to", str(work_dir / "gone"), check=False)
    assert p.returncode == 3 and "pruned" in p.stderr
    run("restore", str(dst), "--cycle", "3", "--to", str(work_dir / "again3"))
    assert equal(states[2], work_dir / "again3")


def test_moved_into_new_dir_then_rewritten_rolls_back(work_dir: Path):
    """An old file moved into a directory the cycle creates, then given new content: every
    crash point must still roll back to the old file at its old path (regression)."""
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "a").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"old content " * 100)
    (src / "a" / "big").write_bytes(os.urandom(3 << 20))
    run("replicate", str(src), str(dst))
    before = save(src, work_dir / "c1")
    (src / "new").mkdir()
    os.rename(src / "a" / "f", src / "new" / "f")
    with open(src / "new" / "f", "r+b") as f:     # same inode, new bytes
        f.write(b"NEW")
    os.rename(src / "a" / "big", src / "new" / "big")
    with open(src / "new" / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed")
    for k in crash_at_each_barrier(src, dst, 40):
        run("recover", str(dst))
        assert equal(before, dst), f"crash at barrier {k}"
    assert equal(src, dst)
    run("restore", str(dst), "--cycle", "1", "--to", str(work_dir / "r1"))
    assert equal(before, work_dir / "r1")


def test_crash_during_first_copy_empties_dest(work_dir: Path):
    """A first copy into an empty DEST writes files in place under one "fresh" undo record: a crash
    at any of its barriers, then recover, leaves DEST empty again (its own mode as before)."""
    rnd = random.Random(9)
    src, dst = work_dir / "src", work_dir / "dst"
    build(src, rnd)
    dst.mkdir()
    os.chmod(dst, 0o750)
    kills = 0
    for k in crash_at_each_barrier(src, dst, 40):
        kills += 1
        if k == 2:  # past the "fresh" barrier: files had been written in place
            assert len(os.listdir(dst)) > 5
        recover_rolls_back(dst)
        assert sorted(os.listdir(dst)) == [".discrep"], f"crash at barrier {k}: DEST not emptied"
        assert os.stat(dst).st_mode & 0o7777 == 0o750, f"crash at barrier {k}: DEST's mode not restored"
    assert kills >= 2
    assert equal(src, dst)

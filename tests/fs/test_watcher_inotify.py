"""The live journal with the inotify backend: storms, races, overflow, SIGKILL, rename cost.

Each scenario: initial replicate (scan), start ``discrep watch --backend B`` as a
subprocess, a replicate that closes the watcher's start gap (scan), then the
changes, a sync point (a marker file whose journal entry proves every earlier
event is journaled), a replicate cycle and the independent rsync check
(``helpers.tree_equal``).  The scenario functions are shared with the fanotify
tests in tests/root/test_watcher_fanotify.py (which load this file by path).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from discrep.journal.store import Journal
from discrep.run.local import replicate_local
from discrep.run.options import CycleOptions
from discrep.source.build import watcher_alive

REPO = Path(__file__).resolve().parents[2]
DISCREP = str(REPO / ".venv" / "bin" / "discrep")
MARK = b"zz-sync-marker"


# --------------------------------------------------------------------------- plumbing

def start_watcher(root: Path, backend: str, catch_up: bool = False) -> subprocess.Popen:
    """``discrep watch``; without ``catch_up`` (``--no-catch-up``) its gaps stay open until a cycle scans."""
    exe = DISCREP if os.path.exists(DISCREP) else None
    opts = ["--backend", backend] + ([] if catch_up else ["--no-catch-up"])
    cmd = [exe, "watch", *opts, str(root)] if exe else [sys.executable, "-m", "discrep", "watch", *opts, str(root)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    sd = str(root / ".discrep")
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"watcher exited {p.returncode}: {p.stderr.read().decode(errors='replace')}")
        if watcher_alive(os.fsencode(str(root))) and os.path.exists(os.path.join(sd, "journal.db")):
            j = Journal(sd)
            try:
                if j.get("watcher_pid") == str(p.pid) and j.get("watcher_backend") == backend:
                    return p
            finally:
                j.close()
        time.sleep(0.05)
    stop_watcher(p)
    raise AssertionError("watcher did not start in 20 s")


def stop_watcher(p: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
    if p.stderr:
        p.stderr.close()
    return p.returncode


def sync_point(root: Path, timeout: float = 15.0) -> None:
    """Return once everything changed before this call is journaled (events are read in order)."""
    sd = str(root / ".discrep")
    j = Journal(sd)
    try:
        before = j.last_seq()
        with open(os.path.join(os.fsencode(str(root)), MARK), "ab") as f:
            f.write(b"x")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.path == MARK for e in j.entries(before)):
                return
            time.sleep(0.02)
    finally:
        j.close()
    raise AssertionError("the watcher did not journal the sync marker")


def replicate(src: Path, dst: Path) -> dict:
    return replicate_local(CycleOptions(str(src), str(dst)))


def assert_same(src: Path, dst: Path, inplace=()) -> None:
    """rsync finds no difference at all.  (``inplace`` -- directories holding a file rewritten in
    place -- is kept only as documentation of the case: their mtimes must match too.)"""
    diff = helpers.tree_equal(src, dst)
    assert diff == [], diff[:20]


def fill(root: Path, ndirs: int = 5, nfiles: int = 10) -> None:
    rng = random.Random(7)
    for d in range(ndirs):
        (root / f"d{d}" / "sub").mkdir(parents=True, exist_ok=True)
        for i in range(nfiles):
            (root / f"d{d}" / f"f{i}").write_bytes(rng.randbytes(rng.randint(0, 9000)))
        (root / f"d{d}" / "sub" / "deep").write_bytes(b"deep %d" % d)
    with open(os.path.join(os.fsencode(str(root)), b"latin-\xe9"), "wb") as f:
        f.write(b"non-utf8 name")


def prepared(work_dir: Path, backend: str, *, big: int = 0):
    """src filled + replicated, watcher running, start gap closed; returns (src, dst, proc)."""
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    fill(src)
    if big:
        (src / "bigdir").mkdir()
        with open(src / "bigdir" / "big.bin", "wb") as f:
            f.write(os.urandom(1 << 20) * (big >> 20))
    r = replicate(src, dst)
    assert r["change_source"] == "scan"
    p = start_watcher(src, backend)
    try:
        r = replicate(src, dst)                  # closes the watcher's start gap
        assert r["change_source"] == "scan"
        sync_point(src)
    except BaseException:
        stop_watcher(p, signal.SIGKILL)
        raise
    return src, dst, p


# --------------------------------------------------------------------------- scenarios

def scenario_rename_storm(work_dir: Path, backend: str) -> None:
    src, dst, p = prepared(work_dir, backend)
    try:
        rng = random.Random(3)
        for k in range(100):                       # swaps a <-> b via tmp
            d = src / f"d{k % 5}"
            a, b = f"f{rng.randrange(10)}", f"f{rng.randrange(10)}"
            if a == b:
                continue
            os.rename(d / a, d / "tmp")
            os.rename(d / b, d / a)
            os.rename(d / "tmp", d / b)
        for k in range(50):                        # chains f9 -> c1 -> c2 -> c3, across dirs
            os.rename(src / "d0" / "f9", src / "d1" / "c1")
            os.rename(src / "d1" / "c1", src / "d2" / "c2")
            os.rename(src / "d2" / "c2", src / "d0" / "f9")
        for k in range(30):                        # directory swaps, with a change inside
            os.rename(src / "d3", src / "dtmp")
            os.rename(src / "d4", src / "d3")
            os.rename(src / "dtmp", src / "d4")
            (src / "d4" / "sub" / "deep").write_bytes(b"changed %d" % k)
        os.rename(src / "d1", src / "d2" / "sub" / "nested")   # a directory moved deeper
        (src / "d2" / "sub" / "nested" / "f0").write_bytes(b"after the move")
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert_same(src, dst, inplace=("d3/sub", "d4/sub", "d2/sub/nested"))
    finally:
        stop_watcher(p)


def scenario_create_delete_and_dir_rename(work_dir: Path, backend: str) -> None:
    src, dst, p = prepared(work_dir, backend)
    try:
        for i in range(50):                        # created and deleted inside one interval
            (src / f"tmp{i}").write_bytes(b"short-lived")
            os.unlink(src / f"tmp{i}")
        (src / "gone" / "x").mkdir(parents=True)
        (src / "gone" / "x" / "y").write_bytes(b"y")
        os.unlink(src / "gone" / "x" / "y")
        os.rmdir(src / "gone" / "x")
        os.rmdir(src / "gone")
        os.rename(src / "d0", src / "d0-renamed")  # renamed, then changed inside
        (src / "d0-renamed" / "f1").write_bytes(b"new content")
        (src / "d0-renamed" / "newfile").write_bytes(b"new file")
        os.unlink(src / "d0-renamed" / "f2")
        os.chmod(src / "d0-renamed" / "f3", 0o600)
        (src / "fresh" / "a" / "b").mkdir(parents=True)         # created, filled, renamed at once
        for i in range(20):
            (src / "fresh" / "a" / "b" / f"n{i}").write_bytes(b"%d" % i)
        os.rename(src / "fresh" / "a", src / "fresh" / "a2")
        (src / "fresh" / "a2" / "b" / "late").write_bytes(b"late")
        os.rename(src / "d1" / "f0", src / "d1" / "f1")          # rename over an existing file
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert_same(src, dst, inplace=("d0-renamed",))
        os.rename(src / "d2", src / "d2b")                      # and once more, next cycle
        (src / "d2b" / "sub" / "deep").write_bytes(b"x" * 5000)
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert_same(src, dst, inplace=("d0-renamed", "d2b/sub"))
    finally:
        stop_watcher(p)


def scenario_overflow(work_dir: Path, backend: str, n: int = 20000, restore=None) -> None:
    src, dst, p = prepared(work_dir, backend)
    if restore is not None:      # the running watcher keeps its small queue; later ones get the default
        with open(restore[0], "w") as f:
            f.write(str(restore[1]))
    try:
        os.kill(p.pid, signal.SIGSTOP)             # the queue fills up while nobody reads it
        try:
            for i in range(n):                     # an existing (watched) directory
                (src / "d4" / f"burst{i}").write_bytes(b"")
        finally:
            os.kill(p.pid, signal.SIGCONT)
        os.unlink(src / "d0" / "f0")
        sync_point(src, timeout=30)
        j = Journal(str(src / ".discrep"))
        try:
            assert j.gap() is not None and "overflow" in j.gap()
        finally:
            j.close()
        r = replicate(src, dst)
        assert r["change_source"] == "scan"
        assert_same(src, dst)
        (src / "d1" / "f1").write_bytes(b"after the overflow")
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert_same(src, dst, inplace=("d1",))
    finally:
        stop_watcher(p)


def scenario_sigkill_restart(work_dir: Path, backend: str) -> None:
    src, dst, p = prepared(work_dir, backend)
    try:
        for i in range(30):
            (src / "d0" / f"before{i}").write_bytes(b"before kill")
        sync_point(src)
        j = Journal(str(src / ".discrep"))
        seen = j.last_seq()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        # what was journaled survives the kill
        assert sum(1 for e in j.entries(0) if e.path.startswith(b"d0/before")) >= 30
        assert j.last_seq() == seen
        for i in range(30):                        # changes while no watcher runs
            (src / "d1" / f"unwatched{i}").write_bytes(b"nobody saw this")
        os.rename(src / "d2", src / "d2-while-down")
        p = start_watcher(src, backend)
        assert j.gap() is not None                 # start always opens a gap
        j.close()
        (src / "d3" / "while-up").write_bytes(b"seen")
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "scan"
        assert_same(src, dst)
        os.rename(src / "d3", src / "d3-up")
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert_same(src, dst)
    finally:
        stop_watcher(p)


def scenario_rename_costs_nothing(work_dir: Path, backend: str) -> None:
    size = 64 << 20
    src, dst, p = prepared(work_dir, backend, big=size)
    try:
        os.rename(src / "bigdir", src / "bigdir-renamed")
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert r["bytes_transferred"] < size // 100, r
        assert_same(src, dst)
        os.rename(src / "bigdir-renamed" / "big.bin", src / "d0" / "big-moved.bin")   # a file, across dirs
        sync_point(src)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert r["bytes_transferred"] < size // 100, r
        assert_same(src, dst)
    finally:
        stop_watcher(p)


# --------------------------------------------------------------------------- tests (inotify)

def test_batch_dedupe_unit():
    from discrep.journal.sink import Batch
    b = Batch()
    for _ in range(1000):
        b.touch("modify", b"a/f")
    b.touch("meta", b"a/f")
    b.touch("create", b"n")
    b.touch("modify", b"n")
    b.touch("delete", b"n")
    b.touch("create", b"n")
    b.touch("modify", b".discrep/journal.db")
    b.rename(b"a/f", b"a/g")
    b.touch("modify", b"a/f")
    assert list(b.rows()) == [("modify", b"a/f", None, None), ("delete", b"n", None, None),
                              ("create", b"n", None, None), ("rename", b"a/g", b"a/f", None),
                              ("modify", b"a/f", None, None)]
    assert len(b) == 5


def test_inotify_rename_storm(work_dir):
    scenario_rename_storm(work_dir, "inotify")


def test_inotify_create_delete_and_dir_rename(work_dir):
    scenario_create_delete_and_dir_rename(work_dir, "inotify")


def test_inotify_sigkill_restart(work_dir):
    scenario_sigkill_restart(work_dir, "inotify")


def test_inotify_rename_costs_nothing(work_dir):
    scenario_rename_costs_nothing(work_dir, "inotify")


def test_inotify_overflow_opens_gap(work_dir):
    knob = "/proc/sys/fs/inotify/max_queued_events"
    with open(knob) as f:
        limit = int(f.read())
    small = os.access(knob, os.W_OK)
    if small:            # only new inotify instances see the new limit: set it before the watcher starts
        with open(knob, "w") as f:
            f.write("256")
    elif limit > 100_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events needed")
    try:
        scenario_overflow(work_dir, "inotify", n=700 if small else limit + 2000, restore=(knob, limit) if small else None)
    finally:
        if small:
            with open(knob, "w") as f:
                f.write(str(limit))


def test_status_reports_backend(work_dir):
    from discrep.run.status import source_status
    src = work_dir / "src"
    src.mkdir()
    p = start_watcher(src, "inotify")
    try:
        st = source_status(str(src))
        assert st["watcher"] == "running" and st["backend"] == "inotify" and st["watcher_pid"] == p.pid
        assert st["gap"] is not None and st["next_change_source"] == "scan"
        out = subprocess.run([DISCREP, "status", "--json", str(src)], stdout=subprocess.PIPE, timeout=30)
        import json
        assert json.loads(out.stdout.splitlines()[-1])["source"]["backend"] == "inotify"
    finally:
        assert stop_watcher(p) == 0
    assert source_status(str(src))["watcher"] == "stopped"


# --------------------------------------------------------------------------- the cycle's barrier

def scenario_change_right_before_cycle(work_dir: Path, backend: str) -> None:
    """A change made immediately before ``replicate`` is in that cycle: the cycle makes the watcher
    commit what it has seen (barrier on ROOT/.discrep) before it reads its journal cut."""
    src, dst, p = prepared(work_dir, backend)
    try:
        for i in range(5):
            with open(src / "d1" / "f3", "ab") as f:
                f.write(b"no pause before the cycle %d\n" % i)
            r = replicate(src, dst)            # no sleep, no sync point
            assert r["change_source"] == "journal"
            assert_same(src, dst)
    finally:
        stop_watcher(p)


def scenario_stalled_watcher_only_delays(work_dir: Path, backend: str) -> None:
    """A watcher that cannot answer (stopped) makes the cycle wait a bounded time and go on; the
    change it had not written yet comes in the next cycle: later, never lost."""
    src, dst, p = prepared(work_dir, backend)
    try:
        os.kill(p.pid, signal.SIGSTOP)
        (src / "d2" / "late").write_bytes(b"written while the watcher was stopped")
        t = time.monotonic()
        replicate(src, dst)
        assert time.monotonic() - t < 30
        os.kill(p.pid, signal.SIGCONT)
        r = replicate(src, dst)
        assert r["change_source"] == "journal"
        assert_same(src, dst)
    finally:
        os.kill(p.pid, signal.SIGCONT)
        stop_watcher(p)


def test_inotify_change_right_before_cycle(work_dir):
    scenario_change_right_before_cycle(work_dir, "inotify")


def test_inotify_stalled_watcher_only_delays(work_dir):
    scenario_stalled_watcher_only_delays(work_dir, "inotify")


# --------------------------------------------------------------------------- the watcher's own catch-up

def wait_caught_up(root: Path, p: subprocess.Popen, timeout: float = 60.0) -> dict:
    """``discrep status --json`` until it says the watcher is caught up (its start gap closed)."""
    import json
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, p.stderr.read().decode(errors="replace")
        out = subprocess.run([DISCREP, "status", "--json", str(root)], stdout=subprocess.PIPE, timeout=30)
        st = json.loads(out.stdout.splitlines()[-1])["source"]
        if st["caught_up"]:
            return st
        time.sleep(0.1)
    raise AssertionError("the watcher did not catch up")


@pytest.mark.parametrize("seed,replicas", [(1, 1), (2, 1), (3, 2), (4, 2)])
def test_watcher_closes_its_start_gap(work_dir, seed, replicas):
    """Changes made while no watcher ran (writes, deletes, renames of files and directories, a new
    subtree) are found by the watcher's own background scan, once per replica position: once status
    says caught up, the very first cycle of every replica reads the journal -- it does not walk --
    and every replica is identical; and so is the next one after more changes.  With two replicas
    at different cycles, each position's catch-up is against its own catalog, and each build keeps
    its own scan block while it drops the other's."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("jc", Path(__file__).with_name("test_journal_cycles.py"))
    jc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jc)
    src = work_dir / "src"
    dsts = [work_dir / f"dst{i}" for i in range(replicas)]
    src.mkdir()
    fill(src)
    rng = random.Random(seed)
    for i, dst in enumerate(dsts):
        assert replicate(src, dst)["change_source"] == "scan"
        jc._random_ops(src, rng, 15, 10 + i)           # the replicas stand at different states
    p = start_watcher(src, "inotify", catch_up=True)
    try:
        st = wait_caught_up(src, p)
        assert st["gap"] is None and st["next_change_source"] == "journal"
        for rnd in (1, 2):
            jc._random_ops(src, rng, 10 * rnd, rnd)    # these the watcher sees
            sync_point(src)
            for dst in dsts:
                r = replicate(src, dst)
                assert r["change_source"] == "journal", r
                assert_same(src, dst)
    finally:
        assert stop_watcher(p) == 0


def test_watch_without_catch_up_leaves_the_gap(work_dir):
    """``--no-catch-up``: the start gap stays open, status says so, and the next cycle scans."""
    from discrep.run.status import source_status
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    fill(src)
    replicate(src, dst)
    p = start_watcher(src, "inotify")
    try:
        time.sleep(1.5)                                # several catch-up rounds, had there been any
        st = source_status(str(src))
        assert st["watcher"] == "running" and not st["caught_up"] and st["next_change_source"] == "scan"
        assert replicate(src, dst)["change_source"] == "scan"
    finally:
        stop_watcher(p)

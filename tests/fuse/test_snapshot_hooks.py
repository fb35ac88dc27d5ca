"""Application-consistent recovery points: pre_snapshot / post_snapshot hooks (tier: fuse).

A writer process keeps a two-file invariant (``a.txt`` and ``b.txt`` hold the same counter, written
one after the other with a pause between) and appends every counter to ``log.txt``; on SIGUSR1 it
finishes its transaction, records the counter it stopped at and waits for SIGUSR2.  With the hooks
pausing and resuming it, every recovery point must hold exactly the state it stopped at.  Then: a
failing hook, a hook that hangs past its timeout (its whole process group killed), the
crash-consistent fallback and its mark, and hooks configured on the source in
``SRC/.discrep/hooks.toml``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse

DISCREP = [sys.executable, "-m", "discrep"]

WRITER = r"""
import os, signal, sys, time
src, ack = sys.argv[1], sys.argv[2]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
pause = []
signal.signal(signal.SIGUSR1, lambda *_: pause.append(1))
def put(name, text):
    with open(os.path.join(src, name), "r+" if os.path.exists(os.path.join(src, name)) else "w") as f:
        f.write(text)
        f.truncate()
n = 0
while True:
    n += 1
    put("a.txt", "%08d" % n)
    time.sleep(0.02)                     # a transaction in flight: a.txt is ahead of b.txt
    put("b.txt", "%08d" % n)
    with open(os.path.join(src, "log.txt"), "a") as f:
        f.write("%d\n" % n)
    if pause:
        with open(ack + ".tmp", "w") as f:
            f.write(str(n))
        os.rename(ack + ".tmp", ack)
        signal.sigwait({signal.SIGUSR2})
        pause.clear()
    time.sleep(0.005)
"""


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)


def history(dst: Path) -> list:
    p = run("history", "--json", str(dst))
    return json.loads(p.stdout.strip().splitlines()[-1])["cycles"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hooks_quiesce_a_writer(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    ack, points = work_dir / "ack", work_dir / "points"
    script = work_dir / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(src), str(ack)])
    try:
        while not (src / "log.txt").exists():
            time.sleep(0.01)
        pre = f"kill -USR1 {writer.pid}; while [ ! -s {ack} ]; do sleep 0.01; done"
        post = f"cat {ack} >> {points}; echo >> {points}; rm -f {ack}; kill -USR2 {writer.pid}"
        for cycle in range(1, 4):
            time.sleep(0.3)
            p = run("replicate", "--json", "--pre-snapshot", pre, "--post-snapshot", post, str(src), str(dst))
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout.strip().splitlines()[-1])["consistency"] == "app"
            stopped = int(points.read_text().split()[-1])
            a, b = (dst / "a.txt").read_text(), (dst / "b.txt").read_text()
            assert a == b == "%08d" % stopped, f"cycle {cycle}: the point is not the state the writer stopped at"
            assert (dst / "log.txt").read_text().split() == [str(i) for i in range(1, stopped + 1)]
            assert writer.poll() is None and not ack.exists()      # released: post ran
        counts = [int(x) for x in points.read_text().split()]
        assert counts == sorted(set(counts)), "the writer did not go on between cycles"
    finally:
        writer.kill()
        writer.wait()
    assert [c["consistency"] for c in history(dst)] == ["app", "app", "app"]


def test_failing_and_hanging_hooks(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "f.txt").write_text("one")
    post_mark, pidf = work_dir / "post-ran", work_dir / "hook.pid"
    post = f"echo x >> {post_mark}"
    assert run("replicate", str(src), str(dst)).returncode == 0
    (src / "f.txt").write_text("two")

    # a failing pre hook: the cycle fails (exit 9), nothing changes, post still runs
    p = run("replicate", "--pre-snapshot", "echo not-ready >&2; exit 4", "--post-snapshot", post, str(src), str(dst))
    assert p.returncode == 9 and "pre_snapshot" in p.stderr and "not-ready" in p.stderr, p.stderr
    assert post_mark.read_text().count("x") == 1
    assert [c["cycle"] for c in history(dst)] == [1] and (dst / "f.txt").read_text() == "one"

    # a pre hook hanging past its timeout: killed with its whole process group; the cycle fails
    hang = f"sleep 300 & echo $! > {pidf}; wait"
    p = run("replicate", "--hook-timeout", "1", "--pre-snapshot", hang, "--post-snapshot", post, str(src), str(dst))
    assert p.returncode == 9 and "killed" in p.stderr, p.stderr
    pid = int(pidf.read_text())
    for _ in range(200):                   # the kill is sent; wait (bounded) for it to land
        if not alive(pid):
            break
        time.sleep(0.05)
    assert not alive(pid), "the hook's child outlived its timeout"
    assert post_mark.read_text().count("x") == 2
    assert [c["cycle"] for c in history(dst)] == [1]

    # the same with --hook-failure crash-consistent: the point is taken and marked
    p = run("replicate", "--json", "--hook-timeout", "1", "--hook-failure", "crash-consistent",
            "--pre-snapshot", hang, "--post-snapshot", post, str(src), str(dst))
    assert p.returncode == 1 and "crash-consistent" in p.stderr, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["consistency"] == "crash-fallback"
    assert post_mark.read_text().count("x") == 3
    assert [(c["cycle"], c["consistency"]) for c in history(dst)] == [(1, "crash"), (2, "crash-fallback")]
    assert (dst / "f.txt").read_text() == "two"
    found = json.loads(run("find", "--json", str(dst), "f.txt").stdout.strip().splitlines()[-1])
    assert [(v["cycle"], v["consistency"]) for v in found["versions"]] == [(1, "crash"), (2, "crash-fallback")]
    st = json.loads(run("status", "--json", str(dst)).stdout.strip().splitlines()[-1])
    assert st["replica"]["last_consistency"] == "crash-fallback" and st["replica"]["last_app_consistent_cycle"] is None


def test_hooks_configured_on_the_source(work_dir: Path):
    """Without hooks on the command line, SRC/.discrep/hooks.toml applies (the only hooks a remote
    agent runs); a hooks file others could write is refused."""
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "f.txt").write_text("one")
    assert run("replicate", str(src), str(dst)).returncode == 0
    marks = work_dir / "marks"
    hooks = src / ".discrep" / "hooks.toml"
    hooks.write_text(f'pre_snapshot = "echo pre >> {marks}"\npost_snapshot = "echo post >> {marks}"\ntimeout = 30\n')
    hooks.chmod(0o600)
    (src / "f.txt").write_text("two")
    p = run("replicate", str(src), str(dst))
    assert p.returncode == 0, p.stderr
    assert marks.read_text().split() == ["pre", "post"]
    assert [c["consistency"] for c in history(dst)] == ["crash", "app"]
    hooks.chmod(0o666)
    p = run("replicate", str(src), str(dst))
    assert p.returncode == 4 and "writable by no one else" in p.stderr, p.stderr
    assert marks.read_text().split() == ["pre", "post"]

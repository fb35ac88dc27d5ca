"""Network faults between replica and source: a TCP forwarder (tests/netfault.py) in front of the
test sshd drops or stalls the link at chosen moments.  After each: the documented exit code, DEST
exactly its last committed cycle (independent check), no mount or temp directory left, and the
next run completes."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, client_env, discrep_cmd, mounts_under

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netfault import Forwarder  # noqa: E402

pytestmark = [pytest.mark.ssh, pytest.mark.fuse]


def _config_through(sshd: Sshd, fwd: Forwarder, work_dir: Path) -> Path:
    typ, b64 = Path(str(sshd.host_key) + ".pub").read_text().split()[:2]
    kh = work_dir / "known_hosts_fwd"
    kh.write_text(f"[127.0.0.1]:{fwd.port} {typ} {b64}\n")
    cfg = work_dir / "ssh_config_fwd"
    cfg.write_text(f"Host {ALIAS}\n  HostName 127.0.0.1\n  Port {fwd.port}\n  User root\n"
                   f"  IdentityFile {sshd.user_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n"
                   f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
    return cfg


def _replicate(cfg: Path, sshd: Sshd, src: Path, dst: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(discrep_cmd("replicate", "--json", "-F", str(cfg), "--remote-discrep", REMOTE_DISCREP,
                                        *extra, f"{ALIAS}:{src}", str(dst)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(sshd))


def _leftovers(sshd: Sshd) -> list:
    deadline = time.monotonic() + 30
    while True:
        left = mounts_under(sshd.local_tmp) + mounts_under(sshd.remote_tmp)
        left += [str(p) for p in sshd.local_tmp.iterdir()] + [str(p) for p in sshd.remote_tmp.iterdir()]
        left += [str(p) for p in sshd.base.glob("**/.discrep/export.*")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_link_dropped_during_an_incremental(sshd: Sshd, work_dir: Path) -> None:
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    rng = random.Random(5)
    src, dst, before = work_dir / "src", work_dir / "dst", work_dir / "before"
    src.mkdir()
    (src / "img").write_bytes(rng.randbytes(48 << 20))
    (src / "note").write_bytes(b"v1\n")
    fwd = Forwarder(sshd.port)
    try:
        cfg = _config_through(sshd, fwd, work_dir)
        p = _replicate(cfg, sshd, src, dst)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        helpers.run(["cp", "-a", str(src), str(before)])
        with open(src / "img", "r+b") as f:          # many scattered changes: a long incremental
            for i in range(0, 48 << 20, 64 << 10):
                f.seek(i)
                f.write(rng.randbytes(4096))
        (src / "note").write_bytes(b"v2\n")
        fwd.trickle(2 << 20)
        fwd.reset_counts()
        p = _replicate(cfg, sshd, src, dst)
        deadline = time.monotonic() + 120
        while fwd.bytes_down < (1 << 20) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        fwd.drop()
        out, err = p.communicate(timeout=120)
        assert p.returncode == 11, f"exit {p.returncode}: {err}"
        assert helpers.tree_equal(before, dst) == [], "DEST is not its last committed cycle"
        assert _leftovers(sshd) == []
        fwd.trickle(None)
        p = _replicate(cfg, sshd, src, dst)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert helpers.tree_equal(src, dst) == []
    finally:
        fwd.close()


def test_link_stalled_during_a_first_copy(sshd: Sshd, work_dir: Path) -> None:
    """Issue 14 item 3: a stalled network fails the cycle with exit 11 within --timeout and a
    margin (not after an hour), on both hosts: no agent, mount or export dir is left behind."""
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    rng = random.Random(7)
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "img").write_bytes(rng.randbytes(32 << 20))
    for i in range(50):
        (src / f"f{i}").write_bytes(rng.randbytes(3000))
    fwd = Forwarder(sshd.port)
    timeout = 8
    try:
        cfg = _config_through(sshd, fwd, work_dir)
        fwd.trickle(2 << 20)
        p = _replicate(cfg, sshd, src, dst, "--timeout", str(timeout))
        deadline = time.monotonic() + 120
        while fwd.bytes_down < (2 << 20) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        fwd.stall()
        t = time.monotonic()
        try:
            out, err = p.communicate(timeout=timeout * 3 + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            pytest.fail(f"the cycle still ran {timeout * 3 + 30}s after the network stalled")
        took = time.monotonic() - t
        assert p.returncode == 11, f"exit {p.returncode}: {err}"
        assert took < timeout * 3 + 30, took
        assert sorted(x.name for x in dst.iterdir()) in ([], [".discrep"]), "DEST is not its last committed cycle"
        fwd.resume()
        fwd.trickle(None)
        assert _leftovers(sshd) == []
        assert _agents_of(src) == []
        p = _replicate(cfg, sshd, src, dst)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert helpers.tree_equal(src, dst) == []
    finally:
        fwd.close()


def _agents_of(src: Path) -> list:
    """``discrep agent`` processes serving ``src`` (waits up to 30 s for them to end)."""
    deadline = time.monotonic() + 30
    while True:
        found = []
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"agent" in cmd and str(src).encode() in cmd:
                found.append(int(d.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_agent_ends_when_its_export_is_busy(sshd: Sshd, work_dir: Path) -> None:
    """Issue 14 item 4: the replica disconnects while a process on the source holds a file open on
    the export: the agent still ends within a bounded time, leaving no mount, export dir or child."""
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    rng = random.Random(9)
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "img").write_bytes(rng.randbytes(24 << 20))
    fwd = Forwarder(sshd.port)
    held = -1
    try:
        cfg = _config_through(sshd, fwd, work_dir)
        p = _replicate(cfg, sshd, src, dst)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        with open(src / "img", "r+b") as f:
            for i in range(0, 24 << 20, 64 << 10):
                f.seek(i)
                f.write(rng.randbytes(4096))
        fwd.trickle(1 << 20)
        p = _replicate(cfg, sshd, src, dst)
        deadline = time.monotonic() + 120
        mnts: list = []
        while not mnts and p.poll() is None and time.monotonic() < deadline:
            mnts = [m for m in mounts_under(src / ".discrep")]
            time.sleep(0.05)
        assert mnts, "the export never appeared"
        held = os.open(mnts[0], os.O_RDONLY | os.O_DIRECTORY)   # the export is busy now
        fwd.drop()
        p.communicate(timeout=120)
        assert p.returncode == 11
        t = time.monotonic()
        assert _agents_of(src) == [], "the agent did not end"
        assert mounts_under(src / ".discrep") == []
        assert list((src / ".discrep").glob("export.*")) == []
        assert time.monotonic() - t < 30
    finally:
        if held >= 0:
            os.close(held)
        fwd.close()

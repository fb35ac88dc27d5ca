"""discrep replicate HOST:PATH DEST against a real sshd started by the test (127.0.0.1 / netns)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, client_env, discrep_cmd, mounts_under, replicate

pytestmark = pytest.mark.ssh


def _need_fuse() -> None:
    helpers.require_fuse()
    helpers.require_tool("sshfs")


def _ok(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _remote_exports(sshd: Sshd) -> list:
    """Export mountpoints / temp dirs the source made in its SRC/.discrep (export.XXXXXXXX)."""
    found = [m for m in mounts_under(sshd.base) if "/.discrep/export." in m]
    found += [str(p) for p in sshd.base.glob("**/.discrep/export.*")]
    return found


def _no_leftovers(sshd: Sshd) -> None:
    """No sshfs mount, no export mount, no temp dir left (the remote side cleans up on EOF; after a
    dropped connection a busy export unmount can take the agent's 10 s join timeout, then a kill)."""
    deadline = time.monotonic() + 30
    while True:
        left = mounts_under(sshd.local_tmp) + mounts_under(sshd.remote_tmp) + _remote_exports(sshd)
        left += [str(p) for p in sshd.local_tmp.iterdir()] + [str(p) for p in sshd.remote_tmp.iterdir()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"left behind: {left}"


def _churn(src: Path) -> None:
    big = src / helpers.SAMPLE_BIG
    with open(big, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X" * 5000)
    (src / "dir_a/small1.txt").write_bytes(b"changed\n")
    (src / "new_file.txt").write_bytes(b"new\n" * 100)
    os.unlink(src / "top.txt")
    os.rename(src / "dir_a/dir_b", src / "dir_b_moved")
    os.chmod(src / helpers.SAMPLE_MODE_640, 0o600)


@pytest.mark.parametrize("transport", ["sshfs", "sftp"])
def test_replicate_two_cycles(sshd: Sshd, work_dir: Path, transport: str) -> None:
    if transport == "sshfs":
        _need_fuse()
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    res = _ok(replicate(sshd, str(src), str(dst), "--transport", transport))
    assert res["transport"] == transport and res["cycle"] == 1
    for key in ("base", "files_changed", "bytes_transferred", "bytes_written", "duration_s", "snapshot"):
        assert key in res
    assert helpers.tree_equal(src, dst) == []
    _churn(src)
    res = _ok(replicate(sshd, str(src), str(dst), "--transport", transport))
    assert res["cycle"] == 2 and res["base"] == 1
    assert res["bytes_transferred"] < 1 << 20, res  # a 5000-byte change in a 3 MiB file: blocks, not the file
    assert helpers.tree_equal(src, dst) == []
    _no_leftovers(sshd)


def test_wrong_host_key(sshd: Sshd, work_dir: Path) -> None:
    other = work_dir / "other_key"
    helpers.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)])
    typ, b64 = (work_dir / "other_key.pub").read_text().split()[:2]
    sshd.known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {typ} {b64}\n")
    src = work_dir / "src"
    (src / "d").mkdir(parents=True)
    r = replicate(sshd, str(src), str(work_dir / "dst"))
    assert r.returncode == 12, r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert "CHANGED" in msg and "ssh-keygen -R" in msg and f"ssh -F {sshd.client_config} {ALIAS}" in msg
    # unknown key (empty known_hosts): refused too, with what to do
    sshd.known_hosts.write_text("")
    r = replicate(sshd, str(src), str(work_dir / "dst"))
    assert r.returncode == 12, r.stderr
    assert "unknown" in r.stderr and "known_hosts" in r.stderr and "connect once" in r.stderr
    # StrictHostKeyChecking accept-new records the key and goes on
    cfg = sshd.client_config.read_text().replace("StrictHostKeyChecking yes", "StrictHostKeyChecking accept-new")
    sshd.client_config.write_text(cfg)
    r = replicate(sshd, str(src), str(work_dir / "dst"), "--transport", "sftp")
    assert r.returncode == 0, r.stderr
    assert f"[127.0.0.1]:{sshd.port}" in sshd.known_hosts.read_text()
    _no_leftovers(sshd)


def test_missing_remote_discrep(sshd: Sshd, work_dir: Path) -> None:
    src = work_dir / "src"
    src.mkdir()
    r = subprocess.run([REMOTE_DISCREP, "replicate", "-F", str(sshd.client_config), "--remote-discrep",
                        "/nonexistent/bin/discrep", f"{ALIAS}:{src}", str(work_dir / "dst")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                       env=client_env(sshd))
    assert r.returncode == 11, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "install discrep" in lines[0] and "--remote-discrep" in lines[0]
    _no_leftovers(sshd)


def _export_mounted(sshd: Sshd) -> bool:
    return any(re.search(r"/m\d+$", m) for m in mounts_under(sshd.base) if "/.discrep/export." in m)


@pytest.mark.parametrize("transport", ["sshfs"])
def test_sshd_killed_mid_cycle(sshd: Sshd, work_dir: Path, transport: str) -> None:
    _need_fuse()
    src, dst, before = work_dir / "src", work_dir / "dst", work_dir / "before"
    helpers.make_sample_tree(src)
    _ok(replicate(sshd, str(src), str(dst), "--transport", transport))
    helpers.run(["cp", "-a", str(src), str(before)])
    with open(src / "huge.bin", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(200):
            f.write(block)
    (src / "top.txt").write_bytes(b"changed in the interrupted cycle\n")
    p = subprocess.Popen([REMOTE_DISCREP, "replicate", "-F", str(sshd.client_config), "--remote-discrep",
                          REMOTE_DISCREP, "--transport", transport, f"{ALIAS}:{src}", str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(sshd))
    try:
        deadline = time.monotonic() + 60
        while not _export_mounted(sshd):
            assert p.poll() is None, f"replicate ended before the export mounted: {p.communicate()}"
            assert time.monotonic() < deadline, "the export never mounted"
            time.sleep(0.005)
        sshd.kill_all()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0, err
    assert p.returncode in (11, 12), err
    assert "lost" in err or "went away" in err or "connection" in err.lower(), err
    # the replica is still exactly its last committed cycle
    diff = helpers.tree_equal(before, dst)
    assert diff == [], f"replica is not at its last committed cycle (half-applied?): {diff}"
    _no_leftovers(sshd)
    sshd.stop()
    sshd.start()
    res = _ok(replicate(sshd, str(src), str(dst), "--transport", transport))
    assert res["cycle"] >= 2
    assert helpers.tree_equal(src, dst) == []
    _no_leftovers(sshd)


# --------------------------------------------------------------------------- network namespaces

_TAG = f"{os.getpid() % 100000}"
NS_A, NS_B = f"discrep-t{_TAG}-a", f"discrep-t{_TAG}-b"   # unique: concurrent sessions must not collide
VETH_A, VETH_B = f"dv{_TAG}a", f"dv{_TAG}b"
ADDR_A, ADDR_B = "10.231.0.1", "10.231.0.2"


def _ns_cleanup() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "delete", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.root
def test_replicate_between_network_namespaces(work_dir: Path) -> None:
    helpers.require_root()
    _need_fuse()
    for tool in ("ip", "unshare", "nsenter", "sshd"):
        helpers.require_tool(tool)
    _ns_cleanup()
    stage, src, dst = work_dir / "stage", work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(stage)
    src.mkdir()
    s = Sshd(work_dir, listen=ADDR_A, port=2222)
    try:
        helpers.run(["ip", "netns", "add", NS_A])
        helpers.run(["ip", "netns", "add", NS_B])
        helpers.run(["ip", "link", "add", VETH_A, "netns", NS_A, "type", "veth", "peer", "name", VETH_B,
                     "netns", NS_B])
        for ns, dev, addr in ((NS_A, VETH_A, ADDR_A), (NS_B, VETH_B, ADDR_B)):
            helpers.run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            helpers.run(["ip", "-n", ns, "link", "set", dev, "up"])
            helpers.run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # the source tree exists only on a tmpfs inside sshd's own mount namespace
        script = (f"mount -t tmpfs none {src} && cp -a {stage}/. {src}/ && exec {{sshd}}")
        s.start(["ip", "netns", "exec", NS_A, "unshare", "-m", "--propagation", "private", "sh", "-c", script],
                connect_via=["ip", "netns", "exec", NS_A])
        assert os.listdir(src) == [], "the source tmpfs must not be visible outside namespace A"
        spid = s.proc.pid  # ip netns exec, unshare and sh exec in place: this pid holds the mount ns
        assert spid is not None
        in_a = ["nsenter", "-t", str(spid), "-m", "--"]
        cmd = ["ip", "netns", "exec", NS_B, REMOTE_DISCREP, "replicate", "--json", "-F", str(s.client_config),
               "--remote-discrep", REMOTE_DISCREP, f"{ALIAS}:{src}", str(dst)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                           env=client_env(s))
        res = _ok(r)
        assert res["transport"] == "sshfs" and res["cycle"] == 1
        assert s.proc.poll() is None, f"sshd exited {s.proc.returncode}: {s.log.read_text()[-3000:]}"
        check = helpers.run(in_a + ["rsync", "-aHAXnci", "--delete", "--modify-window=-1", "--exclude=/.discrep/",
                                    f"{src}/", f"{dst}/"])
        assert check.stdout.strip() == ""
        helpers.run(in_a + ["sh", "-c", f"echo more >> {src}/dir_a/small1.txt && rm {src}/top.txt && touch {src}/dir_a/new"])
        res = _ok(subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                                 env=client_env(s)))
        assert res["cycle"] == 2
        check = helpers.run(in_a + ["rsync", "-aHAXnci", "--delete", "--modify-window=-1", "--exclude=/.discrep/",
                                    f"{src}/", f"{dst}/"])
        assert check.stdout.strip() == ""
    finally:
        s.stop()
        _ns_cleanup()


def test_parent_dir_mtime_kept(sshd: Sshd, work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    _ok(replicate(sshd, str(src), str(dst), "--transport", "sftp"))
    with open(src / "dir_a/small1.txt", "ab") as f:
        f.write(b"more\n")
    _ok(replicate(sshd, str(src), str(dst), "--transport", "sftp"))
    assert helpers.tree_equal(src, dst) == []


# --------------------------------------------------------------------------- continuous mode

def test_continuous_mode_keeps_one_session(sshd: Sshd, work_dir: Path) -> None:
    """``replicate --every`` over SSH: several cycles, ONE SSH login for control and sshfs (passive
    sshfs on a channel of the control connection), whatever the number of cycles; the replica
    converges and nothing is left behind."""
    _need_fuse()
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    # a first one-shot cycle makes SRC/.discrep: on a tree never replicated, the early sshfs mount of
    # SRC/.discrep may race the agent creating it and retry once (a third login by design)
    _ok(replicate(sshd, str(src), str(dst)))
    logins_before = sshd.log.read_text(errors="replace").count("Accepted publickey")
    p = subprocess.Popen([REMOTE_DISCREP, "replicate", "--every", "0.3", "-F", str(sshd.client_config),
                          "--remote-discrep", REMOTE_DISCREP, f"{ALIAS}:{src}", str(dst)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(sshd))
    try:
        def committed() -> int:
            try:
                h = subprocess.run([REMOTE_DISCREP, "history", "--json", str(dst)], capture_output=True, text=True)
                return len(json.loads(h.stdout.strip().splitlines()[-1])["cycles"])
            except (ValueError, IndexError, KeyError):
                return 0
        for round_ in range(3):
            (src / f"continuous-{round_}.txt").write_text(f"round {round_}\n")
            target = committed() + 1
            deadline = time.monotonic() + 60
            while committed() < target or helpers.tree_equal(src, dst):
                assert p.poll() is None, p.communicate()
                assert time.monotonic() < deadline, "continuous mode did not catch up"
                time.sleep(0.2)
    finally:
        p.terminate()
        out, err = p.communicate(timeout=60)
    assert committed() >= 4, err
    assert helpers.tree_equal(src, dst) == []
    logins = sshd.log.read_text(errors="replace").count("Accepted publickey") - logins_before
    assert logins == 1, f"{logins} SSH logins for {committed()} cycles: the session was not kept"
    _no_leftovers(sshd)


def test_streamed_first_copy_many_segments_and_full_disk(sshd: Sshd, work_dir: Path) -> None:
    """A first copy over sshfs is applied while the source builds it (several manifest segments
    and packs, plus large, sparse and hard-linked files read through the export afterwards).  A
    full replica disk mid-stream fails the cycle (exit 18) and leaves DEST empty; once there is
    room the next run completes.  Checked with the independent tree compare."""
    _need_fuse()
    helpers.require_root()
    import random
    src = work_dir / "src"
    helpers.make_sample_tree(src)
    rng = random.Random(5)
    for i in range(2400):            # ~15 MB of small files: several 8 MiB packs, several segments
        d = src / f"bulk{i // 400}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(4000, 9000)))
    small = work_dir / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "discrep-test-small", str(small)], check=True)
    try:
        dst = small / "dst"
        filler = small / "filler"
        filler.write_bytes(b"\1" * (30 << 20))
        r = replicate(sshd, str(src), str(dst))
        assert r.returncode == 18, f"exit {r.returncode}: {r.stderr}"
        assert "full" in r.stderr
        assert sorted(os.listdir(dst)) == [".discrep"], "a failed first copy must leave DEST empty"
        filler.unlink()
        res = _ok(replicate(sshd, str(src), str(dst)))
        assert res["streamed"] is True and res["transport"] == "sshfs"
        assert res["worker_segments"] > 0, "a second process applies part of a long first copy"
        assert helpers.tree_equal(src, dst) == []
        _no_leftovers(sshd)
        # the next cycle is an ordinary one (not streamed) and still exact
        _churn(src)
        res = _ok(replicate(sshd, str(src), str(dst)))
        assert res["streamed"] is False
        assert helpers.tree_equal(src, dst) == []
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_streamed_first_copy_file_changed_while_read(sshd: Sshd, work_dir: Path) -> None:
    """A streamed first copy reads large files live (no copy first) and has the source check them
    afterwards: a file written while it was read is read again from a verified copy, one deleted
    meanwhile is dropped with a warning (exit 1) and left for the next cycle.  Without that check
    the replica would hold the old bytes of big.bin and a gone.bin the source no longer has."""
    _need_fuse()
    import threading
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    size = 96 << 20
    (src / "big.bin").write_bytes(b"A" * size)
    (src / "zz_gone.bin").write_bytes(b"G" * (64 << 20))
    fired = threading.Event()

    def meddle() -> None:   # as soon as the replica starts writing big.bin, change the source
        deadline = time.monotonic() + 120
        while not (dst / "big.bin").exists():
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        with open(src / "big.bin", "r+b") as f:
            f.write(b"B" * 4096)
        os.unlink(src / "zz_gone.bin")
        fired.set()
    t = threading.Thread(target=meddle, daemon=True)
    t.start()
    r = replicate(sshd, str(src), str(dst))
    t.join(5)
    assert fired.is_set(), f"the replica never wrote big.bin: {r.stderr}"
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr}"
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["streamed"] is True
    assert "zz_gone.bin" in r.stderr and "left for the next cycle" in r.stderr
    with open(dst / "big.bin", "rb") as f:
        assert f.read(4096) == b"B" * 4096, "the replica kept bytes read before the file changed"
    assert not (dst / "zz_gone.bin").exists()
    # only the top directory differs (its mtime moved with the delete after it was described)
    assert helpers.tree_equal(src / "dir_a", dst / "dir_a") == []
    assert (dst / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert os.stat(dst / "big.bin").st_mtime_ns == os.stat(src / "big.bin").st_mtime_ns
    res = _ok(replicate(sshd, str(src), str(dst)))
    assert res["cycle"] == 2 and res["files_changed"] == 0, res
    assert helpers.tree_equal(src, dst) == []
    _no_leftovers(sshd)


def test_progress_on_a_terminal_shows_fixed_totals(sshd: Sshd, work_dir: Path) -> None:
    """On a terminal a streamed first copy shows progress against totals the source counted before
    it streamed (files and bytes of the whole tree), ending at N/N; without a terminal it prints
    none (and the source streams while it walks)."""
    _need_fuse()
    import pty
    import select
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    for i in range(300):              # ~18 MB in packs: several segments, so reports before the end
        (src / f"f{i}").write_bytes(bytes([i % 251]) * 60000)
    nfiles = sum(1 for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(discrep_cmd("replicate", "-F", str(sshd.client_config), "--remote-discrep",
                                         REMOTE_DISCREP, f"{ALIAS}:{src}", str(dst)),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=client_env(sshd))
        os.close(slave)
        slave = -1
        out = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:   # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif p.poll() is not None:
                break
        assert p.wait(60) == 0, out.decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode(errors="replace")
    seen = [(int(d), int(t)) for d, t in re.findall(r"files (\d+)/(\d+) ", text)]
    assert (nfiles, nfiles) in seen, text
    assert {t for _d, t in seen} == {nfiles}, f"the total is fixed from the first report on: {seen}"
    assert any(d < nfiles for d, _t in seen), f"no report before the end: {seen}"
    assert helpers.tree_equal(src, dst) == []
    r = replicate(sshd, str(src), str(work_dir / "dst2"))   # not a terminal: no progress lines
    assert r.returncode == 0 and "files " not in r.stderr, r.stderr


def test_filters_reach_the_agent(sshd: Sshd, work_dir: Path) -> None:
    """The replica's rules travel in the cycle command: the source does not walk an excluded
    directory (a merge file there that discrep cannot parse would fail the cycle), the cycle
    records the rules, and the replica equals rsync's copy with the same rules."""
    from discrep.protocol.filterspec import FilterSpec
    from discrep.source.catalog import SourceCatalog
    _need_fuse()
    src, dst, want = work_dir / "src", work_dir / "dst", work_dir / "want"
    (src / "cache" / "sub").mkdir(parents=True)
    (src / "cache" / "sub" / ".discrepignore").write_text("merge not-supported\n")
    (src / "cache" / "blob").write_bytes(b"c" * 100000)
    (src / "data").mkdir()
    (src / "data" / "a.txt").write_bytes(b"a")
    (src / "data" / "b.o").write_bytes(b"o")
    (src / "data" / ".discrepignore").write_text("- *.tmp\n")
    (src / "data" / "c.tmp").write_bytes(b"t")
    rules = ["--filter=dir-merge .discrepignore", "--exclude=/cache/", "--exclude", "*.o"]
    res = _ok(replicate(sshd, str(src), str(dst), *rules))
    assert res["bytes_transferred"] < 100000, res             # cache/blob never crossed
    subprocess.run(["rsync", "-a", "--modify-window=-1", "--exclude=/.discrep/", *rules, f"{src}/", f"{want}/"], check=True)
    assert helpers.tree_equal(want, dst) == [] and helpers.python_tree_diff(want, dst) == []
    assert not (dst / "cache").exists() and not (dst / "data" / "b.o").exists()
    cat = SourceCatalog(str(src / ".discrep"))
    try:
        spec = FilterSpec.from_record(cat.last_acked().info["filters"])
    finally:
        cat.close()
    assert [r.pattern for r in spec.rules.rules] == [b".discrepignore", b"/cache/", b"*.o"]
    # the next cycle (rules changed: newly included paths copied), then without rules the bad
    # merge file is walked and read: the agent's error comes back
    (src / "data" / "new.txt").write_bytes(b"n")
    res = _ok(replicate(sshd, str(src), str(dst), "--filter=dir-merge .discrepignore", "--exclude=/cache/"))
    assert (dst / "data" / "b.o").exists() and (dst / "data" / "new.txt").exists()
    bad = replicate(sshd, str(src), str(dst), "--filter=dir-merge .discrepignore")
    assert bad.returncode != 0 and "merge" in bad.stderr, bad.stderr
    _no_leftovers(sshd)


def test_filters_in_one_session_of_cycles(sshd: Sshd, work_dir: Path, monkeypatch) -> None:
    """Continuous mode's later cycles carry the rules in the in-session cycle command too."""
    import tempfile
    from discrep.core.errors import WarningList
    from discrep.protocol.filters import FilterRules
    from discrep.protocol.filterspec import FilterSpec
    from discrep.replica.options import ReplicaOptions
    from discrep.run.options import CycleOptions
    from discrep.run.remote import RemoteSession
    from discrep.transport.options import SshOptions
    _need_fuse()
    monkeypatch.setenv("TMPDIR", str(sshd.local_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    src, dst, want = work_dir / "src", work_dir / "dst", work_dir / "want"
    (src / "skip").mkdir(parents=True)
    (src / "skip" / "s").write_bytes(b"s")
    (src / "k.txt").write_bytes(b"k")
    spec = FilterSpec(FilterRules.parse([("--exclude", "/skip/"), ("--exclude", "*.o")]))
    opts = CycleOptions(src=f"{ALIAS}:{src}", dest=str(dst), replica=ReplicaOptions(filters=spec),
                        ssh=SshOptions(remote_discrep=REMOTE_DISCREP, ssh_config=str(sshd.client_config)))
    session = RemoteSession(opts)
    try:
        assert session.cycle(WarningList())["cycle"] == 1
        (src / "skip" / "t").write_bytes(b"t")
        (src / "new.o").write_bytes(b"o")
        (src / "new.txt").write_bytes(b"n")
        res = session.cycle(WarningList())
        assert res["cycle"] == 2 and res["session_cycle"] == 2, res
    finally:
        session.close()
    rules = ["--exclude=/skip/", "--exclude=*.o"]
    subprocess.run(["rsync", "-a", "--modify-window=-1", "--exclude=/.discrep/", *rules, f"{src}/", f"{want}/"], check=True)
    assert helpers.tree_equal(want, dst) == [] and helpers.python_tree_diff(want, dst) == []
    _no_leftovers(sshd)

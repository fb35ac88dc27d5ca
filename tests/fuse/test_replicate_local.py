"""End-to-end one-host cycles through the real FUSE export (tier: fuse).

Every replica is checked independently of discrep: rsync's itemized dry run
(checksums, -aHAX) and a Python walk comparing bytes and metadata.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.fuse

DISCREP = [sys.executable, "-m", "discrep"]


@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def discrep(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)
    if check and p.returncode not in (0, 1):
        raise AssertionError(f"discrep {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def replicate(src: Path, dst: Path, *extra: str) -> dict:
    p = discrep("replicate", "--json", *extra, str(src), str(dst))
    return json.loads(p.stdout.strip().splitlines()[-1])


def assert_identical(src: Path, dst: Path) -> None:
    assert helpers.tree_equal(src, dst) == []
    assert helpers.python_tree_diff(src, dst) == []


def no_mounts_left() -> bool:
    return not any("discrep-export-" in m[1] for m in helpers.mounts())


def test_initial_copy_then_churn(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    r1 = replicate(src, dst)
    assert r1["cycle"] == 1 and r1["base"] == 0
    assert_identical(src, dst)
    sparse = os.stat(dst / helpers.SAMPLE_SPARSE)
    assert sparse.st_blocks * 512 < 1024 * 1024, "holes of the sparse file were written as data"

    # churn: in-place write, append, insertion at the front, renames, delete, chmod, touch, xattr
    big = src / helpers.SAMPLE_BIG
    with open(big, "r+b") as f:
        f.seek(1_000_000)
        f.write(b"X" * 100)
    with open(src / "dir_a" / "small1.txt", "ab") as f:
        f.write(b"appended\n")
    data = (src / helpers.SAMPLE_BIG).read_bytes()
    (src / "shifted.bin").write_bytes(b"!" + data)
    os.rename(src / "dir_a", src / "dir_A")
    os.rename(src / helpers.SAMPLE_EMPTY_FILE, src / "moved_empty.txt")
    os.unlink(src / "links" / "abs")
    os.chmod(src / helpers.SAMPLE_MODE_640, 0o600)
    os.utime(src / helpers.SAMPLE_MTIME_FILE, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    os.setxattr(src / helpers.SAMPLE_XATTR_FILE, "user.discrep.test", b"changed")
    r2 = replicate(src, dst)
    assert r2["cycle"] == 2 and r2["base"] == 1
    assert_identical(src, dst)
    changed_total = big.stat().st_size + (src / "shifted.bin").stat().st_size
    # the in-place write costs a few blocks, the shifted copy is new (whole): bound by the new file
    assert r2["bytes_transferred"] < (src / "shifted.bin").stat().st_size + 256 * 1024
    assert r2["files_renamed"] >= 2

    # the shifted file changes again at the front: content-defined chunks, not the whole file
    (src / "shifted.bin").write_bytes(b"??" + data)
    r3 = replicate(src, dst)
    assert_identical(src, dst)
    assert r3["bytes_transferred"] < changed_total * 0.2

    # nothing changed: a cycle costs only its description and manifest
    r4 = replicate(src, dst)
    assert r4["files_changed"] == 0 and r4["bytes_transferred"] < 4096
    assert_identical(src, dst)
    assert no_mounts_left()


def test_renamed_directory_costs_no_data(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d" / "sub").mkdir(parents=True)
    payload = os.urandom(8 << 20)
    (src / "d" / "sub" / "f.bin").write_bytes(payload)
    (src / "d" / "g.bin").write_bytes(payload[:1 << 20])
    replicate(src, dst)
    os.rename(src / "d", src / "renamed")
    r = replicate(src, dst)
    assert_identical(src, dst)
    assert r["files_renamed"] >= 1
    assert r["bytes_transferred"] < (9 << 20) // 100, r


def test_swap_and_chain_renames(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    for n in "abc":
        (src / n).write_bytes(n.encode() * 100_000)
    replicate(src, dst)
    os.rename(src / "a", src / "tmp")
    os.rename(src / "b", src / "a")
    os.rename(src / "tmp", src / "b")
    os.rename(src / "c", src / "d")
    r = replicate(src, dst)
    assert_identical(src, dst)
    assert r["bytes_transferred"] < 50_000


def test_special_files_warn_and_exit_1(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src, with_special=True)
    p = discrep("replicate", str(src), str(dst), check=False)
    assert p.returncode == 1, p.stderr
    assert "FIFO" in p.stderr
    assert not (dst / helpers.SAMPLE_FIFO).exists()


def test_type_changes_and_deletes(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "x").mkdir(parents=True)
    (src / "x" / "f").write_text("in dir")
    (src / "y").write_text("file")
    os.symlink("y", src / "z")
    replicate(src, dst)
    import shutil
    shutil.rmtree(src / "x")
    (src / "x").write_text("now a file")
    os.unlink(src / "y")
    (src / "y").mkdir()
    (src / "y" / "inner").write_text("inside")
    os.unlink(src / "z")
    (src / "z").write_text("was a symlink")
    replicate(src, dst)
    assert_identical(src, dst)


def test_refusals(work_dir: Path):
    src = work_dir / "src"
    src.mkdir()
    (src / "f").write_text("x")
    p = discrep("replicate", str(src), str(src / "inside"), check=False)
    assert p.returncode == 3 and "inside source" in p.stderr
    p = discrep("replicate", str(work_dir / "missing"), str(work_dir / "d"), check=False)
    assert p.returncode == 3 and "does not exist" in p.stderr
    busy = work_dir / "busy"
    busy.mkdir()
    (busy / "precious").write_text("keep me")
    p = discrep("replicate", str(src), str(busy), check=False)
    assert p.returncode == 5 and "--force" in p.stderr
    assert (busy / "precious").read_text() == "keep me"
    p = discrep("replicate", str(src), str(work_dir / "no" / "parent"), check=False)
    assert p.returncode == 5 and "does not exist" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_manual_workflow(work_dir: Path):
    src, dst, mnt = work_dir / "src", work_dir / "dst", work_dir / "mnt"
    helpers.make_sample_tree(src)
    mnt.mkdir()
    for expected_cycle in (1, 2):
        snap = json.loads(discrep("snapshot", "--json", str(src)).stdout.strip().splitlines()[-1])
        assert snap["cycle"] == expected_cycle
        exp = subprocess.Popen(DISCREP + ["export", str(src), str(mnt)], stderr=subprocess.PIPE)
        try:
            import fuse_export
            fuse_export.wait_mounted(str(mnt), 20)
            assert (mnt / ".discrep" / "cycle").exists()
            res = json.loads(discrep("sync", "--json", str(mnt), str(dst)).stdout.strip().splitlines()[-1])
            assert res["cycle"] == expected_cycle
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
            exp.wait(timeout=30)
        discrep("ack", str(src), str(expected_cycle))
        assert_identical(src, dst)
        (src / "new_in_cycle_2.txt").write_text("hello")


def test_failed_cycle_keeps_journal_and_replica(work_dir: Path):
    """A cycle whose sync fails leaves the replica at the last committed cycle; the next run completes."""
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "a").write_text("one")
    replicate(src, dst)
    (src / "b").write_text("two")
    # make the replica unable to take the cycle: its state dir is locked by "another run"
    import fcntl
    fd = os.open(dst / ".discrep" / "lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        p = discrep("replicate", str(src), str(dst), check=False)
        assert p.returncode == 13 and "another discrep run" in p.stderr
    finally:
        os.close(fd)
    assert not (dst / "b").exists()
    r = replicate(src, dst)
    assert r["files_changed"] >= 1
    assert_identical(src, dst)


def test_replica_of_another_source_is_refused(work_dir: Path):
    a, b, dst = work_dir / "a", work_dir / "b", work_dir / "dst"
    for d in (a, b):
        d.mkdir()
        (d / f"only-in-{d.name}").write_text(d.name)
    replicate(a, dst)
    p = discrep("replicate", str(b), str(dst), check=False)
    assert p.returncode == 5 and "another source" in p.stderr
    assert helpers.tree_equal(a, dst) == []          # untouched
    r = replicate(b, dst, "--force")                  # deliberate: DEST follows b now
    assert helpers.tree_equal(b, dst) == []
    assert r["files_deleted"] >= 1

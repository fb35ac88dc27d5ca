"""Special bits and security.* xattrs through real local cycles (tier: root, fuse).

- Issue 13 item 8: ``security.*`` names are compared by one rule on what a file has and what the
  manifest wants, so a file with a ``security.*`` xattr (or a label the replica host gave it) does
  not get its metadata re-applied every cycle: the second cycle reports 0 metadata changes and the
  replica's file keeps its ctime (checked with os.stat, not with discrep's figures alone).
- Issue 13 "special bits": by default setuid/setgid and ``security.capability`` replicate like
  ``rsync -a`` as root (rsync -aHAXnci is the oracle); ``--nosuid`` (and ``nosuid = true`` in the
  jobs file) strips them on the replica, stays stripped after an in-place patch, and does not make
  the file look changed on the next cycle.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.root, pytest.mark.fuse]
DISCREP = [sys.executable, "-m", "discrep"]
CAP = "security.capability"
# a v2 file capability: cap_net_raw (bit 13) permitted + effective
CAP_NET_RAW = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


@pytest.fixture(autouse=True)
def _need_root_and_fuse():
    helpers.require_root()
    helpers.require_fuse()


def replicate(src: Path, dst: Path, *extra: str) -> dict:
    p = subprocess.run(DISCREP + ["replicate", "--json", *extra, str(src), str(dst)], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def xattrs(p: Path) -> dict:
    return {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}


def set_or_skip(p: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(p, name, value)
    except OSError as e:
        pytest.skip(f"the kernel refuses {name} here: {e}")


def touch_ctime(p: Path) -> None:
    """Change only the ctime (the source lists the file again; its content and metadata are the same)."""
    os.chmod(p, stat.S_IMODE(os.stat(p).st_mode))


def test_security_xattr_not_reapplied(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    f = src / "labelled.txt"
    f.write_bytes(b"hello\n")
    os.setxattr(f, "user.note", b"kept")
    set_or_skip(f, "security.discrep-test", b"label-from-the-source")
    replicate(src, dst)
    assert helpers.tree_equal(src, dst) == [], "rsync -X as root copies security.* names: so must discrep"
    assert helpers.python_tree_diff(src, dst) == []
    assert xattrs(dst / "labelled.txt")["security.discrep-test"] == b"label-from-the-source"
    # the replica host's own label (as an LSM would give it) is the replica's: never removed or compared
    set_or_skip(dst / "labelled.txt", "security.selinux", b"system_u:object_r:replica_t:s0\0")
    before = os.stat(dst / "labelled.txt")
    touch_ctime(f)
    r = replicate(src, dst)
    assert r["cycle"] == 2 and r["files_unchanged"] >= 1
    after = os.stat(dst / "labelled.txt")
    assert after.st_ctime_ns == before.st_ctime_ns, "the replica's file was touched although nothing differed"
    assert r["files_meta_changed"] == 0, "metadata of an unchanged labelled file was re-applied"
    assert xattrs(dst / "labelled.txt")["security.selinux"] == b"system_u:object_r:replica_t:s0\0"
    assert helpers.python_tree_diff(src, dst) == []
    # a real difference of a security.* name is still replicated
    os.setxattr(f, "security.discrep-test", b"relabelled")
    r = replicate(src, dst)
    assert r["files_meta_changed"] == 1
    assert xattrs(dst / "labelled.txt")["security.discrep-test"] == b"relabelled"


def _special_tree(src: Path) -> None:
    src.mkdir()
    (src / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "suid", 0o6755)
    (src / "sgid_dir").mkdir()
    os.chmod(src / "sgid_dir", 0o2775)
    (src / "capped").write_bytes(os.urandom(300_000))
    os.chmod(src / "capped", 0o755)
    set_or_skip(src / "capped", CAP, CAP_NET_RAW)


def test_special_bits_kept_by_default(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    _special_tree(src)
    replicate(src, dst)
    assert helpers.tree_equal(src, dst) == []
    assert stat.S_IMODE(os.stat(dst / "suid").st_mode) == 0o6755
    assert stat.S_IMODE(os.stat(dst / "sgid_dir").st_mode) == 0o2775
    assert xattrs(dst / "capped").get(CAP) == CAP_NET_RAW
    # an in-place patch (a write drops a file's capability in the kernel): put back
    with open(src / "capped", "r+b") as fh:
        fh.seek(150_000)
        fh.write(b"patched")
    os.setxattr(src / "capped", CAP, CAP_NET_RAW)
    replicate(src, dst)
    assert helpers.tree_equal(src, dst) == []
    assert xattrs(dst / "capped").get(CAP) == CAP_NET_RAW


def test_nosuid_strips_and_stays_quiet(work_dir: Path):
    src, dst = work_dir / "src", work_dir / "dst"
    _special_tree(src)
    replicate(src, dst, "--nosuid")
    assert stat.S_IMODE(os.stat(dst / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dst / "sgid_dir").st_mode) == 0o2775, "a directory's setgid is no privilege"
    assert CAP not in xattrs(dst / "capped")
    assert (dst / "capped").read_bytes() == (src / "capped").read_bytes()
    # the only differences rsync sees are the stripped bits (perms of suid, xattrs of capped)
    diffs = sorted(line.split(" ", 1)[1] for line in helpers.tree_equal(src, dst))
    assert diffs == ["capped", "suid"], diffs
    # unchanged files: nothing re-applied; a patched one: stripped again
    touch_ctime(src / "suid")
    with open(src / "capped", "r+b") as fh:
        fh.write(b"patched")
    os.setxattr(src / "capped", CAP, CAP_NET_RAW)
    before = os.stat(dst / "suid")
    r = replicate(src, dst, "--nosuid")
    assert r["files_meta_changed"] == 0
    assert os.stat(dst / "suid").st_ctime_ns == before.st_ctime_ns
    assert stat.S_IMODE(os.stat(dst / "suid").st_mode) == 0o755
    assert CAP not in xattrs(dst / "capped")
    assert (dst / "capped").read_bytes() == (src / "capped").read_bytes()
    # without the option again: the bits come back (rsync's fidelity)
    touch_ctime(src / "suid")
    touch_ctime(src / "capped")
    replicate(src, dst)
    assert helpers.tree_equal(src, dst) == []


def test_jobs_file_nosuid(work_dir: Path):
    from discrep.run import config
    doc = {"jobs": {"a": {"source": "/s", "dest": "/d", "every": "1h", "nosuid": True},
                    "b": {"source": "/s", "dest": "/e", "every": "1h"}}}
    jobs = config.parse(doc, "test.toml").jobs
    assert jobs["a"].options.replica.nosuid is True
    assert jobs["b"].options.replica.nosuid is False

"""Special bits through a streamed first copy over SSH, where packed files are written by the
parent's and by the second applying process's ``PackedWriter`` (tier: ssh, root).

By default setuid/setgid and ``security.capability`` arrive like ``rsync -aX`` as root (rsync
-aHAXnci is the oracle); with ``--nosuid`` no file of the replica carries them, whichever process
wrote it, and everything else is identical.
"""
from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest

import helpers
from conftest import Sshd, replicate

pytestmark = [pytest.mark.ssh, pytest.mark.fuse, pytest.mark.root]
CAP = "security.capability"
CAP_NET_RAW = bytes.fromhex("01000002" "00200000" "00000000" "00000000" "00000000")


def _tree(src: Path) -> None:
    rng = random.Random(13)
    for i in range(2400):            # several packs and segments: the second process takes some
        d = src / f"bulk{i // 400}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"f{i}"
        f.write_bytes(rng.randbytes(rng.randint(4000, 9000)))
        os.chmod(f, (0o6755, 0o4711, 0o2755, 0o644)[i % 4])
        if i % 97 == 0:
            try:
                os.setxattr(f, CAP, CAP_NET_RAW)
            except OSError as e:
                pytest.skip(f"the kernel refuses {CAP} here: {e}")


def _result(p) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_streamed_first_copy_special_bits(sshd: Sshd, work_dir: Path) -> None:
    helpers.require_root()
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    src, kept, stripped = work_dir / "src", work_dir / "kept", work_dir / "stripped"
    _tree(src)
    res = _result(replicate(sshd, str(src), str(kept)))
    assert res["streamed"] is True and res["worker_segments"] > 0
    assert helpers.tree_equal(src, kept) == []
    res = _result(replicate(sshd, str(src), str(stripped), "--nosuid"))
    assert res["streamed"] is True and res["worker_segments"] > 0
    n = 0
    for d in sorted(src.iterdir()):
        if d.name == ".discrep":
            continue
        for f in d.iterdir():
            r = stripped / d.name / f.name
            want = stat.S_IMODE(f.stat().st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
            assert stat.S_IMODE(r.stat().st_mode) == want, f"{r}: {oct(r.stat().st_mode)}"
            assert CAP not in os.listxattr(r)
            assert r.read_bytes() == f.read_bytes()
            n += 1
    assert n == 2400
    # the only differences the oracle sees are the stripped bits
    for line in helpers.tree_equal(src, stripped):
        flags, name = line.split(" ", 1)
        i = int(name.rsplit("f", 1)[1])
        assert i % 4 != 3 or i % 97 == 0, line        # a plain 0644 file without capability: equal
        assert set(flags[2:]) <= {".", "p", "x"}, line

"""Attack tests: a source that lies (a wrapped remote discrep rewrites the agent's events).

Whatever it says, the replica must never read or write outside DEST and its own mount of the
source, never copy replica-local data into DEST, and never change a committed recovery point.
Each test checks a canary tree beside DEST (digest before and after) and that DEST holds no
byte of the replica host's secret file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, client_env, discrep_cmd

pytestmark = [pytest.mark.ssh, pytest.mark.hostile]

HERE = Path(__file__).resolve().parent
SECRET = b"REPLICA-HOST-SECRET " * 4096          # 80 KiB: above the packed-file size, read by path


def make_hostile(work_dir: Path, rules: List[dict]) -> str:
    script = work_dir / "hostile-discrep"
    script.write_text("#!/bin/sh\n"
                      f"export HOSTILE_RULES={shlex.quote(json.dumps(rules))}\n"
                      f"export HOSTILE_REAL_DISCREP={shlex.quote(REMOTE_DISCREP)}\n"
                      f"exec {shlex.quote(sys.executable)} {shlex.quote(str(HERE / 'hostile_agent.py'))} \"$@\"\n")
    script.chmod(0o755)
    return str(script)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + sorted(dirnames):
            p = Path(dirpath, name)
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{st.st_mode}|{st.st_uid}|{st.st_size}|{st.st_mtime_ns}".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def scene(work_dir: Path):
    """SRC with a large file named like the secret; a canary dir on the replica host with the secret."""
    src, dst, canary = work_dir / "src", work_dir / "dst", work_dir / "canary"
    src.mkdir()
    (src / "big").write_bytes(b"s" * len(SECRET))
    (src / "small").write_bytes(b"hello\n")
    canary.mkdir()
    (canary / "big").write_bytes(SECRET)
    (canary / "etc").mkdir()
    (canary / "etc" / "big").write_bytes(SECRET)
    return src, dst, canary


def _run(sshd: Sshd, exe: str, src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(discrep_cmd("replicate", "--json", "-F", str(sshd.client_config), "--remote-discrep", exe,
                                      *extra, f"{ALIAS}:{src}", str(dst)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180,
                          env=client_env(sshd))


def _no_secret_in(dst: Path) -> None:
    for dirpath, _dirs, files in os.walk(dst):
        if "/.discrep" in dirpath + "/":
            continue
        for f in files:
            p = Path(dirpath, f)
            if p.is_file() and not p.is_symlink():
                assert b"REPLICA-HOST-SECRET" not in p.read_bytes(), f"replica-local data copied into {p}"


def _escape(work_dir: Path, target: Path) -> str:
    return "/" + "../" * 12 + str(target).lstrip("/")


PATH_FIELDS = [("seg", "snapshot", "sshfs"), ("seg", "dir", "sshfs"), ("built", "path", "sshfs"),
               ("built", "path", "sftp"), ("ready", "mountpoint", "sshfs"), ("ready", "mountpoint", "sftp"),
               ("hello", "dir", "sshfs"), ("hello", "state_dir", "sshfs"), ("hello", "dir", "sftp"),
               ("hello", "state_dir", "sftp")]


@pytest.mark.parametrize("form", ["dotdot", "outside", "nul"])
@pytest.mark.parametrize("event, field, transport", PATH_FIELDS)
def test_event_paths_never_leave_the_mount(sshd: Sshd, work_dir: Path, scene, event, field, transport, form):
    """Every path-bearing field of every event, lying with '..', with a path outside the source's
    state directory, or with a NUL: the replica refuses it or ignores it, never reads its own files."""
    helpers.require_fuse()
    helpers.require_tool("sshfs")
    src, dst, canary = scene
    before = tree_digest(canary)
    value = {"dotdot": _escape(work_dir, canary), "outside": str(canary),
             "nul": str(src / ".discrep") + "/\0/" + _escape(work_dir, canary)}[form]
    if event in ("built", "ready"):     # an incremental cycle (exported): first a clean first copy
        r0 = _run(sshd, REMOTE_DISCREP, src, dst, "--transport", transport)
        assert r0.returncode == 0, r0.stderr
        (src / "big").write_bytes(b"t" * len(SECRET))
    exe = make_hostile(work_dir, [{"event": event, "set": {field: value}, "every": True}])
    r = _run(sshd, exe, src, dst, "--transport", transport)
    assert tree_digest(canary) == before
    _no_secret_in(dst)
    if r.returncode == 0:     # the lie was harmless: the replica must still equal the source
        assert helpers.tree_equal(src, dst) == []
    else:
        assert r.returncode in (6, 7, 11), r.stderr


def test_control_characters_from_the_source_never_reach_the_terminal(sshd: Sshd, work_dir: Path, scene):
    src, dst, _canary = scene
    exe = make_hostile(work_dir, [{"event": "built", "raw": json.dumps(
        {"event": "error", "error": "bad \x1b]0;pwned\x07\x1b[2J thing", "kind": "SourceError", "exit_code": 4})}])
    r = _run(sshd, exe, src, dst, "--transport", "sftp")
    assert r.returncode != 0
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr, repr(r.stderr)

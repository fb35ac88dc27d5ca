"""``replicate -n [USER@]HOST:SRC DEST`` (issue 15 item 3, remote source): the source agent's
read-only dry-run mode over the test sshd.  The oracle is the local dry run of the same pair
(both trees are on this machine), and an independent Python walk of DEST before and after the
next real run: the run changes exactly the paths the dry run listed.  Neither SRC/.discrep nor
DEST (its .discrep included) changes by a byte."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import helpers
from conftest import REMOTE_DISCREP, Sshd, client_env, discrep_cmd, mounts_under, replicate

pytestmark = pytest.mark.ssh


def _need_fuse() -> None:
    helpers.require_fuse()
    helpers.require_tool("sshfs")


def _json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def _local_dry(src: Path, dst: Path, *extra: str) -> dict:
    return _json(subprocess.run(discrep_cmd("replicate", "-n", "--json", *extra, str(src), str(dst)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300))


def _state(root: Path) -> Dict[bytes, Tuple]:
    """Every object under ``root`` but .discrep: what a cycle may change (directories' mtimes left
    out: adding or removing an entry changes them, and a dry run does not itemize that)."""
    out: Dict[bytes, Tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirs, files in os.walk(broot):
        if dirpath == broot:
            dirs[:] = [d for d in dirs if d != b".discrep"]
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, broot)
            xat = tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False))
                               for n in os.listxattr(p, follow_symlinks=False)))
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                body = hashlib.sha256(Path(os.fsdecode(p)).read_bytes()).digest()
            else:
                body = b""
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, body, xat)
    return out


def _changed(before: Dict[bytes, Tuple], after: Dict[bytes, Tuple]) -> Set[str]:
    keys = set(before) | set(after)
    return {os.fsdecode(k) for k in keys if before.get(k) != after.get(k)}


def _listed(items: List[str]) -> Set[str]:
    """The paths the dry run's lines name (a rename names both its paths; a deleted directory
    stands for its contents)."""
    out: Set[str] = set()
    for ln in items:
        body = _body(ln)
        if " (renamed from " in body:
            new, old = body.split(" (renamed from ", 1)
            out |= {new, old[:-1]}
        else:
            out.add(body.split(" (", 1)[0])
    return out


def _body(line: str) -> str:
    """An itemized line without its flags (``*deleting`` pads with spaces; ``R`` adds a flag)."""
    return line.split(" ", 1)[1].lstrip(" ")


def _churn(src: Path) -> None:
    with open(src / helpers.SAMPLE_BIG, "r+b") as f:        # content: a few blocks of a 3 MiB file
        f.seek(1 << 20)
        f.write(b"X" * 5000)
    (src / "dir_a/small1.txt").write_bytes(b"changed\n")  # content and size
    (src / "new_file.txt").write_bytes(b"new\n" * 100)     # created
    (src / "new_dir").mkdir()                              # created, with contents
    (src / "new_dir/inner").write_bytes(b"inner")
    os.unlink(src / "top.txt")                             # deleted
    os.rename(src / "dir_a/dir_b", src / "dir_b_moved")     # a directory renamed: created + deleted
    os.rename(src / "moved_later.bin", src / "renamed.bin")  # a file renamed: "renamed from"
    os.chmod(src / helpers.SAMPLE_MODE_640, 0o600)          # metadata only
    os.setxattr(src / helpers.SAMPLE_XATTR_FILE, "user.discrep.other", b"x")   # xattrs only
    os.utime(src / helpers.SAMPLE_MTIME_FILE, ns=(helpers.SAMPLE_MTIME_NS, helpers.SAMPLE_MTIME_NS + 10**9))


def test_remote_dry_run_equals_local_and_changes_nothing(sshd: Sshd, work_dir: Path) -> None:
    _need_fuse()
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    (src / "moved_later.bin").write_bytes(os.urandom(200_000))
    _json(replicate(sshd, str(src), str(dst)))
    _churn(src)
    before_src, before_dst = helpers.tree_digest(src / ".discrep"), helpers.tree_digest(dst)
    state = _state(dst)
    remote = _json(replicate(sshd, str(src), str(dst), "-n"))
    assert helpers.tree_digest(src / ".discrep") == before_src
    assert helpers.tree_digest(dst) == before_dst
    # nothing left on either host: no mount, no temporary file (the dry-run agent makes none)
    assert mounts_under(sshd.base) == [] and list(sshd.remote_tmp.iterdir()) == []
    assert list(sshd.local_tmp.iterdir()) == []
    local = _local_dry(src, dst)
    assert remote == local
    by_path = {_body(ln).split(" (", 1)[0]: ln for ln in remote["items"]}
    assert by_path["new_file.txt"].startswith(">f+++++++++")
    assert by_path["new_dir"].startswith("cd+++++++++") and by_path["new_dir/inner"].startswith(">f+++")
    assert by_path[helpers.SAMPLE_BIG].startswith(">fc.t")
    fetch = int(by_path[helpers.SAMPLE_BIG].split("(~")[1].split(" ")[0])
    assert 0 < fetch < (3 << 20) // 4
    assert by_path["dir_a/small1.txt"].startswith(">fcst")
    assert by_path["top.txt"].startswith("*deleting")
    assert "renamed from moved_later.bin" in by_path["renamed.bin"]
    assert by_path[helpers.SAMPLE_MODE_640].startswith(".f...p")
    assert by_path[helpers.SAMPLE_XATTR_FILE].startswith(".f......x")
    assert by_path[helpers.SAMPLE_MTIME_FILE].startswith(".f..t......")
    assert remote["renamed"] >= 1 and remote["created"] >= 4 and remote["deleted"] >= 2
    # the human-readable form of the remote run is the local one's
    text = subprocess.run(discrep_cmd("replicate", "-n", "-F", str(sshd.client_config), "--remote-discrep",
                                      REMOTE_DISCREP, f"discrep-src:{src}", str(dst)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300, env=client_env(sshd))
    local_text = subprocess.run(discrep_cmd("replicate", "-n", str(src), str(dst)), stdout=subprocess.PIPE,
                                text=True, timeout=300)
    assert text.returncode == 0 and text.stdout == local_text.stdout
    # the next real run applies exactly what the dry run listed
    _json(replicate(sshd, str(src), str(dst)))
    assert helpers.tree_equal(src, dst) == []
    assert _changed(state, _state(dst)) == _listed(remote["items"])
    again = _json(replicate(sshd, str(src), str(dst), "-n"))
    assert again["items"] == [] and again["bytes_to_fetch"] == 0


def test_remote_dry_run_with_rules_and_a_fresh_dest(sshd: Sshd, work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "logs").mkdir(parents=True)
    (src / "logs/a.log").write_bytes(b"log")
    (src / "keep.txt").write_bytes(b"keep")
    (src / "skip.tmp").write_bytes(b"tmp")
    rules = ("--exclude", "*.tmp", "--exclude", "/logs/")
    res = _json(replicate(sshd, str(src), str(dst), "-n", "--bwlimit", "4M", "--timeout", "30", *rules))
    assert res == _local_dry(src, dst, *rules)
    assert res["items"] == [">f+++++++++ keep.txt (4 bytes)"]
    assert not dst.exists() and not (src / ".discrep").exists()


def test_dry_run_with_every_is_refused(sshd: Sshd, work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    for spec in (str(src), f"discrep-src:{src}"):
        r = subprocess.run(discrep_cmd("replicate", "-n", "--every", "5", "-F", str(sshd.client_config), spec,
                                       str(dst)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=60, env=client_env(sshd))
        assert r.returncode == 3 and "cannot run --every" in r.stderr, r.stderr
    assert not dst.exists() and not (src / ".discrep").exists()


HOSTILE = [
    {"event": "dry-entries", "set": {"entries": [["../../etc/passwd", 0o100644, 0, 0, 1, 0, None, None]]}},
    {"event": "dry-entries", "set": {"entries": [["/etc/passwd", 0o100644, 0, 0, 1, 0, None, None]]}},
    {"event": "dry-entries", "set": {"entries": [["x/y", 0o100644, 0, 0, 1, 0, None, None]]}},
    {"event": "dry-entries", "set": {"entries": [["a", 0o100644, 0, 0, -5, 0, None, None]] * 2}},
    {"event": "dry-entries", "set": {"entries": [["a", 0o100644, 0, 0, 1, 0, None, None]] * 1001}},
    {"event": "dry-walked", "set": {"count": 1 << 40}},
    {"event": "dry-signed", "set": {"differ": 1 << 62}},
    {"event": "dry-signed", "set": {"path": "../../etc/shadow"}},
]


@pytest.mark.parametrize("rule", HOSTILE, ids=lambda r: f"{r['event']}-{next(iter(r['set']))}")
def test_a_hostile_source_cannot_pass_a_bad_walk_or_answer(sshd: Sshd, work_dir: Path, rule: dict) -> None:
    from test_hostile_source import make_hostile
    src, dst = work_dir / "src", work_dir / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_bytes(os.urandom(100_000))
    _json(replicate(sshd, str(src), str(dst)))
    with open(src / "d/f", "r+b") as f:       # a content change: the replica asks for a sign
        f.write(b"changed")
    before = helpers.tree_digest(dst)
    exe = make_hostile(work_dir, [rule])
    r = subprocess.run(discrep_cmd("replicate", "-n", "--json", "-F", str(sshd.client_config), "--remote-discrep",
                                   exe, f"discrep-src:{src}", str(dst)), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120, env=client_env(sshd))
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
    assert "\"items\"" not in r.stdout and "dry_run" not in r.stdout
    assert helpers.tree_digest(dst) == before


# -- generated trees and changes: the remote dry run equals the local one, and the next real run
#    changes exactly what it listed ------------------------------------------------------------

NAMES = ["a", "b", "c", "sub", "x y", "caf\u00e9"]
OPS = st.lists(st.tuples(st.sampled_from(["write", "patch", "append", "truncate", "delete", "rename", "chmod",
                                          "mkdir", "rmtree", "mvdir", "symlink", "xattr", "copy"]),
                         st.integers(0, 1 << 30), st.integers(0, 1 << 30)), min_size=1, max_size=8)


def _files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if ".discrep" not in p.parts and p.is_file() and not p.is_symlink())


def _dirs(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*") if ".discrep" not in p.parts and p.is_dir() and not p.is_symlink())


def _apply(root: Path, op: str, i: int, j: int) -> None:
    """One generated change under ``root`` (i, j pick the paths and sizes)."""
    files, dirs = _files(root), [root] + _dirs(root)
    f = files[i % len(files)] if files else None
    d = dirs[i % len(dirs)]
    name = d / f"{NAMES[j % len(NAMES)]}{j % 7}"
    if op == "write" and not os.path.lexists(name):
        name.write_bytes(os.urandom(j % 150_000))
    elif op == "mkdir" and not os.path.lexists(name):
        name.mkdir()
        (name / "inner").write_bytes(os.urandom(j % 5000))
    elif op == "symlink" and not os.path.lexists(name):
        os.symlink(f"target-{j % 3}", name)
    elif f is None:
        return
    elif op == "patch" and f.stat().st_size:
        with open(f, "r+b") as fh:
            fh.seek(j % f.stat().st_size)
            fh.write(os.urandom(1 + j % 3000))
    elif op == "append":
        with open(f, "ab") as fh:
            fh.write(os.urandom(1 + j % 9000))
    elif op == "truncate":
        os.truncate(f, f.stat().st_size // 2)
    elif op == "delete":
        f.unlink()
    elif op == "rename" and not os.path.lexists(name) and not str(name).startswith(str(f) + "/"):
        os.rename(f, name)
    elif op == "copy" and not os.path.lexists(name):
        name.write_bytes(f.read_bytes())
    elif op == "chmod":
        os.chmod(f, 0o600 if f.stat().st_mode & 0o077 else 0o644)
    elif op == "xattr":
        os.setxattr(f, "user.discrep.gen", str(j).encode())
    elif op == "rmtree" and d != root:
        subprocess.run(["rm", "-rf", str(d)], check=True)
    elif op == "mvdir" and d != root and not os.path.lexists(name) and not str(name).startswith(str(d) + "/"):
        os.rename(d, name)


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 30), ops=OPS)
def test_generated_changes(sshd: Sshd, work_dir: Path, seed: int, ops: list) -> None:
    case = Path(tempfile.mkdtemp(prefix="case-", dir=work_dir))
    src, dst = case / "src", case / "dst"
    (src / "d1" / "d2").mkdir(parents=True)
    for k in range(6):
        (src / ["", "d1", "d1/d2"][k % 3] / f"f{k}").write_bytes(os.urandom((seed >> k) % 120_000))
    _json(replicate(sshd, str(src), str(dst)))
    for op, i, j in ops:
        _apply(src, op, i, j)
    state, before = _state(dst), helpers.tree_digest(dst)
    remote = _json(replicate(sshd, str(src), str(dst), "-n"))
    assert helpers.tree_digest(dst) == before
    note(repr(remote["items"]))
    assert remote == _local_dry(src, dst)
    _json(replicate(sshd, str(src), str(dst)))
    assert helpers.tree_equal(src, dst) == []
    assert _changed(state, _state(dst)) == _listed(remote["items"])

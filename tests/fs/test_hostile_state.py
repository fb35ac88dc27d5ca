"""Planted or damaged state must never reach outside DEST or SRC (issue 13 items 1 and 6): undo
records naming ``..``, absolute paths, bad keep names or a path through a symlink; a state
directory owned by someone else; a source catalog whose snapshot path points elsewhere.  A canary
directory beside the tree is digested before and after (tier: fs, hand-made exports)."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from test_hostile_manifest import make_export, meta, sync_export

pytestmark = [pytest.mark.fs, pytest.mark.hostile]


def digest(d: Path) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(d)):
        dirs.sort()
        for n in sorted(dirs + files):
            p = Path(dirpath, n)
            st = os.lstat(p)
            h.update(f"{p}|{st.st_mode:o}|{st.st_uid}|{st.st_mtime_ns}|{st.st_size}".encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "discrep", *args], capture_output=True, text=True, timeout=120)


def _replica(work_dir: Path) -> Path:
    dst = work_dir / "dst"
    dst.mkdir()
    sync_export(make_export(work_dir / "c1", [dict(meta(op="dir", path="d")),
                                              dict(meta(op="symlink", path="d/s", target="v1"))]), dst)
    return dst


def _plant(dst: Path, records) -> None:
    """An 'applying' cycle 7 whose undo log holds ``records`` (keep/x exists)."""
    con = sqlite3.connect(dst / ".discrep" / "replica.db")
    con.execute("INSERT INTO cycles(cycle, base, state) VALUES (7, 1, 'applying')")
    con.commit()
    con.close()
    h = dst / ".discrep" / "history" / "7"
    (h / "keep").mkdir(parents=True)
    (h / "keep" / "x").write_bytes(b"planted\n")
    with open(h / "undo.log", "wb") as f:
        for r in records:
            payload = json.dumps(r).encode()
            f.write(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)


def _canary(work_dir: Path) -> Path:
    c = work_dir / "canary"
    c.mkdir()
    (c / "f").write_bytes(b"host file\n")
    (c / "sub").mkdir()
    (c / "sub" / "g").write_bytes(b"g\n")
    return c


@pytest.mark.parametrize("rec", [
    {"op": "replace", "path": "../canary/f", "kept": "K:x"},
    {"op": "replace", "path": "CANARY/f", "kept": "K:x"},
    {"op": "create", "paths": ["../canary/sub"]},
    {"op": "create", "paths": ["CANARY/sub"]},
    {"op": "mkdir", "path": "d/../../canary"},
    {"op": "rename", "src": "../canary/new", "dst": "K:x"},
    {"op": "rename", "src": "d/new", "dst": "K:../../../../canary/f"},
    {"op": "replace", "path": "d/t", "kept": "K:../../../../canary/f"},
    {"op": "meta", "path": "../canary/f", "old": {"mode": 0o100777, "uid": 0, "gid": 0, "mtime_ns": 1,
                                                  "atime_ns": 1}},
    {"op": "dirmeta", "path": "../canary", "mtime_ns": 1, "atime_ns": 1},
    {"op": "create", "paths": ["link/f"]},          # through a symlink in DEST to the canary
    {"op": "meta", "path": "link/f", "old": {"mode": 0o100777, "uid": 0, "gid": 0, "mtime_ns": 1,
                                             "atime_ns": 1}},
    {"op": "replace", "path": "link/f", "kept": "K:x"},
    {"op": "patch", "path": "link/f", "old_size": 0, "ranges": [], "blob": [0, 0, "0"]},
    {"op": "create", "paths": [7]},
    {"op": "create", "paths": [""]},
])
@pytest.mark.parametrize("how", ["recover", "replicate"])
def test_planted_undo_record_never_reaches_outside_dest(work_dir: Path, rec, how: str):
    dst = _replica(work_dir)
    canary = _canary(work_dir)
    os.symlink(canary, dst / "link")
    rec = json.loads(json.dumps(rec).replace("CANARY", str(canary)))
    before = digest(canary)
    _plant(dst, [rec])
    if how == "recover":
        run("recover", str(dst))
    else:
        try:
            sync_export(make_export(work_dir / "c2", [dict(meta(op="dir", path="d"))], cycle=8, base=1,
                                    full=False), dst)
        except Exception:
            pass
    assert digest(canary) == before, f"{rec} changed a file outside DEST"
    assert (canary / "f").read_bytes() == b"host file\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="a state dir owned by another user needs root")
def test_state_dir_owned_by_another_user_is_refused(work_dir: Path):
    dst = _replica(work_dir)
    canary = _canary(work_dir)
    before = digest(canary)
    _plant(dst, [{"op": "replace", "path": "../canary/f", "kept": "K:x"}])
    os.chown(dst / ".discrep", 4242, 4242)
    for args in (("recover", str(dst)), ("history", str(dst))):
        p = run(*args)
        assert p.returncode == 5, p.stderr
        assert "belongs to uid 4242" in p.stderr
    assert digest(canary) == before


def test_state_dir_symlinked_elsewhere_is_refused(work_dir: Path):
    dst = _replica(work_dir)
    canary = _canary(work_dir)
    os.rename(dst / ".discrep", work_dir / "moved-state")
    os.symlink(work_dir / "moved-state", dst / ".discrep")
    before = digest(canary)
    p = run("recover", str(dst))
    assert p.returncode == 5 and "not a plain directory" in p.stderr, p.stderr
    assert digest(canary) == before


def test_planted_source_catalog_snapshot_path_is_not_removed(work_dir: Path):
    """``reset`` releases the cycles the catalog lists: a snapshot path outside
    SRC/.discrep/snapshots/<N> is refused, nothing is removed."""
    src = work_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    canary = _canary(work_dir)
    before = digest(canary)
    from discrep.source.catalog import SourceCatalog
    cat = SourceCatalog(str(src / ".discrep"))
    cat.close()
    con = sqlite3.connect(src / ".discrep" / "catalog.db")
    con.execute("INSERT INTO cycles VALUES (3, 2, 0, 'acked', 'copy', ?, 1, '{}')", (os.fsencode(canary),))
    con.execute("INSERT INTO cycles VALUES (4, 3, 0, 'acked', 'copy', ?, 1, '{}')",
                (os.fsencode(str(src / ".discrep" / "snapshots" / "4" / ".." / ".." / ".." / ".." / "canary")),))
    con.commit()
    con.close()
    p = run("reset", str(src))
    assert p.returncode != 0
    assert "nothing was removed" in p.stderr, p.stderr
    assert digest(canary) == before


@pytest.mark.parametrize("cmd", ["snapshot", "reset"])
def test_source_state_dir_symlinked_elsewhere_is_refused(work_dir: Path, cmd: str):
    """SRC/.discrep swapped for a symlink: no snapshot is removed or made there, no lock file."""
    src = work_dir / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    canary = _canary(work_dir)
    for n in range(1, 4):
        (canary / "snapshots" / str(n)).mkdir(parents=True)
        (canary / "snapshots" / str(n) / "keep").write_bytes(b"k")
    os.symlink(canary, src / ".discrep")
    before = digest(canary)
    p = run(cmd, str(src))
    assert p.returncode != 0
    assert "not a plain directory" in p.stderr, p.stderr
    assert digest(canary) == before

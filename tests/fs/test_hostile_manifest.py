"""The replica treats every manifest path as untrusted (tier: fs).

A hand-made export directory (``.discrep/cycle`` + ``.discrep/manifest``) is
read with the real MountReader; nothing outside DEST may be touched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pyzstd

from discrep.core.errors import ManifestError, UnsafePathError
from discrep.transport.mount_reader import MountReader
from discrep.replica.sync import sync

pytestmark = pytest.mark.fs


def make_export(root: Path, entries, cycle=1, base=0, full=True) -> Path:
    d = root / "export" / ".discrep"
    d.mkdir(parents=True)
    header = {"cycle": cycle, "base": base, "full": full, "created_ns": 1}
    (d / "cycle").write_text(json.dumps(header))
    lines = [json.dumps(dict(header, discrep_manifest=1))] + [json.dumps(e) for e in entries]
    (d / "manifest").write_bytes(pyzstd.compress(("\n".join(lines) + "\n").encode()))
    return root / "export"


def sync_export(exp: Path, dst: Path) -> None:
    """Apply a hand-made export with the real reader."""
    r = MountReader(str(exp))
    try:
        sync(r, os.fsencode(dst))
    finally:
        r.close()


def meta(**kw):
    return dict({"mode": 0o644, "uid": os.getuid(), "gid": os.getgid(), "mtime_ns": 1}, **kw)


@pytest.mark.parametrize("bad", ["../evil", "/abs/evil", "a/../../evil", "a\x00b", ".discrep/x", "a//b", "./a"])
def test_bad_paths_refused_nothing_written(work_dir: Path, bad: str):
    dst = work_dir / "dst"
    dst.mkdir()
    exp = make_export(work_dir, [dict(meta(op="dir", path="ok")), dict(meta(op="dir", path=bad))])
    with pytest.raises(UnsafePathError):
        sync_export(exp, dst)
    assert not (work_dir / "evil").exists()
    assert not (dst / "ok").exists(), "the replica was touched before the manifest was validated"


def test_bad_move_and_link_paths(work_dir: Path):
    dst = work_dir / "dst"
    dst.mkdir()
    for entries in ([{"op": "move", "path": "x", "old": "../outside"}],
                    [dict(meta(op="file", path="f", size=0, idx=0, link="/etc/passwd"))]):
        exp = make_export(work_dir / str(len(os.listdir(work_dir))), entries)
        with pytest.raises(UnsafePathError):
            sync_export(exp, dst)


def test_malformed_fields(work_dir: Path):
    dst = work_dir / "dst"
    dst.mkdir()
    exp = make_export(work_dir, [dict(meta(op="file", path="f", size=-1, idx=0))])
    with pytest.raises(ManifestError):
        sync_export(exp, dst)


def test_symlink_inside_dest_is_not_followed(work_dir: Path):
    outside = work_dir / "outside"
    outside.mkdir()
    dst = work_dir / "dst"
    dst.mkdir()
    (dst / ".discrep").mkdir()
    os.symlink(outside, dst / "link")
    # an incremental cycle that writes below "link/" without declaring "link" a directory
    exp = make_export(work_dir, [dict(meta(op="dir", path="link/sub"))], cycle=1, base=0, full=False)
    with pytest.raises((UnsafePathError, ManifestError)):
        sync_export(exp, dst)
    assert os.listdir(outside) == []
    assert os.path.islink(dst / "link")


def test_symlink_target_kept_verbatim_not_followed(work_dir: Path):
    dst = work_dir / "dst"
    dst.mkdir()
    exp = make_export(work_dir, [dict(meta(op="symlink", path="l", target="../../../../etc/shadow"))])
    sync_export(exp, dst)
    assert os.readlink(dst / "l") == "../../../../etc/shadow"

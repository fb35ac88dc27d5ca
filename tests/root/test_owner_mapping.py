"""Owners map by name like rsync (default) or stay numeric with --numeric-ids (tier: root: chown)."""
from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
import pyzstd

import helpers
from discrep.transport.mount_reader import MountReader
from discrep.replica.options import ReplicaOptions
from discrep.replica.sync import sync

pytestmark = pytest.mark.root


def export_with(root: Path, entry: dict) -> Path:
    d = root / ".discrep"
    d.mkdir(parents=True)
    header = {"cycle": 1, "base": 0, "full": True, "created_ns": 1}
    (d / "cycle").write_text(json.dumps(header))
    lines = [json.dumps(dict(header, discrep_manifest=1)), json.dumps(entry)]
    (d / "manifest").write_bytes(pyzstd.compress(("\n".join(lines) + "\n").encode()))
    return root


@pytest.mark.parametrize("numeric", [False, True])
def test_owner_by_name_or_number(work_dir: Path, numeric: bool):
    helpers.require_root()
    nobody = pwd.getpwnam("nobody")
    exp = export_with(work_dir / f"exp{numeric}", {
        "op": "dir", "path": "d", "mode": 0o755, "uid": 54321, "gid": 54321, "user": "nobody",
        "group": "no-such-group-here", "mtime_ns": 1})
    dst = work_dir / f"dst{numeric}"
    dst.mkdir()
    r = MountReader(str(exp))
    try:
        sync(r, os.fsencode(dst), ReplicaOptions(numeric_ids=numeric))
    finally:
        r.close()
    st = os.stat(dst / "d")
    assert st.st_uid == (54321 if numeric else nobody.pw_uid)
    assert st.st_gid == 54321          # the group name does not exist here: its number is kept

"""Fixtures shared by the fuse-tier tests."""
from __future__ import annotations

from pathlib import Path

import pytest

import helpers


@pytest.fixture
def pair(work_dir: Path, monkeypatch):
    """(src, dst) in the test's directory; discrep's TMPDIR (export mountpoints) inside it too."""
    tmp = work_dir / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    src = work_dir / "src"
    src.mkdir()
    yield src, work_dir / "dst"
    assert not [m for m in helpers.mounts() if m[0].startswith(str(work_dir))], "mounts left behind"

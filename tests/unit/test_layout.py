"""The package layout rules hold: no import cycle, no private import, imports point down the
layers, no function over 80 lines, no module over 800 (scripts/check_layout.py, also run by hand)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_layout_rules_hold():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_layout.py")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_checker_finds_a_cycle_and_a_private_import(tmp_path):
    """The checker itself can fail: a planted cycle, private import and upward import are reported."""
    pkg = tmp_path / "discrep"
    (pkg / "core").mkdir(parents=True)
    (pkg / "replica").mkdir()
    for d in (pkg, pkg / "core", pkg / "replica"):
        (d / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from discrep.replica.b import thing\n")
    (pkg / "replica" / "b.py").write_text("from discrep.core.a import _hidden\nthing = 1\n")
    for leaf in ("blockdiff", "fuse_export"):
        (tmp_path / leaf).mkdir()
        (tmp_path / leaf / "__init__.py").write_text("")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_layout.py"), "--root", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "cycle: discrep.core.a <-> discrep.replica.b" in r.stdout
    assert "private import: discrep.replica.b imports _hidden from discrep.core.a" in r.stdout
    assert "layer: discrep.core.a (core) imports discrep.replica.b (replica), a higher layer" in r.stdout

"""Static checks every change must pass: no undefined name, unused import or syntax error (ruff's
pyflakes rules), in the packages, the tests and the scripts."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_pyflakes_rules_pass():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: ./scripts/setup.sh installs the test extra")
    r = subprocess.run([ruff, "check", "--no-cache", "--select", "F,E9", "--output-format", "concise",
                        "discrep", "fuse_export", "blockdiff", "tests", "scripts"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

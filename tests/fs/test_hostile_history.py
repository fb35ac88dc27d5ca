"""A source must not rewrite the replica's history: a cycle number at or below the last committed
one is refused, whether or not the cycle says it is full, and committed recovery points restore
as they were (tier: fs, hand-made exports read with the real reader)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from discrep.core.errors import Error
from test_hostile_manifest import make_export, meta, sync_export

pytestmark = [pytest.mark.fs, pytest.mark.hostile]


def _cycle(work_dir: Path, n: int, target: str, *, full: bool, base: int) -> Path:
    return make_export(work_dir / f"c{n}-{target}", [dict(meta(op="dir", path="d")),
                                                     dict(meta(op="symlink", path="d/s", target=target))],
                       cycle=n, base=base, full=full)


@pytest.mark.parametrize("full", [
    True,
    False])
def test_an_old_cycle_number_is_refused(work_dir: Path, full: bool):
    dst = work_dir / "dst"
    dst.mkdir()
    sync_export(_cycle(work_dir, 1, "v1", full=True, base=0), dst)
    for n in (2, 3, 4):
        sync_export(_cycle(work_dir, n, f"v{n}", full=False, base=n - 1), dst)
    assert os.readlink(dst / "d/s") == "v4"
    with pytest.raises(Error):
        sync_export(_cycle(work_dir, 3, "evil", full=full, base=2 if not full else 0), dst)
    assert os.readlink(dst / "d/s") == "v4"
    to = work_dir / "restored"
    p = subprocess.run([sys.executable, "-m", "discrep", "restore", str(dst), "--cycle", "2", "--to", str(to)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert os.readlink(to / "d/s") == "v2"

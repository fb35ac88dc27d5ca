"""``discrep agent --dry-run SRC`` (source.dryview): read-only, and the replica is untrusted -- it
may have signed only the regular files its walk reported (never a symlink's target, a path with
'..', an excluded file or anything in SRC/.discrep), and its lines are bounded.  Nothing is
written in SRC (no SRC/.discrep made)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import List

import blockdiff
import helpers

from discrep.protocol import agent_messages as am
from discrep.protocol.filters import FilterRules
from discrep.protocol.filterspec import FilterSpec
from discrep.protocol.sourceview import SignRequest


def _agent(src: Path, *lines: str, stdin: bytes = b"") -> List[dict]:
    exe = [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "discrep")]
    p = subprocess.run(exe + ["agent", "--dry-run", "--", str(src)], input="".join(lines).encode() + stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith(b"{")]


def _tree(src: Path) -> None:
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_bytes(os.urandom(20000))
    (src / "skip.tmp").write_bytes(b"tmp")
    os.symlink("/etc/passwd", src / "link")


def test_walk_and_sign_are_read_only_and_correct(work_dir: Path) -> None:
    src = work_dir / "src"
    _tree(src)
    before = helpers.tree_digest(src)
    old = blockdiff.sign_fd(os.open(src / "d/f", os.O_RDONLY), 20000, 4096, 256)
    with open(src / "d/f", "r+b") as f:
        f.seek(5000)
        f.write(b"x")
    walk = am.DryWalk(filters=None).encode()
    sign = am.DrySign.of(SignRequest(b"d/f", 20000, 4096, 256, old.fine)).encode()
    out = _agent(src, walk, sign, am.Bye().encode())
    paths = [e[0] for ev in out if ev["event"] == "dry-entries" for e in ev["entries"]]
    assert paths == ["d", "d/f", "link", "skip.tmp"]
    assert out[-2] == {"event": "dry-walked", "count": 4}
    assert out[-1]["event"] == "dry-signed" and out[-1]["differ"] == 4096
    assert not (src / ".discrep").exists()
    after = helpers.tree_digest(src)
    _agent(src, walk, sign)
    assert helpers.tree_digest(src) == after and before != after


def test_a_replica_cannot_have_other_files_signed(work_dir: Path) -> None:
    src = work_dir / "src"
    _tree(src)
    (src / ".discrep").mkdir()
    (src / ".discrep/secret").write_bytes(b"s")
    walk = am.DryWalk(filters=None).encode()
    for path in ("link", "d", "missing", "../etc/passwd", ".discrep/secret", "/etc/passwd"):
        obj = json.loads(am.DrySign.of(SignRequest(b"d/f", 3, 4096, 256)).encode())
        obj["path"] = path
        out = _agent(src, walk, json.dumps(obj) + "\n")
        assert out[-1]["event"] == "error", (path, out[-1])
        assert not any(ev["event"] == "dry-signed" for ev in out)


def test_excluded_files_are_not_walked_nor_signed(work_dir: Path) -> None:
    src = work_dir / "src"
    _tree(src)
    spec = FilterSpec(FilterRules.parse([("--exclude", "*.tmp")]))
    out = _agent(src, am.DryWalk(filters=spec.wire()).encode(),
                 am.DrySign.of(SignRequest(b"skip.tmp", 3, 4096, 256)).encode())
    paths = [e[0] for ev in out if ev["event"] == "dry-entries" for e in ev["entries"]]
    assert "skip.tmp" not in paths and out[-1]["event"] == "error"


def test_a_huge_line_is_refused(work_dir: Path) -> None:
    src = work_dir / "src"
    _tree(src)
    out = _agent(src, stdin=b"x" * (am.MAX_DRY_LINE + (2 << 20)))
    assert out[-1]["event"] == "error" and "longer than" in out[-1]["error"]

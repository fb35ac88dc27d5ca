"""Random operations under a live watcher, several journal cycles in a row, each checked with rsync.

The watcher journals; every cycle after the start gap must use the journal
(change_source == 'journal') and leave an identical replica.  Operations:
create, in-place write, append, delete, chmod, file rename (within and across
directories, over existing files), directory create / rename / delete.
"""
from __future__ import annotations

import importlib.util
import os
import random
import shutil
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ws", Path(__file__).with_name("test_watcher_inotify.py"))
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


def _random_ops(root: Path, rng: random.Random, n: int, k: int) -> set:
    inplace = set()
    for i in range(n):
        files = [p for p in root.rglob("*") if p.is_file() and ".discrep" not in p.parts
                 and p.name != S.MARK.decode()]
        dirs = [p for p in root.rglob("*") if p.is_dir() and ".discrep" not in p.parts]
        dirs.append(root)
        op = rng.choice(["create", "write", "append", "delete", "chmod", "rename", "rename",
                         "mkdir", "dirrename", "rmtree"])
        if op == "create" or not files:
            (rng.choice(dirs) / f"c{k}_{i}").write_bytes(rng.randbytes(rng.randint(0, 5000)))
        elif op == "write":
            f = rng.choice(files)
            f.write_bytes(rng.randbytes(rng.randint(0, 5000)))
            inplace.add(str(f.parent.relative_to(root)))
        elif op == "append":
            f = rng.choice(files)
            with open(f, "ab") as fh:
                fh.write(b"more")
            inplace.add(str(f.parent.relative_to(root)))
        elif op == "delete":
            rng.choice(files).unlink()
        elif op == "chmod":
            os.chmod(rng.choice(files), rng.choice([0o600, 0o644, 0o755]))
        elif op == "rename":
            f = rng.choice(files)
            target = rng.choice(files) if rng.random() < 0.3 else rng.choice(dirs) / f"r{k}_{i}"
            if target != f:
                os.rename(f, target)
        elif op == "mkdir":
            (rng.choice(dirs) / f"nd{k}_{i}" / "inner").mkdir(parents=True)
        elif op == "dirrename":
            cand = [d for d in dirs if d != root]
            if cand:
                d = rng.choice(cand)
                dest_parent = rng.choice([p for p in dirs if not str(p).startswith(str(d))])
                os.rename(d, dest_parent / f"mv{k}_{i}")
        elif op == "rmtree":
            cand = [d for d in dirs if d != root]
            if cand and rng.random() < 0.3:
                shutil.rmtree(rng.choice(cand))
    return inplace


@pytest.mark.parametrize("seed", [1, 2])
def test_random_ops_journal_cycles(work_dir, seed):
    src, dst, p = S.prepared(work_dir, "inotify")
    try:
        rng = random.Random(seed)
        for k in range(4):
            inplace = _random_ops(src, rng, 40, k)
            S.sync_point(src)
            r = S.replicate(src, dst)
            assert r["change_source"] == "journal", r
            # mtime-only differences on dirs whose file was rewritten in place: see S.assert_same
            S.assert_same(src, dst, inplace=[d for d in inplace if d != "."])
    finally:
        S.stop_watcher(p)

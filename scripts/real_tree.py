#!/usr/bin/env python3
"""Issue 2's acceptance run on a real tree: replicate, churn for real, replicate again, check.

    sudo .venv/bin/python scripts/real_tree.py [--dir /dev/shm/discrep-real]

The tree: the Python standard library, a SQLite database, a 256 MiB binary and a sparse 1 GiB
file.  The churn: SQL updates and deletes, in-place writes, an append, one byte inserted at the
start of a file, file and directory renames, deletes, chmod, touch, xattr changes.  After each
cycle the replica is checked independently (rsync -aHAXnci --delete, nothing printed = identical).
Prints each cycle's JSON and what the changed files add up to.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DISCREP = str(REPO / ".venv" / "bin" / "discrep")


def replicate(src: Path, dst: Path) -> dict:
    p = subprocess.run([DISCREP, "replicate", "--json", str(src), str(dst)], capture_output=True, text=True)
    if p.returncode not in (0, 1):
        raise SystemExit(f"replicate failed ({p.returncode}): {p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def check(src: Path, dst: Path) -> list:
    p = subprocess.run(["rsync", "-aHAXnci", "--delete", "--modify-window=-1", "--exclude=/.discrep/",
                        f"{src}/", f"{dst}/"], capture_output=True, text=True, check=True)
    return p.stdout.split("\n")[:-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/dev/shm/discrep-real")
    a = ap.parse_args()
    base = Path(a.dir)
    if base.exists():
        shutil.rmtree(base)
    src, dst = base / "src", base / "dst"
    src.mkdir(parents=True)
    rnd = random.Random(2)
    shutil.copytree(sysconfig.get_paths()["stdlib"], src / "stdlib", symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "__pycache__"))
    db = sqlite3.connect(src / "app.db")
    db.execute("create table t (id integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", ((i, os.urandom(60).hex()) for i in range(100_000)))
    db.commit()
    (src / "blob.bin").write_bytes(os.urandom(256 << 20))
    with open(src / "disk.img", "wb") as f:
        f.truncate(1 << 30)
        for off in (0, 300 << 20, 900 << 20):
            f.seek(off)
            f.write(rnd.randbytes(1 << 20))
    r1 = replicate(src, dst)
    print("cycle 1:", json.dumps(r1))
    print("check 1:", check(src, dst) or "identical")

    # churn
    changed = set()
    db.executemany("update t set v = ? where id = ?", ((os.urandom(60).hex(), rnd.randrange(100_000)) for _ in range(500)))
    db.execute("delete from t where id % 97 = 0")
    db.commit()
    db.close()
    changed.add(src / "app.db")
    with open(src / "blob.bin", "r+b") as f:                     # in-place writes
        for _ in range(50):
            f.seek(rnd.randrange(256 << 20))
            f.write(rnd.randbytes(4096))
    changed.add(src / "blob.bin")
    with open(src / "disk.img", "r+b") as f:                     # write into a hole and into data
        f.seek(600 << 20)
        f.write(rnd.randbytes(8192))
        f.seek(300 << 20)
        f.write(b"X" * 4096)
    changed.add(src / "disk.img")
    with open(src / "stdlib" / "os.py", "a") as f:               # append
        f.write("\n# appended by discrep's real-tree check\n")
    changed.add(src / "stdlib" / "os.py")
    p = src / "stdlib" / "typing.py"                              # one byte inserted at the start
    p.write_bytes(b"#" + p.read_bytes())
    changed.add(p)
    os.rename(src / "stdlib" / "json", src / "stdlib" / "json_renamed")        # directory rename
    os.rename(src / "stdlib" / "abc.py", src / "stdlib" / "abc_renamed.py")    # file rename
    shutil.rmtree(src / "stdlib" / "tkinter", ignore_errors=True)             # deletes
    (src / "stdlib" / "this.py").unlink()
    os.chmod(src / "stdlib" / "random.py", 0o600)                               # chmod
    os.utime(src / "stdlib" / "string.py", ns=(1_700_000_000_123_456_789,) * 2)  # touch
    os.setxattr(src / "stdlib" / "ast.py", "user.origin", b"real-tree check")  # xattr
    r2 = replicate(src, dst)
    total = sum(p.stat().st_size for p in changed)
    print("cycle 2:", json.dumps(r2))
    print("check 2:", check(src, dst) or "identical")
    print(f"changed files total {total} bytes; cycle 2 read {r2['bytes_transferred']} bytes through the export "
          f"= {100 * r2['bytes_transferred'] / total:.3f} % of that")
    shutil.rmtree(base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

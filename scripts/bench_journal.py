#!/usr/bin/env python3
"""Benchmark: a journal cycle (live watcher) vs local rsync, watcher throughput and RSS.

    sudo .venv/bin/python scripts/bench_journal.py --quick          # 100 000 files on tmpfs
    sudo .venv/bin/python scripts/bench_journal.py                  # + 1 000 000 files on a loop ext4

Per tree size: build N small files (1-8 KiB, 1000 per directory); initial
``discrep replicate`` (scan) into DST and ``rsync -aHAX`` into DST2; start
``discrep watch``; one replicate to close the watcher's start gap; change 10
files; time one ``discrep replicate`` (must say change_source journal) against
``rsync -aHAX --delete SRC/ DST2/``.  Then watcher throughput: create E files as
fast as possible, wait until the journal holds all of them (no loss), events/s;
and the watcher's VmRSS.  Prints a table.  Never on the root ext4 (mass deletes
make it crawl): tmpfs for the quick case, a loop-mounted ext4 image (mkfs,
mount, cleanup in finally) for 1M.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DISCREP = os.path.join(REPO, ".venv", "bin", "discrep")

from discrep.journal.store import Journal  # noqa: E402
from discrep.source.build import watcher_alive  # noqa: E402


def build(src: str, n: int) -> None:
    per = 1000
    payload = os.urandom(8192)
    for d in range((n + per - 1) // per):
        dd = os.path.join(src, f"d{d // 100:03d}", f"s{d:05d}")
        os.makedirs(dd, exist_ok=True)
        for i in range(min(per, n - d * per)):
            fd = os.open(os.path.join(dd, f"f{i:04d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, payload[:1024 + (i * 37 % 7168)])
            os.close(fd)


def replicate(src: str, dst: str) -> dict:
    t = time.monotonic()
    r = subprocess.run([DISCREP, "replicate", "--json", src, dst], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode not in (0, 1):
        raise SystemExit(f"replicate failed: {r.stderr.decode()[-500:]}")
    res = json.loads(r.stdout.splitlines()[-1])
    res["wall"] = time.monotonic() - t
    return res


def rsync(src: str, dst: str) -> float:
    t = time.monotonic()
    subprocess.run(["rsync", "-aHAX", "--delete", "--exclude=/.discrep/", src + "/", dst + "/"], check=True)
    return time.monotonic() - t


def start_watcher(src: str) -> subprocess.Popen:
    p = subprocess.Popen([DISCREP, "watch", src], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if watcher_alive(os.fsencode(src)):
            j = Journal(os.path.join(src, ".discrep"))
            ok = j.get("watcher_pid") == str(p.pid)
            be = j.get("watcher_backend")
            j.close()
            if ok:
                p.backend = be  # type: ignore[attr-defined]
                return p
        time.sleep(0.1)
    raise SystemExit("watcher did not start")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def throughput(src: str, nev: int) -> float:
    j = Journal(os.path.join(src, ".discrep"))
    before = j.last_seq()
    d = os.path.join(src, "burst")
    os.mkdir(d)
    t = time.monotonic()
    for i in range(nev):
        os.close(os.open(os.path.join(d, f"e{i}"), os.O_WRONLY | os.O_CREAT, 0o644))
    while True:
        n = j.con.execute("SELECT COUNT(*) FROM entries WHERE seq > ? AND op = 'create' AND path >= ? "
                          "AND path < ?", (before, b"burst/e", b"burst/f")).fetchone()[0]
        if n >= nev:
            break
        if time.monotonic() - t > 120:
            raise SystemExit(f"only {n} of {nev} creates journaled")
        time.sleep(0.01)
    el = time.monotonic() - t
    gap = j.gap()
    j.close()
    if gap:
        raise SystemExit(f"journal gap during the throughput run: {gap}")
    return nev / el


def run_case(base: str, n: int, nev: int) -> dict:
    src, dst, dst2 = (os.path.join(base, x) for x in ("src", "dst", "dst2"))
    os.makedirs(src)
    t = time.monotonic()
    build(src, n)
    t_build = time.monotonic() - t
    r0 = replicate(src, dst)
    t_rs0 = rsync(src, dst2)
    w = start_watcher(src)
    try:
        replicate(src, dst)                  # closes the watcher's start gap (scan)
        for i in range(10):
            p = os.path.join(src, f"d000/s{i:05d}/f0001")
            with open(p, "r+b") as f:
                f.write(b"changed %d %f" % (i, time.time()))
        time.sleep(0.3)                      # the watcher's batch (<= 50 ms) is committed
        r = replicate(src, dst)
        t_rsync = rsync(src, dst2)
        diff = subprocess.run(["rsync", "-aHAXnci", "--delete", "--exclude=/.discrep/", src + "/", dst + "/"],
                              stdout=subprocess.PIPE).stdout.decode().split("\n")
        diff = [x for x in diff if x.strip() and not x.startswith(".d..t......")]
        ev_s = throughput(src, nev)
        rss = rss_kib(w.pid)
        backend = w.backend
    finally:
        w.send_signal(signal.SIGTERM)
        w.wait(60)
    return {"files": n, "backend": backend, "build_s": t_build, "initial_replicate_s": r0["wall"],
            "initial_rsync_s": t_rs0, "cycle_s": r["wall"], "cycle_inner_s": r["duration_s"],
            "change_source": r["change_source"], "bytes": r["bytes_transferred"], "rsync_s": t_rsync,
            "ratio": r["wall"] / t_rsync, "events_per_s": ev_s, "rss_mib": rss / 1024,
            "replica_diffs": len(diff)}


def loop_fs(size_gb: int):
    d = tempfile.mkdtemp(prefix="discrep-bench-")
    img = os.path.join(d, "fs.img")
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(size_gb << 30)
    dev = subprocess.run(["losetup", "--find", "--show", img], check=True, stdout=subprocess.PIPE,
                         text=True).stdout.strip()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "4500000", dev], check=True)
    subprocess.run(["mount", dev, mnt], check=True)
    return d, dev, mnt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the 100 000-file case (tmpfs)")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--big-files", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=50_000)
    a = ap.parse_args()
    rows = []
    tmp = tempfile.mkdtemp(prefix="discrep-bench-", dir="/dev/shm")
    try:
        rows.append(run_case(tmp, a.files, a.events))
        print("ROW", json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not a.quick:
        d, dev, mnt = loop_fs(24)
        try:
            rows.append(run_case(mnt, a.big_files, a.events))
            print("ROW", json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            subprocess.run(["umount", mnt])
            subprocess.run(["losetup", "-d", dev])
            shutil.rmtree(d, ignore_errors=True)
    cols = ["files", "backend", "initial_replicate_s", "initial_rsync_s", "cycle_s", "rsync_s", "ratio",
            "change_source", "bytes", "events_per_s", "rss_mib", "replica_diffs"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

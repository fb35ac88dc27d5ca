#!/usr/bin/env python3
"""discrep over SSH vs rsync over SSH, side by side, in one run, on one loopback sshd.

    sudo .venv/bin/python scripts/bench.py [--quick] [--cases a,b,c] [--json out.json]

Everything lives on a dedicated tmpfs mounted at /tmp/discrep-bench-*/ (unmounted in
finally).  A private sshd (generated host and user keys) listens on 127.0.0.1; both tools
reach it through a counting TCP proxy (threads, optional one-way delay), so "wire" is the
bytes that crossed TCP in both directions, SSH overhead included.  discrep runs
``discrep replicate -F CFG --remote-discrep <venv discrep> ALIAS:SRC DEST`` (transport
auto: sshfs); rsync runs ``rsync -aHAXS --delete --exclude=/.discrep/ -e 'ssh -F CFG'``.  Push rows
(``p*``) run ``discrep replicate ... SRC ALIAS:DEST`` beside ``rsync ... SRC/ ALIAS:DEST/``; there the
tool's own process is the source side and sshd's sessions are the replica side, so the two CPU
columns of a push row are source+replica.
Each row is checked with ``rsync -aHAXnci --delete`` (nothing printed = identical).
CPU seconds per side: the replica's is the tool's process and the children it waited for
(``RUSAGE_CHILDREN``: discrep with sshfs, rsync with its ssh); the source's is what the
sshd master reaped from the run's sessions (sshd itself, the agent and its export, or
rsync's sender; sftp-server) -- both tools pay their SSH crypto on each side.

Cases are functions registered with @case(letter, title); each gets a Ctx and returns
after preparing SRC; incremental cases call ctx.initial() (untimed first copy for both
tools) and then change SRC.  Add a case by writing one more function.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DISCREP = str(REPO / ".venv" / "bin" / "discrep")
ALIAS = "bench-src"
# both tools use this cipher (discrep's paramiko and sshfs prefer it; rsync's ssh gets it from the client config)
CIPHER = "aes128-gcm@openssh.com"


# --------------------------------------------------------------------------- counting proxy

class CountingProxy:
    """127.0.0.1:port -> target; counts bytes both ways; optional one-way delay (each direction)."""

    def __init__(self, target_port: int, delay_s: float = 0.0):
        self.target = ("127.0.0.1", target_port)
        self.delay = delay_s
        self.up = self.down = 0
        self.events: List = []       # (monotonic time, bytes) per chunk read, both directions
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0
            self.events = []

    def max_rate(self, window_s: float = 5.0) -> float:
        """Highest mean rate (bytes/s, both directions) over any ``window_s`` window of the run
        (shorter runs: their bytes over ``window_s``)."""
        with self._lock:
            ev = list(self.events)
        best, lo, acc = 0, 0, 0
        for t, n in ev:
            acc += n
            while ev[lo][0] <= t - window_s:
                acc -= ev[lo][1]
                lo += 1
            best = max(best, acc)
        return best / window_s

    @property
    def total(self) -> int:
        return self.up + self.down

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(c, s, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, "down"), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, direction: str) -> None:
        if self.delay:
            return self._pump_delayed(a, b, direction)
        try:
            while True:
                d = a.recv(1 << 20)
                if not d:
                    break
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(d))
                    self.events.append((time.monotonic(), len(d)))
                b.sendall(d)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pump_delayed(self, a, b, direction) -> None:
        import queue
        q: "queue.Queue" = queue.Queue()

        def sender() -> None:
            while True:
                t, d = q.get()
                if d is None:
                    break
                wait = t + self.delay - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    b.sendall(d)
                except OSError:
                    break
            try:
                b.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        th = threading.Thread(target=sender, daemon=True)
        th.start()
        try:
            while True:
                d = a.recv(1 << 20)
                if not d:
                    break
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(d))
                    self.events.append((time.monotonic(), len(d)))
                q.put((time.monotonic(), d))
        except OSError:
            pass
        q.put((0, None))

    def close(self) -> None:
        self._stop = True
        self.sock.close()


# --------------------------------------------------------------------------- sshd

class Sshd:
    def __init__(self, base: Path):
        self.dir = base / "ssh"
        self.dir.mkdir()
        for k in ("host", "user"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / k)], check=True)
        shutil.copy(self.dir / "user.pub", self.dir / "authorized_keys")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir}/host\n"
            f"AuthorizedKeysFile {self.dir}/authorized_keys\nPidFile {self.dir}/sshd.pid\nStrictModes no\n"
            f"UsePAM no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            f"Subsystem sftp /usr/lib/openssh/sftp-server\nLogLevel ERROR\nMaxStartups 100\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "sshd.log", "ab"))
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)

    def client_config(self, proxy_port: int) -> Path:
        typ, b64 = (self.dir / "host.pub").read_text().split()[:2]
        kh = self.dir / "known_hosts"
        kh.write_text(f"[127.0.0.1]:{proxy_port} {typ} {b64}\n")
        cfg = self.dir / f"ssh_config_{proxy_port}"
        cfg.write_text(f"Host {ALIAS}\n  HostName 127.0.0.1\n  Port {proxy_port}\n  User root\n"
                       f"  IdentityFile {self.dir}/user\n  IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n"
                       f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
                       f"  Ciphers {CIPHER}\n  Compression no\n")
        return cfg

    def children_cpu(self) -> float:
        """CPU seconds (user + system) of every finished SSH session: the sshd master's reaped children
        (per-connection sshd, the remote command and what it ran: the source side of a run)."""
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[13]) + int(f[14])) / os.sysconf("SC_CLK_TCK")   # cutime, cstime

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every session of the last run ended (so its CPU is counted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") or \
                    not open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().strip():
                return
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- cases

CASES: Dict[str, "Case"] = {}


class Case:
    def __init__(self, key: str, title: str, fn: Callable, delay_ms: float = 0.0, loop_gb: int = 0,
                 bwlimit: bool = False, push: bool = False):
        self.key, self.title, self.fn, self.delay_ms = key, title, fn, delay_ms
        self.push = push         # both tools push: discrep replicate SRC host:DEST vs rsync SRC/ host:DEST/
        self.loop_gb = loop_gb   # > 0: the case's trees live on a loop-mounted ext4 of that size
        self.bwlimit = bwlimit   # both tools get --bwlimit=BWLIMIT; the row reports their max 5-s rates


def case(key: str, title: str, *, delay_ms: float = 0.0, loop_gb: int = 0, bwlimit: bool = False,
         push: bool = False):
    def deco(fn):
        CASES[key] = Case(key, title, fn, delay_ms, loop_gb, bwlimit, push)
        return fn
    return deco


class Ctx:
    def __init__(self, root: Path, quick: bool, runner: "Runner"):
        self.root, self.quick, self.runner = root, quick, runner
        self.src = root / "src"
        self.src.mkdir()
        self.rng = random.Random(42)

        self.cleanups: List[Callable[[], None]] = []

    def initial(self) -> None:
        """Untimed first copy for both tools (incremental cases)."""
        self.runner.run_discrep(self)
        self.runner.run_rsync(self)


def _small_files(ctx: Ctx, n: int) -> None:
    rng = ctx.rng
    for i in range(n):
        d = ctx.src / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir()
        (d / f"f{i:06d}").write_bytes(rng.randbytes(rng.randint(1024, 8192)))


def _big_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


@case("a", "initial: 100 000 files of 1-8 KiB")
def case_a(ctx: Ctx) -> None:
    _small_files(ctx, 10_000 if ctx.quick else 100_000)


@case("b", "initial: one 1 GiB file")
def case_b(ctx: Ctx) -> None:
    _big_file(ctx.src / "big.bin", (128 << 20) if ctx.quick else (1 << 30))


def _random_writes(path: Path, rng: random.Random, n: int = 100) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for _ in range(n):
            f.seek(rng.randrange(0, size - 4096))
            f.write(rng.randbytes(4096))


@case("c", "100 random 4 KiB overwrites in the 1 GiB file")
def case_c(ctx: Ctx) -> None:
    case_b(ctx)
    ctx.initial()
    _random_writes(ctx.src / "big.bin", ctx.rng)


@case("d", "1 byte inserted at the front of a 100 MiB file")
def case_d(ctx: Ctx) -> None:
    p = ctx.src / "f.bin"
    _big_file(p, (16 << 20) if ctx.quick else (100 << 20))
    ctx.initial()
    data = p.read_bytes()
    p.write_bytes(b"!" + data)


@case("e", "10 changed files out of the 100 000")
def case_e(ctx: Ctx) -> None:
    case_a(ctx)
    ctx.initial()
    files = sorted(ctx.src.rglob("f*"))
    for p in ctx.rng.sample(files, 10):
        p.write_bytes(ctx.rng.randbytes(ctx.rng.randint(1024, 8192)))


@case("w", "10 changed files out of the 100 000, watcher running on the source")
def case_w(ctx: Ctx) -> None:
    """Case e with ``discrep watch SRC`` running: the cycle -- the first since the watcher started --
    reads the journal, it does not walk."""
    _watched_change(ctx, 10_000 if ctx.quick else 100_000)


@case("W", "10 changed files out of 1 000 000, watcher running (loop-mounted ext4)", loop_gb=40)
def case_big_w(ctx: Ctx) -> None:
    _watched_change(ctx, 100_000 if ctx.quick else 1_000_000)


def _watched_change(ctx: Ctx, n: int) -> None:
    _small_files(ctx, n)
    ctx.initial()
    proc = subprocess.Popen([DISCREP, "watch", str(ctx.src)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ctx.cleanups.append(stop)
    # the watcher closes its own start gap (a background scan of its own): once status says it is
    # caught up, the timed cycle -- the first one since the watcher started -- reads the journal
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        st = subprocess.run([DISCREP, "status", "--json", str(ctx.src)], capture_output=True, text=True)
        try:
            if json.loads(st.stdout.strip().splitlines()[-1])["source"].get("caught_up"):
                break
        except (ValueError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError("the watcher did not catch up within 600 s")
    files = sorted(ctx.src.glob("d00*/f*"))
    for p in ctx.rng.sample(files, 10):
        p.write_bytes(ctx.rng.randbytes(ctx.rng.randint(1024, 8192)))


@case("f", "SQLite 100k rows: 200 updates + 1% deleted")
def case_f(ctx: Ctx) -> None:
    db = ctx.src / "app.db"
    n = 10_000 if ctx.quick else 100_000
    con = sqlite3.connect(db)
    con.execute("create table t (id integer primary key, v text)")
    con.executemany("insert into t values (?, ?)", ((i, os.urandom(40).hex()) for i in range(n)))
    con.commit()
    con.close()
    ctx.initial()
    con = sqlite3.connect(db)
    for i in ctx.rng.sample(range(n), 200):
        con.execute("update t set v = ? where id = ?", (os.urandom(40).hex(), i))
    con.executemany("delete from t where id = ?", ((i,) for i in ctx.rng.sample(range(n), n // 100)))
    con.commit()
    con.close()


@case("g", "1 GiB sparse file, one 4 KiB write")
def case_g(ctx: Ctx) -> None:
    p = ctx.src / "sparse.img"
    with open(p, "wb") as f:
        f.truncate((128 << 20) if ctx.quick else (1 << 30))
    ctx.initial()
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size // 2)
        f.write(os.urandom(4096))


@case("h", "case c with 20 ms one-way delay", delay_ms=20)
def case_h(ctx: Ctx) -> None:
    case_c(ctx)


BWLIMIT = {"rate": "2M"}      # --bwlimit RATE of the bench (rsync's syntax; both tools get it in rows l, L)


def _rate_bps(text: str) -> int:
    """rsync's --bwlimit syntax in bytes/s (K/M/G powers of 1024, KB/MB/GB of 1000, bare = KiB/s)."""
    import re
    m = re.match(r"^(\d+(?:\.\d+)?)([KMG]?)(B?)$", text.strip(), re.I)
    if not m:
        raise ValueError(f"bad rate {text!r}")
    base = 1000 if m.group(3) else 1024
    return int(float(m.group(1)) * base ** {"": 1, "K": 1, "M": 2, "G": 3}[m.group(2).upper()])


@case("l", "--bwlimit: first copy of 32 MiB (a file and 1 000 small ones)", bwlimit=True)
def case_l(ctx: Ctx) -> None:
    _big_file(ctx.src / "big.bin", (16 if ctx.quick else 32) << 20)
    _small_files(ctx, 1000)


@case("L", "--bwlimit: case c's 100 overwrites in a 256 MiB file, incremental", bwlimit=True)
def case_big_l(ctx: Ctx) -> None:
    _big_file(ctx.src / "img", 256 << 20)
    ctx.initial()
    _random_writes(ctx.src / "img", ctx.rng)


@case("n", "no change at all: the per-cycle floor (a 3 MiB file, nothing changed)")
def case_n(ctx: Ctx) -> None:
    _big_file(ctx.src / "f.bin", 3 << 20)
    ctx.initial()


@case("pl", "push --bwlimit: first copy of 32 MiB (a file and 1 000 small ones)", bwlimit=True, push=True)
def case_pl(ctx: Ctx) -> None:
    case_l(ctx)


@case("pa", "push, initial: 100 000 files of 1-8 KiB (SRC host:DEST)", push=True)
def case_pa(ctx: Ctx) -> None:
    case_a(ctx)


@case("pb", "push, initial: one 1 GiB file (SRC host:DEST)", push=True)
def case_pb(ctx: Ctx) -> None:
    case_b(ctx)


@case("pe", "push, 10 changed files out of the 100 000 (SRC host:DEST)", push=True)
def case_pe(ctx: Ctx) -> None:
    case_e(ctx)


# --------------------------------------------------------------------------- runner

def _own_children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Runner:
    def __init__(self, sshd: Sshd, delay_ms: float, bwlimit: str = "", push: bool = False):
        self.sshd = sshd
        self.push = push
        self.proxy = CountingProxy(sshd.port, delay_ms / 1000.0)
        self.cfg = sshd.client_config(self.proxy.port)
        self.extra = [f"--bwlimit={bwlimit}"] if bwlimit else []
        self.timed = False       # initial() copies run unlimited; the timed run gets the extra options

    def close(self) -> None:
        self.proxy.close()

    def run_discrep(self, ctx: Ctx) -> Dict:
        dst = ctx.root / "dst-discrep"
        self.proxy.reset()
        self.sshd.settle()
        cpu0, src0 = _own_children_cpu(), self.sshd.children_cpu()
        t = time.monotonic()
        r = subprocess.run([DISCREP, "replicate", "--json", "-q", "-F", str(self.cfg), "--remote-discrep", DISCREP,
                            *(self.extra if self.timed else []),
                            *((str(ctx.src), f"{ALIAS}:{dst}") if self.push else (f"{ALIAS}:{ctx.src}", str(dst)))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, TMPDIR=str(ctx.root)))
        wall = time.monotonic() - t
        cpu = _own_children_cpu() - cpu0
        self.sshd.settle()
        time.sleep(0.05)
        if r.returncode not in (0, 1):
            raise RuntimeError(f"discrep failed ({r.returncode}): {r.stderr.strip()}")
        return {"wall": wall, "wire": self.proxy.total, "res": json.loads(r.stdout.strip().splitlines()[-1]),
                "max5": self.proxy.max_rate(5.0), "cpu": cpu, "src_cpu": self.sshd.children_cpu() - src0}

    def run_rsync(self, ctx: Ctx) -> Dict:
        dst = ctx.root / "dst-rsync"
        self.proxy.reset()
        self.sshd.settle()
        cpu0, src0 = _own_children_cpu(), self.sshd.children_cpu()
        t = time.monotonic()
        r = subprocess.run(["rsync", "-aHAXS", "--delete", "--exclude=/.discrep/", "-e", f"ssh -F {self.cfg}",
                            *(self.extra if self.timed else []),
                            *((f"{ctx.src}/", f"{ALIAS}:{dst}/") if self.push else (f"{ALIAS}:{ctx.src}/", f"{dst}/"))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        wall = time.monotonic() - t
        cpu = _own_children_cpu() - cpu0
        self.sshd.settle()
        time.sleep(0.05)
        if r.returncode != 0:
            raise RuntimeError(f"rsync failed ({r.returncode}): {r.stderr.strip()}")
        return {"wall": wall, "wire": self.proxy.total, "max5": self.proxy.max_rate(5.0), "cpu": cpu,
                "src_cpu": self.sshd.children_cpu() - src0}


def identical(src: Path, dst: Path) -> bool:
    r = subprocess.run(["rsync", "-aHAXnci", "--delete", "--exclude=/.discrep/", f"{src}/", f"{dst}/"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return r.returncode == 0 and not r.stdout.strip()


def run_case(c: Case, base: Path, sshd: Sshd, quick: bool) -> Dict:
    if c.loop_gb:
        with loop_ext4(c.loop_gb) as mnt:
            return _run_case(c, mnt, sshd, quick)
    return _run_case(c, base, sshd, quick)


@contextlib.contextmanager
def loop_ext4(size_gb: int):
    """A loop-mounted ext4 (image on the root disk, sparse) for trees too big for the tmpfs;
    unmounted and detached in finally."""
    d = Path(tempfile.mkdtemp(prefix="discrep-bench-loop-"))
    img, mnt = d / "fs.img", d / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size_gb << 30)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "4500000", dev], check=True)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)])
    finally:
        subprocess.run(["losetup", "-d", dev])
        shutil.rmtree(d, ignore_errors=True)


def _run_case(c: Case, base: Path, sshd: Sshd, quick: bool) -> Dict:
    root = Path(tempfile.mkdtemp(prefix=f"case-{c.key}-", dir=base))
    runner = Runner(sshd, c.delay_ms, BWLIMIT["rate"] if c.bwlimit else "", c.push)
    try:
        ctx = Ctx(root, quick, runner)
        c.fn(ctx)
        runner.timed = True
        d = runner.run_discrep(ctx)
        r = runner.run_rsync(ctx)
        ok_d = identical(ctx.src, root / "dst-discrep")
        hist_kept = _history_kept(root / "dst-discrep", d["res"].get("cycle"))
        ok_r = identical(ctx.src, root / "dst-rsync")
        return {"case": c.key, "title": c.title, "discrep_s": round(d["wall"], 3), "rsync_s": round(r["wall"], 3),
                "time_ratio": round(d["wall"] / r["wall"], 2) if r["wall"] else None,
                "discrep_wire": d["wire"], "rsync_wire": r["wire"],
                "wire_ratio": round(d["wire"] / r["wire"], 2) if r["wire"] else None,
                "discrep_identical": ok_d, "rsync_identical": ok_r, "transport": d["res"].get("transport"),
                "connections": d["res"].get("connections"), "change_source": d["res"].get("change_source"),
                "mounted": d["res"].get("mounted"),
                "history_written": d["res"].get("history_bytes"), "history_kept": hist_kept,
                "discrep_cpu": round(d["cpu"], 2), "discrep_src_cpu": round(d["src_cpu"], 2),
                "rsync_cpu": round(r["cpu"], 2), "rsync_src_cpu": round(r["src_cpu"], 2),
                **(_rate_fields(BWLIMIT["rate"], d, r) if c.bwlimit else {})}
    finally:
        for fn in reversed(getattr(locals().get("ctx"), "cleanups", [])):
            fn()
        runner.close()
        shutil.rmtree(root, ignore_errors=True)


def _rate_fields(bwlimit: str, d: Dict, r: Dict) -> Dict:
    """A --bwlimit row: each tool's highest 5-s mean rate on the wire (both directions), vs the limit."""
    limit = _rate_bps(bwlimit)
    return {"bwlimit": bwlimit, "discrep_max5s_Bps": round(d["max5"]), "rsync_max5s_Bps": round(r["max5"]),
            "discrep_max5s_vs_limit": round(d["max5"] / limit, 3), "rsync_max5s_vs_limit": round(r["max5"] / limit, 3)}


def _history_kept(dst: Path, cycle) -> Optional[int]:
    """Bytes the replica's history keeps for this cycle (blocks referenced only by the history:
    saved old blocks, replaced or deleted files).  Hard links shared with the tree count 0."""
    if not cycle:
        return None
    d = dst / ".discrep" / "history" / str(cycle)
    total = 0
    for p in d.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and st.st_nlink == 1:
            total += st.st_blocks * 512
    return total


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def table(rows: List[Dict]) -> str:
    out = [f"Both tools over one loopback sshd with cipher {CIPHER}, compression off, through a counting proxy.",
           "",
           "| case | discrep s | rsync s | time ratio | discrep wire | rsync wire | wire ratio | identical "
           "| history written / kept | CPU s replica+source: discrep | rsync |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['case']} {r['title']} | error: {r['error']} | | | | | | | | | |")
            continue
        hw, hk = r.get("history_written"), r.get("history_kept")
        hist = f"{fmt_bytes(hw)} / {fmt_bytes(hk)}" if hw is not None and hk is not None else ""
        out.append(f"| {r['case']} {r['title']} | {r['discrep_s']:.2f} | {r['rsync_s']:.2f} | {r['time_ratio']}x | "
                   f"{fmt_bytes(r['discrep_wire'])} | {fmt_bytes(r['rsync_wire'])} | {r['wire_ratio']}x | "
                   f"{'yes' if r['discrep_identical'] and r['rsync_identical'] else 'NO'} | {hist} | "
                   f"{r['discrep_cpu']:.2f}+{r['discrep_src_cpu']:.2f} | {r['rsync_cpu']:.2f}+{r['rsync_src_cpu']:.2f} |")
    limited = [r for r in rows if r.get("bwlimit")]
    if limited:
        out += ["", "Highest mean rate on the wire over any 5 s (both directions, SSH included) under --bwlimit:", "",
                "| case | limit | discrep max 5 s | rsync max 5 s |", "|---|---|---|---|"]
        for r in limited:
            out.append(f"| {r['case']} | {r['bwlimit']} | {fmt_bytes(r['discrep_max5s_Bps'])}/s "
                       f"({r.get('discrep_max5s_vs_limit', '?')}x) | {fmt_bytes(r['rsync_max5s_Bps'])}/s "
                       f"({r.get('rsync_max5s_vs_limit', '?')}x) |")
    return "\n".join(out)


def signature_throughput(base: Path, size: int) -> float:
    """Source-side signing speed (GB/s) of a cached file: what the export spends per byte it must hash."""
    sys.path.insert(0, str(REPO))
    import blockdiff
    p = base / "sig-probe.bin"
    _big_file(p, size)
    fd = os.open(p, os.O_RDONLY)
    try:
        blockdiff.sign_fd(fd)            # warm the page cache
        t = time.perf_counter()
        blockdiff.sign_fd(fd)
        dt = time.perf_counter() - t
    finally:
        os.close(fd)
        p.unlink()
    return size / dt / 1e9


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (10 000 files, 128 MiB, 16 MiB)")
    ap.add_argument("--cases", default="a,b,c,d,e", help=f"comma-separated, from {','.join(CASES)} (default a-e)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--tmpfs-size", default="12g")
    ap.add_argument("--bwlimit", default=BWLIMIT["rate"], metavar="RATE",
                    help="the limit both tools get in the --bwlimit rows l and L (default %(default)s)")
    ap.add_argument("--sig", action="store_true", help="also measure source-side signature throughput")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (tmpfs mount, sshd, FUSE)", file=sys.stderr)
        return 2
    keys = [k.strip() for k in a.cases.split(",") if k.strip()]
    BWLIMIT["rate"] = a.bwlimit
    _rate_bps(a.bwlimit)
    for k in keys:
        if k not in CASES:
            print(f"bench: unknown case {k!r}", file=sys.stderr)
            return 2
    base = Path(tempfile.mkdtemp(prefix="discrep-bench-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={a.tmpfs_size}", "discrep-bench", str(base)], check=True)
    sshd = None
    rows: List[Dict] = []
    try:
        sshd = Sshd(base)
        for k in keys:
            c = CASES[k]
            print(f"bench: case {k}: {c.title} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_case(c, base, sshd, a.quick))
            except Exception as e:
                rows.append({"case": k, "title": c.title, "error": str(e)[:300]})
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if a.sig:
            gbps = signature_throughput(base, (128 << 20) if a.quick else (1 << 30))
            print(f"bench: source-side signature throughput (cached): {gbps:.2f} GB/s", file=sys.stderr)
            rows.append({"case": "sig", "title": "signature throughput GB/s", "value": round(gbps, 2)})
    finally:
        if sshd is not None:
            sshd.stop()
        subprocess.run(["umount", str(base)])
        os.rmdir(base)
    print(table([r for r in rows if r.get("case") != "sig"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all("error" not in r and r.get("discrep_identical", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

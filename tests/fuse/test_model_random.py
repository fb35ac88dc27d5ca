"""Model-based random test of whole cycles: any sequence of changes, the replica equals the source.

A Hypothesis stateful machine (``RuleBasedStateMachine``) changes a real SRC tree in a test
directory -- small files and one to three files of a few MB, directories, symlinks, hard links,
names that are not UTF-8 -- and every few steps runs one cycle, ``discrep replicate --json SRC
DEST`` as a subprocess of the venv's discrep, then the independent check of tests/helpers.py
(``rsync -aHAXnci --delete`` and a Python walk: content, mode, owner, mtime_ns, hard-link
groups, user xattrs, symlink targets).  The "model" is the source tree itself: whatever the
changes did, DEST must equal SRC after the cycle, and the cycle must exit 0.

Variants (one pytest test each):

* ``scan``  -- no watcher: every cycle's changes come from the catch-up scan;
* ``watch`` -- ``discrep watch --backend inotify SRC`` runs during the example, so cycles read
  the live journal (each one is asserted to say ``"change_source": "journal"``);
* ``crash`` -- like ``scan``, but the regular cycles follow a drawn plan: normal, SIGKILL at the
  k-th write-ahead barrier (``DISCREP_CRASH_AFTER_BARRIERS``) or ``kill -9`` from outside after a
  random delay.  After a kill the replica, once recovered (``discrep recover``, or the next
  ``replicate`` by itself), must equal the last committed cycle (a ``cp -a`` copy of the source
  taken after it) -- or, for a kill from outside that came after the commit, the source -- and
  the next cycle must equal the source.

Known bugs. Every bug this test found is fixed and kept as a plain test in
test_model_regressions.py (bugs 1-9; 8 is in test_model_races.py). The model has no guards and
tolerates no symptom: a cycle must exit 0 and leave DEST equal to SRC. (``DISCREP_MODEL_STRICT=1``,
which turned the guards of the known bugs off, is accepted and changes nothing now.) A new bug that
cannot be fixed at once gets a strict-xfail regression test; a guard here, if one is needed to keep
long runs useful, must name that test and go away with the fix.

The operations of an example are recorded with ``note()`` as readable lines (``rename
b'a' -> b'd/b'``), so a failure prints the shrunk sequence as operations on paths as well as
Hypothesis' rule calls.  Every bug found is kept as a plain test in test_model_regressions.py.

Budget.  Defaults keep the whole file well under 90 s on the 2-core machine: a few examples per
variant and a wall-clock budget per variant after which no new example starts.  Long runs:

    DISCREP_MODEL_EXAMPLES=80 DISCREP_MODEL_STEPS=30 .venv/bin/pytest -s tests/fuse/test_model_random.py
    DISCREP_MODEL_SEED=7 ...          # another seed (default: derandomized, the same examples each run)
    DISCREP_MODEL_BUDGET_S=600 ...    # wall-clock budget per variant (none when EXAMPLES is set)
    DISCREP_MODEL_LOG=/tmp/m.log ...  # a line per example, the operations of failed ones
                                      # (DISCREP_MODEL_LOG_OPS=1: of every example)

Clean-up: each example works in its own directory below the test's ``work_dir`` with TMPDIR for
discrep pointing inside it (export mountpoints of killed runs land there); the watcher is stopped
by PID and everything below the directory is unmounted in the example's teardown.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, note, reject, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

import helpers

pytestmark = [pytest.mark.fuse]

REPO = Path(__file__).resolve().parents[2]
_EXE = REPO / ".venv" / "bin" / "discrep"
DISCREP: List[str] = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "discrep"]
STATE = b".discrep"


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "")
    return float(v) if v.strip() else default


LONG = bool(os.environ.get("DISCREP_MODEL_EXAMPLES", "").strip())
EXAMPLES = _env_int("DISCREP_MODEL_EXAMPLES", 0)          # 0: the per-variant defaults below
STEPS = _env_int("DISCREP_MODEL_STEPS", 18)
SEED = os.environ.get("DISCREP_MODEL_SEED", "").strip()
DEFAULTS = {  # variant: (examples, wall-clock budget in s for starting new examples)
    "scan": (3, 18.0),
    "watch": (2, 16.0),
    "crash": (2, 10.0),
}

# ---------------------------------------------------------------------------- the vocabulary

NAMES = [b"a", b"b", b"c", b"d", b"caf\xe9", b"\xff\xfe", b"sp ace", b"new\nline"]
SYMLINK_TARGETS = [b"a", b"../b", b"/etc/hostname", b"does/not/exist", b"caf\xe9", b"."]
FILE_MODES = [0o644, 0o600, 0o755, 0o444, 0o640, 0o4755]
DIR_MODES = [0o755, 0o700, 0o750, 0o775, 0o555]
FIXED_MTIMES = [1_600_000_000_123_456_789, 1_000_000_000, 1_700_000_000_999_999_999, 1_234_567_890_000_000_001]
XATTR_NAMES = ["user.x", "user.discrep.y"]
XATTR_VALUES = [b"", b"v", b"\x00bin\xff", b"long" * 64]
SMALL_MAX = 64 * 1024      # discrep packs files up to this size; bigger ones are patched by blocks
BIG_LIMIT = 3              # at most this many files above SMALL_MAX
SIZE_CAP = 5 << 20         # no file grows beyond this

picks = st.integers(0, 60)
names = st.sampled_from(NAMES)
seeds = st.integers(0, 2 ** 31 - 1)
mtime_modes = st.sampled_from(["now", "restore", "same_second"])


def show(p: bytes) -> str:
    return repr(p) if p else "<root>"


def join(*parts: bytes) -> bytes:
    return b"/".join(p for p in parts if p)


def parent(p: bytes) -> bytes:
    return p.rpartition(b"/")[0]


def is_under(p: bytes, anc: bytes) -> bool:
    return p == anc or p.startswith(anc + b"/")


@dataclass
class RunState:
    """Shared by every example of one test: the budget and whether a failure was seen."""
    variant: str
    base: Path
    budget_s: float
    t0: float = field(default_factory=time.monotonic)
    failed: bool = False
    examples: int = 0
    cycles: int = 0
    crashes: int = 0
    ops: int = 0
    steps_seen: int = 0

    def over_budget(self) -> bool:
        return not self.failed and time.monotonic() - self.t0 > self.budget_s


class ModelMachine(RuleBasedStateMachine):
    """One example: a fresh SRC/DEST pair; rules change SRC, cycles replicate and check."""

    RUN: RunState  # set on the per-test subclass

    def __init__(self) -> None:
        super().__init__()
        self.ready = False
        self.in_rule = False
        self.failed_here = False
        self.changed = False
        self.top: Optional[Path] = None
        self.watcher: Optional[subprocess.Popen] = None
        self.ops: List[str] = []
        self.prev_mtime: Dict[bytes, int] = {}
        self.since = 0
        self.every = 3
        self.ncycle = 0
        self.committed: Optional[Path] = None     # crash variant: copy of SRC at the last committed cycle

    # ------------------------------------------------------------------ plumbing
    @property
    def variant(self) -> str:
        return self.RUN.variant

    def op(self, text: str) -> None:
        if not text.startswith(("(", "--", " ")):
            self.changed = True
        self.ops.append(text)
        self.RUN.ops += 1
        try:
            note(text)
        except Exception:   # driven by hand, outside a Hypothesis test
            pass

    def full(self, rel: bytes) -> bytes:
        return join(self.bsrc, rel) if rel else self.bsrc

    def env(self, **extra: str) -> Dict[str, str]:
        return dict(os.environ, TMPDIR=str(self.tmp), **extra)

    def fail(self, msg: str) -> None:
        self.RUN.failed = True
        self.failed_here = True
        self.fail_msg = msg
        ops = "\n".join("  " + o for o in self.ops)
        raise AssertionError(f"[{self.variant}] {msg}\noperations of this example:\n{ops}")

    def entries(self) -> List[Tuple[bytes, os.stat_result]]:
        """(path, lstat) of everything in SRC but the top directory and .discrep, sorted."""
        out: List[Tuple[bytes, os.stat_result]] = []

        def rec(rel: bytes) -> None:
            for ent in sorted(os.scandir(self.full(rel)), key=lambda e: e.name):
                name = os.fsencode(ent.name)
                if not rel and name == STATE:
                    continue
                child = join(rel, name)
                st_ = os.lstat(self.full(child))
                out.append((child, st_))
                if stat.S_ISDIR(st_.st_mode):
                    rec(child)
        rec(b"")
        return out

    def pick(self, i: int, pred: Callable[[os.stat_result], bool] = lambda s: True,
             with_root: bool = False) -> Optional[Tuple[bytes, os.stat_result]]:
        cands = [(p, s) for p, s in self.entries() if pred(s)]
        if with_root:
            cands.insert(0, (b"", os.lstat(self.bsrc)))
        return cands[i % len(cands)] if cands else None

    def pick_dir(self, i: int) -> bytes:
        got = self.pick(i, lambda s: stat.S_ISDIR(s.st_mode), with_root=True)
        assert got is not None
        return got[0]

    def big_files(self) -> int:
        return sum(1 for _p, s in self.entries() if stat.S_ISREG(s.st_mode) and s.st_size > SMALL_MAX)

    def remember_mtime(self, rel: bytes) -> None:
        try:
            self.prev_mtime[rel] = os.lstat(self.full(rel)).st_mtime_ns
        except FileNotFoundError:
            pass

    def stepped(self) -> None:
        """End of a changing rule: a cycle every ``self.every`` of them."""
        if not self.changed:          # a rule that found nothing to do does not bring a cycle closer
            return
        self.changed = False
        self.since += 1
        self.RUN.steps_seen += 1
        if self.since >= self.every:
            self.run_cycle()

    # ------------------------------------------------------------------ discrep
    def discrep(self, *args: str, env: Optional[Dict[str, str]] = None,
                timeout: float = 180) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(DISCREP + list(args), capture_output=True, timeout=timeout,
                                  env=env or self.env(), encoding="utf-8", errors="surrogateescape")
        except subprocess.TimeoutExpired:
            self.fail(f"discrep {' '.join(args)} did not finish in {timeout} s")
            raise

    def replicate_ok(self, why: str) -> dict:
        self.ncycle += 1
        self.RUN.cycles += 1
        self.op(f"-- cycle {self.ncycle} ({why})")
        p = self.discrep("replicate", "--json", str(self.src), str(self.dst))
        if p.returncode != 0:
            self.fail(f"replicate exited {p.returncode} (cycle {self.ncycle})\nstdout: {p.stdout}\n"
                      f"stderr: {p.stderr}")
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.fail(f"replicate printed no JSON result: {p.stdout!r} {p.stderr!r}")
            raise
        self.check_equal(self.src, f"after cycle {self.ncycle} ({res.get('change_source')}, exit 0)")
        self.committed_now()
        return res

    def check_equal(self, want: Path, what: str) -> None:
        d1 = helpers.tree_equal(want, self.dst)
        d2 = helpers.python_tree_diff(want, self.dst)
        if not (d1 or d2):
            return
        self.fail(f"replica differs from {'the source' if want == self.src else want.name} {what}:\n"
                  f"rsync: {d1[:30]}\npython: {d2[:30]}")

    def committed_now(self) -> None:
        """The replica holds the source as it is now: in the crash variant, keep a copy to compare a
        rolled-back replica with."""
        if self.variant == "crash":
            self.save_committed()

    def save_committed(self) -> None:
        new = self.top / f"committed{self.ncycle}"
        subprocess.run(["cp", "-a", str(self.src), str(new)], check=True)
        if (new / ".discrep").exists():
            shutil.rmtree(new / ".discrep")
        subprocess.run(["touch", "-h", "-r", str(self.src), str(new)], check=True)
        if self.committed is not None:
            shutil.rmtree(self.committed)
        self.committed = new

    def run_cycle(self, crash: Optional[Tuple[str, float]] = None, explicit_recover: bool = True) -> None:
        self.since = 0
        self.changed = False
        if crash is None:
            res = self.replicate_ok("every %d steps" % self.every)
            if self.variant == "watch" and res.get("change_source") != "journal":
                self.fail(f"cycle {self.ncycle} with the watcher running used {res.get('change_source')}, "
                          f"not the journal: {res}")
            return
        self.crashed_cycle(*crash, explicit_recover=explicit_recover)

    def crashed_cycle(self, how: str, arg: float, *, explicit_recover: bool) -> None:
        """Crash variant: a cycle killed at a barrier or from outside, then recovery and checks."""
        self.ncycle += 1
        self.RUN.cycles += 1
        args = DISCREP + ["replicate", "--json", str(self.src), str(self.dst)]
        if how == "barrier":
            k = int(arg)
            self.op(f"-- cycle {self.ncycle}: SIGKILL after write-ahead barrier {k}")
            p = subprocess.run(args, capture_output=True, timeout=180, encoding="utf-8",
                               errors="surrogateescape", env=self.env(DISCREP_CRASH_AFTER_BARRIERS=str(k)))
            rc = p.returncode
            if rc == 0:   # fewer barriers than k: the cycle completed
                self.op(f"   (cycle {self.ncycle} completed before barrier {k})")
                self.check_equal(self.src, f"after cycle {self.ncycle} (completed, exit 0)")
                self.committed_now()
                return
            if rc != -signal.SIGKILL:
                self.fail(f"replicate with DISCREP_CRASH_AFTER_BARRIERS={k} exited {rc}\n{p.stderr}")
        else:
            self.op(f"-- cycle {self.ncycle}: kill -9 from outside after {arg:.2f} s")
            errf = self.tmp / "killed.err"
            with open(errf, "w") as err:
                proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=self.env())
                try:
                    proc.wait(timeout=arg)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                rc = proc.wait(timeout=60)
            if rc == 0:
                self.op(f"   (cycle {self.ncycle} completed before the kill)")
                self.check_equal(self.src, f"after cycle {self.ncycle} (completed, exit 0)")
                self.committed_now()
                return
            if rc != -signal.SIGKILL:
                self.fail(f"replicate exited {rc} (not killed)")
        self.RUN.crashes += 1
        self.wait_no_mounts()
        if explicit_recover:
            r = self.discrep("recover", "--json", str(self.dst))
            if r.returncode != 0:
                self.fail(f"recover exited {r.returncode}: {r.stderr}")
            self.op(f"   recover: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''}")
            self.after_recover(how)
        # the next cycle completes and equals the source (it recovers by itself if needed)
        self.replicate_ok("after the kill")

    def after_recover(self, how: str) -> None:
        assert self.committed is not None
        d_old = helpers.tree_equal(self.committed, self.dst) + helpers.python_tree_diff(self.committed, self.dst)
        if not d_old:
            return
        if how == "kill":   # the kill may have come after the commit: then DEST is the new cycle
            d_new = helpers.tree_equal(self.src, self.dst) + helpers.python_tree_diff(self.src, self.dst)
            if not d_new:
                self.op("   (the killed cycle had committed)")
                self.committed_now()
                return
        self.fail(f"after the kill and recover, the replica is not the last committed cycle:\n{d_old[:30]}")

    def wait_no_mounts(self) -> None:
        deadline = time.monotonic() + 10
        prefix = str(self.tmp) + "/"
        while time.monotonic() < deadline:
            if not any(m[0].startswith(prefix) for m in helpers.mounts()):
                return
            time.sleep(0.1)
        self.fail("the FUSE export of the killed replicate is still mounted after 10 s")

    # ------------------------------------------------------------------ watcher
    def start_watcher(self) -> None:
        from discrep.core import locks
        from discrep.journal.store import Journal
        p = subprocess.Popen(DISCREP + ["watch", "--backend", "inotify", "--no-catch-up", str(self.src)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env())
        self.watcher = p
        sd = str(self.src / ".discrep")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll() is not None:
                self.fail(f"watcher exited {p.returncode}: {p.stderr.read().decode(errors='replace')}")
            if locks.held(os.path.join(os.fsencode(sd), b"watcher.lock")) and \
                    os.path.exists(os.path.join(sd, "journal.db")):
                j = Journal(sd)
                try:
                    if j.get("watcher_pid") == str(p.pid) and j.get("watcher_backend") == "inotify":
                        return
                finally:
                    j.close()
            time.sleep(0.05)
        self.fail("watcher did not start in 20 s")

    def stop_watcher(self) -> None:
        p, self.watcher = self.watcher, None
        if p is None:
            return
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
        if p.stderr:
            p.stderr.close()

    def check_watcher(self) -> None:
        if self.watcher is not None and self.watcher.poll() is not None:
            err = self.watcher.stderr.read().decode(errors="replace") if self.watcher.stderr else ""
            self.fail(f"the watcher died (exit {self.watcher.returncode}): {err}")

    # ------------------------------------------------------------------ life cycle
    @initialize(seed=seeds, every=st.integers(2, 6), big=st.integers(1, 2))
    def setup(self, seed: int, every: int, big: int) -> None:
        if self.RUN.over_budget():
            reject()
        self.RUN.examples += 1
        self.in_rule = True
        self.every = every
        self.top = Path(tempfile.mkdtemp(prefix="ex", dir=self.RUN.base))
        self.src, self.dst, self.tmp = self.top / "src", self.top / "dst", self.top / "tmp"
        self.tmp.mkdir()
        self.bsrc = os.fsencode(str(self.src))
        self.build_tree(seed, big)
        self.op(f"initial tree (seed {seed}, {big} big file(s)); a cycle every {every} changes")
        self.replicate_ok("initial copy")
        if self.variant == "watch":
            self.start_watcher()
            res = self.replicate_ok("closes the watcher's start gap")
            if res.get("change_source") != "scan":
                self.fail(f"the cycle after the watcher started did not scan: {res}")
        self.ready = True
        self.in_rule = False

    def build_tree(self, seed: int, big: int) -> None:
        rng = random.Random(seed)
        b = self.bsrc
        os.makedirs(join(b, b"d1", b"d2"))
        os.makedirs(join(b, b"e"))
        os.makedirs(join(b, b"empty"))
        for rel, n in ((b"a", 100), (b"d1/b", 3000), (b"d1/d2/c", 0), (b"e/caf\xe9", 700), (b"sp ace", 5000)):
            with open(join(b, rel), "wb") as f:
                f.write(rng.randbytes(n))
        for i in range(big):
            with open(join(b, b"big%d" % i if i else b"d1/big"), "wb") as f:
                f.write(rng.randbytes((1 << 20) + rng.randrange(2 << 20)))
        os.link(join(b, b"d1/b"), join(b, b"e/b-link"))
        os.symlink(b"../a", join(b, b"d1/sym"))
        os.setxattr(join(b, b"a"), "user.x", b"initial")
        os.chmod(join(b, b"e"), 0o750)

    def teardown(self) -> None:
        try:
            if self.ready and not self.in_rule and not self.failed_here:
                self.check_watcher()
                self.replicate_ok("final")
        finally:
            self.log_example()
            try:
                self.stop_watcher()
            finally:
                if self.top is not None:
                    left = helpers.unmount_under(str(self.top))
                    helpers.remove_tree(self.top)
                    if left:
                        raise AssertionError(f"could not unmount {left}")

    def log_example(self) -> None:
        """DISCREP_MODEL_LOG=FILE: one line per example (and its operations when it failed), for long runs."""
        path = os.environ.get("DISCREP_MODEL_LOG")
        if not path or self.top is None:
            return
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{time.strftime('%H:%M:%S')} [{self.variant}] example {self.RUN.examples}: "
                    f"{len(self.ops)} ops, {self.ncycle} cycles, "
                    f"{'FAILED' if self.failed_here else 'ok' if not self.in_rule else 'error'}\n")
            if self.failed_here or self.in_rule or os.environ.get("DISCREP_MODEL_LOG_OPS"):
                f.writelines("    " + o + "\n" for o in self.ops)
            if self.failed_here:
                f.write("  failure: " + getattr(self, "fail_msg", "?").replace("\n", "\n    ") + "\n")

    # ------------------------------------------------------------------ rules: content
    def _rule(self) -> None:
        self.in_rule = True
        self.check_watcher()

    def _done(self) -> None:
        self.stepped()
        self.in_rule = False

    @rule(where=picks, name=names, kind=st.sampled_from(["small", "small", "empty", "big", "dir", "symlink"]),
          size=st.integers(0, 6000), seed=seeds)
    def create(self, where: int, name: bytes, kind: str, size: int, seed: int) -> None:
        self._rule()
        d = self.pick_dir(where)
        rel = join(d, name)
        if os.path.lexists(self.full(rel)):
            self.op(f"(create {show(rel)}: exists, nothing done)")
        else:
            self.make(rel, kind, size, seed)
        self._done()

    def make(self, rel: bytes, kind: str, size: int, seed: int) -> None:
        rng = random.Random(seed)
        full = self.full(rel)
        if kind == "big" and self.big_files() >= BIG_LIMIT:
            kind = "small"
        if kind == "dir":
            os.mkdir(full)
            self.op(f"mkdir {show(rel)}")
        elif kind == "symlink":
            target = SYMLINK_TARGETS[seed % len(SYMLINK_TARGETS)]
            os.symlink(target, full)
            self.op(f"symlink {show(rel)} -> {target!r}")
        else:
            n = 0 if kind == "empty" else (1 << 20) + rng.randrange(2 << 20) if kind == "big" else size
            with open(full, "wb") as f:
                f.write(rng.randbytes(n))
            self.op(f"create file {show(rel)} ({n} bytes)")

    @rule(which=picks, kind=st.sampled_from(["overwrite", "overwrite", "append", "shrink", "grow", "hole"]),
          pos=st.integers(0, 1000), length=st.integers(1, 20000), seed=seeds, mtime=mtime_modes)
    def edit(self, which: int, kind: str, pos: int, length: int, seed: int, mtime: str) -> None:
        """Change a file's content: same-size overwrite, append, truncate down/up, a write past EOF."""
        self._rule()
        got = self.pick(which, lambda s: stat.S_ISREG(s.st_mode))
        if got is None:
            self.op("(edit: no file)")
            return self._done()
        rel, st0 = got
        rng = random.Random(seed)
        size = st0.st_size
        big = size > SMALL_MAX
        self.remember_mtime(rel)
        with open(self.full(rel), "r+b") as f:
            if kind == "overwrite" and size > 0:
                off = pos * size // 1001
                n = min(length, size - off)
                data = rng.randbytes(n)
                os.pwrite(f.fileno(), data, off)
                desc = f"overwrite {n} bytes at {off} (same size {size})"
            elif kind in ("append", "overwrite"):
                os.pwrite(f.fileno(), rng.randbytes(length), size)
                desc = f"append {length} bytes (size {size} -> {size + length})"
            elif kind == "shrink":
                new = pos * size // 1000
                f.truncate(new)
                desc = f"truncate {size} -> {new}"
            elif kind == "grow":
                new = min(size + length * (64 if big else 1), SIZE_CAP)
                f.truncate(new)
                desc = f"truncate (grow) {size} -> {new}"
            else:
                gap = length * (64 if big else 1)
                off = min(size + gap, SIZE_CAP)
                n = 1 + seed % 5000
                os.pwrite(f.fileno(), rng.randbytes(n), off)
                desc = f"write {n} bytes at {off}, past EOF {size} (a hole of {off - size})"
        self.set_mtime_after_edit(rel, st0, mtime, rng)
        self.op(f"edit {show(rel)}: {desc}, mtime {mtime}")
        self._done()

    def set_mtime_after_edit(self, rel: bytes, st0: os.stat_result, mode: str, rng: random.Random) -> None:
        if mode == "restore":        # the edit keeps the old mtime exactly
            os.utime(self.full(rel), ns=(st0.st_atime_ns, st0.st_mtime_ns), follow_symlinks=False)
        elif mode == "same_second":  # the same second, other nanoseconds
            s = st0.st_mtime_ns // 10 ** 9 * 10 ** 9
            ns = s + (st0.st_mtime_ns - s + 1 + rng.randrange(10 ** 8)) % 10 ** 9
            os.utime(self.full(rel), ns=(st0.st_atime_ns, ns), follow_symlinks=False)

    # ------------------------------------------------------------------ rules: namespace
    @rule(which=picks, where=picks, name=names, into_new_dir=st.booleans())
    def rename(self, which: int, where: int, name: bytes, into_new_dir: bool) -> None:
        """Rename a file, symlink or directory: over an existing file, into a new directory."""
        self._rule()
        got = self.pick(which)
        if got is None:
            self.op("(rename: nothing)")
            return self._done()
        rel = got[0]
        d = self.pick_dir(where)
        if into_new_dir:
            nd = join(d, name)
            if os.path.lexists(self.full(nd)) or is_under(nd, rel):
                self.op(f"(rename {show(rel)} into new dir {show(nd)}: not possible)")
                return self._done()
            os.mkdir(self.full(nd))
            self.op(f"mkdir {show(nd)}")
            dst = join(nd, rel.rpartition(b"/")[2])
        else:
            dst = join(d, name)
        if dst == rel:
            self.op(f"(rename {show(rel)} to itself)")
            return self._done()
        over = os.path.lexists(self.full(dst))
        try:
            os.rename(self.full(rel), self.full(dst))
            self.op(f"rename {show(rel)} -> {show(dst)}" + (" (over an existing entry)" if over else ""))
        except OSError as e:
            self.op(f"(rename {show(rel)} -> {show(dst)}: {e.strerror})")
        self._done()

    @rule(a=picks, b=picks)
    def swap(self, a: int, b: int) -> None:
        """Swap two entries through a temporary name."""
        self._rule()
        ents = self.entries()
        if len(ents) < 2:
            return self._done()
        pa = ents[a % len(ents)][0]
        others = [p for p, _s in ents if p != pa]
        pb = others[b % len(others)]
        if is_under(pa, pb) or is_under(pb, pa):
            self.op(f"(swap {show(pa)} {show(pb)}: nested)")
            return self._done()
        tmp = join(parent(pa), b".swap-tmp")
        os.rename(self.full(pa), self.full(tmp))
        os.rename(self.full(pb), self.full(pa))
        os.rename(self.full(tmp), self.full(pb))
        self.op(f"swap {show(pa)} <-> {show(pb)} (via {show(tmp)})")
        self._done()

    @precondition(lambda self: self.ready and len(self.entries()) > 4)
    @rule(which=picks)
    def delete(self, which: int) -> None:
        self._rule()
        got = self.pick(which)
        if got is None:
            return self._done()
        rel, s = got
        if stat.S_ISDIR(s.st_mode):
            shutil.rmtree(self.full(rel))
            self.op(f"rm -r {show(rel)}")
        else:
            os.unlink(self.full(rel))
            self.op(f"rm {show(rel)}")
        self._done()

    @rule(which=picks, to=st.sampled_from(["file", "dir", "symlink"]), seed=seeds, keep_mtime=st.booleans())
    def type_change(self, which: int, to: str, seed: int, keep_mtime: bool) -> None:
        """Replace an entry by one of another type at the same path (optionally with the same mtime)."""
        self._rule()
        got = self.pick(which)
        if got is None:
            return self._done()
        rel, s = got
        kinds = ["file", "dir", "symlink"]
        have = "dir" if stat.S_ISDIR(s.st_mode) else "symlink" if stat.S_ISLNK(s.st_mode) else "file"
        if to == have:
            to = kinds[(kinds.index(to) + 1) % 3]
        if have == "dir":
            shutil.rmtree(self.full(rel))
        else:
            os.unlink(self.full(rel))
        self.op(f"type change {show(rel)}: {have} -> {to}")
        self.make(rel, "small" if to == "file" else to, seed % 3000, seed)
        if to == "dir" and seed % 2:
            self.make(join(rel, b"inner"), "small", seed % 500, seed)
        if keep_mtime:
            os.utime(self.full(rel), ns=(s.st_atime_ns, s.st_mtime_ns), follow_symlinks=False)
            self.op(f"utime {show(rel)} back to the old object's mtime {s.st_mtime_ns}")
        self._done()

    # ------------------------------------------------------------------ rules: hard links
    @rule(kind=st.sampled_from(["add", "add", "over", "remove", "break", "break"]), which=picks, other=picks,
          where=picks, name=names, edit=st.booleans(), keep_mtime=st.booleans(), seed=seeds)
    def hardlink(self, kind: str, which: int, other: int, where: int, name: bytes, edit: bool,
                 keep_mtime: bool, seed: int) -> None:
        """Hard links added, replacing a file, removed, and broken (a name replaced by an edited copy)."""
        self._rule()
        is_file = lambda s: stat.S_ISREG(s.st_mode)  # noqa: E731
        linked = lambda s: stat.S_ISREG(s.st_mode) and s.st_nlink > 1  # noqa: E731
        if kind in ("remove", "break"):
            got = self.pick(which, linked) or self.pick(which, is_file)
        else:
            got = self.pick(which, is_file)
        if got is None:
            self.op(f"(hardlink {kind}: no file)")
            return self._done()
        rel, s = got
        if kind == "add":
            dst = join(self.pick_dir(where), name)
            if os.path.lexists(self.full(dst)):
                self.op(f"(link {show(rel)} {show(dst)}: exists)")
            else:
                os.link(self.full(rel), self.full(dst))
                self.op(f"ln {show(rel)} {show(dst)}")
        elif kind == "over":
            tgt = self.pick(other, is_file)
            if tgt is None or tgt[1].st_ino == s.st_ino:
                self.op(f"(ln over: {show(rel)} and target are one file)")
            else:
                dst = tgt[0]
                tmp = join(parent(dst), b".ln-tmp")
                os.link(self.full(rel), self.full(tmp))
                os.rename(self.full(tmp), self.full(dst))
                self.op(f"ln {show(rel)} over existing file {show(dst)} (link to a temp name, rename over)")
        elif kind == "remove":
            os.unlink(self.full(rel))
            self.op(f"rm {show(rel)} (a name of a file with {s.st_nlink} links)")
        else:
            rng = random.Random(seed)
            with open(self.full(rel), "rb") as f:
                data = bytearray(f.read())
            what = "identical copy"
            if edit and data:
                off = rng.randrange(len(data))
                chunk = rng.randbytes(min(100, len(data) - off))
                data[off:off + len(chunk)] = chunk
                what = f"copy edited at {off} ({len(chunk)} bytes)"
            tmp = join(parent(rel), b".break-tmp")
            with open(self.full(tmp), "wb") as f:
                f.write(data)
            os.chmod(self.full(tmp), stat.S_IMODE(s.st_mode))
            for n in os.listxattr(self.full(rel)):
                os.setxattr(self.full(tmp), n, os.getxattr(self.full(rel), n))
            if keep_mtime:
                os.utime(self.full(tmp), ns=(s.st_atime_ns, s.st_mtime_ns))
            os.rename(self.full(tmp), self.full(rel))
            self.op(f"break link: {show(rel)} ({s.st_nlink} links) replaced by an {what}"
                    f"{', same mode/xattrs/mtime' if keep_mtime else ', same mode/xattrs'} (temp + rename)")
        self._done()

    # ------------------------------------------------------------------ rules: metadata
    @rule(which=picks, kind=st.sampled_from(["chmod", "utime", "utime_restore", "xattr_set", "xattr_set",
                                             "xattr_remove"]), val=st.integers(0, 100))
    def meta(self, which: int, kind: str, val: int) -> None:
        """chmod, utime (fixed values, or the mtime a path had before its last change), user xattrs."""
        self._rule()
        got = self.pick(which, with_root=True)
        rel, s = got
        full = self.full(rel)
        is_link, is_dir = stat.S_ISLNK(s.st_mode), stat.S_ISDIR(s.st_mode)
        if kind == "chmod" and not is_link:
            mode = (DIR_MODES if is_dir else FILE_MODES)[val % 5 if is_dir else val % len(FILE_MODES)]
            os.chmod(full, mode)
            self.op(f"chmod {oct(mode)} {show(rel)}")
        elif kind == "utime_restore" and rel in self.prev_mtime:
            ns = self.prev_mtime[rel]
            self.remember_mtime(rel)
            os.utime(full, ns=(ns, ns), follow_symlinks=False)
            self.op(f"utime {show(rel)} back to its old mtime {ns}")
        elif kind in ("utime", "utime_restore"):
            ns = FIXED_MTIMES[val % len(FIXED_MTIMES)]
            self.remember_mtime(rel)
            os.utime(full, ns=(ns, ns), follow_symlinks=False)
            self.op(f"utime {show(rel)} {ns}")
        elif kind == "xattr_set" and not is_link:
            n, v = XATTR_NAMES[val % 2], XATTR_VALUES[(val // 2) % len(XATTR_VALUES)]
            os.setxattr(full, n, v)
            self.op(f"setxattr {show(rel)} {n}={v[:16]!r}{'...' if len(v) > 16 else ''}")
        elif kind == "xattr_remove" and not is_link:
            have = [n for n in os.listxattr(full) if n.startswith("user.")]
            if have:
                n = have[val % len(have)]
                os.removexattr(full, n)
                self.op(f"removexattr {show(rel)} {n}")
            else:
                self.op(f"(removexattr {show(rel)}: none)")
        else:
            self.op(f"({kind} {show(rel)}: not for a symlink)")
        self._done()



crash_plan = st.one_of(      # (the simplest plan kills at the first barrier)
    st.tuples(st.just("barrier"), st.integers(1, 14), st.booleans()),
    st.tuples(st.just("kill"), st.floats(0.4, 1.8), st.booleans()),
    st.none(),
)


class CrashMachine(ModelMachine):
    """The crash variant: the regular cycles follow a drawn plan (normal, SIGKILL at barrier k, or
    kill -9 after a delay; then ``discrep recover`` or not), and a rule runs a killed cycle at once."""

    @initialize(plans=st.lists(crash_plan, min_size=1, max_size=10))
    def crash_plans(self, plans) -> None:
        self.plans = list(plans)

    def run_cycle(self, crash: Optional[Tuple[str, float]] = None, explicit_recover: bool = True) -> None:
        if crash is None and getattr(self, "plans", None):
            plan = self.plans.pop(0)
            if plan is not None:
                crash, explicit_recover = (plan[0], float(plan[1])), plan[2]
        super().run_cycle(crash, explicit_recover)

    @rule(how=st.sampled_from(["barrier", "barrier", "kill"]), k=st.integers(1, 14),
          delay=st.floats(0.4, 1.8), explicit_recover=st.booleans())
    def crash_cycle(self, how: str, k: int, delay: float, explicit_recover: bool) -> None:
        self._rule()
        self.run_cycle((how, float(k) if how == "barrier" else delay), explicit_recover)
        self.in_rule = False


# ---------------------------------------------------------------------------- the tests

@pytest.fixture(autouse=True)
def _need_fuse():
    helpers.require_fuse()


def _settings(variant: str) -> settings:
    examples, budget = DEFAULTS[variant]
    if LONG:
        examples = EXAMPLES
        budget = 10 ** 9
    budget = _env_float("DISCREP_MODEL_BUDGET_S", budget)
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=not SEED,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    ), budget


@pytest.mark.parametrize("variant", ["scan", "watch", "crash"])
def test_random_changes_replicate_exactly(variant: str, work_dir: Path):
    if variant == "watch":
        helpers.require_tool("rsync")
    sett, budget = _settings(variant)
    run = RunState(variant, work_dir, budget)
    base_cls = CrashMachine if variant == "crash" else ModelMachine
    machine = type(f"Model_{variant}", (base_cls,), {"RUN": run})

    def factory():
        return machine()
    if SEED:
        factory = hyp_seed(int(SEED))(factory)
    t0 = time.monotonic()
    try:
        try:
            run_state_machine_as_test(factory, settings=sett)
        except FlakyStrategyDefinition:
            # the budget's reject() in setup makes a prefix Hypothesis saw draw less the next time;
            # after the budget ran out with no failure, that is the end of the run, not a finding
            if run.failed or time.monotonic() - run.t0 <= run.budget_s:
                raise
    finally:
        print(f"\nmodel[{variant}]: {run.examples} examples, {run.steps_seen} changing steps, "
              f"{run.ops} operations, {run.cycles} cycles ({run.crashes} killed), "
              f"{time.monotonic() - t0:.1f} s")
        left = [m for m in helpers.mounts() if m[0].startswith(str(work_dir))]
        assert not left, f"mounts left behind: {left}"

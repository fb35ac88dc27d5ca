"""Filters on ``discrep replicate SRC DEST``, with rsync as the oracle (tier: fuse).

The oracle for every case: rsync with the same rules, run on a copy of what DEST held before the
cycle (``rsync -a --delete RULES SRC/ DEST2/``); DEST and DEST2 must then be identical by the
independent checks of tests/helpers.py (rsync -aHAXnci and the Python walk), never by discrep's
catalog.  Hypothesis generates trees and rule lists (anchored, directory-only, ``**``,
``dir/***``, include-before-exclude, --exclude-from, dir-merge files); fixed sequences cover rule
changes between cycles (newly included copied, newly excluded kept, or deleted with
--delete-excluded) and the live journal (a watched source).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers

pytestmark = [pytest.mark.fuse]

REPO = Path(__file__).resolve().parents[2]
_EXE = REPO / ".venv" / "bin" / "discrep"
DISCREP = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "discrep"]
RSYNC = shutil.which("rsync")
MERGE = ".discrepignore"
NAMES = ["a", "b", "c.o", "d.log", "e"]

Rules = List[str]          # argv elements, e.g. "--exclude=*.o", "--filter=- /a/"


@pytest.fixture(autouse=True)
def _need_tools():
    helpers.require_fuse()
    helpers.require_tool("rsync")


def discrep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(DISCREP + list(args), capture_output=True, text=True, timeout=300)


def replicate(src: Path, dst: Path, rules: Rules = ()) -> dict:
    p = discrep("replicate", "--json", *rules, str(src), str(dst))
    assert p.returncode == 0, f"replicate {rules} exited {p.returncode}: {p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def rsync_into(src: Path, dst: Path, rules: Rules) -> None:
    """The oracle: rsync with the same rules (SRC's state directory left out, as discrep does)."""
    # --modify-window=-1: times compared to the nanosecond, else rsync may leave a directory time unset
    cmd = [RSYNC, "-a", "--delete", "--modify-window=-1", "--exclude=/.discrep/", *rules, f"{src}/", f"{dst}/"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, LC_ALL="C"))
    assert p.returncode == 0, (cmd, p.stderr)


def copy_replica(dst: Path, to: Path) -> None:
    """DEST as it is (without its state directory): where the oracle's rsync starts from."""
    if to.exists():
        shutil.rmtree(to)
    if dst.exists():
        shutil.copytree(dst, to, symlinks=True, ignore=lambda d, names: [".discrep"] if d == str(dst) else [])
    else:
        to.mkdir()


def same(dst: Path, oracle: Path) -> None:
    diff = helpers.tree_equal(oracle, dst) + helpers.python_tree_diff(oracle, dst)
    assert diff == [], diff[:20]


def cycle_vs_rsync(src: Path, dst: Path, oracle: Path, rules: Rules) -> dict:
    """One discrep cycle with ``rules``; rsync with the same rules from DEST's state before it."""
    copy_replica(dst, oracle)
    res = replicate(src, dst, rules)
    rsync_into(src, oracle, rules)
    same(dst, oracle)
    return res


# --------------------------------------------------------------------------- generated cases

@st.composite
def trees(draw) -> Dict[str, str]:
    """rel -> 'f' or 'd'."""
    tree: Dict[str, str] = {}
    for comps, kind in draw(st.lists(st.tuples(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
                                               st.sampled_from("ffd")), min_size=1, max_size=8)):
        for i in range(1, len(comps)):
            tree["/".join(comps[:i])] = "d"
        rel = "/".join(comps)
        if tree.get(rel) != "d":
            tree[rel] = kind
    return tree


@st.composite
def pattern(draw, tree: Dict[str, str]) -> str:
    path = draw(st.sampled_from(sorted(tree)))
    comps = path.split("/")
    form = draw(st.sampled_from(["base", "anchored", "tail", "dironly", "stars", "***", "glob"]))
    if form == "base":
        return comps[-1]
    if form == "anchored":
        return "/" + path
    if form == "tail":
        return "/".join(comps[-2:])
    if form == "dironly":
        return comps[-1] + "/"
    if form == "stars":
        return "**/" + comps[-1] if len(comps) == 1 or draw(st.booleans()) else comps[0] + "/**/" + comps[-1]
    if form == "***":
        return "/" + path + "/***"
    return draw(st.sampled_from(["*.o", "*.log", "?", "[ab]", "*"]))


@st.composite
def rule_lists(draw, tree: Dict[str, str]) -> Tuple[Rules, Dict[str, str]]:
    """(argv rules, merge files: dir rel -> content)."""
    rules: Rules = []
    for _ in range(draw(st.integers(1, 4))):
        pat = draw(pattern(tree))
        inc = draw(st.integers(0, 2)) == 0
        spell = draw(st.integers(0, 1))
        rules.append((f"--include={pat}" if inc else f"--exclude={pat}") if spell == 0 else
                     f"--filter={'+' if inc else '-'} {pat}")
    if draw(st.integers(0, 2)) == 0:                      # include-before-exclude: a catch-all last
        rules += draw(st.sampled_from([["--include=*/", "--exclude=*"], ["--exclude=*"], ["--exclude=/*"]]))
    merges: Dict[str, str] = {}
    if draw(st.integers(0, 2)) == 0:
        rules.insert(draw(st.integers(0, len(rules))), f"--filter=dir-merge {MERGE}")
        for d in [""] + sorted(k for k, v in tree.items() if v == "d"):
            if draw(st.booleans()):
                merges[d] = "".join(f"{'+' if draw(st.booleans()) else '-'} {draw(pattern(tree))}\n"
                                    for _ in range(draw(st.integers(1, 2))))
    return rules, merges


@st.composite
def scenarios(draw):
    tree = draw(trees())
    rules, merges = draw(rule_lists(tree))
    return tree, rules, merges


def build(src: Path, tree: Dict[str, str], merges: Dict[str, str]) -> None:
    src.mkdir()
    for rel in sorted(tree, key=lambda r: r.count("/")):
        if tree[rel] == "d":
            (src / rel).mkdir()
        else:
            (src / rel).write_bytes(rel.encode() * 3)
    for d, text in merges.items():
        (src / d / MERGE).write_text(text)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(scenarios())
def test_replica_equals_rsync_with_the_same_rules(work_dir: Path, scenario) -> None:
    tree, rules, merges = scenario
    tmp = Path(tempfile.mkdtemp(dir=work_dir))
    try:
        src = tmp / "src"
        build(src, tree, merges)
        res = cycle_vs_rsync(src, tmp / "dst", tmp / "oracle", rules)
        assert res["cycle"] == 1
    finally:
        shutil.rmtree(tmp)


@st.composite
def rule_changes(draw):
    """A tree, two rule lists (each with or without --delete-excluded) and paths deleted in between."""
    tree = draw(trees())
    first, merges = draw(rule_lists(tree))
    second, _ = draw(rule_lists(tree))
    if any("dir-merge" in r for r in first) and not any("dir-merge" in r for r in second):
        second = second + [f"--filter=dir-merge {MERGE}"]       # merge files stay files like any other
    flags = [draw(st.booleans()), draw(st.booleans())]
    gone = draw(st.lists(st.sampled_from(sorted(tree)), max_size=2))
    return tree, merges, [first + (["--delete-excluded"] if flags[0] else []),
                          second + (["--delete-excluded"] if flags[1] else [])], gone


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(rule_changes())
def test_rule_change_equals_rsync_on_the_same_replica(work_dir: Path, case) -> None:
    """Cycle 1 with rules A, some paths deleted on the source, cycle 2 with rules B: each cycle
    equals rsync with the same rules run on a copy of DEST as it was before the cycle."""
    tree, merges, (first, second), gone = case
    tmp = Path(tempfile.mkdtemp(dir=work_dir))
    try:
        src, dst, oracle = tmp / "src", tmp / "dst", tmp / "oracle"
        build(src, tree, merges)
        replicate(src, dst)                                    # everything, then the rules come
        cycle_vs_rsync(src, dst, oracle, first)
        for rel in gone:
            if (src / rel).is_dir():
                shutil.rmtree(src / rel)
            elif (src / rel).exists():
                (src / rel).unlink()
        cycle_vs_rsync(src, dst, oracle, second)
    finally:
        shutil.rmtree(tmp)


# --------------------------------------------------------------------------- rule changes

def _tree(src: Path) -> None:
    for rel, data in {"keep/k.txt": b"k", "skip/s.txt": b"s", "skip/deep/t.txt": b"t", "logs/a.log": b"a",
                      "logs/b.log": b"b", "logs/readme": b"r", "top.o": b"o"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)


def test_rule_changes_between_cycles(work_dir: Path) -> None:
    src, dst, oracle = work_dir / "src", work_dir / "dst", work_dir / "oracle"
    src.mkdir()
    _tree(src)
    cycle_vs_rsync(src, dst, oracle, ["--exclude=skip/", "--exclude=*.o"])
    assert not (dst / "skip").exists() and not (dst / "top.o").exists()
    # newly included: copied in the next cycle (changed meanwhile too)
    (src / "skip/deep/t.txt").write_bytes(b"t2")
    res = cycle_vs_rsync(src, dst, oracle, ["--exclude=*.o"])
    # (the old rules may have left excluded files in DEST: a full comparison settles them)
    assert (dst / "skip/deep/t.txt").read_bytes() == b"t2" and res["base"] == 0, res
    # newly excluded, without --delete-excluded: kept untouched in DEST
    before = os.stat(dst / "logs/a.log")
    cycle_vs_rsync(src, dst, oracle, ["--exclude=*.log", "--exclude=*.o"])
    assert os.stat(dst / "logs/a.log").st_ino == before.st_ino
    # an excluded file deleted on the source stays (rsync: protected); an included one goes
    os.unlink(src / "logs/a.log")
    os.unlink(src / "logs/readme")
    cycle_vs_rsync(src, dst, oracle, ["--exclude=*.log", "--exclude=*.o"])
    assert (dst / "logs/a.log").exists() and not (dst / "logs/readme").exists()
    # source directory gone, a protected file inside: the file and its directory stay, the rest goes
    shutil.rmtree(src / "logs")
    cycle_vs_rsync(src, dst, oracle, ["--exclude=*.log", "--exclude=*.o"])
    assert (dst / "logs/b.log").exists()
    # --delete-excluded: excluded files are deleted
    cycle_vs_rsync(src, dst, oracle, ["--exclude=*.log", "--exclude=*.o", "--delete-excluded"])
    assert not (dst / "logs").exists()
    # a rule added with --delete-excluded deletes what it now excludes
    res = cycle_vs_rsync(src, dst, oracle, ["--exclude=*.log", "--exclude=*.o", "--exclude=deep/",
                                            "--delete-excluded"])
    assert not (dst / "skip/deep").exists() and res["files_deleted"] >= 1, res


def test_delete_excluded_counts_toward_max_delete(work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}.log").write_bytes(b"x")
    (src / "keep").write_bytes(b"k")
    replicate(src, dst)
    kept = discrep("replicate", "--json", "--exclude=*.log", "--max-delete", "2", str(src), str(dst))
    assert kept.returncode == 0, kept.stderr              # excluded files are kept: nothing deleted
    res = json.loads(kept.stdout.strip().splitlines()[-1])
    assert res["base"] == 1 and res["change_source"] == "scan", res     # first rules: a scan, not a full cycle
    assert len(list(dst.glob("*.log"))) == 5
    p = discrep("replicate", "--json", "--exclude=*.log", "--delete-excluded", "--max-delete", "2",
                str(src), str(dst))
    assert p.returncode == 19, (p.returncode, p.stderr)
    assert len(list(dst.glob("*.log"))) == 5              # refused: nothing changed
    replicate(src, dst, ["--exclude=*.log", "--delete-excluded"])
    assert not list(dst.glob("*.log")) and (dst / "keep").exists()


def test_excluded_directory_is_not_walked(work_dir: Path) -> None:
    """A merge file discrep cannot parse inside an excluded directory: reading it would fail the
    cycle, so a success shows the directory was not descended (rsync does not read it either)."""
    src, dst, oracle = work_dir / "src", work_dir / "dst", work_dir / "oracle"
    (src / "cache" / "sub").mkdir(parents=True)
    (src / "cache" / "sub" / MERGE).write_text("merge other-file\n")
    (src / "cache" / "big").write_bytes(b"c" * 1000)
    (src / "data").mkdir()
    (src / "data" / "d").write_bytes(b"d")
    rules = ["--filter=dir-merge " + MERGE, "--exclude=/cache/"]
    cycle_vs_rsync(src, dst, oracle, rules)
    assert not (dst / "cache").exists()
    p = discrep("replicate", "--filter=dir-merge " + MERGE, str(src), str(work_dir / "dst2"))
    assert p.returncode != 0 and "merge" in p.stderr, p.stderr     # walked: the bad merge file fails it


def test_cycle_records_its_rules(work_dir: Path) -> None:
    from discrep.protocol.filterspec import FilterSpec
    from discrep.replica.catalog import ReplicaCatalog
    from discrep.source.catalog import SourceCatalog
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "x.o").write_bytes(b"o")
    replicate(src, dst, ["--exclude=*.o", "--delete-excluded"])
    cat = SourceCatalog(str(src / ".discrep"))
    try:
        spec = FilterSpec.from_record(cat.last_acked().info["filters"])
    finally:
        cat.close()
    assert [r.pattern for r in spec.rules.rules] == [b"*.o"] and spec.delete_excluded
    rcat = ReplicaCatalog(str(dst / ".discrep"))
    try:
        assert FilterSpec.from_record(json.loads(rcat.get_meta("filters"))) == spec
    finally:
        rcat.close()


# --------------------------------------------------------------------------- live journal

def _start_watcher(src: Path) -> subprocess.Popen:
    from discrep.core import locks
    from discrep.journal.store import Journal
    p = subprocess.Popen(DISCREP + ["watch", "--backend", "inotify", "--no-catch-up", str(src)],
                         stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    sd = str(src / ".discrep")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise AssertionError(f"watcher exited {p.returncode}: {p.stderr.read().decode(errors='replace')}")
        if locks.held(os.path.join(os.fsencode(sd), b"watcher.lock")) and os.path.exists(os.path.join(sd, "journal.db")):
            j = Journal(sd)
            try:
                if j.get("watcher_pid") == str(p.pid):
                    return p
            finally:
                j.close()
        time.sleep(0.05)
    _stop(p)
    raise AssertionError("watcher did not start in 20 s")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    if p.stderr:
        p.stderr.close()


def _settle(src: Path) -> None:
    """Everything changed so far is journaled (the watcher reads events in order)."""
    from discrep.journal.store import Journal
    j = Journal(str(src / ".discrep"))
    try:
        before = j.last_seq()
        (src / "zz-mark").write_bytes(b"m")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(e.path == b"zz-mark" for e in j.entries(before)):
            time.sleep(0.02)
    finally:
        j.close()


def test_filters_with_the_live_journal(work_dir: Path) -> None:
    src, dst, oracle = work_dir / "src", work_dir / "dst", work_dir / "oracle"
    src.mkdir()
    _tree(src)
    (src / MERGE).write_text("- *.tmp\n")
    rules = ["--exclude=/skip/", "--exclude=*.o", "--filter=dir-merge " + MERGE]
    cycle_vs_rsync(src, dst, oracle, rules)
    w = _start_watcher(src)
    try:
        assert cycle_vs_rsync(src, dst, oracle, rules)["change_source"] == "scan"    # the watcher's start gap
        # changes under excluded paths, to excluded names, and to included ones
        (src / "skip/new.txt").write_bytes(b"n")
        (src / "skip/deep/t.txt").write_bytes(b"changed")
        (src / "keep/x.o").write_bytes(b"o")
        (src / "keep/y.tmp").write_bytes(b"t")
        (src / "keep/k.txt").write_bytes(b"k2")
        (src / "keep/new").mkdir()
        (src / "keep/new/n.txt").write_bytes(b"n")
        os.rename(src / "logs/readme", src / "keep/readme.o")     # moved to an excluded name: gone
        _settle(src)
        res = cycle_vs_rsync(src, dst, oracle, rules)
        assert res["change_source"] == "journal", res
        assert not (dst / "keep/x.o").exists() and not (dst / "keep/readme.o").exists()
        # a directory renamed into an excluded path, another out of one (the cycle scans)
        os.rename(src / "keep/new", src / "skip/new-dir")
        os.rename(src / "skip/deep", src / "keep/deep")
        _settle(src)
        cycle_vs_rsync(src, dst, oracle, rules)
        assert (dst / "keep/deep/t.txt").read_bytes() == b"changed"
        # the merge file changed (the cycle scans): new files it excludes are not copied; the ones
        # DEST has go, as with rsync, whose receiver protects by its own (old) copy of the merge file
        (src / MERGE).write_text("- *.tmp\n- *.log\n")
        (src / "logs/c.log").write_bytes(b"c")
        _settle(src)
        cycle_vs_rsync(src, dst, oracle, rules)
        assert not (dst / "logs/c.log").exists() and not (dst / "logs/a.log").exists()
    finally:
        _stop(w)


def test_dry_run_honours_the_rules(work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    _tree(src)
    (src / MERGE).write_text("- readme\n")
    rules = ["--exclude=/skip/", "--exclude=*.o", "--filter=dir-merge " + MERGE]
    p = discrep("replicate", "-n", "--json", *rules, str(src), str(dst))
    assert p.returncode == 0, p.stderr
    planned = {line.split(" ", 1)[1].split(" (")[0] for line in json.loads(p.stdout)["items"]}
    replicate(src, dst, rules)
    made = {str(q.relative_to(dst)) for q in dst.rglob("*") if ".discrep" not in q.relative_to(dst).parts[:1]}
    assert planned == made == {"keep", "keep/k.txt", "logs", "logs/a.log", "logs/b.log", MERGE}
    # newly excluded, DEST keeps them (nothing to delete); with --delete-excluded they would go
    more = rules + ["--exclude=*.log"]
    p = discrep("replicate", "-n", "--json", *more, str(src), str(dst))
    assert json.loads(p.stdout)["items"] == []
    p = discrep("replicate", "-n", "--json", *more, "--delete-excluded", str(src), str(dst))
    assert sorted(json.loads(p.stdout)["items"]) == ["*deleting   logs/a.log", "*deleting   logs/b.log"]


def test_verify_compares_only_included_paths(work_dir: Path) -> None:
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    _tree(src)
    rules = ["--exclude=/skip/", "--exclude=*.o"]
    replicate(src, dst)
    replicate(src, dst, rules + ["--exclude=*.log"])           # the logs stay in DEST (protected)
    (src / "skip/s.txt").write_bytes(b"changed, excluded")
    (src / "top.o").write_bytes(b"changed, excluded")
    assert discrep("verify", str(src), str(dst), *rules, "--exclude=*.log").returncode == 0
    assert discrep("verify", str(src), str(dst)).returncode == 17
    (src / "keep/k.txt").write_bytes(b"changed, included")
    p = discrep("verify", str(src), str(dst), *rules, "--exclude=*.log")
    assert p.returncode == 17 and "keep/k.txt" in p.stdout, (p.returncode, p.stdout)

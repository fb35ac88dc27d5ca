"""rsync is the oracle for discrep.protocol.filters (tier: fs).

Hypothesis builds small trees (names from a small alphabet with ``.``, ``-``, non-UTF-8
bytes, a backslash and names that look like patterns; files, directories, symlinks to
directories) and rule lists (anchored, unanchored, directory-only, ``*``, ``**``,
``***``, classes, include-before-exclude, ``- ``/``+ `` prefixes on --exclude/--include,
*-from files, optionally ``dir-merge .discrepignore`` with modifiers and a merge file
in some directories).  rsync copies the tree into an empty directory with the same
rules, each rule its own argv element, no shell; the set of paths it wrote must be the
set discrep's engine selects when it walks the same tree (pruning excluded
directories), and ``Filter.path_allowed`` must agree path by path.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from discrep.protocol.filters import Filter, FilterRules, tree_merge_reader

pytestmark = pytest.mark.fs

RSYNC = shutil.which("rsync")
MERGE = b".discrepignore"
NAMES = [b"a", b"b", b"ab", b".d", b"-e", b"x\xffy", b"*", b"[ab]", b"a?", b"b\\c", b"a b"]
ATOMS = [b"a", b"b", b"*", b"**", b"?", b"[ab]", b"[!a]", b"a*", b"*b", b"[a-c]*", b"x\xffy",
         b"\\*", b"[[:alpha:]]*", b"***", b"b\\c", b"\\[ab]"]

Options = List[Tuple[str, bytes]]
Tree = Dict[bytes, str]


@st.composite
def component(draw, name: bytes) -> bytes:
    """A pattern for one path component ``name``: itself or a wildcard that matches it
    (or, for a negated class, one that does not)."""
    lo, hi = bytes((max(name[0] - 1, 0x21),)), bytes((min(name[0] + 1, 0xFE),))
    return draw(st.sampled_from([
        name, name, b"*", name[:1] + b"*", b"?" * len(name), b"[" + name[:1] + b"]" + name[1:],
        b"[!" + name[:1] + b"]" + name[1:], b"[" + lo + b"-" + hi + b"]" + name[1:],
        b"*" + name[-1:], b"**"]))


@st.composite
def patterns(draw, tree: Tree, base: bytes = b"") -> bytes:
    """Mostly a pattern derived from a path of the tree below ``base`` (a merge file's
    directory; anchored patterns are relative to it, unanchored ones may reach above
    it), sometimes one from ATOMS."""
    below = sorted(p for p in tree if base == b"" or p.startswith(base + b"/"))
    anchored = draw(st.integers(0, 2)) == 0
    if not below or draw(st.integers(0, 4)) == 0:
        pat = b"/".join(draw(st.lists(st.sampled_from(ATOMS), min_size=1, max_size=3)))
    else:
        path = draw(st.sampled_from(below))
        comps = path.split(b"/")
        if anchored:
            comps = comps[base.count(b"/") + 1 if base else 0:]
        else:
            comps = comps[-draw(st.integers(1, min(3, len(comps)))):]
        pat = b"/".join(draw(component(c)) for c in comps)
        if tree[path] == "d" and draw(st.booleans()):
            return (b"/" if anchored else b"") + pat + draw(st.sampled_from([b"/", b"/***"]))
    return (b"/" if anchored else b"") + pat + draw(st.sampled_from([b"", b"", b"/", b"/***"]))


@st.composite
def rule_options(draw, tree: Tree) -> Options:
    """One global rule in one of rsync's spellings."""
    pat = draw(patterns(tree))
    inc = draw(st.booleans())
    form = draw(st.integers(0, 4))
    if form == 0:
        return [("--include" if inc else "--exclude", pat)]
    if form == 1:                      # old-style prefix overrides the option's kind
        return [(draw(st.sampled_from(["--include", "--exclude"])), (b"+ " if inc else b"- ") + pat)]
    if form == 2:
        return [("--filter", (b"+ " if inc else b"- ") + pat)]
    if form == 3:
        return [("--filter", (b"include " if inc else b"exclude_") + pat)]
    lines = draw(st.lists(st.tuples(st.booleans(), patterns(tree)), min_size=1, max_size=3))
    body = b"# comment\n\n; other\n" + b"".join(
        (b"+ " if i else b"- ") + p + b"\n" for i, p in lines)
    return [(draw(st.sampled_from(["--exclude-from", "--include-from"])), body)]


@st.composite
def merge_lines(draw, tree: Tree, base: bytes, bare: bool) -> List[bytes]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        pat = draw(patterns(tree, base))
        if bare:
            out.append(pat)
        else:
            out.append(draw(st.sampled_from([b"- ", b"+ ", b"exclude ", b"-_"])) + pat)
    if not bare and draw(st.integers(0, 4)) == 0:
        out.insert(draw(st.integers(0, len(out))), b"!")
    return out


@st.composite
def conflict(draw, tree: Tree, lines: Dict[bytes, List[bytes]]) -> None:
    """Opposite verdicts on one name in a directory's merge file and in an ancestor's:
    the nearer file must win (and with 'n' the ancestor's must not reach); or a '!' in
    the nearer file that drops the ancestor's verdict."""
    deep = sorted(p for p in tree if p.count(b"/") >= 1)
    if not deep:
        return
    path = draw(st.sampled_from(deep))
    dirs = [b""] + [path.rsplit(b"/", k)[0] for k in range(path.count(b"/"), 0, -1)]
    near = draw(st.integers(1, len(dirs) - 1))
    far = draw(st.integers(0, near - 1))
    name = draw(component(path.rpartition(b"/")[2]))
    kind = draw(st.booleans())
    clear = draw(st.integers(0, 2)) == 0
    for d, inc in ((dirs[far], kind), (dirs[near], not kind)):
        got = lines.setdefault(d, [])
        at = draw(st.integers(0, len(got))) if draw(st.integers(0, 2)) == 0 else 0
        got.insert(at, b"!" if clear and d == dirs[near] else (b"+ " if inc else b"- ") + name)


@st.composite
def trees(draw) -> Tree:
    """rel -> 'f' (file), 'd' (directory) or 'l' (symlink to a directory)."""
    tree: Tree = {}
    names = st.sampled_from(NAMES) | st.sampled_from(NAMES[:2])   # the same names recur
    for comps, kind in draw(st.lists(st.tuples(
            st.lists(names, min_size=1, max_size=4), st.sampled_from("fffdl")),
            min_size=1, max_size=10)):
        for i in range(1, len(comps)):
            tree[b"/".join(comps[:i])] = "d"
        rel = b"/".join(comps)
        if tree.get(rel) != "d":
            tree[rel] = kind
    return tree


@st.composite
def scenarios(draw) -> Tuple[Tree, Options, Dict[bytes, bytes]]:
    """(tree, options, merge files: dir rel -> content).  Two in three use dir-merge."""
    tree = draw(trees())
    merging = draw(st.integers(0, 2)) > 0
    opts: Options = []
    for _ in range(draw(st.integers(0, 2 if merging else 4))):
        opts += draw(rule_options(tree))
    if draw(st.booleans()):            # include-before-exclude: a catch-all at the end
        opts.append(("--exclude", draw(st.sampled_from([b"*", b"/*", b"**", b"*/"]))))
    merges: Dict[bytes, bytes] = {}
    if merging:
        mods = draw(st.sampled_from([b"", b"", b"n", b"n", b"e", b"-", b"+", b"n-"]))
        spell = draw(st.sampled_from([b":", b"dir-merge,"])) if mods else \
            draw(st.sampled_from([b": ", b"dir-merge "]))
        rule = spell + mods + (b" " if mods else b"") + MERGE
        opts.insert(draw(st.integers(0, len(opts))), ("--filter", rule))
        bare = mods.strip(b"en") != b""
        lines: Dict[bytes, List[bytes]] = {}
        for d in [b""] + sorted(k for k, v in tree.items() if v == "d"):
            if draw(st.integers(0, 2)) > 0:
                lines[d] = draw(merge_lines(tree, d, bare))
        if not bare:
            draw(conflict(tree, lines))
        for d, got in lines.items():
            if draw(st.booleans()):
                got.insert(0, b"# a comment")
            merges[d] = draw(st.sampled_from([b"\n", b"\r\n"])).join(got) + b"\n"
    return tree, opts, merges


def _build(src: bytes, tree: Tree, merges: Dict[bytes, bytes]) -> None:
    os.mkdir(src)
    for rel in sorted(tree, key=lambda r: r.count(b"/")):
        path = os.path.join(src, rel)
        if tree[rel] == "d":
            os.mkdir(path)
        elif tree[rel] == "l":
            os.symlink(b".", path)
        else:
            with open(path, "wb") as f:
                f.write(b"x")
    for d, content in merges.items():
        with open(os.path.join(src, d, MERGE) if d else os.path.join(src, MERGE), "wb") as f:
            f.write(content)


def _argv_and_options(tmp: bytes, opts: Options) -> Tuple[List[bytes], Options]:
    """rsync argv elements (one per rule) and the same options for FilterRules.parse."""
    argv: List[bytes] = []
    out: Options = []
    for i, (opt, val) in enumerate(opts):
        if opt.endswith("-from"):
            path = os.path.join(tmp, b"rules%d" % i)
            with open(path, "wb") as f:
                f.write(val)
            val = path
        argv.append(opt.encode() + b"=" + val)
        out.append((opt, val))
    return argv, out


def _all_paths(root: bytes) -> Dict[bytes, bool]:
    """rel -> is_dir (lstat) for everything below root."""
    out: Dict[bytes, bool] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            out[rel] = stat.S_ISDIR(os.lstat(os.path.join(root, rel)).st_mode)
    return out


def engine_select(src: bytes, rules: FilterRules) -> Set[bytes]:
    """What a tree walk keeps: walk_allows per entry, excluded directories pruned."""
    flt = Filter(rules, tree_merge_reader(src))
    out: Set[bytes] = set()
    stack = [b""]
    while stack:
        d = stack.pop()
        with os.scandir(os.path.join(src, d) if d else src) as it:
            for ent in it:
                rel = d + b"/" + ent.name if d else ent.name
                is_dir = ent.is_dir(follow_symlinks=False)
                if flt.walk_allows(rel, is_dir):
                    out.add(rel)
                    if is_dir:
                        stack.append(rel)
    return out


def rsync_select(tmp: bytes, src: bytes, argv: List[bytes]) -> Set[bytes]:
    dst = os.path.join(tmp, b"dst")
    os.mkdir(dst)
    cmd = [RSYNC.encode(), b"-a"] + argv + [src + b"/", dst + b"/"]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert res.returncode == 0, (cmd, res.stderr)
    return set(_all_paths(dst))


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(scenarios())
def test_engine_selects_what_rsync_transfers(work_dir: Path, scenario) -> None:
    tree, opts, merges = scenario
    tmp = tempfile.mkdtemp(dir=os.fsencode(work_dir))
    try:
        src = os.path.join(tmp, b"src")
        _build(src, tree, merges)
        argv, options = _argv_and_options(tmp, opts)
        want = rsync_select(tmp, src, argv)
        rules = FilterRules.parse(options)
        got = engine_select(src, rules)
        assert got == want, {"rsync only": want - got, "engine only": got - want, "argv": argv}
        # every path checked alone (parents included), in an order unlike the walk's,
        # with rules that went through the JSON record a cycle keeps
        again = Filter(FilterRules.from_json(rules.to_json()), tree_merge_reader(src))
        kinds = _all_paths(src)
        event(f"{len(merges)} merge files" if rules.merge_names else "global rules only")
        event("rsync left something out" if len(want) < len(kinds) else "rsync copied all")
        for rel in sorted(kinds, reverse=True):
            assert again.path_allowed(rel, kinds.__getitem__) == (rel in want), rel
        if not rules.merge_names:
            alone = {rel for rel in kinds if not any(
                rules.excluded(p, kinds[p]) for p in _prefixes(rel))}
            assert alone == want
    finally:
        shutil.rmtree(tmp)


def _prefixes(rel: bytes) -> List[bytes]:
    parts = rel.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts) + 1)]


@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
@pytest.mark.parametrize("opts, merges, tree", [
    # the dir-prefix quirk: an anchored rule in the merge file of a directory whose name
    # holds wildcard characters matches with that name as a pattern
    ([("--filter", b": " + MERGE)], {b"[ab]": b"- /foo\n", b"c": b"- /foo\n"},
     {b"[ab]": "d", b"[ab]/foo": "f", b"a": "d", b"a/foo": "f", b"c": "d", b"c/foo": "f"}),
    # ':e' excludes the merge files; 'n' rules are not inherited
    ([("--filter", b":en " + MERGE)], {b"": b"- x\n", b"d": b"+ x\n- *\n"},
     {b"x": "f", b"d": "d", b"d/x": "f", b"d/y": "f", b"d/e": "d", b"d/e/x": "f"}),
    # a directory's own rules come before the inherited ones
    ([("--filter", b": " + MERGE)], {b"": b"- *.tmp\n", b"d": b"+ keep.tmp\n"},
     {b"keep.tmp": "f", b"d": "d", b"d/keep.tmp": "f", b"d/a.tmp": "f", b"d/e": "d",
      b"d/e/keep.tmp": "f"}),
    # '!' in a merge file drops the inherited rules
    ([("--filter", b": " + MERGE)], {b"": b"- y\n", b"d": b"- z\n!\n- w\n"},
     {b"y": "f", b"d": "d", b"d/y": "f", b"d/z": "f", b"d/w": "f"}),
])
def test_known_merge_cases_agree_with_rsync(work_dir: Path, opts, merges, tree) -> None:
    tmp = tempfile.mkdtemp(dir=os.fsencode(work_dir))
    src = os.path.join(tmp, b"src")
    _build(src, tree, merges)
    argv, options = _argv_and_options(tmp, opts)
    want = rsync_select(tmp, src, argv)
    assert engine_select(src, FilterRules.parse(options)) == want


def test_tree_merge_reader(work_dir: Path) -> None:
    root = os.fsencode(work_dir)
    os.makedirs(os.path.join(root, b"d", b".r"))
    with open(os.path.join(root, b".r"), "wb") as f:
        f.write(b"- x\n")
    os.symlink(b".r", os.path.join(root, b"d", b"e"))
    os.mkfifo(os.path.join(root, b"fifo"))
    read = tree_merge_reader(work_dir)
    assert read(b"", b".r") == b"- x\n"
    assert read(b"d", b".r") == b""            # a directory: no rules (rsync reads nothing)
    assert read(b"d", b"e") is None            # a symlink is not followed
    assert read(b"", b"fifo") == b""           # never blocks on a FIFO
    assert read(b"d", b"none") is None and read(b"none", b".r") is None
    assert read(b"d/.r", b"x") is None         # a parent that is not a directory

"""Known answers for discrep.protocol.filters: rsync's rule syntax and matching (tier: unit).

Each construct of rsync's FILTER RULES against a few paths (the answers were checked
with rsync 3.x by hand; tests/fs/test_filters_rsync.py checks random ones against rsync),
merge files through an in-memory reader, the JSON record and hostile JSON.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discrep.core.errors import UsageError
from discrep.protocol.filters import (MAX_PATTERN, MAX_RULES, Filter, FilterRules, Rule,
                                      _nfa_match, _regex, _tokens)

pytestmark = pytest.mark.unit

FAST = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def _rules(*opts: Tuple[str, object]) -> FilterRules:
    return FilterRules.parse(opts)


def _ex(rules: FilterRules, rel: bytes, is_dir: bool = False) -> bool:
    return rules.excluded(rel, is_dir)


def _excludes(pattern: bytes, rel: bytes, is_dir: bool = False) -> bool:
    return _ex(_rules(("--exclude", pattern)), rel, is_dir)


# ------------------------------------------------------------------ matching constructs

@pytest.mark.parametrize("pattern, rel, is_dir, want", [
    # unanchored, no slash: the last component
    (b"foo", b"foo", False, True), (b"foo", b"a/b/foo", False, True),
    (b"foo", b"foobar", False, False), (b"foo", b"foo/bar", False, False),
    # anchored at the root
    (b"/foo", b"foo", False, True), (b"/foo", b"a/foo", False, False),
    (b"/a/foo", b"a/foo", False, True), (b"/", b"a", True, False),
    # an inner slash: the last components, at a component boundary
    (b"a/foo", b"a/foo", False, True), (b"a/foo", b"x/a/foo", False, True),
    (b"a/foo", b"xa/foo", False, False), (b"a/*", b"x/a/b", False, True),
    (b"a/*", b"a/b/c", False, False), (b"a/*", b"a", True, False),
    # trailing slash: directories only (a symlink to a directory is not one)
    (b"foo/", b"foo", True, True), (b"foo/", b"foo", False, False),
    (b"a/foo/", b"x/a/foo", True, True), (b"/foo/", b"foo", True, True),
    # '*' stays within a component
    (b"*.o", b"x/y.o", False, True), (b"*.o", b"y.o/z", False, False),
    (b"a*", b"a/b", False, False), (b"*", b"anything", True, True),
    (b"/*/x", b"a/x", False, True), (b"/*/x", b"a/b/x", False, False),
    # '**' crosses '/'
    (b"a/**", b"a/b/c", False, True), (b"a/**", b"x/a/b", False, True),
    (b"/a/**", b"x/a/b", False, False), (b"a/**", b"a", True, False),
    (b"**/foo", b"foo", False, True), (b"**/foo", b"x/y/foo", False, True),
    (b"/**/foo", b"foo", False, False), (b"/**/foo", b"x/foo", False, True),
    (b"/foo/**/bar", b"foo/bar", False, False), (b"/foo/**/bar", b"foo/x/bar", False, True),
    (b"a**", b"x/ab/c", False, True), (b"**", b"x/y", False, True),
    # '?' is one byte but never '/'
    (b"a?c", b"abc", False, True), (b"a?c", b"ac", False, False),
    (b"/a?c", b"a/c", False, False), (b"a?c", b"a\xffc", False, True),
    # classes
    (b"[ab]x", b"bx", False, True), (b"[ab]x", b"cx", False, False),
    (b"[!a]x", b"bx", False, True), (b"[!a]x", b"ax", False, False),
    (b"[^a]x", b"ax", False, False), (b"[a-c]", b"b", False, True),
    (b"[c-a]", b"b", False, False), (b"[]]", b"]", False, True),
    (b"[!]]", b"a", False, True), (b"[[:digit:]]", b"7", False, True),
    (b"[[:digit:]]", b"a", False, False), (b"[[:alpha:]]", b"\xe9", False, False),
    (b"[a-]", b"-", False, True), (b"[\\]]", b"]", False, True),
    (b"/a[/]b", b"a/b", False, False), (b"/a[!x]b", b"a/b", False, False),
    # malformed: a pattern that can match nothing
    (b"[ab", b"[ab", False, False), (b"[[:nope:]]", b"n", False, False),
    (b"a*\\", b"a\\", False, False),
    # escapes only count in a wildcard pattern
    (b"\\*", b"*", False, True), (b"\\*", b"x", False, False),
    (b"foo\\bar", b"foo\\bar", False, True), (b"fo?\\bar", b"foo\\bar", False, False),
    (b"fo?\\\\bar", b"foo\\bar", False, True),
    # '***': the directory itself and everything below
    (b"dir/***", b"dir", True, True), (b"dir/***", b"dir", False, False),
    (b"dir/***", b"dir/x/y", False, True), (b"dir/***", b"x/dir/y", False, True),
    (b"/dir/***", b"x/dir", True, False), (b"/dir/***", b"dir/x", False, True),
    (b"foo***", b"foo", True, True),
    # non-UTF-8 bytes are ordinary bytes
    (b"\xff*", b"d/\xffabc", False, True), (b"\xfe", b"\xfe", False, True),
    (b"[\xfe-\xff]", b"\xff", False, True),
])
def test_pattern_matching(pattern: bytes, rel: bytes, is_dir: bool, want: bool) -> None:
    assert _excludes(pattern, rel, is_dir) is want


def test_first_match_wins_include_before_exclude() -> None:
    keep = _rules(("--include", b"*/"), ("--include", b"*.c"), ("--exclude", b"*"))
    assert not _ex(keep, b"src", True) and not _ex(keep, b"src/a.c")
    assert _ex(keep, b"src/a.h") and _ex(keep, b"a.c", True) is False
    late = _rules(("--exclude", b"*"), ("--include", b"*.c"))
    assert _ex(late, b"a.c")


def test_excluded_directory_hides_its_contents() -> None:
    rules = _rules(("--exclude", b"/tmp/"), ("--include", b"**"))
    flt = Filter(rules)
    assert not flt.walk_allows(b"tmp", True)
    assert flt.walk_allows(b"tmp/keep", False)            # alone: parents assumed kept
    assert not flt.path_allowed(b"tmp/keep", lambda rel: False)
    assert flt.path_allowed(b"tmpx/keep", lambda rel: False)
    assert flt.path_allowed(b"", lambda rel: True)
    asked: List[bytes] = []
    assert not flt.path_allowed(b"tmp", lambda rel: asked.append(rel) or True)
    assert asked == [b"tmp"]


@pytest.mark.parametrize("bad", [b"", b"/a", b"a/", "a"])
def test_paths_must_be_relative_bytes(bad) -> None:
    with pytest.raises(ValueError):
        _rules().excluded(bad, False)


# ------------------------------------------------------------------ rule syntax

@pytest.mark.parametrize("opts, rel, want", [
    ([("--exclude", b"+ foo"), ("--exclude", b"*")], b"foo", False),    # old-style prefix
    ([("--include", b"- foo"), ("--include", b"*")], b"foo", True),
    ([("--exclude", b"foo"), ("--exclude", b"!"), ("--exclude", b"bar")], b"foo", False),
    ([("--exclude", b"!x")], b"!x", True),                                # '!' only alone
    ([("--exclude", b"")], b"x", False),                                  # empty: ignored
    ([("--filter", b"-_foo")], b"foo", True),
    ([("--filter", b"-, foo")], b"foo", True),
    ([("--filter", b"exclude foo")], b"foo", True),
    ([("--filter", b"exclude_foo")], b"foo", True),
    ([("--filter", b"include foo"), ("-f", b"- *")], b"foo", False),
    ([("--filter", b"- foo"), ("--filter", b"clear")], b"foo", False),
    ([("--filter", b"- foo"), ("--filter", b"!")], b"foo", False),
    ([("--filter", b"-  foo")], b" foo", True),                          # extra spaces kept
    ([("--filter", b"- foo ")], b"foo", False),                         # trailing space kept
    ([("exclude", "f\udcffo")], b"f\xffo", True),                      # str -> fsencode
])
def test_option_syntax(opts, rel: bytes, want: bool) -> None:
    assert _ex(_rules(*opts), rel) is want


@pytest.mark.parametrize("opt, value", [
    ("--filter", b"-foo"),              # rsync: invalid modifier 'f'
    ("--filter", b"- "),                # unexpected end of rule
    ("--filter", b"-"),
    ("--filter", b"exclude"),
    ("--filter", b"! x"),               # '!' with trailing characters
    ("--filter", b"clear x"),
    ("--filter", b"x foo"),             # unknown rule
    ("--filter", b"excludes foo"),
    ("--filter", b"exclude\tfoo"),      # a tab is not the separator
    ("--filter", b"merge /etc/rules"),  # supported by rsync, not by discrep
    ("--filter", b". /etc/rules"),
    ("--filter", b"hide foo"), ("--filter", b"P foo"),
    ("--filter", b"-! foo"), ("--filter", b"+/ foo"),
    ("--filter", b": a/.rules"),        # parent-dir scan
    ("--filter", b":w .rules"), ("--filter", b":-+ .rules"),
    ("--filter", b": "), ("--filter", b": .."),
    ("--exclude", b"- "),
    ("--exclude", b"x" * (MAX_PATTERN + 1)),
    ("--exclude", b"a\0b"),
    ("--files-from", b"x"),
])
def test_bad_rules_raise_usage_error(opt: str, value: bytes) -> None:
    with pytest.raises(UsageError) as info:
        _rules((opt, value))
    assert info.value.exit_code == 3


def test_from_files_like_rsync() -> None:
    files = {
        b"ex": b"# comment\n; comment\n\nfoo\r\n+ keep\r- bar\n!x\n*.o",
        b"in": b"+ a\n- b\nc\n",
        b"clear": b"x\n!\ny\n",
    }
    rules = FilterRules.parse([("--exclude-from", b"ex"), ("--include-from", "in"),
                               ("--exclude-from", b"clear")], read_file=files.__getitem__)
    assert [r.text() for r in rules.rules] == [b"- y"]
    rules = FilterRules.parse([("--exclude-from", b"ex"), ("--include-from", "in")],
                              read_file=files.__getitem__)
    assert [r.text() for r in rules.rules] == [
        b"- foo", b"+ keep", b"- bar", b"- !x", b"- *.o", b"+ a", b"- b", b"+ c"]
    assert FilterRules.parse([("--exclude-from", b"n")],
                             read_file=lambda p: b"a\0ignored\n\0b\n").rules == (Rule("-", b"a"),)


def test_missing_from_file_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="cannot read filter file"):
        FilterRules.parse([("--exclude-from", str(tmp_path / "none"))])


def test_dir_merge_normalization() -> None:
    rules = _rules(("--filter", b":e .r"), ("--filter", b"dir-merge,n- .r"),
                   ("--filter", b"dir-merge .s"), ("--filter", b":ne+ .t"))
    assert [r.text() for r in rules.rules] == [
        b"- .r", b": .r", b": .s", b"- .t", b":n+ .t"]     # the second .r is dropped
    assert rules.merge_names == (b".r", b".s", b".t")
    cleared = _rules(("--filter", b": .r"), ("--filter", b"!"), ("--filter", b":n .r"))
    assert cleared.rules == (Rule(":", b".r", "n"),)


# ------------------------------------------------------------------ merge files

class Tree:
    """An in-memory read_merge: dir rel -> merge file content; counts reads."""

    def __init__(self, files: Dict[bytes, bytes]):
        self.files = files
        self.reads: List[Tuple[bytes, bytes]] = []

    def __call__(self, dir_rel: bytes, name: bytes) -> Optional[bytes]:
        self.reads.append((dir_rel, name))
        return self.files.get(dir_rel + b"/" + name if dir_rel else name)


def _flt(files: Dict[bytes, bytes], *opts: Tuple[str, object]) -> Filter:
    return Filter(_rules(*opts), Tree(files))


def test_merge_rules_apply_to_the_subtree_newest_first() -> None:
    flt = _flt({b".r": b"- *.tmp\n+ keep.tmp\n- x*\n", b"d/.r": b"+ keep.tmp\n+ x1\n"},
               ("--filter", b": .r"))
    assert not flt.walk_allows(b"a.tmp", False) and not flt.walk_allows(b"d/e/a.tmp", False)
    assert not flt.walk_allows(b"keep.tmp", False)           # root file: '- *.tmp' first
    assert flt.walk_allows(b"d/keep.tmp", False)             # d's own rules come first
    assert flt.walk_allows(b"d/e/x1", False) and not flt.walk_allows(b"x1", False)
    assert flt.walk_allows(b".r", False)                     # transferred unless excluded


def test_merge_group_sits_where_the_dir_merge_rule_is() -> None:
    files = {b".r": b"+ a\n- b\n"}
    flt = _flt(files, ("--exclude", b"a"), ("--filter", b": .r"), ("--include", b"b"))
    assert not flt.walk_allows(b"a", False) and not flt.walk_allows(b"b", False)
    flt = _flt(files, ("--filter", b": .r"), ("--exclude", b"a"))
    assert flt.walk_allows(b"a", False)


def test_anchored_merge_rules_are_relative_to_their_directory() -> None:
    files = {b"d/.r": b"- /x\n- /y/\n", b"[ab]/.r": b"- /x\n", b"a/.r": b"- /x\n"}
    flt = _flt(files, ("--filter", b": .r"))
    assert not flt.walk_allows(b"d/x", False) and flt.walk_allows(b"d/e/x", False)
    assert flt.walk_allows(b"x", False) and flt.walk_allows(b"d/y", False)
    assert not flt.walk_allows(b"d/y", True)
    assert not flt.walk_allows(b"a/x", False)
    # rsync pastes the directory into the pattern: '[ab]' is a class, so "/[ab]/x" does
    # not match the directory "[ab]" itself
    assert flt.walk_allows(b"[ab]/x", False)


def test_merge_modifiers_and_clear() -> None:
    files = {b".r": b"- a\n", b"d/.r": b"- b\n", b"d/e/.r": b"- c\n!\n- d\n"}
    inherit = _flt(files, ("--filter", b": .r"))
    assert not inherit.walk_allows(b"d/f/a", False)
    assert inherit.walk_allows(b"d/e/f/a", False)           # d/e's '!' dropped the rest
    assert not inherit.walk_allows(b"d/x/b", False)
    assert inherit.walk_allows(b"d/e/b", False) and inherit.walk_allows(b"d/e/c", False)
    assert not inherit.walk_allows(b"d/e/d", False)
    alone = _flt(files, ("--filter", b":n .r"))
    assert not alone.walk_allows(b"a", False) and alone.walk_allows(b"d/a", False)
    assert not alone.walk_allows(b"d/b", False) and alone.walk_allows(b"d/x/b", False)
    bare = _flt({b".r": b"# c\n!\n/a\nb/\n"}, ("--filter", b":- .r"))
    assert not bare.walk_allows(b"!", False) and not bare.walk_allows(b"a", False)
    assert not bare.walk_allows(b"b", True) and bare.walk_allows(b"x/a", False)
    plus = _flt({b".r": b"a\n"}, ("--filter", b":+ .r"), ("--exclude", b"*"))
    assert plus.walk_allows(b"a", False) and not plus.walk_allows(b"b", False)
    self_ex = _flt({}, ("--filter", b":e .r"))
    assert not self_ex.walk_allows(b"d/.r", False)


def test_merge_file_read_once_per_directory() -> None:
    tree = Tree({b"d/.r": b"- x\n"})
    flt = Filter(_rules(("--filter", b": .r")), tree)
    for _ in range(3):
        assert not flt.walk_allows(b"d/e/x", False)
        assert flt.walk_allows(b"d/e/y", False)
    assert sorted(tree.reads) == [(b"", b".r"), (b"d", b".r"), (b"d/e", b".r")]
    small = Filter(_rules(("--filter", b": .r")), tree, cache_dirs=1)
    assert not small.walk_allows(b"d/e/x", False) and not small.walk_allows(b"d/f/x", False)


@pytest.mark.parametrize("content", [b"foo\n", b"dir-merge .x\n", b"merge x\n", b"-! a\n",
                                     b" - a\n", b"- \n"])
def test_bad_merge_file_names_the_file(content: bytes) -> None:
    flt = _flt({b"d/.r": content}, ("--filter", b": .r"))
    assert flt.walk_allows(b"x", False)
    with pytest.raises(UsageError, match=r"d/\.r"):
        flt.walk_allows(b"d/x", False)


def test_filter_needs_a_reader_for_dir_merge() -> None:
    with pytest.raises(ValueError):
        Filter(_rules(("--filter", b": .r")))
    assert not _rules(("--filter", b": .r"), ("--exclude", b"x")).excluded(b"y", False)


# ------------------------------------------------------------------ matcher internals

TEXT = st.lists(st.sampled_from([b"a", b"b", b"/", b"\xff", b"*"]), max_size=8).map(b"".join)
PAT = st.lists(st.sampled_from([b"a", b"b", b"/", b"*", b"**", b"?", b"[ab]", b"[!a]", b"\xff",
                                b"\\*"]), max_size=7).map(b"".join)


@settings(FAST, max_examples=200)
@given(PAT, TEXT, st.booleans())
def test_state_set_matcher_agrees_with_regex(pat: bytes, text: bytes, suffix: bool) -> None:
    tokens = _tokens(pat, True)
    assert tokens is not None
    assert bool(_regex(tokens, suffix)(text)) == _nfa_match(tokens, suffix, text)


def test_many_stars_stay_fast() -> None:
    rules = _rules(("--exclude", b"*a*a*a*a*a*a*a*a*b"), ("--exclude", b"**a**a**a**a**a**c"),
                   ("--exclude", b"x/**a*a*a*/**b"))
    path = b"/".join([b"a" * 200] * 20)
    t0 = time.monotonic()
    assert not rules.excluded(path, False)
    assert time.monotonic() - t0 < 2.0


# ------------------------------------------------------------------ JSON record

RULE_OPTS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["--exclude", "--include"]),
              st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b
                                                       and b not in (b"!",)
                                                       and b[:2] not in (b"- ", b"+ "))),
    st.tuples(st.just("--filter"), st.sampled_from([b": .r", b":n- .s", b":e .t", b"!"]))),
    max_size=8)


@FAST
@given(RULE_OPTS)
def test_json_round_trip(opts) -> None:
    rules = FilterRules.parse(opts)
    text = rules.to_json()
    back = FilterRules.from_json(text)
    assert back == rules and hash(back) == hash(rules)
    assert FilterRules.from_json(text.encode()) == rules
    for r in rules.rules:
        assert back.excluded(r.pattern.strip(b"/") or b"x", True) == \
            rules.excluded(r.pattern.strip(b"/") or b"x", True)


def test_json_keeps_non_utf8_patterns() -> None:
    rules = _rules(("--exclude", b"\xff*"), ("--include", "ü"))
    obj = json.loads(rules.to_json())
    assert obj["rules"] == [{"k": "-", "p64": "/yo="}, {"k": "+", "p": "ü"}]
    assert FilterRules.from_json(rules.to_json()).rules == rules.rules


def _doc(*rules: object, v: object = 1) -> str:
    return json.dumps({"v": v, "rules": list(rules)})


@pytest.mark.parametrize("text", [
    "", "[]", "{}", "null", "not json", '{"v": 1}', _doc(v=2), _doc(v=True), _doc(v="1"),
    '{"v": 1, "rules": [], "x": 1}', '{"v": 1, "rules": {}}',
    _doc({"k": "?", "p": "a"}), _doc({"k": "-"}), _doc({"k": "-", "p": ""}),
    _doc({"k": "-", "p": "a", "p64": "YQ=="}), _doc({"k": "-", "p64": "!!"}),
    _doc({"k": "-", "p64": "YQ==!"}),
    _doc({"k": "-", "p": "a", "m": "n"}), _doc({"k": ":", "p": ".r", "m": "e"}),
    _doc({"k": ":", "p": ".r", "m": "+-"}), _doc({"k": ":", "p": "a/.r"}),
    _doc({"k": ":", "p": ".r"}, {"k": ":", "p": ".r"}), _doc({"k": "-", "p": "a\u0000"}),
    _doc({"k": "-", "p": "\udcff"}), _doc({"k": "-", "p": 5}), _doc({"k": "-", "p": "a", "x": 1}),
    _doc("- a"), _doc({"k": "-", "p": "x" * (MAX_PATTERN + 1)}),
    _doc(*[{"k": "-", "p": "a"}] * (MAX_RULES + 1)),
    '{"v": 1, "rules": ' + "[" * 100000 + "]" * 100000 + "}",
    "x" * (3 << 20),
])
def test_from_json_rejects_bad_records(text: str) -> None:
    with pytest.raises(UsageError):
        FilterRules.from_json(text)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6)
    | st.sampled_from(["-", "+", ":", "!", "p", "p64", "k", "m", "v", "rules", ".r", "n-"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["k", "p", "p64", "m", "v", "rules", "x"]), inner,
                      max_size=4),
    max_leaves=12)


@FAST
@given(st.one_of(JSON.map(json.dumps),
                 st.builds(lambda r: json.dumps({"v": 1, "rules": r}), st.lists(JSON, max_size=4)),
                 st.binary(max_size=40)))
def test_from_json_hostile_input_is_usage_error_or_valid(text) -> None:
    try:
        rules = FilterRules.from_json(text)
    except UsageError:
        return
    assert FilterRules.from_json(rules.to_json()) == rules

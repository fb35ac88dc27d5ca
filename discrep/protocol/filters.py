"""rsync-compatible include/exclude filter rules: parse, serialize, match.

Role: the source decides with this module which paths of its tree take part in a
cycle, with the rule syntax and the matching semantics of rsync's FILTER RULES
(``--exclude``, ``--include``, ``--exclude-from``, ``--include-from``, ``--filter``
with ``-``/``+``/``exclude``/``include``/``!``/``clear`` and per-directory merge files
``dir-merge NAME`` / ``: NAME``).  ``FilterRules`` is the typed, immutable rule list a
cycle records (``to_json``/``from_json``); ``Filter`` applies it during a tree walk and
to journal entries, reading per-directory merge files through a callback.  Paths are
bytes relative to the tree root (no leading or trailing ``/``); names need not be UTF-8.

Semantics matched (rsync 3.x, checked against rsync itself by tests/fs/test_filters_rsync.py):

- first matching rule wins; no match means included; an excluded directory is not
  descended, so nothing below it is selected whatever later rules say (``Filter``
  checks a path assuming its parents passed; ``path_allowed`` checks the parents too);
- ``/pat`` is anchored at the tree root; a pattern without a (non-trailing) ``/`` and
  without ``**`` matches the last component; one with a ``/`` matches the last N
  components (N = its slashes + 1); one with ``**`` (not leading) is tried at the start
  and after every ``/`` of the path; a leading ``**`` matches against ``"/" + path``
  (so ``**/foo`` matches a top-level ``foo``); a trailing ``/`` matches directories only
  (a symlink to a directory is not a directory);
- ``*`` matches within a component, ``**`` (any run of 2+ stars) across ``/``, ``?``
  one non-``/`` byte, ``[...]`` a class (``!``/``^`` negate, ranges, ``[:alpha:]`` etc.
  in the C locale, ``]`` first is literal, never ``/``); a malformed class or a trailing
  ``\\`` makes the pattern match nothing; a pattern ending in ``***`` also matches a
  directory as if it had a trailing ``/`` (``dir/***`` = ``dir`` and all below);
- a backslash escapes only in a pattern holding one of ``*?[``; otherwise it is literal;
- ``--exclude``/``--include`` and ``*-from`` lines accept ``"- "``/``"+ "`` prefixes and a
  lone ``!`` clears the list so far; ``*-from`` and merge files: one rule per line
  (``\\n``, ``\\r\\n`` or ``\\r``), empty lines and lines starting with ``;`` or ``#``
  skipped, a NUL ends the line, trailing spaces are part of the pattern;
- ``dir-merge NAME``: NAME in each walked directory D holds rules (full rule syntax, or
  bare patterns with the ``-``/``+`` modifier) for D's subtree, grouped at the position
  of the dir-merge rule, D's own rules before the inherited ones (``n``: not inherited;
  ``!`` in the file drops the inherited ones); an anchored ``/pat`` in D's file is
  rsync's ``/D/pat`` -- rsync prepends the directory text to the pattern, so wildcard
  characters in D's name act as wildcards (a dir ``[ab]`` makes ``/foo`` in its file
  match nothing); ``e`` adds ``- NAME`` before the group; a repeated dir-merge of the
  same name is ignored; the merge file itself is transferred unless a rule excludes it;
  it is read even when excluded.

Not supported (``UsageError`` naming the rule; rsync would accept them): ``merge``/``.``,
hide/show/protect/risk, modifiers on ``+``/``-``, dir-merge modifiers other than
``e n - +``, dir-merge names with ``/`` (rsync's parent-dir scan), merge rules inside a
merge file.  A merge-file line rsync rejects (e.g. a bare pattern in a plain dir-merge
file) raises ``UsageError`` naming the file, where rsync stops with a syntax error.
Deliberate differences: patterns over ``MAX_PATTERN`` bytes raise instead
of being discarded with a message; ``tree_merge_reader`` does not follow a symlinked
merge file (rsync follows one owned by root or the caller) and reads a non-regular one
as empty; rsync prefixes anchored merge-file rules with the absolute source path, so
there the root path must hold none of ``*?[\\`` for the two to agree.

Receiver side (the caller's business): in rsync an exclude also *protects* the
receiver's file of that name from ``--delete`` (an include puts it at risk again);
excluded files already on the replica are kept unless ``--delete-excluded`` is given,
which makes the rules sender-only so excluded files are deleted like any file the
sender did not list.  Without a delete option nothing is deleted at all.

Thread-safety: ``Rule`` and ``FilterRules`` are immutable values, safe to share.
``Filter`` caches per-directory rules under a lock, so one instance may serve several
walker threads; the merge-file callback is called with that lock held.
"""
from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import re
import stat
import string
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple, Union

from discrep.core.errors import UsageError

EXCLUDE = "-"
INCLUDE = "+"
DIR_MERGE = ":"
KINDS = (EXCLUDE, INCLUDE, DIR_MERGE)
MERGE_MODIFIERS = ("", "n", "-", "+", "n-", "n+")   # canonical dir-merge modifier strings
MAX_RULES = 4096            # rules in one FilterRules and in one merge file
MAX_PATTERN = 4095          # bytes; rsync discards patterns of MAXPATHLEN (4096) and more
MAX_RULE_FILE = 4 << 20     # bytes of one --exclude-from/--include-from or merge file
MAX_JSON = 2 << 20          # bytes of a serialized FilterRules
JSON_VERSION = 1

#: read_merge(dir_rel, name) -> the merge file's bytes, or None when there is none
MergeReader = Callable[[bytes, bytes], Optional[bytes]]

_HINT = "see FILTER RULES in man rsync; discrep supports -, +, exclude, include, !, dir-merge"
_SLASH = 0x2F
_STAR = -1                  # token: '*', any run of non-'/' bytes
_ANY = -2                   # token: '**', any run of bytes
_Token = Union[int, FrozenSet[int]]


def _ascii(chars: str) -> FrozenSet[int]:
    return frozenset(chars.encode("ascii"))


_POSIX: Dict[bytes, FrozenSet[int]] = {
    b"alnum": _ascii(string.ascii_letters + string.digits),
    b"alpha": _ascii(string.ascii_letters),
    b"blank": _ascii(" \t"),
    b"cntrl": frozenset(list(range(32)) + [127]),
    b"digit": _ascii(string.digits),
    b"graph": frozenset(range(33, 127)),
    b"lower": _ascii(string.ascii_lowercase),
    b"print": frozenset(range(32, 127)),
    b"punct": _ascii(string.punctuation),
    b"space": _ascii(" \t\n\r\x0b\x0c"),
    b"upper": _ascii(string.ascii_uppercase),
    b"xdigit": _ascii(string.hexdigits),
}
_NOT_SLASH = frozenset(range(256)) - {_SLASH}


# ------------------------------------------------------------------ pattern compiler

def _class_at(pat: bytes, i: int) -> Optional[Tuple[FrozenSet[int], int]]:
    """The ``[...]`` class opening at ``pat[i]``: (bytes it matches, index after ``]``);
    None when it is malformed (then rsync's pattern matches nothing)."""
    n, j = len(pat), i + 1
    negate = j < n and pat[j] in b"!^"
    j += negate
    members: set = set()
    prev: Optional[int] = None          # a range may start here
    first = True
    while True:
        if j >= n:
            return None
        c = pat[j]
        if c == 0x5D and not first:                          # ']'
            break
        first = False
        if c == 0x5C:                                        # '\\' escapes one byte
            j += 1
            if j >= n:
                return None
            members.add(pat[j])
            prev = pat[j]
        elif c == 0x2D and prev is not None and j + 1 < n and pat[j + 1] != 0x5D:
            j += 1
            hi = pat[j]
            if hi == 0x5C:
                j += 1
                if j >= n:
                    return None
                hi = pat[j]
            members.update(range(prev, hi + 1))
            prev = None
        elif c == 0x5B and j + 1 < n and pat[j + 1] == 0x3A:  # '[:' maybe a POSIX class
            end = pat.find(b"]", j + 2)
            if end < 0:
                return None
            if end - (j + 2) - 1 < 0 or pat[end - 1] != 0x3A:   # no ':]': a plain '['
                members.add(c)
                prev = c
            else:
                cls = _POSIX.get(pat[j + 2:end - 1])
                if cls is None:
                    return None
                members |= cls
                prev = None
                j = end
        else:
            members.add(c)
            prev = c
        j += 1
    got = (frozenset(range(256)) - members) if negate else frozenset(members)
    return got - {_SLASH}, j + 1


def _tokens(body: bytes, wild: bool) -> Optional[List[_Token]]:
    """Pattern text -> tokens (a byte set per single-byte step, _STAR, _ANY); None if the
    pattern can match nothing.  A pattern without ``*?[`` is literal bytes (no escapes)."""
    if not wild:
        return [frozenset((c,)) for c in body]
    out: List[_Token] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == 0x2A:                                        # '*'
            j = i
            while j < n and body[j] == 0x2A:
                j += 1
            out.append(_STAR if j - i == 1 else _ANY)
            i = j
            continue
        if c == 0x3F:                                        # '?'
            out.append(_NOT_SLASH)
        elif c == 0x5B:                                      # '['
            got = _class_at(body, i)
            if got is None:
                return None
            out.append(got[0])
            i = got[1]
            continue
        elif c == 0x5C:                                      # '\\'
            if i + 1 >= n:
                return None
            i += 1
            out.append(frozenset((body[i],)))
        else:
            out.append(frozenset((c,)))
        i += 1
    return out


def _set_regex(s: FrozenSet[int]) -> bytes:
    if not s:
        return b"(?!)"
    if len(s) == 1:
        return re.escape(bytes(s))
    if s == _NOT_SLASH:
        return b"[^/]"
    parts, vals = [], sorted(s)
    start = prev = vals[0]
    for v in vals[1:] + [-1]:
        if v != prev + 1:
            parts.append(b"\\x%02x" % start if start == prev else b"\\x%02x-\\x%02x" % (start, prev))
            start = v
        prev = v
    return b"[" + b"".join(parts) + b"]"


def _regex(tokens: List[_Token], suffix: bool) -> Callable[[bytes], object]:
    body = b"".join(b"[^/]*" if t == _STAR else b".*" if t == _ANY else _set_regex(t)
                    for t in tokens)
    if suffix:
        body = b"(?:.*/)?(?:" + body + b")"
    return re.compile(body, re.DOTALL).fullmatch


def _nfa_match(tokens: List[_Token], suffix: bool, text: bytes) -> bool:
    """Glob match by state-set simulation: O(len(text) * len(tokens)) whatever the
    stars (a backtracking regex can take exponential time on hostile patterns)."""
    end = len(tokens)

    def close(states: set) -> set:
        out = set()
        for i in states:
            out.add(i)
            while i < end and isinstance(tokens[i], int):
                i += 1
                out.add(i)
        return out

    start = close({0})
    cur = set(start)
    for c in text:
        nxt = set()
        for i in cur:
            if i == end:
                continue
            t = tokens[i]
            if t == _ANY or (t == _STAR and c != _SLASH):
                nxt.add(i)
            elif not isinstance(t, int) and c in t:
                nxt.add(i + 1)
        cur = close(nxt)
        if suffix and c == _SLASH:
            cur |= start
        if not cur and not suffix:
            return False
    return end in cur


_BASE, _START, _TAIL, _SUFFIX = range(4)


@dataclass(frozen=True)
class _Compiled:
    include: bool
    dir_only: bool
    mode: int                  # which part of the path the pattern is matched against
    tail: int                  # _TAIL: number of trailing components
    wild3: bool                # directories are matched with a "/" appended
    slash_prefix: bool         # the path is matched with a "/" prepended (leading "**")
    test: Optional[Callable[[bytes], object]]   # None: never matches

    def matches(self, path: bytes, is_dir: bool) -> bool:
        if self.test is None or (self.dir_only and not is_dir):
            return False
        if self.mode == _BASE:
            return bool(self.test(path[path.rfind(b"/") + 1:]))
        if self.mode == _TAIL:
            pos = len(path)
            for k in range(self.tail):
                pos = path.rfind(b"/", 0, pos)
                if pos < 0:
                    if k < self.tail - 1:
                        return False      # fewer components than the pattern has
                    break
            return bool(self.test(path[pos + 1:]))
        if self.wild3 and is_dir:
            path += b"/"
        if self.slash_prefix:
            path = b"/" + path
        return bool(self.test(path))


def _compile(pattern: bytes, include: bool, dir_prefix: bytes = b"") -> _Compiled:
    """One rule's pattern -> matcher, with rsync's flags computed from the pattern text.
    ``dir_prefix``: the directory of the merge file the rule came from (anchored rules)."""
    pat, dir_only = pattern, False
    if len(pat) > 1 and pat.endswith(b"/"):
        pat, dir_only = pat[:-1], True
    if dir_prefix and pat.startswith(b"/"):
        pat = b"/" + dir_prefix + pat
    wild = any(c in pat for c in b"*?[")
    wild2 = wild and b"**" in pat
    anchored = pat.startswith(b"/")
    slashes = pat.count(b"/")
    tail, slash_prefix = 0, False
    if anchored:
        mode = _START
    elif not slashes and not wild2:
        mode = _BASE
    elif not wild2:
        mode, tail = _TAIL, slashes + 1
    elif pat.startswith(b"**"):
        mode, slash_prefix = _START, True
    else:
        mode = _SUFFIX
    tokens = _tokens(pat[1:] if anchored else pat, wild)
    test = None
    if tokens is not None:
        suffix = mode == _SUFFIX
        stars = sum(1 for t in tokens if isinstance(t, int)) + suffix
        test = _regex(tokens, suffix) if stars <= 2 else partial(_nfa_match, tokens, suffix)
    return _Compiled(include, dir_only, mode, tail, wild2 and pat.endswith(b"***"),
                     slash_prefix, test)


# ------------------------------------------------------------------ rule values

def _fsbytes(value: Union[str, bytes, "os.PathLike[str]"], what: str) -> bytes:
    try:
        return os.fsencode(value)
    except TypeError:
        raise UsageError(f"{what}: expected a str, bytes or path, got {type(value).__name__}")


def _show(b: bytes) -> str:
    return repr(b)[2:-1]


@dataclass(frozen=True)
class Rule:
    """One normalized rule: exclude/include PATTERN, or dir-merge NAME with modifiers
    (canonical: ``n`` not inherited, ``-``/``+`` lines are bare exclude/include patterns)."""

    kind: str
    pattern: bytes
    modifiers: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown filter rule kind {self.kind!r}", hint=_HINT)
        if not isinstance(self.pattern, bytes) or not self.pattern:
            raise UsageError("a filter rule needs a non-empty pattern", hint=_HINT)
        if len(self.pattern) > MAX_PATTERN or b"\0" in self.pattern:
            raise UsageError(f"filter pattern longer than {MAX_PATTERN} bytes or holding NUL: "
                             f"{_show(self.pattern[:60])}", hint="shorten the pattern")
        if self.kind != DIR_MERGE:
            if self.modifiers:
                raise UsageError(f"modifiers {self.modifiers!r} on a {self.kind} rule are not "
                                 "supported", hint=_HINT)
            return
        if self.modifiers not in MERGE_MODIFIERS:
            raise UsageError(f"dir-merge modifiers {self.modifiers!r} not supported",
                             hint="discrep supports e, n and one of - or + on dir-merge")
        if b"/" in self.pattern or self.pattern in (b".", b".."):
            raise UsageError(f"dir-merge name {_show(self.pattern)} must be a plain file name",
                             hint="rsync's parent-directory scan (a name with /) is not supported")

    def text(self) -> bytes:
        """The rule in rsync's --filter syntax."""
        if self.kind == DIR_MERGE:
            return b":" + self.modifiers.encode() + b" " + self.pattern
        return self.kind.encode() + b" " + self.pattern

    def to_obj(self) -> Dict[str, str]:
        try:
            out = {"k": self.kind, "p": self.pattern.decode("utf-8")}
        except UnicodeDecodeError:
            out = {"k": self.kind, "p64": base64.b64encode(self.pattern).decode("ascii")}
        if self.modifiers:
            out["m"] = self.modifiers
        return out

    @classmethod
    def from_obj(cls, obj: object) -> "Rule":
        if not isinstance(obj, dict) or not set(obj) <= {"k", "p", "p64", "m"} \
                or ("p" in obj) == ("p64" in obj):
            raise UsageError("bad filter rule record: want {k, p or p64[, m]}", hint=_HINT)
        kind, mods = obj.get("k"), obj.get("m", "")
        raw = obj.get("p", obj.get("p64"))
        if not isinstance(kind, str) or not isinstance(mods, str) or not isinstance(raw, str):
            raise UsageError("bad filter rule record: k, p, p64 and m are strings", hint=_HINT)
        try:
            pattern = raw.encode("utf-8") if "p" in obj else base64.b64decode(raw, validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
            raise UsageError(f"bad filter rule pattern encoding: {exc}", hint=_HINT) from None
        return cls(kind, pattern, mods)


# ------------------------------------------------------------------ rule text parser

_LONG = {b"clear": "!", b"dir-merge": ":", b"exclude": "-", b"include": "+", b"merge": ".",
         b"hide": "H", b"show": "S", b"protect": "P", b"risk": "R"}
_SHORT = set("!:-+.HSPR")
_AFTER_LONG = {b"", b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b"_", b","}


def _split_rule(text: bytes, where: str) -> Tuple[str, bytes, str]:
    """rsync's ``RULE[,MODIFIERS] PATTERN`` (``_`` may stand for the space) ->
    (rule char, pattern, modifiers).  Kinds discrep does not support raise."""
    for word, ch in _LONG.items():
        if text.startswith(word) and text[len(word):len(word) + 1] in _AFTER_LONG:
            kind, pos = ch, len(word)
            break
    else:
        kind, pos = chr(text[0]), 1
        if text[:1] in b"cdehimprs" or kind not in _SHORT:
            raise UsageError(f"{where}unknown filter rule: {_show(text[:60])}", hint=_HINT)
    if text[pos:pos + 1] == b",":
        pos += 1
    if kind == "!":
        if text[pos:]:
            raise UsageError(f"{where}'!' rule has trailing characters: {_show(text[:60])}",
                             hint=_HINT)
        return kind, b"", ""
    end = pos
    while end < len(text) and text[end] not in b" _":
        end += 1
    mods = text[pos:end].decode("latin-1")
    pattern = text[end + 1:]
    if kind in ".HSPR":
        raise UsageError(f"{where}filter rule {_show(text[:60])} is not supported by discrep",
                         hint=_HINT)
    if not pattern:
        raise UsageError(f"{where}unexpected end of filter rule: {_show(text[:60])}", hint=_HINT)
    return kind, pattern, mods


def _rule_lines(data: bytes) -> Iterator[bytes]:
    """Lines of a rule file the way rsync reads them (CR, LF, CRLF; NUL ends a line;
    empty and ';'/'#' comment lines skipped)."""
    for line in re.split(rb"\r\n|\r|\n", data):
        line = line.split(b"\0", 1)[0]
        if line and line[:1] not in (b";", b"#"):
            yield line


def _old_style(text: bytes, include: bool, where: str) -> Optional[Tuple[str, bytes]]:
    """--exclude/--include argument or *-from line -> (kind, pattern); ("!", b"") clears;
    None for an empty one (rsync ignores it)."""
    if not text:
        return None
    kind = INCLUDE if include else EXCLUDE
    if text[:2] in (b"- ", b"+ "):
        kind, text = text[:1].decode(), text[2:]
        if not text:
            raise UsageError(f"{where}unexpected end of filter rule", hint=_HINT)
    elif text == b"!":
        return "!", b""
    return kind, text


class _Builder:
    """Accumulates rules the way rsync's global list does (clear, e, repeated dir-merge)."""

    def __init__(self) -> None:
        self.rules: List[Rule] = []

    def add(self, kind: str, pattern: bytes, mods: str = "") -> None:
        if kind == "!":
            self.rules.clear()
            return
        if kind != DIR_MERGE:
            return self._append(Rule(kind, pattern, mods))
        if set(mods) - set("en-+") or mods.count("-") + mods.count("+") > 1:
            raise UsageError(f"dir-merge modifiers {mods!r} not supported",
                             hint="discrep supports e, n and one of - or + on dir-merge")
        rule = Rule(DIR_MERGE, pattern, "".join(m for m in "n-+" if m in mods))
        if "e" in mods:
            self._append(Rule(EXCLUDE, pattern))
        if not any(r.kind == DIR_MERGE and r.pattern == pattern for r in self.rules):
            self._append(rule)

    def _append(self, rule: Rule) -> None:
        if len(self.rules) >= MAX_RULES:
            raise UsageError(f"more than {MAX_RULES} filter rules", hint="merge some patterns")
        self.rules.append(rule)


def _read_rule_file(path: bytes) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RULE_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read filter file {_show(path)}: {exc.strerror}",
                         hint="check the --exclude-from/--include-from path") from None
    if len(data) > MAX_RULE_FILE:
        raise UsageError(f"filter file {_show(path)} is larger than {MAX_RULE_FILE} bytes")
    return data


# ------------------------------------------------------------------ FilterRules

@dataclass(frozen=True)
class FilterRules:
    """An ordered, normalized rsync rule list (clears applied, ``e`` expanded, repeated
    dir-merges dropped).  Immutable and hashable; ``to_json``/``from_json`` round-trip."""

    rules: Tuple[Rule, ...] = ()
    _compiled: Tuple[Union[_Compiled, int], ...] = field(
        init=False, repr=False, compare=False, hash=False, default=())

    def __post_init__(self) -> None:
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise UsageError("FilterRules.rules must be a tuple of Rule")
        if len(self.rules) > MAX_RULES:
            raise UsageError(f"more than {MAX_RULES} filter rules", hint="merge some patterns")
        names = [r.pattern for r in self.rules if r.kind == DIR_MERGE]
        if len(set(names)) != len(names):
            raise UsageError("the same dir-merge file is named twice", hint=_HINT)
        out: List[Union[_Compiled, int]] = []
        for r in self.rules:
            out.append(names.index(r.pattern) if r.kind == DIR_MERGE
                       else _compile(r.pattern, r.kind == INCLUDE))
        object.__setattr__(self, "_compiled", tuple(out))

    @classmethod
    def parse(cls, options: Iterable[Tuple[str, Union[str, bytes]]], *,
              read_file: Optional[Callable[[bytes], bytes]] = None) -> "FilterRules":
        """Rules from rsync options in command-line order, e.g.
        ``[("--exclude", "*.o"), ("--filter", "dir-merge .discrepignore"),
        ("--include-from", "/etc/keep")]``.  Option names: ``exclude``, ``include``,
        ``exclude-from``, ``include-from``, ``filter`` (or ``f``), with or without
        leading dashes; the value is always separate (no ``--exclude=x``).  ``read_file(path)`` reads a *-from file (default: open it)."""
        build = _Builder()
        reader = read_file or _read_rule_file
        for opt, value in options:
            name = opt.lstrip("-") if isinstance(opt, str) else ""
            val = _fsbytes(value, f"--{name}")
            if name in ("f", "filter"):
                if val:
                    build.add(*_split_rule(val, "--filter: "))
            elif name in ("exclude", "include"):
                got = _old_style(val, name == "include", f"--{name}: ")
                if got:
                    build.add(*got)
            elif name in ("exclude-from", "include-from"):
                data = reader(val)
                if len(data) > MAX_RULE_FILE:
                    raise UsageError(f"filter file {_show(val)} is too large")
                for line in _rule_lines(data):
                    got = _old_style(line, name == "include-from", f"{_show(val)}: ")
                    if got:
                        build.add(*got)
            else:
                raise UsageError(f"unknown filter option {opt!r}",
                                 hint="use exclude, include, exclude-from, include-from, filter")
        return cls(tuple(build.rules))

    @property
    def merge_names(self) -> Tuple[bytes, ...]:
        """The dir-merge file names, in rule order."""
        return tuple(r.pattern for r in self.rules if r.kind == DIR_MERGE)

    def is_empty(self) -> bool:
        return not self.rules

    def excluded(self, rel: bytes, is_dir: bool) -> bool:
        """Whether ``rel`` is excluded by the global rules, assuming its parents were
        included.  Dir-merge rules contribute nothing here (use ``Filter`` for them)."""
        _check_rel(rel)
        return _decide(self._compiled, (), rel, is_dir) is False

    def to_json(self) -> str:
        return json.dumps({"v": JSON_VERSION, "rules": [r.to_obj() for r in self.rules]},
                          separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, data: Union[str, bytes]) -> "FilterRules":
        """Inverse of ``to_json``; validates everything (untrusted input from the peer)."""
        if not isinstance(data, (str, bytes)) or len(data) > MAX_JSON:
            raise UsageError(f"filter rules: want a JSON text of at most {MAX_JSON} bytes")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise UsageError(f"filter rules: not JSON: {str(exc)[:80]}", hint=_HINT) from None
        if not isinstance(obj, dict) or set(obj) != {"v", "rules"} \
                or type(obj["v"]) is not int or obj["v"] != JSON_VERSION \
                or not isinstance(obj["rules"], list):
            raise UsageError(f"filter rules: want {{\"v\": {JSON_VERSION}, \"rules\": [...]}}",
                             hint="source and replica must run compatible discrep versions")
        if len(obj["rules"]) > MAX_RULES:
            raise UsageError(f"filter rules: more than {MAX_RULES} rules")
        return cls(tuple(Rule.from_obj(r) for r in obj["rules"]))


def _check_rel(rel: bytes) -> None:
    if not isinstance(rel, bytes) or not rel or rel[:1] == b"/" or rel[-1:] == b"/":
        raise ValueError(f"not a relative path: {rel!r}")


class _Chain:
    """One directory's rules of one dir-merge, then the inherited ones (``parent``)."""

    __slots__ = ("rules", "parent")

    def __init__(self, rules: Tuple[_Compiled, ...], parent: Optional["_Chain"]):
        self.rules = rules
        self.parent = parent


def _decide(items: Tuple[Union[_Compiled, int], ...], chains: Tuple[Optional[_Chain], ...],
            rel: bytes, is_dir: bool) -> Optional[bool]:
    """The first matching rule's verdict: True include, False exclude, None no match."""
    for item in items:
        if isinstance(item, int):
            node = chains[item] if item < len(chains) else None
            while node is not None:
                for r in node.rules:
                    if r.matches(rel, is_dir):
                        return r.include
                node = node.parent
        elif item.matches(rel, is_dir):
            return item.include
    return None


# ------------------------------------------------------------------ Filter (tree walk)

def _merge_rules(data: bytes, mods: str, dir_rel: bytes,
                 where: str) -> Tuple[Tuple[_Compiled, ...], bool]:
    """A merge file's rules (compiled, anchored at ``dir_rel``) and whether it cleared
    the inherited ones."""
    if len(data) > MAX_RULE_FILE:
        raise UsageError(f"{where}larger than {MAX_RULE_FILE} bytes")
    out: List[_Compiled] = []
    cleared = False
    for line in _rule_lines(data):
        if "-" in mods or "+" in mods:
            kind, pattern = ("+" if "+" in mods else "-"), line
        else:
            kind, pattern, extra = _split_rule(line, where)
            if kind == "!":
                out.clear()
                cleared = True
                continue
            if kind == DIR_MERGE:
                raise UsageError(f"{where}dir-merge inside a merge file is not supported",
                                 hint=_HINT)
            try:
                Rule(kind, pattern, extra)                  # validates
            except UsageError as exc:
                raise UsageError(f"{where}{exc.args[0]}", hint=exc.hint) from None
        if len(pattern) > MAX_PATTERN or len(out) >= MAX_RULES:
            raise UsageError(f"{where}pattern too long or too many rules")
        out.append(_compile(pattern, kind == INCLUDE, dir_rel))
    return tuple(out), cleared


class Filter:
    """``FilterRules`` applied to one tree: per-directory merge files are read through
    ``read_merge(dir_rel, name)`` (None: no such file; ``dir_rel`` is b"" for the root)
    once per directory and cached (``cache_dirs`` directories; the cache is dropped
    when full, so a file may be read again)."""

    def __init__(self, rules: FilterRules, read_merge: Optional[MergeReader] = None, *,
                 cache_dirs: int = 65536):
        if rules.merge_names and read_merge is None:
            raise ValueError("rules with dir-merge need a read_merge callback")
        self.rules = rules
        self._read = read_merge
        self._slots = tuple((r.pattern, r.modifiers) for r in rules.rules if r.kind == DIR_MERGE)
        self._cache: Dict[bytes, Tuple[Optional[_Chain], ...]] = {}
        self._cache_dirs = max(1, cache_dirs)
        self._lock = threading.Lock()

    def walk_allows(self, rel: bytes, is_dir: bool) -> bool:
        """Whether a tree walk keeps ``rel`` (descends into it when a directory),
        assuming its parent directories were kept."""
        _check_rel(rel)
        chains = self._chains(rel.rpartition(b"/")[0]) if self._slots else ()
        return _decide(self.rules._compiled, chains, rel, is_dir) is not False

    def path_allowed(self, rel: bytes, is_dir_of: Callable[[bytes], bool]) -> bool:
        """Whether ``rel`` and every parent directory of it pass (a journal entry below
        an excluded directory is dropped).  ``is_dir_of(rel)`` tells whether ``rel``
        itself is a directory; its parents are directories.  The root always passes."""
        if rel == b"":
            return True
        _check_rel(rel)
        pos = rel.find(b"/")
        while pos >= 0:
            if not self.walk_allows(rel[:pos], True):
                return False
            pos = rel.find(b"/", pos + 1)
        return self.walk_allows(rel, bool(is_dir_of(rel)))

    def _chains(self, dir_rel: bytes) -> Tuple[Optional[_Chain], ...]:
        with self._lock:
            got = self._cache.get(dir_rel)
            if got is not None:
                return got
            todo = [dir_rel]
            inherited: Tuple[Optional[_Chain], ...] = (None,) * len(self._slots)
            while todo[-1]:
                parent = todo[-1].rpartition(b"/")[0]
                cached = self._cache.get(parent)
                if cached is not None:
                    inherited = cached
                    break
                todo.append(parent)
            if len(self._cache) + len(todo) > self._cache_dirs:
                self._cache.clear()
            for d in reversed(todo):
                inherited = self._load(d, inherited)
                self._cache[d] = inherited
            return inherited

    def _load(self, dir_rel: bytes,
              inherited: Tuple[Optional[_Chain], ...]) -> Tuple[Optional[_Chain], ...]:
        out: List[Optional[_Chain]] = []
        assert self._read is not None
        for slot, (name, mods) in enumerate(self._slots):
            parent = None if "n" in mods else inherited[slot]
            data = self._read(dir_rel, name)
            if data is None:
                out.append(parent)
                continue
            where = f"{_show(dir_rel + b'/' + name if dir_rel else name)}: "
            own, cleared = _merge_rules(data, mods, dir_rel, where)
            if cleared:
                parent = None
            out.append(_Chain(own, parent) if own else parent)
        return tuple(out)


def tree_merge_reader(root: Union[str, bytes, "os.PathLike[str]"]) -> MergeReader:
    """A ``read_merge`` for a directory tree at ``root``: a regular file's bytes, None
    when absent or a symlink (not followed), b"" for another file type (rsync reads a
    directory as empty).  Larger than MAX_RULE_FILE raises UsageError."""
    root_b = _fsbytes(root, "root")

    def read(dir_rel: bytes, name: bytes) -> Optional[bytes]:
        path = os.path.join(root_b, dir_rel, name) if dir_rel else os.path.join(root_b, name)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        return read_rule_fd(fd, _show(path))

    return read


def read_rule_fd(fd: int, shown: str) -> bytes:
    """The bytes of the merge file open on ``fd`` (closed here): b"" for another file type than a
    regular file (rsync reads a directory as empty); over MAX_RULE_FILE raises UsageError naming
    ``shown``."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        chunks, size = [], 0
        while size <= MAX_RULE_FILE:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_RULE_FILE:
        raise UsageError(f"merge file {shown} is larger than {MAX_RULE_FILE} bytes")
    return b"".join(chunks)

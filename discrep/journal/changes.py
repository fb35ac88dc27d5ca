"""Coalesce journal entries of one interval into a change set.

A change set is what the manifest is built from:

* ``moves``  -- {new path: base path}: objects of the base cycle now found
  elsewhere (set semantics, children of a moved directory implied);
* ``touched`` -- current paths whose state must be looked up in the snapshot
  (existing -> upsert with full metadata, absent -> delete);
* ``expand`` -- current paths whose whole subtree must be looked at (entries that
  raced with a catch-up scan, directories that appeared from outside).

Many events on one path coalesce into one entry; memory is bounded by the
number of distinct paths, not of events.  Moves are only hints that let the
replica reuse data it already has: the snapshot's state is the truth, so a
wrong hint costs bytes, never correctness -- except for implied children of a
moved directory, which is why a move is only recorded when its base path is in
the base catalog.

Thread-safety: plain data, used by one thread.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Set

from discrep.journal.store import Entry
from discrep.core.paths import is_under, parent


@dataclass
class ChangeSet:
    moves: Dict[bytes, bytes] = field(default_factory=dict)
    touched: Set[bytes] = field(default_factory=set)
    expand: Set[bytes] = field(default_factory=set)
    fresh: Set[bytes] = field(default_factory=set)
    scanned: bool = False
    events: int = 0

    def resolve(self, p: bytes) -> "bytes | None":
        """Base path of current path ``p`` (None if created in this interval)."""
        q = p
        while True:
            if q in self.fresh:
                return None
            if q in self.moves:
                return self.moves[q] + p[len(q):]
            if not q:
                return p
            q = parent(q)

    def _rekey(self, old: bytes, new: bytes) -> None:
        for s in (self.touched, self.expand, self.fresh):
            hit = [k for k in s if is_under(k, old)]
            for k in hit:
                s.discard(k)
                s.add(new + k[len(old):])
        hit = [k for k in self.moves if is_under(k, old)]
        for k in hit:
            self.moves[new + k[len(old):]] = self.moves.pop(k)

    def _drop_under(self, p: bytes) -> None:
        for s in (self.fresh,):
            for k in [k for k in s if is_under(k, p)]:
                s.discard(k)
        dropped = [self.moves.pop(k) for k in [k for k in self.moves if is_under(k, p)]]
        # the objects a dropped move carried left their base paths all the same: look there (a
        # scan's move touched nothing else; a rename touched its old path already)
        for b in dropped:
            if b:
                self.touched.add(self._current(b))

    def _current(self, b: bytes) -> bytes:
        """Base path ``b`` in the current namespace (through the moves of its ancestors)."""
        back = {old: new for new, old in self.moves.items()}
        q = parent(b)
        while q:
            if q in back:
                return back[q] + b[len(q):]
            q = parent(q)
        return b

    def apply(self, e: Entry, base_exists: Callable[[bytes], bool]) -> None:
        self.events += 1
        op = e.op
        if op in ("create", "modify", "meta", "touch"):
            if op == "create" and not base_exists(e.path):
                self.fresh.add(e.path)
            self.touched.add(e.path)
        elif op == "delete":
            self._drop_under(e.path)
            self.touched.add(e.path)
        elif op == "move":  # scan result, set semantics
            self.moves[e.path] = e.old_path or b""
        elif op == "rename":
            old, new = e.old_path or b"", e.path
            if old == new:
                self.touched.add(new)
                return
            b = self.resolve(old)
            self._drop_under(new)
            self._rekey(old, new)
            if new not in self.moves and new not in self.fresh:
                if b is not None and base_exists(b):
                    self.moves[new] = b
                else:
                    self.fresh.add(new)
            self.touched.add(old)
            self.touched.add(new)


def coalesce(entries: Iterable[Entry], base_exists: Callable[[bytes], bool]) -> ChangeSet:
    """Fold an interval's entries into one ChangeSet.

    A ``scan`` marker supersedes everything before it (the scan compared the
    whole tree with the base); entries that raced with the scan (seq between the
    scan's start, kept in the marker's ``ino`` field, and the marker) are kept as
    subtree expansions, so nothing the scan might have missed is lost.
    """
    ents = list(entries)
    cs = ChangeSet()
    last_scan = max((i for i, e in enumerate(ents) if e.op == "scan"), default=-1)
    if last_scan >= 0:
        begin = ents[last_scan].ino or 0
        cs.scanned = True
        for e in ents[:last_scan]:
            if e.seq > begin and e.op not in ("move", "touch", "scan"):
                cs.expand.add(e.path)
                if e.old_path is not None:
                    cs.expand.add(e.old_path)
        ents = ents[last_scan + 1:]
    for e in ents:
        cs.apply(e, base_exists)
    cs.touched |= cs.expand
    return cs

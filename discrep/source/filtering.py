"""The replica's filter rules applied on the source: the scan's walk, the journal's change set,
and what a rule change costs the next cycle.

Role: ``SourceFilter`` wraps ``protocol.filters.Filter`` for one source tree: ``keep`` is the
walk hook (an excluded directory is never descended), ``prune`` drops journal entries under
excluded paths from a coalesced change set (a path the catalog holds that a rule now excludes
becomes a delete: the replica keeps or deletes it as its ``--delete-excluded`` says), and
``needs_scan`` tells when the journal alone cannot say what the rules select (a directory
renamed in the interval, or a dir-merge file changed): the cycle then scans.  Merge files are
read from the live tree through a directory fd, strictly beneath the root (protocol.filterspec).

``prepare_filters`` compares the replica's spec with the one the last acknowledged cycle
recorded: unchanged -> nothing; changed -> this cycle scans (paths now included are new to the
catalog and copied; paths now excluded vanish from the walk and are sent as deletes); and when
the old rules may have left excluded files on the replica (rules without --delete-excluded),
the source is reset so that the cycle is a full comparison (the replica then removes or keeps
every extraneous entry by the new rules, as rsync does on every run).

Thread-safety: one ``SourceFilter`` per cycle build, used by the building thread.
"""
from __future__ import annotations

import logging
import os
import stat as statmod
from typing import Callable, Iterable, List, Optional

from discrep.core.paths import basename, join
from discrep.journal.changes import ChangeSet
from discrep.journal.store import Entry
from discrep.protocol.filters import Filter
from discrep.protocol.filterspec import FilterSpec, beneath_reader
from discrep.source import cycles

log = logging.getLogger(__name__)


class SourceFilter:
    """``spec``'s rules applied to the live tree at ``root`` (see module doc); ``close`` when done."""

    def __init__(self, root: bytes, spec: FilterSpec):
        self.root, self.spec = root, spec
        self.merge_names = set(spec.rules.merge_names)
        self._fd: Optional[int] = None
        if self.merge_names:
            self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.flt = Filter(spec.rules, beneath_reader(self._fd) if self._fd is not None else None)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def keep(self, rel: bytes, st: os.stat_result) -> bool:
        """The walk hook: ``rel`` (its parents kept) is selected; a directory is descended."""
        return self.flt.walk_allows(rel, statmod.S_ISDIR(st.st_mode))

    def keep_below(self, top: bytes) -> Callable[[bytes, os.stat_result], bool]:
        """The walk hook for a walk of the subtree ``top`` (paths relative to it)."""
        return lambda rel, st: self.keep(top + b"/" + rel, st)

    def allowed(self, rel: bytes) -> bool:
        """``rel`` and all its parents are selected (a directory by the live tree's lstat)."""
        return self.flt.path_allowed(rel, self._is_dir)

    def _is_dir(self, rel: bytes) -> bool:
        try:
            return statmod.S_ISDIR(os.lstat(join(self.root, rel)).st_mode)
        except OSError:
            return False

    def needs_scan(self, entries: Iterable[Entry]) -> bool:
        """The interval renamed a directory (its subtree's selection may differ at the new path) or
        changed a dir-merge file (the rules of a subtree changed): the journal alone cannot say."""
        for e in entries:
            for p in (e.path, e.old_path):
                if p and basename(p) in self.merge_names:
                    log.info("a filter file changed (%r): this cycle scans", p)
                    return True
            if e.op in ("rename", "move") and self._is_dir(e.path):
                log.info("a directory was renamed with filter rules in force: this cycle scans")
                return True
        return False

    def prune(self, cs: ChangeSet, base_exists: Callable[[bytes], bool]) -> List[bytes]:
        """Drop from ``cs`` what the rules exclude; the excluded paths the catalog still holds
        (the replica has them from before): they are sent as deletes."""
        for new in [n for n in cs.moves if not self.allowed(n)]:
            del cs.moves[new]
        # a directory new to the catalog may have come from an excluded path with its contents
        # (a rename that raced with needs_scan): its subtree is walked, as the rules select it
        cs.expand |= {p for p in cs.fresh if self._is_dir(p)}
        cs.expand = {p for p in cs.expand if self.allowed(p)}
        gone: List[bytes] = []
        for p in sorted(cs.touched):
            if not self.allowed(p):
                cs.touched.discard(p)
                was = cs.resolve(p)           # its base path (a moved parent carried it here)
                if was is not None and base_exists(was):
                    gone.append(p)
        return gone


def prepare_filters(root: bytes, spec: FilterSpec) -> bool:
    """Before a build: compare ``spec`` with the last acknowledged cycle's; reset the source when
    the replica may hold files the old rules protected (see module doc).  True: this cycle scans."""
    acked = cycles.acked_cycle(root)
    if acked is None:
        return False                      # a first (full) cycle compares everything anyway
    old = FilterSpec.from_record(acked.info.get("filters") if isinstance(acked.info, dict) else None)
    if old == spec or (not old.active and not spec.active):
        return False
    if old.active and not old.delete_excluded:
        log.info("the filter rules changed since cycle %d: a full comparison (excluded files the old rules "
                 "kept on the replica are settled by the new ones)", acked.cycle)
        cycles.reset(root)
    else:
        log.info("the filter rules changed since cycle %d: this cycle scans", acked.cycle)
    return True

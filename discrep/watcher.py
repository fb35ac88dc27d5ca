"""``discrep watch ROOT``: journal every change under ROOT as it happens.

Backends
--------
* **fanotify** (preferred; root): one ``FAN_MARK_FILESYSTEM`` mark in
  ``FAN_REPORT_DFID_NAME`` mode with ``FAN_RENAME``: no per-directory watch, no
  race with directories created and filled at once.  Events carry (directory
  file handle, name); the handle is resolved with ``open_by_handle_at`` +
  ``readlink /proc/self/fd/N`` and cached (handle -> path).  Events outside ROOT
  (the mark sees the whole filesystem) cost one dict lookup.
* **inotify** (fallback): one watch per directory, kept in a tree model
  (wd -> parent wd, name) updated in event order, so paths are always those of
  the moment of the event.  A new directory gets its watch, then its contents
  are scanned and journaled as creates (what happened before the watch existed
  is not lost).  ``ENOSPC`` from ``inotify_add_watch`` (out of watches) opens a
  gap, and the watcher keeps reopening it after each catch-up scan until the
  missing watches could be added.

Ordering (fanotify).  A handle resolves to the directory's path *now*, which may
already include renames still queued.  So a batch is resolved as a whole: drain
the queue, resolve every handle, read again; if that read brought directory
renames, resolve everything again (until a read brings none).  All paths are
then in the namespace at the end of the batch.  The batch's renames are
journaled first, each mapped back to the namespace of its own moment (undoing
the later directory renames of the batch, newest first), then every other
change, deduplicated, in the end namespace.  Unresolvable handles (directory
deleted since) are dropped: the deletion of that directory is itself an event
in an existing parent.

Durability / fsync policy.  The journal is SQLite WAL with ``synchronous=FULL``:
a row is on disk once its batch's transaction has committed.  The watcher
commits a batch at most every ``batch_s`` (default 50 ms) after its first event,
or at once when it holds ``max_items`` rows; so SIGKILL loses at most the last
~50 ms of events -- and a killed watcher is noticed (its flock is gone, the next
cycle scans; the next watcher start opens a gap).

Gaps (``journal.mark_gap``): at every start (changes while no watcher ran are
unknown; marked before *and* after the watches are in place), on queue overflow
(``FAN_Q_OVERFLOW`` / ``IN_Q_OVERFLOW``), when inotify runs out of watches, when
the handle resolution fails for another reason than a deleted directory, when
ROOT itself moves.  The next cycle's catch-up scan closes the gap.

Memory: per batch, one row per distinct path and op (1000 writes to one file
are one ``modify``); the handle cache is capped; inotify keeps one small record
per directory.

Thread-safety: a ``Watcher`` runs in one thread; ``stop()`` may be called from
any thread or a signal handler.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import signal
import stat as statmod
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import fanotify as fan
from . import inotify as ino
from . import locks
from .errors import SourceError, UsageError, WarningList
from .journal import Journal
from .paths import STATE_DIR, join

log = logging.getLogger(__name__)

CACHE_MAX = 200_000


def is_state(rel: bytes) -> bool:
    return rel == STATE_DIR or rel.startswith(STATE_DIR + b"/")


# --------------------------------------------------------------------------- batch

class Batch:
    """Rows of one journal transaction, deduplicated.

    Renames are kept in order and start a new *segment*; inside a segment each
    path has at most three ops (``delete`` resets, a repeated op or a
    modify/meta after a create/modify is dropped)."""

    def __init__(self) -> None:
        self.items: List[list] = []       # ["rename", new, old] or [ops list, path]
        self.idx: Dict[bytes, list] = {}
        self.first = 0.0
        self.nrows = 0

    def __len__(self) -> int:
        return self.nrows

    def _mark(self) -> None:
        if not self.items:
            self.first = time.monotonic()

    def touch(self, op: str, path: bytes) -> None:
        if not path or is_state(path):
            return
        it = self.idx.get(path)
        if it is None:
            self._mark()
            it = [[op], path]
            self.items.append(it)
            self.idx[path] = it
            self.nrows += 1
            return
        ops = it[0]
        last = ops[-1]
        if op == "delete":
            if ops != ["delete"]:
                self.nrows -= len(ops) - 1
                it[0] = ["delete"]
        elif op == "create":
            if last != "create":
                ops.append(op)
                self.nrows += 1
        elif last == "delete":
            ops.append(op)
            self.nrows += 1

    def rename(self, old: bytes, new: bytes) -> None:
        self._mark()
        self.items.append(["rename", new, old])
        self.idx = {}
        self.nrows += 1

    def rows(self):
        for it in self.items:
            if it[0] == "rename":
                yield ("rename", it[1], it[2], None)
            else:
                for op in it[0]:
                    yield (op, it[1], None, None)


# --------------------------------------------------------------------------- backends

class _Backend:
    name = "?"
    fd = -1

    def __init__(self, w: "Watcher"):
        self.w = w

    def pump(self) -> int:
        """Read what is queued; returns the number of events read."""
        raise NotImplementedError

    def settle(self) -> None:
        """Before a flush: bring the pending events into the batch."""

    def pending(self) -> int:
        return 0

    def close(self) -> None:
        pass


class InotifyBackend(_Backend):
    name = "inotify"

    def __init__(self, w: "Watcher"):
        super().__init__(w)
        self.ino = ino.Inotify()
        self.fd = self.ino.fd
        self.node: Dict[int, list] = {}           # wd -> [parent wd | None, name]
        self.child: Dict[Tuple[int, bytes], int] = {}
        self.root_wd = -1
        self.moves: Dict[int, Tuple[int, bytes, bool]] = {}   # cookie -> (wd, name, isdir)
        self.retry: List[Tuple[int, bytes, float]] = []       # (parent wd, name, since)
        self.lost = 0                                           # directories without a watch (ENOSPC)
        self.root_wd = self.ino.add_watch(w.root)
        self.node[self.root_wd] = [None, b""]
        self._add_tree(self.root_wd, b"", journal=False)

    # -- model ---------------------------------------------------------
    def path(self, wd: int) -> Optional[bytes]:
        parts = []
        while wd != self.root_wd:
            n = self.node.get(wd)
            if n is None or n[0] is None:
                return None
            parts.append(n[1])
            wd = n[0]
        parts.reverse()
        return b"/".join(parts)

    def _link(self, wd: int, pwd: int, name: bytes) -> None:
        old = self.node.get(wd)
        if old is not None and old[0] is not None and self.child.get((old[0], old[1])) == wd:
            del self.child[(old[0], old[1])]
        self.node[wd] = [pwd, name]
        self.child[(pwd, name)] = wd

    def _watch(self, pwd: int, name: bytes, rel: bytes) -> Optional[int]:
        try:
            wd = self.ino.add_watch(join(self.w.root, rel))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.lost += 1
                self.w.gap(f"inotify ran out of watches at {os.fsdecode(rel)} "
                           f"(raise fs.inotify.max_user_watches)")
                self.w.degraded = "inotify: out of watches"
                return None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                self.retry.append((pwd, name, time.monotonic()))
                return None
            if e.errno in (errno.EACCES, errno.ELOOP):
                self.w.gap(f"inotify cannot watch {os.fsdecode(rel)}: {e.strerror}")
                return None
            raise
        self._link(wd, pwd, name)
        return wd

    def _add_tree(self, wd: int, rel: bytes, *, journal: bool) -> None:
        """Watch every directory below ``rel`` (watched as ``wd``); journal entries as creates."""
        stack = [(wd, rel)]
        b = self.w.batch
        while stack:
            dwd, drel = stack.pop()
            try:
                it = os.scandir(join(self.w.root, drel))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self.w.gap(f"cannot read {os.fsdecode(drel) or '.'}: {e.strerror}")
                continue
            with it:
                for e in it:
                    name = os.fsencode(e.name)
                    crel = join(drel, name) if drel else name
                    if is_state(crel):
                        continue
                    if journal:
                        b.touch("create", crel)
                    try:
                        isdir = e.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    if isdir:
                        cwd = self._watch(dwd, name, crel)
                        if cwd is not None:
                            stack.append((cwd, crel))

    def _appeared(self, pwd: int, name: bytes, rel: bytes, isdir: bool) -> None:
        """A directory entry appeared (create, or moved in from outside)."""
        b = self.w.batch
        b.touch("create", rel)
        if isdir:
            wd = self._watch(pwd, name, rel)
            if wd is not None:
                self._add_tree(wd, rel, journal=True)

    def _detach(self, pwd: int, name: bytes) -> None:
        cwd = self.child.pop((pwd, name), None)
        if cwd is not None and cwd in self.node:
            self.node[cwd][0] = None   # its subtree resolves to None from now on

    # -- events --------------------------------------------------------
    def pump(self) -> int:
        evs = self.ino.read()
        if evs:
            self._handle(evs)
        return len(evs)

    def _moved_out(self, cookie: int) -> None:
        wd, name, isdir = self.moves.pop(cookie)
        d = self.path(wd)
        if d is None:
            return
        rel = join(d, name) if d else name
        self.w.batch.touch("delete", rel)
        self.w.batch.touch("meta", d)
        if isdir:
            self._detach(wd, name)

    def _handle(self, evs: List[ino.Event]) -> None:
        b = self.w.batch
        for ev in evs:
            m = ev.mask
            if m & ino.IN_Q_OVERFLOW:
                self.w.gap("inotify event queue overflowed")
                continue
            n = self.node.get(ev.wd)
            if n is None:
                continue
            if m & ino.IN_IGNORED:
                if ev.wd != self.root_wd:
                    if n[0] is not None and self.child.get((n[0], n[1])) == ev.wd:
                        del self.child[(n[0], n[1])]
                    del self.node[ev.wd]
                else:
                    self.w.gap("ROOT itself was deleted or unmounted")
                continue
            d = self.path(ev.wd)
            if d is None:                       # moved out of ROOT: stop watching it
                if ev.wd != self.root_wd and not (m & ino.IN_IGNORED):
                    self.ino.rm_watch(ev.wd)
                continue
            if is_state(d):
                continue
            name = ev.name
            if not name:
                if m & (ino.IN_DELETE_SELF | ino.IN_MOVE_SELF):
                    if ev.wd == self.root_wd:
                        self.w.gap("ROOT itself was moved or deleted")
                    continue
                if m & (ino.IN_ATTRIB | ino.IN_MODIFY):
                    b.touch("meta", d)
                continue
            rel = join(d, name) if d else name
            if is_state(rel):
                if rel == STATE_DIR and m & ino.IN_ATTRIB:
                    self.w.barrier()
                continue
            isdir = bool(m & ino.IN_ISDIR)
            if m & ino.IN_CREATE:
                b.touch("meta", d)
                self._appeared(ev.wd, name, rel, isdir)
            elif m & ino.IN_DELETE:
                b.touch("delete", rel)
                b.touch("meta", d)
                self.retry = [r for r in self.retry if (r[0], r[1]) != (ev.wd, name)]
            elif m & ino.IN_MOVED_FROM:
                if ev.cookie in self.moves:      # never paired: treat as moved out
                    self._moved_out(ev.cookie)
                self.moves[ev.cookie] = (ev.wd, name, isdir)
                self.retry = [r for r in self.retry if (r[0], r[1]) != (ev.wd, name)]
            elif m & ino.IN_MOVED_TO:
                src = self.moves.pop(ev.cookie, None)
                sd = None if src is None else self.path(src[0])
                if src is None or sd is None:
                    b.touch("meta", d)
                    if isdir:
                        self._detach(ev.wd, name)
                    self._appeared(ev.wd, name, rel, isdir)
                    continue
                swd, sname, _sdir = src
                old = join(sd, sname) if sd else sname
                if is_state(old):
                    b.touch("meta", d)
                    self._appeared(ev.wd, name, rel, isdir)
                    continue
                b.rename(old, rel)
                b.touch("meta", sd)
                b.touch("meta", d)
                if isdir:
                    self._detach(ev.wd, name)           # an empty dir it replaced
                    cwd = self.child.pop((swd, sname), None)
                    if cwd is not None and cwd in self.node:
                        self._link(cwd, ev.wd, name)
                    else:                               # we had no watch on it
                        wd2 = self._watch(ev.wd, name, rel)
                        if wd2 is not None:
                            self._add_tree(wd2, rel, journal=True)
                    self.retry = [(ev.wd, name, r[2]) if (r[0], r[1]) == (swd, sname) else r
                                  for r in self.retry]
            elif m & (ino.IN_MODIFY | ino.IN_CLOSE_WRITE):
                b.touch("modify", rel)
            elif m & ino.IN_ATTRIB:
                b.touch("meta", rel)

    def settle(self) -> None:
        if self.moves:           # a MOVED_FROM whose MOVED_TO may still be queued
            r, _, _ = select.select([self.fd], [], [], 0.005)
            if r:
                self.pump()
            for cookie in list(self.moves):
                self._moved_out(cookie)
        if self.retry:
            keep = []
            for pwd, name, since in self.retry:
                d = self.path(pwd)
                if d is None or pwd not in self.node:
                    continue
                rel = join(d, name) if d else name
                try:
                    st = os.lstat(join(self.w.root, rel))
                except FileNotFoundError:
                    if time.monotonic() - since > 2.0:
                        self.w.gap(f"inotify lost track of new directory {os.fsdecode(rel)}")
                    else:
                        keep.append((pwd, name, since))
                    continue
                if statmod.S_ISDIR(st.st_mode) and (pwd, name) not in self.child:
                    wd = self._watch(pwd, name, rel)
                    if wd is not None:
                        self.w.batch.touch("create", rel)
                        self._add_tree(wd, rel, journal=True)
            self.retry = keep

    def pending(self) -> int:
        return len(self.moves) + len(self.retry)

    def rewatch(self) -> bool:
        """After running out of watches: try to watch what is still unwatched."""
        self.lost = 0
        stack = [(self.root_wd, b"")]
        while stack:
            wd, rel = stack.pop()
            try:
                it = os.scandir(join(self.w.root, rel))
            except OSError:
                continue
            with it:
                for e in it:
                    name = os.fsencode(e.name)
                    crel = join(rel, name) if rel else name
                    if is_state(crel) or not e.is_dir(follow_symlinks=False):
                        continue
                    cwd = self.child.get((wd, name))
                    if cwd is None:
                        cwd = self._watch(wd, name, crel)
                        if cwd is None:
                            return False
                    stack.append((cwd, crel))
        return self.lost == 0

    def close(self) -> None:
        self.ino.close()


class FanotifyBackend(_Backend):
    name = "fanotify"
    MAX_RAW = 200_000

    def __init__(self, w: "Watcher"):
        super().__init__(w)
        self.fa = fan.Fanotify(w.root)
        self.fd = self.fa.fd
        try:
            self.res = fan.HandleResolver(w.root)
        except BaseException:
            self.fa.close()
            raise
        self.cache: Dict[bytes, Optional[bytes]] = {}   # handle key -> rel path | None (outside / gone)
        self.raw: List[fan.Event] = []
        self.dirty = False
        self.prefix = w.root.rstrip(b"/") + b"/"

    def pump(self) -> int:
        evs = self.fa.read()
        if evs:
            self._take(evs)
        return len(evs)

    def _take(self, evs: List[fan.Event]) -> None:
        for ev in evs:
            if (ev.mask & (fan.FAN_RENAME | fan.FAN_ONDIR)) == (fan.FAN_RENAME | fan.FAN_ONDIR):
                self.dirty = True
        self.raw.extend(evs)
        if not self.w.batch.items:
            self.w.batch._mark()

    def pending(self) -> int:
        return len(self.raw)

    def _rel(self, key: bytes) -> Optional[bytes]:
        c = self.cache
        if key in c:
            return c[key]
        try:
            p = self.res.resolve(key)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EACCES, errno.EPERM):
                self.w.gap(f"fanotify: cannot resolve a directory handle: {e.strerror}")
                p = None
            else:
                p = None
        if p is None:
            rel = None
        elif p == self.w.root:
            rel = b""
        elif p.startswith(self.prefix):
            rel = p[len(self.prefix):]
            if is_state(rel) and rel != STATE_DIR:   # the state dir itself stays: its own attribute
                rel = None                              # event is a cycle's barrier
        else:
            rel = None
        if len(c) >= CACHE_MAX:
            c.clear()
        c[key] = rel
        return rel

    def _resolve_all(self, evs) -> int:
        n = 0
        c = self.cache
        for ev in evs:
            for _t, key, _n in ev.records:
                if key not in c:
                    self._rel(key)
                    n += 1
        return n

    def settle(self) -> None:
        if not self.raw:
            return
        rounds = 0
        while True:
            if self.dirty:
                self.cache.clear()
                self.dirty = False
                self._resolve_all(self.raw)
            else:
                self._resolve_all(self.raw)
            more = self.fa.read()
            if not more:
                break
            self._take(more)
            rounds += 1
            if not self.dirty and all(k in self.cache for ev in more for _t, k, _n in ev.records):
                break
            if rounds > 50 or len(self.raw) > self.MAX_RAW:
                if self.dirty:
                    self.w.gap("fanotify: directory renames kept racing with path resolution")
                    self.cache.clear()
                    self.dirty = False
                    self._resolve_all(self.raw)
                break
        raw, self.raw = self.raw, []
        self._emit(raw)

    def _emit(self, raw: List[fan.Event]) -> None:
        b = self.w.batch
        rel = self.cache.get
        renames = []
        touches: List[Tuple[str, bytes]] = []
        for ev in raw:
            m = ev.mask
            if m & fan.FAN_Q_OVERFLOW:
                self.w.gap("fanotify event queue overflowed")
                continue
            if m & fan.FAN_RENAME:
                old = new = None
                for t, key, name in ev.records:
                    if t == fan.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                        old = (key, name)
                    elif t == fan.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME:
                        new = (key, name)
                if old is None or new is None:
                    continue
                po, pn = rel(old[0]), rel(new[0])
                if po is None and pn is None:
                    continue
                renames.append((old, new, bool(m & fan.FAN_ONDIR)))
                continue
            if not ev.records:
                continue
            _t, key, name = ev.records[0]
            d = rel(key)
            if d is None:
                continue
            if d == STATE_DIR:
                if name in (b"", b".") and m & fan.FAN_ATTRIB:
                    self.w.barrier()
                continue
            if name in (b"", b"."):
                if d and m & (fan.FAN_ATTRIB | fan.FAN_MODIFY):
                    touches.append(("meta", d))
                continue
            p = join(d, name) if d else name
            if is_state(p):
                if p == STATE_DIR and m & fan.FAN_ATTRIB:
                    self.w.barrier()
                continue
            if m & (fan.FAN_CREATE | fan.FAN_DELETE):
                if d:
                    touches.append(("meta", d))
                if m & fan.FAN_CREATE and m & fan.FAN_DELETE:
                    touches.append(("modify", p))   # merged: order unknown, look at it
                elif m & fan.FAN_CREATE:
                    touches.append(("create", p))
                else:
                    touches.append(("delete", p))
            elif m & (fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE):
                touches.append(("modify", p))
            elif m & fan.FAN_ATTRIB:
                touches.append(("meta", p))
        # renames: map each back to the namespace of its own moment (undo later dir renames)
        inv: List[Tuple[bytes, bytes]] = []
        seq: List[Tuple[Optional[bytes], Optional[bytes], bool, tuple, tuple]] = []
        for old, new, isdir in reversed(renames):
            po, pn = rel(old[0]), rel(new[0])
            po = None if po is None else _unmap(po, inv)
            pn = None if pn is None else _unmap(pn, inv)
            o = None if po is None else (join(po, old[1]) if po else old[1])
            n = None if pn is None else (join(pn, new[1]) if pn else new[1])
            if o is not None and is_state(o):
                o = None
            if n is not None and is_state(n):
                n = None
            if isdir and o is not None and n is not None:
                inv.append((n, o))
            seq.append((o, n, isdir, old, new))
        seq.reverse()
        appeared: List[bytes] = []               # directories moved in from outside, batch-time paths
        for i, (o, n, isdir, old, new) in enumerate(seq):
            eo, en = rel(old[0]), rel(new[0])     # end-namespace parents
            if eo is not None:
                touches.append(("meta", eo))
            if en is not None:
                touches.append(("meta", en))
            if o is not None and n is not None:
                b.rename(o, n)
                if appeared:
                    under = any(o == a or o.startswith(a + b"/") for a in appeared)
                    appeared = [n + a[len(o):] if (a == o or a.startswith(o + b"/")) else a for a in appeared]
                    if under:
                        # it left a directory that appeared in this batch and was walked as it is
                        # at the end: nothing journaled its contents, so walk it too
                        if isdir:
                            appeared.append(n)
                            _touch_subtree(self.w, _forward(n, seq, i), as_rel=n)
            elif o is not None:                  # moved out of ROOT (or its target vanished)
                if eo is not None:
                    touches.append(("delete", join(eo, old[1]) if eo else old[1]))
            elif n is not None:                  # moved in from outside: journaled in sequence,
                b.touch("create", n)             # so the batch's later renames carry it along
                if isdir:
                    appeared.append(n)
                    _touch_subtree(self.w, _forward(n, seq, i), as_rel=n)
        for op, p in touches:
            b.touch(op, p)

    def close(self) -> None:
        self.fa.close()
        self.res.close()


def _unmap(path: bytes, inv: List[Tuple[bytes, bytes]]) -> bytes:
    for n, o in inv:
        if path == n or path.startswith(n + b"/"):
            path = o + path[len(n):]
    return path


def _forward(path: bytes, seq, i: int) -> bytes:
    """Where ``path`` (namespace just after rename ``i``) is at the end of the batch."""
    for o, n, isdir, _old, _new in seq[i + 1:]:
        if isdir and o is not None and n is not None and (path == o or path.startswith(o + b"/")):
            path = n + path[len(o):]
    return path


def _touch_subtree(w: "Watcher", rel: bytes, as_rel: Optional[bytes] = None) -> None:
    """Journal everything below ``rel`` (as it is now) as creates, named below ``as_rel``."""
    as_rel = rel if as_rel is None else as_rel
    stack = [b""]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(join(w.root, join(rel, d) if d else rel))
        except OSError:
            continue
        with it:
            for e in it:
                c = join(d, os.fsencode(e.name)) if d else os.fsencode(e.name)
                w.batch.touch("create", join(as_rel, c))
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(c)
                except OSError:
                    pass


def _submounts(root: bytes) -> List[bytes]:
    out = []
    pre = root.rstrip(b"/") + b"/"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                mp = line.split(b" ")[4]
                mp = mp.replace(b"\\040", b" ").replace(b"\\011", b"\t").replace(b"\\012", b"\n") \
                    .replace(b"\\134", b"\\")
                if mp.startswith(pre):
                    out.append(mp)
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- watcher

class Watcher:
    def __init__(self, root: "str | bytes", backend: str = "auto", *, batch_s: float = 0.05,
                 max_items: int = 20_000):
        root_b = os.fsencode(root)
        if not os.path.isdir(root_b):
            raise UsageError(f"{os.fsdecode(root_b)} does not exist or is not a directory")
        self.root = os.path.realpath(root_b)
        self.want = backend
        self.batch_s = batch_s
        self.max_items = max_items
        self.batch = Batch()
        self.state_dir = join(self.root, STATE_DIR)
        self.journal: Optional[Journal] = None
        self.backend: Optional[_Backend] = None
        self.lock_fd = -1
        self.degraded: Optional[str] = None
        self.gaps: List[str] = []
        self._pending_gap: Optional[str] = None
        self._barrier_pending = False
        self._stop = threading.Event()
        self._wr, self._ww = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events = 0
        self.rows = 0

    # -- life cycle ----------------------------------------------------
    def start(self) -> "Watcher":
        self.lock_fd = locks.take(join(self.state_dir, b"watcher.lock"),
                                  f"a watcher already runs for {os.fsdecode(self.root)}",
                                  hint="see 'discrep status ROOT'; stop it first")
        try:
            self.journal = Journal(os.fsdecode(self.state_dir))
            # changes while no watcher ran are unknown; also while the watches are being placed
            self.journal.mark_gap("watcher starting")
            self.backend = self._open_backend()
            self.journal.mark_gap("watcher started (changes before it are unknown)")
            self.journal.set("watcher_backend", self.backend.name)
            self.journal.set("watcher_pid", str(os.getpid()))
            self.journal.set("watcher_started_ns", str(time.time_ns()))
            self.journal.set("watcher_stopped_ns", "")
            os.ftruncate(self.lock_fd, 0)
            os.pwrite(self.lock_fd, f"{os.getpid()} {self.backend.name}\n".encode(), 0)
        except BaseException:
            self.close()
            raise
        log.info("watching %s with %s", os.fsdecode(self.root), self.backend.name)
        return self

    def _open_backend(self) -> _Backend:
        want = self.want
        if want in ("auto", "fanotify"):
            subs = _submounts(self.root)
            if subs and want == "auto":
                log.info("%d filesystems mounted below ROOT: using inotify", len(subs))
            else:
                if subs:
                    raise UsageError(f"{os.fsdecode(subs[0])} is mounted below ROOT; a fanotify "
                                     f"filesystem mark would not see it", hint="use --backend inotify")
                try:
                    return FanotifyBackend(self)
                except OSError as e:
                    if want == "fanotify":
                        raise SourceError(f"fanotify is not available for {os.fsdecode(self.root)}: "
                                          f"{e.strerror}", hint="run as root on Linux >= 5.17, or use "
                                          "--backend inotify") from None
                    log.info("fanotify unavailable (%s): using inotify", e.strerror)
        try:
            return InotifyBackend(self)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise SourceError("inotify: out of watches or instances",
                                  hint="raise fs.inotify.max_user_watches / max_user_instances") from None
            raise

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._ww, b"x")
        except OSError:
            pass

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.journal is not None:
            try:
                self.journal.set("watcher_stopped_ns", str(time.time_ns()))
            except Exception:
                pass
            self.journal.close()
            self.journal = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1
        for fd in (self._wr, self._ww):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wr = self._ww = -1

    # -- journal -------------------------------------------------------
    def gap(self, reason: str) -> None:
        """Open a journal gap after the rows gathered so far are written."""
        if self._pending_gap is None:
            self._pending_gap = reason
        self.gaps.append(reason)
        log.warning("journal gap: %s", reason)

    def barrier(self) -> None:
        """A cycle touched ROOT/.discrep (see source.wait_for_watcher): everything seen before that
        event must be committed before the cycle reads its journal cut."""
        self._barrier_pending = True

    def _ack_barrier(self) -> None:
        assert self.journal is not None
        self.flush()
        try:
            token = os.stat(self.state_dir).st_mtime_ns
        except OSError:
            return
        self.journal.set("barrier_ns", str(token))
        self._barrier_pending = False

    def flush(self) -> None:
        assert self.journal is not None
        if self.batch.items:
            rows = list(self.batch.rows())
            self.journal.append_many(rows)
            self.rows += len(rows)
            self.batch = Batch()
        if self._pending_gap is not None:
            self.journal.mark_gap(self._pending_gap)
            self._pending_gap = None

    # -- loop ----------------------------------------------------------
    def run(self) -> None:
        assert self.backend is not None and self.journal is not None
        be = self.backend
        poller = select.poll()
        poller.register(be.fd, select.POLLIN)
        poller.register(self._wr, select.POLLIN)
        last_check = time.monotonic()
        try:
            while not self._stop.is_set():
                busy = bool(self.batch.items) or be.pending()
                if busy:
                    left = self.batch_s - (time.monotonic() - self.batch.first)
                    timeout = max(5, int(left * 1000))
                else:
                    timeout = 1000
                ready = poller.poll(timeout)
                for fd, _ev in ready:
                    if fd == self._wr:
                        try:
                            os.read(self._wr, 64)
                        except OSError:
                            pass
                if any(fd == be.fd for fd, _ in ready):
                    self.events += be.pump()
                now = time.monotonic()
                if (self.batch.items or be.pending()) and (
                        now - self.batch.first >= self.batch_s or len(self.batch) >= self.max_items
                        or be.pending() >= self.max_items * 4):
                    be.settle()
                    self.flush()
                elif self._pending_gap is not None:
                    self.flush()
                if self._barrier_pending:
                    be.settle()
                    self._ack_barrier()
                if now - last_check >= 1.0:
                    last_check = now
                    self._check_degraded()
            be.settle()
            self.flush()
        finally:
            try:
                if self.batch.items and self.journal is not None:
                    self.flush()
            finally:
                pass

    def _check_degraded(self) -> None:
        if self.degraded is None or self.journal is None:
            return
        if self.journal.gap() is not None:
            return
        # a scan closed the gap, but some directories are still not watched: retry, else reopen
        be = self.backend
        if isinstance(be, InotifyBackend) and be.rewatch():
            self.degraded = None
            self.gap("inotify watches restored after running out (changes meanwhile unknown)")
        else:
            self.gap(self.degraded)
        self.flush()


# --------------------------------------------------------------------------- CLI

def cmd_watch(a, warnings: WarningList) -> Dict[str, Any]:
    w = Watcher(a.root, getattr(a, "backend", "auto"))
    w.start()
    main = threading.current_thread() is threading.main_thread()
    old = {}
    if main:
        def on_sig(signum, frame):
            w.stop()
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, on_sig)
    log.warning("watching %s with %s (journal %s); stop with Ctrl-C", os.fsdecode(w.root), w.backend.name,
                os.fsdecode(join(w.state_dir, b"journal.db")))
    t0 = time.monotonic()
    backend = w.backend.name
    try:
        w.run()
    finally:
        w.close()
        for s, h in old.items():
            signal.signal(s, h)
    return {"root": os.fsdecode(w.root), "backend": backend, "events": w.events, "rows": w.rows,
            "gaps": len(w.gaps), "duration_s": round(time.monotonic() - t0, 3)}

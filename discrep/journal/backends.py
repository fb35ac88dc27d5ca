"""The watcher's event sources: recursive inotify and fanotify filesystem marks.

Role: turn kernel events under ROOT into journal rows on the ``Watcher``'s batch
(``w.batch.touch`` / ``rename``) and gaps (``w.gap``); a cycle's barrier on
``ROOT/.discrep`` is passed on (``w.barrier``).  See watcher.py for the journal
semantics and the fsync policy; these classes only read and interpret events.

Thread-safety: a backend is used by the watcher's one thread.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import stat as statmod
import time
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from discrep.journal import fanotify as fan
from discrep.journal import inotify as ino
from discrep.core.paths import STATE_DIR, join

if TYPE_CHECKING:
    from discrep.journal.watcher import Watcher

log = logging.getLogger(__name__)

CACHE_MAX = 200_000


def is_state(rel: bytes) -> bool:
    return rel == STATE_DIR or rel.startswith(STATE_DIR + b"/")




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

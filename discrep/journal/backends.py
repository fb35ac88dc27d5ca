"""The watcher's event sources: recursive inotify and fanotify filesystem marks.

Role: turn kernel events under ROOT into journal rows, gaps and the cycle barrier on the
``Sink`` the watcher hands over (sink.py: ``touch`` / ``rename`` / ``mark`` / ``gap`` /
``barrier``); a backend never sees the watcher.  See watcher.py for the journal semantics
and the fsync policy; these classes only read and interpret events.  ``open_backend`` picks
one (a fanotify filesystem mark when permitted, else inotify); ``submounts`` lists the
filesystems mounted below ROOT, which a filesystem mark would not see.

Each backend owns its kernel fd(s): ``fd`` is polled by the watcher and read by ``pump``;
``close`` closes them.  ``degraded`` says why some changes cannot be seen for now (inotify
out of watches); ``rewatch`` tries to see everything again.

Thread-safety: a backend is used by the watcher's one thread.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import stat as statmod
import time
from typing import Dict, List, Optional, Tuple

from discrep.core.errors import SourceError, UsageError
from discrep.core.paths import STATE_DIR, join
from discrep.journal import fanotify as fan
from discrep.journal import inotify as ino
from discrep.journal.sink import Sink, is_state

log = logging.getLogger(__name__)

CACHE_MAX = 200_000

#: (directory handle key, entry name) of a fanotify rename record
Named = Tuple[bytes, bytes]
#: a fanotify rename: old, new, is a directory
Rename = Tuple[Named, Named, bool]
#: a rename in the namespace of its own moment: old path, new path (None: outside ROOT), is a
#: directory, and its records
Step = Tuple[Optional[bytes], Optional[bytes], bool, Named, Named]


def entry_path(d: bytes, name: bytes) -> bytes:
    """Path of entry ``name`` of directory ``d`` (``b""`` is ROOT)."""
    return join(d, name) if d else name


def submounts(root: bytes) -> List[bytes]:
    """Mount points below ``root`` (from /proc/self/mountinfo)."""
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


def open_backend(root: bytes, sink: Sink, want: str = "auto") -> "Backend":
    """The backend ``want`` (auto, fanotify, inotify) for ``root``, reporting into ``sink``."""
    if want in ("auto", "fanotify"):
        subs = submounts(root)
        if subs and want == "auto":
            log.info("%d filesystems mounted below ROOT: using inotify", len(subs))
        else:
            if subs:
                raise UsageError(f"{os.fsdecode(subs[0])} is mounted below ROOT; a fanotify "
                                 f"filesystem mark would not see it", hint="use --backend inotify")
            try:
                return FanotifyBackend(root, sink)
            except OSError as e:
                if want == "fanotify":
                    raise SourceError(f"fanotify is not available for {os.fsdecode(root)}: "
                                      f"{e.strerror}", hint="run as root on Linux >= 5.17, or use "
                                      "--backend inotify") from None
                log.info("fanotify unavailable (%s): using inotify", e.strerror)
    try:
        return InotifyBackend(root, sink)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise SourceError("inotify: out of watches or instances",
                              hint="raise fs.inotify.max_user_watches / max_user_instances") from None
        raise


# --------------------------------------------------------------------------- backends

class Backend:
    """An event source for ``root`` reporting into ``sink`` (see the module doc)."""
    name = "?"
    fd = -1

    def __init__(self, root: bytes, sink: Sink):
        self.root = root
        self.sink = sink
        self.degraded: Optional[str] = None

    def pump(self) -> int:
        """Read what is queued; returns the number of events read."""
        raise NotImplementedError

    def settle(self) -> None:
        """Before a flush: bring the pending events into the batch."""

    def pending(self) -> int:
        return 0

    def rewatch(self) -> bool:
        """When ``degraded``: try to see every change again; True (and ``degraded`` cleared)
        when that worked."""
        return False

    def close(self) -> None:
        pass


class InotifyBackend(Backend):
    """One inotify watch per directory, kept in a tree model (wd -> parent wd, name)."""
    name = "inotify"

    def __init__(self, root: bytes, sink: Sink):
        super().__init__(root, sink)
        self.ino = ino.Inotify()
        self.fd = self.ino.fd
        self.node: Dict[int, list] = {}           # wd -> [parent wd | None, name]
        self.child: Dict[Tuple[int, bytes], int] = {}
        self.root_wd = -1
        self.moves: Dict[int, Tuple[int, bytes, bool]] = {}   # cookie -> (wd, name, isdir)
        self.retry: List[Tuple[int, bytes, float]] = []       # (parent wd, name, since)
        self.lost = 0                                           # directories without a watch (ENOSPC)
        try:
            self.root_wd = self.ino.add_watch(root)
            self.node[self.root_wd] = [None, b""]
            self._add_tree(self.root_wd, b"", journal=False)
        except BaseException:
            self.ino.close()
            raise

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
            wd = self.ino.add_watch(join(self.root, rel))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.lost += 1
                self.sink.gap(f"inotify ran out of watches at {os.fsdecode(rel)} "
                              f"(raise fs.inotify.max_user_watches)")
                self.degraded = "inotify: out of watches"
                return None
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                self.retry.append((pwd, name, time.monotonic()))
                return None
            if e.errno in (errno.EACCES, errno.ELOOP):
                self.sink.gap(f"inotify cannot watch {os.fsdecode(rel)}: {e.strerror}")
                return None
            raise
        self._link(wd, pwd, name)
        return wd

    def _add_tree(self, wd: int, rel: bytes, *, journal: bool) -> None:
        """Watch every directory below ``rel`` (watched as ``wd``); journal entries as creates."""
        stack = [(wd, rel)]
        while stack:
            dwd, drel = stack.pop()
            try:
                it = os.scandir(join(self.root, drel))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self.sink.gap(f"cannot read {os.fsdecode(drel) or '.'}: {e.strerror}")
                continue
            with it:
                for e in it:
                    name = os.fsencode(e.name)
                    crel = entry_path(drel, name)
                    if is_state(crel):
                        continue
                    if journal:
                        self.sink.touch("create", crel)
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
        self.sink.touch("create", rel)
        if isdir:
            wd = self._watch(pwd, name, rel)
            if wd is not None:
                self._add_tree(wd, rel, journal=True)

    def _detach(self, pwd: int, name: bytes) -> None:
        cwd = self.child.pop((pwd, name), None)
        if cwd is not None and cwd in self.node:
            self.node[cwd][0] = None   # its subtree resolves to None from now on

    def _forget_retry(self, pwd: int, name: bytes) -> None:
        self.retry = [r for r in self.retry if (r[0], r[1]) != (pwd, name)]

    # -- events --------------------------------------------------------
    def pump(self) -> int:
        evs = self.ino.read()
        for ev in evs:
            self._event(ev)
        return len(evs)

    def _event(self, ev: ino.Event) -> None:
        """One event, read against the tree model of its moment."""
        m = ev.mask
        if m & ino.IN_Q_OVERFLOW:
            self.sink.gap("inotify event queue overflowed")
            return
        n = self.node.get(ev.wd)
        if n is None:
            return
        if m & ino.IN_IGNORED:
            self._unwatched(ev.wd, n)
            return
        d = self.path(ev.wd)
        if d is None:                       # moved out of ROOT: stop watching it
            if ev.wd != self.root_wd:
                self.ino.rm_watch(ev.wd)
            return
        if is_state(d):
            return
        if not ev.name:
            self._on_dir_itself(ev, d)
            return
        rel = entry_path(d, ev.name)
        if is_state(rel):
            if rel == STATE_DIR and m & ino.IN_ATTRIB:
                self.sink.barrier()
            return
        self._on_entry(ev, d, rel)

    def _unwatched(self, wd: int, n: list) -> None:
        """IN_IGNORED: the kernel dropped watch ``wd`` (its directory is gone)."""
        if wd == self.root_wd:
            self.sink.gap("ROOT itself was deleted or unmounted")
            return
        if n[0] is not None and self.child.get((n[0], n[1])) == wd:
            del self.child[(n[0], n[1])]
        del self.node[wd]

    def _on_dir_itself(self, ev: ino.Event, d: bytes) -> None:
        """An event on watched directory ``d`` itself (no name)."""
        if ev.mask & (ino.IN_DELETE_SELF | ino.IN_MOVE_SELF):
            if ev.wd == self.root_wd:
                self.sink.gap("ROOT itself was moved or deleted")
        elif ev.mask & (ino.IN_ATTRIB | ino.IN_MODIFY):
            self.sink.touch("meta", d)

    def _on_entry(self, ev: ino.Event, d: bytes, rel: bytes) -> None:
        """An event on entry ``rel`` of watched directory ``d``."""
        m, name, sink = ev.mask, ev.name, self.sink
        isdir = bool(m & ino.IN_ISDIR)
        if m & ino.IN_CREATE:
            sink.touch("meta", d)
            self._appeared(ev.wd, name, rel, isdir)
        elif m & ino.IN_DELETE:
            sink.touch("delete", rel)
            sink.touch("meta", d)
            self._forget_retry(ev.wd, name)
        elif m & ino.IN_MOVED_FROM:
            if ev.cookie in self.moves:      # never paired: treat as moved out
                self._moved_out(ev.cookie)
            self.moves[ev.cookie] = (ev.wd, name, isdir)
            self._forget_retry(ev.wd, name)
        elif m & ino.IN_MOVED_TO:
            self._moved_to(ev, d, rel, isdir)
        elif m & (ino.IN_MODIFY | ino.IN_CLOSE_WRITE):
            sink.touch("modify", rel)
        elif m & ino.IN_ATTRIB:
            sink.touch("meta", rel)

    def _moved_out(self, cookie: int) -> None:
        wd, name, isdir = self.moves.pop(cookie)
        d = self.path(wd)
        if d is None:
            return
        self.sink.touch("delete", entry_path(d, name))
        self.sink.touch("meta", d)
        if isdir:
            self._detach(wd, name)

    def _moved_to(self, ev: ino.Event, d: bytes, rel: bytes, isdir: bool) -> None:
        """IN_MOVED_TO: the second half of a rename inside ROOT, or a move in from outside."""
        name, sink = ev.name, self.sink
        src = self.moves.pop(ev.cookie, None)
        sd = None if src is None else self.path(src[0])
        if src is None or sd is None:
            sink.touch("meta", d)
            if isdir:
                self._detach(ev.wd, name)
            self._appeared(ev.wd, name, rel, isdir)
            return
        swd, sname, _sdir = src
        old = entry_path(sd, sname)
        if is_state(old):
            sink.touch("meta", d)
            self._appeared(ev.wd, name, rel, isdir)
            return
        sink.rename(old, rel)
        sink.touch("meta", sd)
        sink.touch("meta", d)
        if isdir:
            self._dir_moved(swd, sname, ev.wd, name, rel)

    def _dir_moved(self, swd: int, sname: bytes, wd: int, name: bytes, rel: bytes) -> None:
        """Directory ``sname`` of ``swd`` is now ``name`` of ``wd``: carry its watch and retries."""
        self._detach(wd, name)           # an empty dir it replaced
        cwd = self.child.pop((swd, sname), None)
        if cwd is not None and cwd in self.node:
            self._link(cwd, wd, name)
        else:                               # we had no watch on it
            wd2 = self._watch(wd, name, rel)
            if wd2 is not None:
                self._add_tree(wd2, rel, journal=True)
        self.retry = [(wd, name, r[2]) if (r[0], r[1]) == (swd, sname) else r
                      for r in self.retry]

    def settle(self) -> None:
        if self.moves:           # a MOVED_FROM whose MOVED_TO may still be queued
            r, _, _ = select.select([self.fd], [], [], 0.005)
            if r:
                self.pump()
            for cookie in list(self.moves):
                self._moved_out(cookie)
        if self.retry:
            self._retry_watches()

    def _retry_watches(self) -> None:
        """Directories whose watch failed with ENOENT/ENOTDIR: watch them if they are there now;
        a gap when one is still missing after 2 s."""
        keep = []
        for pwd, name, since in self.retry:
            d = self.path(pwd)
            if d is None or pwd not in self.node:
                continue
            rel = entry_path(d, name)
            try:
                st = os.lstat(join(self.root, rel))
            except FileNotFoundError:
                if time.monotonic() - since > 2.0:
                    self.sink.gap(f"inotify lost track of new directory {os.fsdecode(rel)}")
                else:
                    keep.append((pwd, name, since))
                continue
            if statmod.S_ISDIR(st.st_mode) and (pwd, name) not in self.child:
                wd = self._watch(pwd, name, rel)
                if wd is not None:
                    self.sink.touch("create", rel)
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
                it = os.scandir(join(self.root, rel))
            except OSError:
                continue
            with it:
                for e in it:
                    name = os.fsencode(e.name)
                    crel = entry_path(rel, name)
                    if is_state(crel) or not e.is_dir(follow_symlinks=False):
                        continue
                    cwd = self.child.get((wd, name))
                    if cwd is None:
                        cwd = self._watch(wd, name, crel)
                        if cwd is None:
                            return False
                    stack.append((cwd, crel))
        if self.lost:
            return False
        self.degraded = None
        return True

    def close(self) -> None:
        self.ino.close()


class FanotifyBackend(Backend):
    """One fanotify filesystem mark; a batch of events is resolved as a whole (watcher.py)."""
    name = "fanotify"
    MAX_RAW = 200_000

    def __init__(self, root: bytes, sink: Sink):
        super().__init__(root, sink)
        self.fa = fan.Fanotify(root)
        self.fd = self.fa.fd
        try:
            self.res = fan.HandleResolver(root)
        except BaseException:
            self.fa.close()
            raise
        self.cache: Dict[bytes, Optional[bytes]] = {}   # handle key -> rel path | None (outside / gone)
        self.raw: List[fan.Event] = []
        self.dirty = False
        self.prefix = root.rstrip(b"/") + b"/"

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
        self.sink.mark()

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
                self.sink.gap(f"fanotify: cannot resolve a directory handle: {e.strerror}")
            p = None
        if p is None:
            rel = None
        elif p == self.root:
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

    def _resolve_all(self, evs: List[fan.Event]) -> int:
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
                    self.sink.gap("fanotify: directory renames kept racing with path resolution")
                    self.cache.clear()
                    self.dirty = False
                    self._resolve_all(self.raw)
                break
        raw, self.raw = self.raw, []
        self._emit(raw)

    def _emit(self, raw: List[fan.Event]) -> None:
        """Journal a resolved batch: its renames in sequence first, then every other change,
        in the end namespace."""
        renames: List[Rename] = []
        touches: List[Tuple[str, bytes]] = []
        for ev in raw:
            self._classify(ev, renames, touches)
        seq = self._sequence(renames)
        self._journal_renames(seq, touches)
        for op, p in touches:
            self.sink.touch(op, p)

    def _classify(self, ev: fan.Event, renames: List[Rename],
                  touches: List[Tuple[str, bytes]]) -> None:
        """A rename goes to ``renames``, any other change to ``touches``; an overflow opens a
        gap, an attribute change of ROOT/.discrep is a cycle's barrier."""
        m = ev.mask
        if m & fan.FAN_Q_OVERFLOW:
            self.sink.gap("fanotify event queue overflowed")
            return
        if m & fan.FAN_RENAME:
            r = self._rename_of(ev)
            if r is not None:
                renames.append(r)
            return
        if not ev.records:
            return
        _t, key, name = ev.records[0]
        d = self.cache.get(key)
        if d is None:
            return
        if d == STATE_DIR:
            if name in (b"", b".") and m & fan.FAN_ATTRIB:
                self.sink.barrier()
            return
        if name in (b"", b"."):
            if d and m & (fan.FAN_ATTRIB | fan.FAN_MODIFY):
                touches.append(("meta", d))
            return
        p = entry_path(d, name)
        if is_state(p):
            if p == STATE_DIR and m & fan.FAN_ATTRIB:
                self.sink.barrier()
            return
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

    def _rename_of(self, ev: fan.Event) -> Optional[Rename]:
        """The (old, new, is a directory) of a FAN_RENAME; None when it is not under ROOT."""
        old: Optional[Named] = None
        new: Optional[Named] = None
        for t, key, name in ev.records:
            if t == fan.FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                old = (key, name)
            elif t == fan.FAN_EVENT_INFO_TYPE_NEW_DFID_NAME:
                new = (key, name)
        if old is None or new is None:
            return None
        if self.cache.get(old[0]) is None and self.cache.get(new[0]) is None:
            return None
        return (old, new, bool(ev.mask & fan.FAN_ONDIR))

    def _sequence(self, renames: List[Rename]) -> List[Step]:
        """Map each rename back to the namespace of its own moment (undo the batch's later
        directory renames, newest first); a path outside ROOT or in .discrep is None."""
        rel = self.cache.get
        inv: List[Tuple[bytes, bytes]] = []
        seq: List[Step] = []
        for old, new, isdir in reversed(renames):
            po, pn = rel(old[0]), rel(new[0])
            po = None if po is None else _unmap(po, inv)
            pn = None if pn is None else _unmap(pn, inv)
            o = None if po is None else entry_path(po, old[1])
            n = None if pn is None else entry_path(pn, new[1])
            if o is not None and is_state(o):
                o = None
            if n is not None and is_state(n):
                n = None
            if isdir and o is not None and n is not None:
                inv.append((n, o))
            seq.append((o, n, isdir, old, new))
        seq.reverse()
        return seq

    def _journal_renames(self, seq: List[Step], touches: List[Tuple[str, bytes]]) -> None:
        """Journal the renames in order (so the batch's later renames carry along what earlier
        ones moved in); the parents' meta changes and the moves out of ROOT go to ``touches``."""
        rel, sink = self.cache.get, self.sink
        appeared: List[bytes] = []               # directories moved in from outside, batch-time paths
        for i, (o, n, isdir, old, new) in enumerate(seq):
            eo, en = rel(old[0]), rel(new[0])     # end-namespace parents
            if eo is not None:
                touches.append(("meta", eo))
            if en is not None:
                touches.append(("meta", en))
            if o is not None and n is not None:
                sink.rename(o, n)
                if appeared:
                    under = any(o == a or o.startswith(a + b"/") for a in appeared)
                    appeared = [n + a[len(o):] if (a == o or a.startswith(o + b"/")) else a for a in appeared]
                    if under and isdir:
                        # it left a directory that appeared in this batch and was walked as it is
                        # at the end: nothing journaled its contents, so walk it too
                        self._walk_appeared(appeared, n, seq, i)
            elif o is not None:                  # moved out of ROOT (or its target vanished)
                if eo is not None:
                    touches.append(("delete", entry_path(eo, old[1])))
            elif n is not None:                  # moved in from outside: journaled in sequence,
                sink.touch("create", n)          # so the batch's later renames carry it along
                if isdir:
                    self._walk_appeared(appeared, n, seq, i)

    def _walk_appeared(self, appeared: List[bytes], n: bytes, seq: List[Step], i: int) -> None:
        """Directory ``n`` (namespace after rename ``i``) appeared: journal its contents."""
        appeared.append(n)
        _touch_subtree(self.root, self.sink, _forward(n, seq, i), as_rel=n)

    def close(self) -> None:
        self.fa.close()
        self.res.close()


def _unmap(path: bytes, inv: List[Tuple[bytes, bytes]]) -> bytes:
    for n, o in inv:
        if path == n or path.startswith(n + b"/"):
            path = o + path[len(n):]
    return path


def _forward(path: bytes, seq: List[Step], i: int) -> bytes:
    """Where ``path`` (namespace just after rename ``i``) is at the end of the batch."""
    for o, n, isdir, _old, _new in seq[i + 1:]:
        if isdir and o is not None and n is not None and (path == o or path.startswith(o + b"/")):
            path = n + path[len(o):]
    return path


def _touch_subtree(root: bytes, sink: Sink, rel: bytes, as_rel: Optional[bytes] = None) -> None:
    """Journal everything below ``rel`` (as it is now) as creates, named below ``as_rel``."""
    as_rel = rel if as_rel is None else as_rel
    stack = [b""]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(join(root, join(rel, d)))
        except OSError:
            continue
        with it:
            for e in it:
                c = entry_path(d, os.fsencode(e.name))
                sink.touch("create", join(as_rel, c))
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(c)
                except OSError:
                    pass

"""The source agent's protocol: the commands a replica sends and the events the agent says.

``discrep agent`` (source.agent) and its client on the replica (transport.agent_client)
talk in JSON lines over one SSH exec channel.  Every line is one message, encoded and
decoded here and nowhere else:

* a **command** (replica -> agent) is ``{"cmd": NAME, ...fields}``: ``cycle``, ``ack``,
  ``export``, ``verify``, ``done``, ``bye``, ``ping``;
* an **event** (agent -> replica) is ``{"event": NAME, ...fields}``: ``hello``, ``seg``,
  ``built``, ``ready``, ``verified``, ``acked``, ``ended``, ``error``, ``alive``.
  ``ping`` and ``alive`` are heartbeats: each side sends one every few seconds, so a peer
  that is silent for the session's ``--timeout`` is gone (a stalled network).
  Path fields (``PATHS``) are checked on decode: absolute, no '.', '..' or NUL, bounded.

Each message is an immutable value class declared like a frozen dataclass (annotated fields,
defaults, ``factory(list)`` for a mutable default; positional or keyword construction, equality,
repr) but built by ``Message.__init_subclass__``: a dataclass costs about a millisecond to create
and both ends of every remote cycle start by importing this module.  ``encode()`` gives its line (fields that are None are
left out), ``Event.decode(line)`` / ``Command.decode(line)`` give the message back and
check every field's type on the way (an int is an int, not a bool or a string; a path is a
str; a list is a list of what it should hold).  Fields a message does not know are
ignored, so a newer peer may add some.  A line that is not a JSON object, or names no
event (command) this version knows, raises ``UnknownMessage``; a known message with a
missing or mistyped field raises ``ManifestError`` -- both name the message.

Warnings do not travel as events: the agent writes them to its stderr as
``discrep: warning: PATH: MESSAGE`` lines (``warning_line``), which the client reads back
with ``parse_warning``.

Thread-safety: immutable values and pure functions (a per-class cache of type hints is
filled idempotently, so a race on it is harmless).
"""
from __future__ import annotations

import json
import typing
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar, Union, dataclass_transform

from discrep.core import errors
from discrep.core.errors import Error, ManifestError, TransportError
from discrep.protocol.replicaid import check_replica_id

HINT = "install the same discrep version on both hosts"
MAX_PATH = 4096                 # longest path an event may name
WARNING_PREFIX = "discrep: warning: "

M = TypeVar("M", bound="Message")


class UnknownMessage(ManifestError):
    """A line that is no message this version knows: not a JSON object, or an unknown name."""


def _is_type(value: Any, tp: Any) -> bool:
    """``value`` fits the annotation ``tp`` (int, float, str, bool, Dict[..], List[X], Optional[X])."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_is_type(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return type(value) is bool
    if tp is int:
        return type(value) is int
    if tp is float:
        return type(value) in (int, float)
    if tp is str:
        return type(value) is str
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is_type(v, item) for v in value)
    if tp is Any:
        return True
    raise TypeError(f"no check for {tp!r}")


_hints: Dict[type, Dict[str, Any]] = {}
_REQUIRED = object()            # a field without a default


class _Factory:
    """A field's default made fresh for each message (``factory(list)``)."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make


def factory(make: Callable[[], Any]) -> Any:
    """A mutable default: ``redo: List[X] = factory(list)`` gives each message its own list."""
    return _Factory(make)


@dataclass_transform(frozen_default=True, field_specifiers=(factory,))
class Message:
    """One line of the agent protocol (see the module doc)."""

    KEY: ClassVar[str] = ""        # "cmd" or "event"
    SENDER: ClassVar[str] = ""     # who sends this kind of message
    NAME: ClassVar[str] = ""       # the message's name on the wire
    PATHS: ClassVar[Tuple[str, ...]] = ()   # fields that name a path on the source (see check_path)
    IDS: ClassVar[Tuple[str, ...]] = ()     # fields that hold a replica id (protocol.replicaid)
    FIELDS: ClassVar[Tuple[Tuple[str, Any], ...]] = ()   # (name, default or _REQUIRED or a _Factory), in order

    def __init_subclass__(cls, **kw: Any) -> None:
        """The fields: the base's, then this class's annotated names that are not ClassVar."""
        super().__init_subclass__(**kw)
        got = dict(cls.FIELDS)
        for name, ann in cls.__dict__.get("__annotations__", {}).items():
            if str(ann).startswith(("ClassVar", "typing.ClassVar")):
                continue
            default = cls.__dict__.get(name, _REQUIRED)
            if isinstance(default, _Factory):
                delattr(cls, name)
            got[name] = default
        cls.FIELDS = tuple(got.items())

    def __init__(self, *args: Any, **kw: Any) -> None:
        spec = self.FIELDS
        if len(args) > len(spec):
            raise TypeError(f"{type(self).__name__}() takes {len(spec)} arguments, {len(args)} given")
        for (name, _d), v in zip(spec, args):
            if name in kw:
                raise TypeError(f"{type(self).__name__}() got {name!r} twice")
            kw[name] = v
        for name, default in spec:
            if name in kw:
                v = kw.pop(name)
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__}() lacks its field {name!r}")
            else:
                v = default.make() if isinstance(default, _Factory) else default
            object.__setattr__(self, name, v)
        if kw:
            raise TypeError(f"{type(self).__name__}() has no field {next(iter(kw))!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name, _d in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n, _d in self.FIELDS)})"

    def encode(self) -> str:
        """The message as one JSON line (with its newline)."""
        obj: Dict[str, Any] = {self.KEY: self.NAME}
        for name, _d in self.FIELDS:
            v = getattr(self, name)
            if v is not None:
                obj[name] = v
        return json.dumps(obj) + "\n"

    @classmethod
    def from_dict(cls: Type[M], obj: Dict[str, Any]) -> M:
        """The message of a decoded JSON object whose name is this class's; fields are checked."""
        hints = _hints.get(cls)
        if hints is None:
            hints = _hints[cls] = typing.get_type_hints(cls)
        kw: Dict[str, Any] = {}
        for name, default in cls.FIELDS:
            if name not in obj:
                if default is _REQUIRED:
                    raise ManifestError(f"{cls.KEY} {cls.NAME!r} lacks its field {name!r}", hint=HINT)
                continue
            v = obj[name]
            if not _is_type(v, hints[name]):
                raise ManifestError(f"{cls.KEY} {cls.NAME!r}: field {name!r} is not {_describe(hints[name])} "
                                    f"({v!r:.60})", hint=HINT)
            if name in cls.PATHS and v is not None:
                check_path(v, f"{cls.KEY} {cls.NAME!r}: field {name!r}")
            if name in cls.IDS and v is not None:
                check_replica_id(v, f"{cls.KEY} {cls.NAME!r}: field {name!r}")
            kw[name] = v
        return cls(**kw)


def check_path(path: str, what: str) -> str:
    """``path`` if it is a sane absolute path on the source: no NUL, no '.' or '..' component,
    at most MAX_PATH long; else ManifestError naming ``what``."""
    if not path.startswith("/") or len(path) > MAX_PATH or "\0" in path or \
            any(c in (".", "..") for c in path.split("/")):
        raise ManifestError(f"{what} is not a plain absolute path ({path!r:.80})", hint=HINT)
    return path


def below(path: Optional[str], base: str, what: str) -> str:
    """``path`` relative to ``base`` (both checked by ``check_path``), which it must lie strictly
    below; else ManifestError: the source named a path outside its state directory."""
    p = check_path(path or "", what).rstrip("/")
    b = check_path(base, "the base directory").rstrip("/")
    if not p.startswith(b + "/") or len(p) == len(b) + 1:
        raise ManifestError(f"{what} {path!r:.80} is not below {base!r:.80}", hint=HINT)
    return p[len(b) + 1:]


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_describe(t) for t in typing.get_args(tp) if t is not type(None))
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0]).split(" ", 1)[1] + "s"
    return "an object"


def _decode(line: Union[str, bytes], base: Type[M], registry: Dict[str, Type[M]]) -> M:
    try:
        obj = json.loads(line)
    except ValueError:
        raise UnknownMessage(f"{base.SENDER} sent a line that is not JSON: {line!r:.80}", hint=HINT) from None
    if not isinstance(obj, dict):
        raise UnknownMessage(f"{base.SENDER} sent a line that is not a JSON object: {line!r:.80}", hint=HINT)
    name = obj.get(base.KEY)
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownMessage(f"{base.SENDER} sent an unknown {base.KEY} {name!r:.40}", hint=HINT)
    return cls.from_dict(obj)


# -- commands: replica -> agent ------------------------------------------------

class Command(Message):
    KEY: ClassVar[str] = "cmd"
    SENDER: ClassVar[str] = "the replica"

    @staticmethod
    def decode(line: Union[str, bytes]) -> "Command":
        return _decode(line, Command, COMMANDS)


class StartCycle(Command):
    """Build and serve the next cycle (the first one, when the agent was started without
    ``--replica-cycle``; continuous mode: the next one in the same session).  ``read_live``: the
    replica verifies (``verify``) before it commits, so a copy snapshot need not copy large files.
    ``filters``: the replica's rules as FilterRules JSON text (the agent bounds and validates it:
    protocol.filterspec), ``delete_excluded`` its --delete-excluded.  ``replica_id``: the replica's
    id (protocol.replicaid, checked on decode): the source keeps its acknowledged position per id
    (source.positions); without one the replica shares the source's legacy position."""
    NAME: ClassVar[str] = "cycle"
    IDS: ClassVar[Tuple[str, ...]] = ("replica_id",)
    replica_cycle: int
    stream: bool = False
    totals: bool = True
    read_live: bool = False
    filters: Optional[str] = None
    delete_excluded: bool = False
    replica_id: Optional[str] = None


class Ack(Command):
    """The replica committed ``cycle``: unmount, acknowledge it on the source (in the position of
    ``replica_id``, which must be the one the cycle was built for)."""
    NAME: ClassVar[str] = "ack"
    IDS: ClassVar[Tuple[str, ...]] = ("replica_id",)
    cycle: int
    replica_id: Optional[str] = None


class Export(Command):
    """A streamed cycle's replica needs the FUSE export after all."""
    NAME: ClassVar[str] = "export"


class Verify(Command):
    """A streamed cycle's replica read every file: check the ones it read live."""
    NAME: ClassVar[str] = "verify"


class Done(Command):
    """The cycle failed on the replica: end it without acknowledging."""
    NAME: ClassVar[str] = "done"


class Bye(Command):
    """The session ends (EOF means the same)."""
    NAME: ClassVar[str] = "bye"


class Ping(Command):
    """The replica is alive (sent every few seconds: an agent that hears nothing for its timeout ends)."""
    NAME: ClassVar[str] = "ping"


COMMANDS: Dict[str, Type[Command]] = {c.NAME: c for c in (StartCycle, Ack, Export, Verify, Done, Bye, Ping)}


# -- events: agent -> replica --------------------------------------------------

class Event(Message):
    KEY: ClassVar[str] = "event"
    SENDER: ClassVar[str] = "the source agent"

    @staticmethod
    def decode(line: Union[str, bytes]) -> "Event":
        return _decode(line, Event, EVENTS)


class Hello(Event):
    """The agent runs: the source's state directory and the export's parent directory."""
    NAME: ClassVar[str] = "hello"
    PATHS: ClassVar[Tuple[str, ...]] = ("state_dir", "dir")
    state_dir: str
    dir: str


class Segment(Event):
    """A streamed cycle's manifest segment ``seg`` and packs below ``packs`` are on disk in ``dir``;
    segment 0 also carries the cycle ``header``, the ``snapshot`` path and (unless the build
    walks as it streams) ``totals`` ``{"files", "bytes"}``."""
    NAME: ClassVar[str] = "seg"
    PATHS: ClassVar[Tuple[str, ...]] = ("dir", "snapshot")
    seg: int
    packs: int
    entries: int
    dir: str
    header: Optional[Dict[str, Any]] = None
    snapshot: Optional[str] = None
    totals: Optional[Dict[str, Any]] = None


class Built(Event):
    """Cycle ``cycle`` is built (journal cut, snapshot at ``path``, manifest)."""
    NAME: ClassVar[str] = "built"
    PATHS: ClassVar[Tuple[str, ...]] = ("path",)
    cycle: int
    base: int
    entries: int
    snapshot: str            # the snapshot provider
    change_source: str
    path: str
    build_s: float


class Ready(Event):
    """The cycle's FUSE export is mounted at ``mountpoint``."""
    NAME: ClassVar[str] = "ready"
    PATHS: ClassVar[Tuple[str, ...]] = ("mountpoint",)
    mountpoint: str


class Verified(Event):
    """Answer to ``verify``: entries to read again (from ``redo-<idx>``), paths dropped."""
    NAME: ClassVar[str] = "verified"
    redo: List[Dict[str, Any]] = factory(list)
    gone: List[str] = factory(list)


class Acked(Event):
    NAME: ClassVar[str] = "acked"
    cycle: int


class Ended(Event):
    """Answer to ``done``."""
    NAME: ClassVar[str] = "ended"


class Failed(Event):
    """The agent failed: the error's message, class name (core.errors) and exit code."""
    NAME: ClassVar[str] = "error"
    error: str
    kind: str = ""
    exit_code: int = 2

    @classmethod
    def of(cls, e: Error) -> "Failed":
        return cls(error=str(e), kind=type(e).__name__, exit_code=e.exit_code)

    def to_error(self, host: str) -> Error:
        """The error to raise on the replica: the agent's class (named by ``kind``) when this
        version knows it, else a TransportError; the message already carries its hint."""
        msg = f"on {host}: {self.error}"
        cls = getattr(errors, self.kind, None) if self.kind else None
        if isinstance(cls, type) and issubclass(cls, Error):
            e = cls(msg)
            e.hint = None
            return e
        return TransportError(msg)


class Alive(Event):
    """The agent is alive and working (sent every few seconds while it builds or verifies)."""
    NAME: ClassVar[str] = "alive"


EVENTS: Dict[str, Type[Event]] = {c.NAME: c for c in (Hello, Segment, Built, Ready, Verified, Acked, Ended,
                                                      Failed, Alive)}


# -- warnings: agent stderr ----------------------------------------------------

def warning_line(warning: object) -> str:
    """The stderr line of one warning (``str(warning)`` is ``PATH: MESSAGE``)."""
    return f"{WARNING_PREFIX}{warning}"


def parse_warning(line: str) -> Optional[Tuple[Optional[str], str]]:
    """(path or None, message) of a ``warning_line``; None for any other line."""
    if not line.startswith(WARNING_PREFIX):
        return None
    body = line[len(WARNING_PREFIX):]
    path, sep, msg = body.partition(": ")
    return (path, msg) if sep else (None, body)


# -- dry run: ``discrep agent --dry-run`` (source.dryview, transport.dryview_client) --------
# The agent walks SRC read-only with the replica's rules and answers sign requests; nothing
# crosses unchecked: relative paths (no '.', '..', empty component, NUL, .discrep), in strictly
# increasing manifest order, numbers in range, batches and totals bounded.

MAX_DRY_BATCH = 1000            # entries in one ``dry-entries`` event
MAX_DRY_ENTRIES = 50_000_000    # entries in one dry walk
MAX_DRY_FINE = 24 << 20         # bytes of old fine digests in one ``dry-sign`` (3M blocks)
MAX_DRY_LINE = 48 << 20         # longest line either side of a dry run reads
_U32, _I64 = 1 << 32, 1 << 63


def _dry_rel(v: Any, what: str) -> bytes:
    """An untrusted relative path (JSON text, surrogate-escaped bytes), checked."""
    from discrep.core.paths import check_rel, dec
    try:
        p = check_rel(dec(v))
    except errors.UnsafePathError as e:
        raise ManifestError(f"{what}: {e}", hint=HINT) from None
    if len(p) > MAX_PATH:
        raise ManifestError(f"{what}: a path longer than {MAX_PATH} bytes", hint=HINT)
    return p


def dry_signable(size: int, block_size: int) -> bool:
    """A file of ``size`` bytes at ``block_size`` has few enough blocks for one ``dry-sign``: the
    replica asks only then (else it counts the whole file), the source refuses more."""
    return block_size >= 1 and -(-size // block_size) <= MAX_DRY_FINE // 8


def _dry_int(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v < hi:
        raise ManifestError(f"{what}: {v!r:.40} is not an integer in [{lo}, {hi})", hint=HINT)
    return v


class DryWalk(Command):
    """Walk SRC read-only with the replica's rules (as in ``cycle``) and say its entries."""
    NAME: ClassVar[str] = "dry-walk"
    filters: Optional[str] = None
    delete_excluded: bool = False


class DrySign(Command):
    """Sign the first ``size`` bytes of file ``path`` (one the walk said) at ``block_size`` and
    ``factor``; with ``fine`` (base64 of the old signature's fine digests) also count the bytes
    of the blocks that differ.  Answered with ``dry-signed``."""
    NAME: ClassVar[str] = "dry-sign"
    path: str
    size: int
    block_size: int
    factor: int
    fine: Optional[str] = None

    @classmethod
    def of(cls, req: Any) -> "DrySign":
        """The command of a ``protocol.sourceview.SignRequest``."""
        import base64
        from discrep.core.paths import enc
        return cls(path=enc(req.path), size=req.size, block_size=req.block_size, factor=req.factor,
                   fine=base64.b64encode(req.fine).decode() if req.fine is not None else None)

    def request(self) -> Any:
        """The checked ``SignRequest`` (ManifestError when a field is out of bounds)."""
        import base64
        import binascii
        from discrep.protocol.sourceview import FINE, SignRequest
        fine = None
        if self.fine is not None:
            if len(self.fine) > MAX_DRY_FINE * 4 // 3 + 4:
                raise ManifestError(f"dry-sign: more than {MAX_DRY_FINE} bytes of digests", hint=HINT)
            try:
                fine = base64.b64decode(self.fine, validate=True)
            except (binascii.Error, ValueError):
                raise ManifestError("dry-sign: digests that are not base64", hint=HINT) from None
            if len(fine) % FINE:
                raise ManifestError("dry-sign: digests of a partial block", hint=HINT)
        req = SignRequest(_dry_rel(self.path, "dry-sign"), _dry_int(self.size, 0, _I64, "dry-sign size"),
                          _dry_int(self.block_size, 1, (1 << 30) + 1, "dry-sign block size"),
                          _dry_int(self.factor, 1, (1 << 24) + 1, "dry-sign factor"), fine)
        if not dry_signable(req.size, req.block_size):
            raise ManifestError(f"dry-sign: more than {MAX_DRY_FINE // FINE} blocks to sign", hint=HINT)
        return req


class DryEntries(Event):
    """Entries of the dry walk, in manifest order: ``[path, mode, uid, gid, size, mtime_ns, target,
    xattrs]`` each (target: a symlink's, else null; xattrs: their digest, null for a symlink)."""
    NAME: ClassVar[str] = "dry-entries"
    entries: List[Any]

    @classmethod
    def of(cls, batch: List[Any]) -> "DryEntries":
        """The event of a list of ``protocol.sourceview.SrcEntry``."""
        from discrep.core.paths import enc
        return cls(entries=[[enc(e.path), e.mode, e.uid, e.gid, e.size, e.mtime_ns,
                             enc(e.target) if e.target is not None else None, e.xattrs] for e in batch])

    def parsed(self) -> List[Any]:
        """The checked ``SrcEntry`` list (ManifestError on any malformed field)."""
        import stat as statmod
        from discrep.core.paths import dec
        from discrep.protocol.sourceview import MAX_TARGET, SrcEntry
        if len(self.entries) > MAX_DRY_BATCH:
            raise ManifestError(f"dry-entries: more than {MAX_DRY_BATCH} entries in one batch", hint=HINT)
        out = []
        for item in self.entries:
            if not isinstance(item, list) or len(item) != 8:
                raise ManifestError(f"dry-entries: an entry that is not a list of 8 ({item!r:.60})", hint=HINT)
            p, mode, uid, gid, size, mtime, target, xat = item
            path = _dry_rel(p, "dry-entries")
            _dry_int(mode, 0, _U32, "dry-entries mode")
            if statmod.S_IFMT(mode) not in (statmod.S_IFREG, statmod.S_IFDIR, statmod.S_IFLNK, statmod.S_IFIFO,
                                            statmod.S_IFSOCK, statmod.S_IFCHR, statmod.S_IFBLK):
                raise ManifestError(f"dry-entries: an unknown file type {mode:o}", hint=HINT)
            link = statmod.S_ISLNK(mode)
            tgt = None
            if link:
                if type(target) is not str:
                    raise ManifestError("dry-entries: a symlink without its target", hint=HINT)
                try:
                    tgt = dec(target)
                except errors.UnsafePathError as e:
                    raise ManifestError(f"dry-entries: {e}", hint=HINT) from None
                if not tgt or len(tgt) > MAX_TARGET or b"\0" in tgt:
                    raise ManifestError("dry-entries: an empty, too long or NUL symlink target", hint=HINT)
            elif target is not None:
                raise ManifestError("dry-entries: a target for an object that is not a symlink", hint=HINT)
            if xat is not None and (link or type(xat) is not str or len(xat) != 64
                                    or xat.strip("0123456789abcdef")):
                raise ManifestError("dry-entries: a malformed xattrs digest", hint=HINT)
            out.append(SrcEntry(path, mode, _dry_int(uid, 0, _U32, "dry-entries uid"),
                                _dry_int(gid, 0, _U32, "dry-entries gid"), _dry_int(size, 0, _I64, "dry-entries size"),
                                _dry_int(mtime, -_I64, _I64, "dry-entries mtime"), tgt, xat))
        return out


class DryWalked(Event):
    """The dry walk ended after ``count`` entries."""
    NAME: ClassVar[str] = "dry-walked"
    count: int


class DrySigned(Event):
    """Answer to ``dry-sign``: the whole digest (hex; null: the file could not be read as asked)
    and, when digests were sent, the bytes of the blocks that differ."""
    NAME: ClassVar[str] = "dry-signed"
    path: str
    whole: Optional[str] = None
    differ: Optional[int] = None

    @classmethod
    def of(cls, req: Any, ans: Any) -> "DrySigned":
        from discrep.core.paths import enc
        return cls(path=enc(req.path), whole=ans.whole.hex() if ans.whole is not None else None, differ=ans.differ)

    def answer(self, req: Any) -> Any:
        """The checked ``SignAnswer`` to ``req`` (the ``SignRequest`` this answers, in order)."""
        from discrep.protocol.sourceview import SignAnswer
        if _dry_rel(self.path, "dry-signed") != req.path:
            raise ManifestError("dry-signed: the answer names another file than the request", hint=HINT)
        if self.whole is None:
            return SignAnswer(None)
        if len(self.whole) > 128 or len(self.whole) % 2 or self.whole.strip("0123456789abcdef"):
            raise ManifestError("dry-signed: a malformed digest", hint=HINT)
        differ = None
        if req.fine is not None:
            if self.differ is None:
                raise ManifestError("dry-signed: no count of differing bytes", hint=HINT)
            differ = _dry_int(self.differ, 0, req.size + 1, "dry-signed count")
        return SignAnswer(bytes.fromhex(self.whole), differ)


COMMANDS.update({c.NAME: c for c in (DryWalk, DrySign)})
EVENTS.update({c.NAME: c for c in (DryEntries, DryWalked, DrySigned)})

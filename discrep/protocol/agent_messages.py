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

Each message is a frozen dataclass; ``encode()`` gives its line (fields that are None are
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
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar, Union

from discrep.core import errors
from discrep.core.errors import Error, ManifestError, TransportError

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


@dataclass(frozen=True)
class Message:
    """One line of the agent protocol (see the module doc)."""

    KEY: ClassVar[str] = ""        # "cmd" or "event"
    SENDER: ClassVar[str] = ""     # who sends this kind of message
    NAME: ClassVar[str] = ""       # the message's name on the wire
    PATHS: ClassVar[Tuple[str, ...]] = ()   # fields that name a path on the source (see check_path)

    def encode(self) -> str:
        """The message as one JSON line (with its newline)."""
        obj: Dict[str, Any] = {self.KEY: self.NAME}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                obj[f.name] = v
        return json.dumps(obj) + "\n"

    @classmethod
    def from_dict(cls: Type[M], obj: Dict[str, Any]) -> M:
        """The message of a decoded JSON object whose name is this class's; fields are checked."""
        hints = _hints.get(cls)
        if hints is None:
            hints = _hints[cls] = typing.get_type_hints(cls)
        kw: Dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in obj:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ManifestError(f"{cls.KEY} {cls.NAME!r} lacks its field {f.name!r}", hint=HINT)
                continue
            v = obj[f.name]
            if not _is_type(v, hints[f.name]):
                raise ManifestError(f"{cls.KEY} {cls.NAME!r}: field {f.name!r} is not {_describe(hints[f.name])} "
                                    f"({v!r:.60})", hint=HINT)
            if f.name in cls.PATHS and v is not None:
                check_path(v, f"{cls.KEY} {cls.NAME!r}: field {f.name!r}")
            kw[f.name] = v
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

@dataclass(frozen=True)
class Command(Message):
    KEY: ClassVar[str] = "cmd"
    SENDER: ClassVar[str] = "the replica"

    @staticmethod
    def decode(line: Union[str, bytes]) -> "Command":
        return _decode(line, Command, COMMANDS)


@dataclass(frozen=True)
class StartCycle(Command):
    """Build and serve the next cycle (the first one, when the agent was started without
    ``--replica-cycle``; continuous mode: the next one in the same session).  ``filters``: the
    replica's rules as FilterRules JSON text (the agent bounds and validates it:
    protocol.filterspec), ``delete_excluded`` its --delete-excluded."""
    NAME: ClassVar[str] = "cycle"
    replica_cycle: int
    stream: bool = False
    totals: bool = True
    filters: Optional[str] = None
    delete_excluded: bool = False


@dataclass(frozen=True)
class Ack(Command):
    """The replica committed ``cycle``: unmount, acknowledge it on the source."""
    NAME: ClassVar[str] = "ack"
    cycle: int


@dataclass(frozen=True)
class Export(Command):
    """A streamed cycle's replica needs the FUSE export after all."""
    NAME: ClassVar[str] = "export"


@dataclass(frozen=True)
class Verify(Command):
    """A streamed cycle's replica read every file: check the ones it read live."""
    NAME: ClassVar[str] = "verify"


@dataclass(frozen=True)
class Done(Command):
    """The cycle failed on the replica: end it without acknowledging."""
    NAME: ClassVar[str] = "done"


@dataclass(frozen=True)
class Bye(Command):
    """The session ends (EOF means the same)."""
    NAME: ClassVar[str] = "bye"


@dataclass(frozen=True)
class Ping(Command):
    """The replica is alive (sent every few seconds: an agent that hears nothing for its timeout ends)."""
    NAME: ClassVar[str] = "ping"


COMMANDS: Dict[str, Type[Command]] = {c.NAME: c for c in (StartCycle, Ack, Export, Verify, Done, Bye, Ping)}


# -- events: agent -> replica --------------------------------------------------

@dataclass(frozen=True)
class Event(Message):
    KEY: ClassVar[str] = "event"
    SENDER: ClassVar[str] = "the source agent"

    @staticmethod
    def decode(line: Union[str, bytes]) -> "Event":
        return _decode(line, Event, EVENTS)


@dataclass(frozen=True)
class Hello(Event):
    """The agent runs: the source's state directory and the export's parent directory."""
    NAME: ClassVar[str] = "hello"
    PATHS: ClassVar[Tuple[str, ...]] = ("state_dir", "dir")
    state_dir: str
    dir: str


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Ready(Event):
    """The cycle's FUSE export is mounted at ``mountpoint``."""
    NAME: ClassVar[str] = "ready"
    PATHS: ClassVar[Tuple[str, ...]] = ("mountpoint",)
    mountpoint: str


@dataclass(frozen=True)
class Verified(Event):
    """Answer to ``verify``: entries to read again (from ``redo-<idx>``), paths dropped."""
    NAME: ClassVar[str] = "verified"
    redo: List[Dict[str, Any]] = field(default_factory=list)
    gone: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class Acked(Event):
    NAME: ClassVar[str] = "acked"
    cycle: int


@dataclass(frozen=True)
class Ended(Event):
    """Answer to ``done``."""
    NAME: ClassVar[str] = "ended"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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

"""The replica agent's protocol (push mode): what a pushing source and ``discrep replica-agent`` say.

In push mode (``discrep replicate SRC HOST:DEST``, run.push) the source host starts
``discrep replica-agent DEST`` on an exec channel of its one SSH connection (run.replica_agent
is the other side) and they talk in JSON lines, with the same message classes, field checks and
bounds as the source agent's protocol (protocol.agent_messages.Message):

* **commands** (source -> replica agent): ``apply`` (the cycle is exported: mount it through the
  SFTP relay and patch DEST; carries the replica's filter rules as FilterRules JSON text), ``bye``,
  ``ping``;
* **events** (replica agent -> source): ``hello`` (DEST's last committed cycle and the unix socket
  the SFTP relay connects to), ``applied`` (the cycle is committed; the result's numbers),
  ``error`` and ``alive`` (the source agent's ``Failed`` and ``Alive``).

``decode_event`` / ``decode_command`` give the message of one line (``UnknownMessage`` for a
line that is no message of this protocol, ``ManifestError`` for a known one with a bad field).
``result_of(applied)`` keeps the numbers of an ``applied`` result: only known keys, only ints,
floats and short strings cross.

Thread-safety: immutable values and pure functions.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Dict, Optional, Tuple, Type, TypeVar, Union

from discrep.protocol.agent_messages import HINT, Alive, Failed, Message, UnknownMessage

M = TypeVar("M", bound=Message)

RESULT_KEYS = ("files_changed", "files_unchanged", "files_repaired", "files_deleted", "files_renamed", "dirs_created",
               "symlinks", "bytes_transferred", "bytes_written", "history_bytes", "streamed", "worker_segments",
               "consistency")      # replica.sync.result_fields
MAX_TEXT = 200


class PushCommand(Message):
    KEY: ClassVar[str] = "cmd"
    SENDER: ClassVar[str] = "the pushing source"


class Apply(PushCommand):
    """Cycle ``cycle`` is exported and served on the SFTP relay: mount it, patch DEST, commit."""
    NAME: ClassVar[str] = "apply"
    cycle: int
    filters: Optional[str] = None
    delete_excluded: bool = False


class PushBye(PushCommand):
    """The session ends (EOF means the same)."""
    NAME: ClassVar[str] = "bye"


class PushPing(PushCommand):
    """The source is alive."""
    NAME: ClassVar[str] = "ping"


class PushEvent(Message):
    KEY: ClassVar[str] = "event"
    SENDER: ClassVar[str] = "the replica agent"


class ReplicaHello(PushEvent):
    """The replica agent runs: DEST's last committed cycle and the relay's socket."""
    NAME: ClassVar[str] = "hello"
    PATHS: ClassVar[Tuple[str, ...]] = ("socket",)
    cycle: int
    socket: str


class Applied(PushEvent):
    """Cycle ``cycle`` is committed in DEST; ``result``: its numbers (see result_of)."""
    NAME: ClassVar[str] = "applied"
    cycle: int
    result: Dict[str, Any]


COMMANDS: Dict[str, Type[PushCommand]] = {c.NAME: c for c in (Apply, PushBye, PushPing)}
EVENTS: Dict[str, Type[Message]] = {c.NAME: c for c in (ReplicaHello, Applied, Failed, Alive)}


def _decode(line: Union[str, bytes], sender: str, key: str, registry: Dict[str, Type[M]]) -> M:
    try:
        obj = json.loads(line)
    except ValueError:
        raise UnknownMessage(f"{sender} sent a line that is not JSON: {line!r:.80}", hint=HINT) from None
    if not isinstance(obj, dict):
        raise UnknownMessage(f"{sender} sent a line that is not a JSON object: {line!r:.80}", hint=HINT)
    name = obj.get(key)
    cls = registry.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UnknownMessage(f"{sender} sent an unknown {key} {name!r:.40}", hint=HINT)
    return cls.from_dict(obj)


def decode_event(line: Union[str, bytes]) -> Message:
    return _decode(line, PushEvent.SENDER, "event", EVENTS)


def decode_command(line: Union[str, bytes]) -> PushCommand:
    return _decode(line, PushCommand.SENDER, "cmd", COMMANDS)


def result_of(result: Dict[str, Any]) -> Dict[str, Any]:
    """The known numbers of an ``applied`` result (bounded: ints, floats, short strings)."""
    out: Dict[str, Any] = {}
    for k in RESULT_KEYS:
        v = result.get(k)
        if type(v) in (int, float, bool) or (type(v) is str and len(v) <= MAX_TEXT):
            out[k] = v
    return out

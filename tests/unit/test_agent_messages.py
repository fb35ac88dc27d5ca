"""The agent protocol's messages (protocol.agent_messages): one encoding for both ends.

Every message survives encode -> decode; the lines the agent and the replica wrote before
the messages were typed still decode to the same values; decode checks field types (an int
is an int, not a bool or a string; a list holds what it should) and rejects unknown events
and commands by name.
"""
from __future__ import annotations

import json

import pytest

from discrep.core.errors import LiveReadError, ManifestError, SourceError, TransportError
from discrep.protocol import agent_messages as am

EVENTS = [
    am.Hello(state_dir="/s/.discrep", dir="/s/.discrep/export.ab"),
    am.Segment(seg=0, packs=1, entries=10, dir="/s/.discrep/cycles/1", header={"cycle": 1, "base": 0},
               snapshot="/s/.discrep/snapshots/1", totals={"files": 3, "bytes": 99}),
    am.Segment(seg=3, packs=4, entries=40, dir="/s/.discrep/cycles/1"),
    am.Built(cycle=2, base=1, entries=7, snapshot="copy", change_source="scan", path="/s/.discrep/snapshots/2",
             build_s=0.25),
    am.Ready(mountpoint="/s/.discrep/export.ab/m1"),
    am.Verified(redo=[{"op": "file", "path": "a", "idx": 3}], gone=["b", "c\udcff"]),
    am.Verified(),
    am.Acked(cycle=2),
    am.Ended(),
    am.Failed(error="no such source", kind="SourceError", exit_code=4),
]
COMMANDS = [am.StartCycle(replica_cycle=3, stream=True, totals=False), am.StartCycle(replica_cycle=0),
            am.Ack(cycle=5), am.Export(), am.Verify(), am.Done(), am.Bye()]


@pytest.mark.parametrize("msg", EVENTS, ids=lambda m: m.NAME)
def test_events_round_trip(msg: am.Event) -> None:
    line = msg.encode()
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert am.Event.decode(line) == msg
    assert am.Event.decode(line.encode()) == msg


@pytest.mark.parametrize("msg", COMMANDS, ids=lambda m: m.NAME)
def test_commands_round_trip(msg: am.Command) -> None:
    assert am.Command.decode(msg.encode()) == msg


def test_lines_of_the_untyped_protocol_decode() -> None:
    """What the agent and the replica wrote as dict literals before is read the same now."""
    seg = json.dumps(dict({"seg": 0, "packs": 2, "entries": 5, "dir": "/d", "header": {"cycle": 1},
                           "snapshot": "/s"}, event="seg"))
    assert am.Event.decode(seg) == am.Segment(seg=0, packs=2, entries=5, dir="/d", header={"cycle": 1},
                                              snapshot="/s")
    err = json.dumps({"event": "error", "error": "x", "kind": "SourceError", "exit_code": 4})
    assert am.Event.decode(err) == am.Failed("x", "SourceError", 4)
    cyc = json.dumps({"cmd": "cycle", "replica_cycle": 1, "stream": False, "totals": True})
    assert am.Command.decode(cyc) == am.StartCycle(1, False, True)
    assert json.loads(am.Ack(cycle=4).encode()) == {"cmd": "ack", "cycle": 4}
    assert json.loads(am.Segment(seg=1, packs=0, entries=0, dir="/d").encode()) == \
        {"event": "seg", "seg": 1, "packs": 0, "entries": 0, "dir": "/d"}


@pytest.mark.parametrize("line, field", [
    ('{"event": "built", "cycle": "2", "base": 1, "entries": 1, "snapshot": "copy", "change_source": "scan", '
     '"path": "/p", "build_s": 0.1}', "cycle"),
    ('{"event": "acked", "cycle": true}', "cycle"),
    ('{"event": "hello", "state_dir": 5, "dir": "/d"}', "state_dir"),
    ('{"event": "verified", "redo": {}, "gone": []}', "redo"),
    ('{"event": "verified", "redo": [], "gone": [1]}', "gone"),
    ('{"event": "seg", "seg": 0, "packs": 0, "entries": 0, "dir": "/d", "header": []}', "header"),
    ('{"cmd": "cycle", "replica_cycle": 1, "stream": 1}', "stream"),
    ('{"cmd": "ack", "cycle": 1.5}', "cycle"),
])
def test_decode_checks_types(line: str, field: str) -> None:
    decode = am.Command.decode if '"cmd"' in line else am.Event.decode
    with pytest.raises(ManifestError) as ei:
        decode(line)
    assert not isinstance(ei.value, am.UnknownMessage)
    assert repr(field) in str(ei.value)


def test_missing_field_is_named() -> None:
    with pytest.raises(ManifestError, match="'mountpoint'"):
        am.Event.decode('{"event": "ready"}')


@pytest.mark.parametrize("line, name", [('{"event": "progress", "n": 1}', "'progress'"), ('{"foo": 1}', "None"),
                                        ('{"event": 3}', "3")])
def test_unknown_event_is_rejected_by_name(line: str, name: str) -> None:
    with pytest.raises(am.UnknownMessage, match=f"unknown event {name}"):
        am.Event.decode(line)


@pytest.mark.parametrize("line", ["", "not json", "[1, 2]", '"ack"', '{"cmd": "shutdown"}'])
def test_unknown_or_garbled_commands(line: str) -> None:
    with pytest.raises(am.UnknownMessage):
        am.Command.decode(line)


def test_failed_names_the_error_class() -> None:
    f = am.Failed.of(SourceError("gone", hint="check the path"))
    assert f == am.Failed("gone (check the path)", "SourceError", SourceError.exit_code)
    e = f.to_error("src-host")
    assert type(e) is SourceError and str(e) == "on src-host: gone (check the path)"
    assert type(am.Failed("x", "LiveReadError", 11).to_error("h")) is LiveReadError
    for kind in ("", "NoSuchError", "WarningList"):
        assert type(am.Failed("x", kind).to_error("h")) is TransportError


def test_warning_lines() -> None:
    assert am.parse_warning(am.warning_line("a/b: skipped: FIFOs")) == ("a/b", "skipped: FIFOs")
    assert am.parse_warning("discrep: warning: no path here") == (None, "no path here")
    assert am.parse_warning("Traceback (most recent call last):") is None


@pytest.mark.parametrize("bad", ["../../etc", "ABCDEF0123456789ABCDEF0123456789", "0" * 31, "0" * 33, "",
                                 "/tmp/x", "0" * 31 + "\n", "g" * 32])
def test_replica_id_is_a_bounded_token(bad: str) -> None:
    """A replica id names a file on the source: 32 lowercase hex digits, nothing else, on decode."""
    for line in (json.dumps({"cmd": "cycle", "replica_cycle": 1, "replica_id": bad}),
                 json.dumps({"cmd": "ack", "cycle": 1, "replica_id": bad})):
        with pytest.raises(ManifestError, match="replica_id"):
            am.Command.decode(line)
    good = "0123456789abcdef" * 2
    assert am.Command.decode(am.StartCycle(replica_cycle=3, replica_id=good).encode()).replica_id == good
    assert am.Command.decode(am.Ack(cycle=3, replica_id=good).encode()) == am.Ack(3, good)
    assert am.Command.decode('{"cmd": "ack", "cycle": 3}') == am.Ack(3)      # an id-less (older) replica

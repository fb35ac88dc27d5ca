"""Push mode's small parts: the replica agent's messages (typed, validated, bounded), the relay's
socket check, the replica agent's command line (quoted; rules never on it)."""
from __future__ import annotations

import os
import shlex
import socket
import stat
import tempfile

import pytest

from discrep.core.errors import ManifestError
from discrep.protocol.agent_messages import Alive, Failed, UnknownMessage
from discrep.protocol.replica_messages import (Applied, Apply, PushBye, ReplicaHello, decode_command, decode_event,
                                               result_of)
from discrep.replica.options import ReplicaOptions
from discrep.run.push import replica_agent_command
from discrep.run.replica_agent import SOCKET_NAME, relay_socket_ok

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("msg", [ReplicaHello(cycle=3, socket="/tmp/discrep-push-x/sftp"),
                                 Applied(cycle=4, result={"files_changed": 2}), Alive(), Failed(error="boom")])
def test_events_round_trip(msg):
    assert decode_event(msg.encode()) == msg


@pytest.mark.parametrize("msg", [Apply(cycle=5, filters='[["-", "*.o"]]', delete_excluded=True), PushBye()])
def test_commands_round_trip(msg):
    assert decode_command(msg.encode()) == msg


@pytest.mark.parametrize("line", ['{"event": "hello", "cycle": "3", "socket": "/s"}',
                                  '{"event": "hello", "cycle": true, "socket": "/s"}',
                                  '{"event": "hello", "cycle": 1, "socket": "relative"}',
                                  '{"event": "hello", "cycle": 1, "socket": "/a/../b"}',
                                  '{"event": "hello", "cycle": 1}',
                                  '{"event": "applied", "cycle": 1, "result": []}'])
def test_bad_events_refused(line):
    with pytest.raises(ManifestError):
        decode_event(line)


@pytest.mark.parametrize("line", ["[1]", "nope", '{"event": "seg"}', '{"cmd": "apply", "cycle": 1}'])
def test_unknown_events_refused(line):
    with pytest.raises(UnknownMessage):
        decode_event(line)


def test_result_is_bounded():
    got = result_of({"files_changed": 3, "bytes_transferred": 10, "consistency": "x" * 10_000, "evil": 1,
                     "files_deleted": [1, 2], "streamed": False})
    assert got == {"files_changed": 3, "bytes_transferred": 10, "streamed": False}


def test_relay_socket_check():
    d = tempfile.mkdtemp(prefix="discrep-push-")
    try:
        path = os.path.join(d, SOCKET_NAME)
        assert not relay_socket_ok(path)                  # nothing there yet
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        try:
            assert relay_socket_ok(path)
            os.chmod(d, 0o755)
            assert not relay_socket_ok(path)              # a directory others may enter
            os.chmod(d, stat.S_IRWXU)
            assert not relay_socket_ok(path + "x")
            assert not relay_socket_ok("/run/docker.sock") and not relay_socket_ok("sftp")
        finally:
            s.close()
    finally:
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)


def test_agent_command_quoted():
    cmd = replica_agent_command("/opt/my discrep", "/dst/it's; rm -rf /", ReplicaOptions(force=True, max_delete_pct=5.0),
                                30.0)
    argv = shlex.split(cmd)
    assert argv[0] == "/opt/my discrep" and argv[1] == "replica-agent" and argv[-1] == "/dst/it's; rm -rf /"
    assert "--force" in argv and argv[argv.index("--max-delete") + 1] == "5.0%"


def test_agent_command_passes_nosuid():
    """--nosuid reaches the replica agent of a push (the replica strips the bits, not the source)."""
    argv = shlex.split(replica_agent_command("discrep", "/d", ReplicaOptions(nosuid=True), 30.0))
    assert "--nosuid" in argv
    assert "--nosuid" not in shlex.split(replica_agent_command("discrep", "/d", ReplicaOptions(), 30.0))

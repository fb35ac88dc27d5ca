"""protocol.filterspec: what crosses from the replica to the source agent is bounded and validated;
a cycle's record round-trips; merge files are read beneath the root, never through a symlink."""
from __future__ import annotations

import json
import os

import pytest

from discrep.core.errors import UsageError
from discrep.protocol.agent_messages import Command, StartCycle
from discrep.protocol.filters import MAX_JSON, MAX_RULES, FilterRules
from discrep.protocol.filterspec import FilterSpec, beneath_reader

pytestmark = pytest.mark.unit


def test_wire_and_record_round_trip():
    spec = FilterSpec(FilterRules.parse([("--exclude", "*.o"), ("--filter", "dir-merge .discrepignore")]), True)
    cmd = Command.decode(StartCycle(replica_cycle=3, filters=spec.wire(), delete_excluded=True).encode())
    assert isinstance(cmd, StartCycle) and FilterSpec.from_wire(cmd.filters, cmd.delete_excluded) == spec
    assert FilterSpec.from_record(json.loads(json.dumps(spec.record()))) == spec
    assert FilterSpec.from_record(None) == FilterSpec() and FilterSpec().wire() is None
    old = Command.decode('{"cmd": "cycle", "replica_cycle": 1}\n')       # an older replica: no rules
    assert FilterSpec.from_wire(old.filters, old.delete_excluded) == FilterSpec()


@pytest.mark.parametrize("text", [
    "x" * (MAX_JSON + 1),
    "not json",
    json.dumps({"v": 1, "rules": [["-", "a"]] * (MAX_RULES + 1)}),
    json.dumps({"v": 99, "rules": []}),
    json.dumps({"v": 1, "rules": [{"kind": "?", "pattern": "x"}]}),
])
def test_from_wire_refuses_what_it_cannot_trust(text):
    with pytest.raises(UsageError):
        FilterSpec.from_wire(text, False)


def test_start_cycle_field_types_are_checked():
    from discrep.core.errors import ManifestError
    with pytest.raises(ManifestError):
        Command.decode('{"cmd": "cycle", "replica_cycle": 1, "filters": ["- x"]}')
    with pytest.raises(ManifestError):
        Command.decode('{"cmd": "cycle", "replica_cycle": 1, "delete_excluded": "yes"}')


def test_beneath_reader_does_not_follow_symlinks(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / ".r").write_bytes(b"- x\n")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / ".r").write_bytes(b"- secret\n")
    os.symlink(tmp_path / "outside", tmp_path / "link")
    os.symlink(tmp_path / "d" / ".r", tmp_path / ".r")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".r").mkdir()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        read = beneath_reader(fd)
        assert read(b"d", b".r") == b"- x\n"
        assert read(b"link", b".r") is None          # a symlinked directory on the way
        assert read(b"", b".r") is None              # a symlinked merge file
        assert read(b"none", b".r") is None
        assert read(b"sub", b".r") == b""            # not a regular file: read as empty, like rsync
    finally:
        os.close(fd)

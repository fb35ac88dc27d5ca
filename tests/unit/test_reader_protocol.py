"""The transport's readers satisfy the replica's ``Reader`` protocol: every member, with the
same parameters (tier: unit).  The replica never imports the transport, so nothing else
would notice a reader that lost or renamed a method the replica calls."""
from __future__ import annotations

import inspect

import pytest

from discrep.replica.reader import Reader
from discrep.transport.mount_reader import MountReader
from discrep.transport.sftp_reader import SftpReader

pytestmark = pytest.mark.unit


def _members(cls) -> dict:
    out = {n: v for n, v in vars(cls).items()
           if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    out.update({n: None for n in getattr(cls, "__annotations__", {})})
    return out


def _params(fn) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()][1:]


@pytest.fixture(params=["mount", "sftp"])
def reader(request, tmp_path):
    r = MountReader(str(tmp_path)) if request.param == "mount" else SftpReader(None, "/export")
    yield r
    r.pool.shutdown(wait=True)


def test_readers_have_every_member_of_the_protocol(reader):
    for name, member in _members(Reader).items():
        assert hasattr(reader, name), f"{type(reader).__name__} has no {name}"
        if callable(member) and not isinstance(member, property):
            assert _params(getattr(type(reader), name)) == _params(member), name
    assert reader.bytes_read == 0 and reader.cycle_dir is None
    reader.add_bytes_read(5)
    reader.know_files({0: b"f"}, [0])
    assert reader.bytes_read == 5

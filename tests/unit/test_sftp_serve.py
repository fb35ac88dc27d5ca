"""The confined read-only SFTP server of push mode (transport.sftp_serve), spoken to by paramiko's
SFTP client over a socketpair: what it serves equals the tree (Hypothesis), and nothing outside
the root is reachable (``..``, absolute paths, symlinks pointing out), nothing can be written."""
from __future__ import annotations

import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paramiko.sftp import int64

from discrep.transport import sftp_serve
from discrep.transport.sftp_serve import serve

pytestmark = pytest.mark.unit


class NamedSocket:
    """A socket with the ``get_name`` paramiko's SFTP client logs with."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_name(self) -> str:
        return "test"

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


class Served:
    """A server thread on one end of a socketpair, paramiko's client on the other."""

    def __init__(self, root: Path) -> None:
        self.ours, theirs = socket.socketpair()
        self.served: list = []
        self.errors: list = []

        def run() -> None:
            try:
                self.served.append(serve(theirs, str(root)))
            except Exception as e:  # noqa: BLE001 -- reported by the test
                self.errors.append(e)
            finally:
                theirs.close()
        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()
        self.client = paramiko.SFTPClient(NamedSocket(self.ours))

    def close(self) -> None:
        self.client.close()
        self.ours.close()
        self.t.join(10)


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, Path]:
    root, secret = tmp_path / "export", tmp_path / "secret"
    root.mkdir()
    secret.mkdir()
    (secret / "key").write_bytes(b"SECRET")
    (tmp_path / "sibling").write_bytes(b"SIBLING")
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"hello")
    os.symlink("../secret/key", root / "up")                       # relative, pointing out
    os.symlink(str(secret / "key"), root / "abs")                  # absolute, pointing out
    os.symlink(str(secret), root / "dirlink")                      # a directory outside
    os.symlink("d/f", root / "inside")                             # pointing in: still not followed
    return root, secret


@pytest.fixture
def served(outside) -> Iterator[Served]:
    s = Served(outside[0])
    try:
        yield s
    finally:
        s.close()


def test_reads_inside(served):
    c = served.client
    assert c.open("/d/f").read() == b"hello"
    assert c.open("d/f").read() == b"hello"
    assert sorted(c.listdir("/")) == ["abs", "d", "dirlink", "inside", "up"]
    assert c.readlink("/up") == "../secret/key"        # a link's text is data, never followed
    assert stat.S_ISLNK(c.lstat("/abs").st_mode)
    assert c.stat("/d/f").st_size == 5
    assert c.normalize(".") == "/"


@pytest.mark.parametrize("path", ["/../secret/key", "../secret/key", "d/../../secret/key", "/d/../../sibling",
                                  "..", "/..", "up", "abs", "dirlink/key", "/dirlink/key", "inside",
                                  "/d/f\0x"])
def test_escapes_refused(served, path):
    with pytest.raises((IOError, OSError)):
        served.client.open(path).read()


@pytest.mark.parametrize("path", ["/..", "..", "dirlink", "/d/../..", "up"])
def test_listing_outside_refused(served, path):
    with pytest.raises((IOError, OSError)):
        served.client.listdir(path)


def test_absolute_paths_are_inside_the_root(served, outside):
    root, secret = outside
    with pytest.raises(IOError):
        served.client.open(str(secret / "key")).read()     # /<tmp>/secret/key below the root: absent
    assert not (root / str(secret / "key").lstrip("/")).exists()


def test_writes_refused(served, outside):
    root, _ = outside
    c = served.client
    before = sorted(os.listdir(root))
    for attempt in (lambda: c.open("/new", "w"), lambda: c.open("/d/f", "r+"), lambda: c.open("/d/f", "a"),
                    lambda: c.remove("/d/f"), lambda: c.mkdir("/m"), lambda: c.rmdir("/d"),
                    lambda: c.rename("/d/f", "/g"), lambda: c.symlink("/x", "/y"), lambda: c.chmod("/d/f", 0o777),
                    lambda: c.utime("/d/f", (1, 1))):
        with pytest.raises((IOError, OSError)):
            attempt()
    assert sorted(os.listdir(root)) == before
    assert (root / "d" / "f").read_bytes() == b"hello"
    assert stat.S_IMODE((root / "d" / "f").stat().st_mode) != 0o777


def test_malformed_packets_end_the_session(outside):
    a, b = socket.socketpair()
    errs: list = []

    def run() -> None:
        try:
            serve(b, str(outside[0]))
        except sftp_serve.SftpProtocolError as e:
            errs.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    a.sendall(struct.pack(">I", sftp_serve.MAX_PACKET + 1) + b"\x01")
    t.join(10)
    a.close()
    b.close()
    assert errs and not t.is_alive()


def test_open_handles_bounded(served, monkeypatch):
    monkeypatch.setattr(sftp_serve, "MAX_HANDLES", 3)
    files = [served.client.open("/d/f") for _ in range(3)]
    with pytest.raises(IOError):
        served.client.open("/d/f")
    files[0].close()
    served.client.open("/d/f").close()


names = st.binary(min_size=1, max_size=12).filter(lambda n: b"/" not in n and b"\0" not in n
                                                  and n not in (b".", b".."))
trees = st.dictionaries(names, st.one_of(st.binary(max_size=3000), st.dictionaries(names, st.binary(max_size=300),
                                                                                    max_size=4)), max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees)
def test_serves_the_tree_exactly(tmp_path_factory, tree):
    """Every file and directory (non-UTF-8 names included) reads back as it is on disk."""
    root = tmp_path_factory.mktemp("gen")
    broot = os.fsencode(root)
    for name, v in tree.items():
        p = os.path.join(broot, name)
        if isinstance(v, dict):
            os.mkdir(p)
            for n2, data in v.items():
                with open(os.path.join(p, n2), "wb") as f:
                    f.write(data)
        else:
            with open(p, "wb") as f:
                f.write(v)
    s = Served(root)
    try:
        # raw byte names: paramiko's client decodes names as UTF-8, so the server is checked on the wire
        for name, v in tree.items():
            got = _raw_listdir(s.client, b"/" + name) if isinstance(v, dict) else _raw_read(s.client, b"/" + name)
            want = sorted(v) if isinstance(v, dict) else v
            assert got == want
        assert _raw_listdir(s.client, b"/") == sorted(tree)
    finally:
        s.close()


def _raw_handle(client, t: int, *args) -> bytes:
    """A raw request (names as bytes: paramiko's client decodes them as UTF-8); the handle."""
    kind, reply = client._request(t, *args)
    assert kind == sftp_serve.HANDLE, (kind, args)
    return reply.get_binary()


def _raw_read(client, path: bytes) -> bytes:
    h = _raw_handle(client, sftp_serve.OPEN, path, sftp_serve.FXF_READ, paramiko.SFTPAttributes())
    out = b""
    while True:
        try:
            kind, reply = client._request(sftp_serve.READ, h, int64(len(out)), 100000)
        except EOFError:
            break
        assert kind == sftp_serve.DATA
        out += reply.get_binary()
    return out


def _raw_listdir(client, path: bytes) -> list:
    h = _raw_handle(client, sftp_serve.OPENDIR, path)
    got = []
    while True:
        try:
            kind, reply = client._request(sftp_serve.READDIR, h)
        except EOFError:
            break
        assert kind == sftp_serve.NAME
        for _ in range(reply.get_int()):
            n = reply.get_binary()
            reply.get_binary()
            paramiko.SFTPAttributes._from_msg(reply)
            if n not in (b".", b".."):
                got.append(n)
    return sorted(got)


def test_direct_opener(outside, tmp_path):
    """``direct`` gives the bytes of a validated path another way; None falls back to the root."""
    root, _ = outside
    other = tmp_path / "other"
    other.write_bytes(b"from the snapshot")
    asked: list = []

    def direct(rel: bytes):
        asked.append(rel)
        return os.open(other, os.O_RDONLY) if rel == b"d/f" else None
    a, b = socket.socketpair()
    t = threading.Thread(target=serve, args=(b, str(root), direct), daemon=True)
    t.start()
    c = paramiko.SFTPClient(NamedSocket(a))
    try:
        assert c.open("/d/f").read() == b"from the snapshot"
        assert c.open("/d//./f").read() == b"from the snapshot"
        with pytest.raises(IOError):
            c.open("/d/../../secret/key")
        with pytest.raises(IOError):
            c.open("/up")                       # None: opened beneath the root, a symlink is refused
    finally:
        c.close()
        a.close()
        t.join(10)
        b.close()
    assert b"d/../../secret/key" not in asked and all(b".." not in r for r in asked)

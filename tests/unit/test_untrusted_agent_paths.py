"""Paths the source agent names are untrusted (issue 13 items 1 and 8): decode refuses '..', NUL,
relative and over-long paths in every path-bearing event field; ``below`` keeps them inside the
state directory; ``core.beneath.open_beneath`` never leaves its directory (openat2 and the
O_NOFOLLOW walk alike); the remote agent command line ends its options with ``--``.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from discrep.core import beneath
from discrep.core.errors import ManifestError
from discrep.protocol import agent_messages as am
from discrep.transport.agent_client import agent_command

BASE = {"hello": {"state_dir": "/s/.discrep", "dir": "/s/.discrep/export.ab"},
        "seg": {"seg": 0, "packs": 0, "entries": 0, "dir": "/s/.discrep/cycles/1", "snapshot": "/s/.discrep/snap/1"},
        "built": {"cycle": 1, "base": 0, "entries": 0, "snapshot": "copy", "change_source": "scan",
                  "path": "/s/.discrep/snap/1", "build_s": 0.1},
        "ready": {"mountpoint": "/s/.discrep/export.ab/m1"}}
FIELDS = [(e, f) for e, cls in (("hello", am.Hello), ("seg", am.Segment), ("built", am.Built), ("ready", am.Ready))
          for f in cls.PATHS]
BAD = ["/../../etc", "/s/.discrep/../../etc", "/s/.discrep/./x", "relative/x", "", "/s/\0/x", "/" + "a" * 5000]


def test_every_path_field_is_listed() -> None:
    assert set(FIELDS) == {("hello", "state_dir"), ("hello", "dir"), ("seg", "dir"), ("seg", "snapshot"),
                           ("built", "path"), ("ready", "mountpoint")}


@pytest.mark.parametrize("event, field", FIELDS)
@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_decode_refuses_paths_that_could_leave(event: str, field: str, bad: str) -> None:
    obj = {"event": event, **BASE[event], field: bad}
    with pytest.raises(ManifestError):
        am.Event.decode(json.dumps(obj))


@pytest.mark.parametrize("event", sorted(BASE))
def test_decode_accepts_plain_paths(event: str) -> None:
    am.Event.decode(json.dumps({"event": event, **BASE[event]}))


def test_below() -> None:
    assert am.below("/s/.discrep/snap/1", "/s/.discrep", "x") == "snap/1"
    assert am.below("/s/.discrep/export.ab/m1", "/s/.discrep/export.ab/", "x") == "m1"
    for bad in ("/s/.discrep", "/s/.discrepx/a", "/etc/passwd", "/s/.discrep/../x", None):
        with pytest.raises(ManifestError):
            am.below(bad, "/s/.discrep", "x")


@pytest.mark.parametrize("use_openat2", [True, False])
def test_open_beneath_stays_inside(tmp_path: Path, use_openat2: bool) -> None:
    if use_openat2 and not beneath.has_openat2():
        pytest.skip("no openat2 on this kernel")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"inside")
    (tmp_path / "secret").write_bytes(b"outside")
    (root / "abs").symlink_to(tmp_path / "secret")
    (root / "rel").symlink_to("../secret")
    (root / "dirlink").symlink_to(tmp_path)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        f = beneath.open_beneath(fd, b"d/./f", use_openat2=use_openat2)
        assert os.read(f, 10) == b"inside"
        os.close(f)
        for bad in (b"../secret", b"d/../../secret", b"/etc/passwd", b"abs", b"rel", b"dirlink/secret",
                    b"d/f\0x", b"", b"a" * 5000):
            with pytest.raises(beneath.EscapeError):
                os.close(beneath.open_beneath(fd, bad, use_openat2=use_openat2))
        with pytest.raises(FileNotFoundError):
            beneath.open_beneath(fd, b"d/none", use_openat2=use_openat2)
    finally:
        os.close(fd)


def test_agent_command_ends_options_before_the_source() -> None:
    argv = shlex.split(agent_command("discrep", "-rf", 3, "auto", True, False))
    i = argv.index("--")
    assert argv[i + 1:] == ["-rf"]
    from discrep.cli.main import build_parser
    a = build_parser().parse_args(argv[1:])
    assert a.src == "-rf" and a.replica_cycle == 3

"""The dry-run messages of the agent protocol are untrusted on both ends (issue 15 item 3): the
replica checks every entry the source's dry walk sends (relative paths without '.', '..', empty
components, NUL or .discrep; bounded lengths, types and numbers; batches; order, parents and the
count of the whole walk), the source checks every sign request (path, size, block size, factor,
digests), and the replica checks every answer against its request."""
from __future__ import annotations

import base64
import json
from typing import Any, List

import pytest

from discrep.core.errors import ManifestError
from discrep.protocol import agent_messages as am
from discrep.protocol.sourceview import SignRequest, SrcEntry
from discrep.transport import dryview_client
from discrep.transport.dryview_client import RemoteSourceView

FILE, DIR, LINK = 0o100644, 0o40755, 0o120777
GOOD = ["a", FILE, 0, 0, 1, 2, None, "0" * 64]
BAD_PATHS = ["/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", "", ".", "..", "a\0b", ".discrep/x",
             ".discrep", "a" * 5000, 7, None, ["a"]]


def _entries(*items: Any) -> am.DryEntries:
    return am.Event.decode(json.dumps({"event": "dry-entries", "entries": list(items)}))


def test_a_good_batch_round_trips() -> None:
    e = SrcEntry(b"caf\xe9/l", LINK, 1, 2, 3, -4, b"../t\xff", None)
    f = SrcEntry(b"d/f", FILE, 0, 0, 10, 5, None, "ab" * 32)
    assert am.Event.decode(am.DryEntries.of([e, f]).encode()).parsed() == [e, f]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_entry_paths_are_refused(path: Any) -> None:
    with pytest.raises(ManifestError):
        _entries([path] + GOOD[1:]).parsed()


@pytest.mark.parametrize("index,value", [
    (1, True), (1, "33188"), (1, -1), (1, 1 << 40), (1, 0), (1, 0o170644),          # mode / file type
    (2, -1), (2, 1 << 32), (2, 1.5), (3, 1 << 32), (3, False),                      # uid, gid
    (4, -1), (4, 1 << 63), (4, 10 ** 30), (5, 1 << 63), (5, -(1 << 63) - 1),        # size, mtime
    (6, "target"), (7, "0" * 63), (7, "G" * 64), (7, "A" * 64), (7, 5),            # target, xattrs
])
def test_bad_entry_fields_are_refused(index: int, value: Any) -> None:
    item = list(GOOD)
    item[index] = value
    with pytest.raises(ManifestError):
        _entries(item).parsed()


@pytest.mark.parametrize("target,xattrs", [(None, None), ("", None), ("a\0b", None), ("x" * 5000, None),
                                           (5, None), ("ok", "0" * 64)])
def test_bad_symlinks_are_refused(target: Any, xattrs: Any) -> None:
    with pytest.raises(ManifestError):
        _entries(["l", LINK, 0, 0, 1, 2, target, xattrs]).parsed()


@pytest.mark.parametrize("item", [GOOD[:7], GOOD + [1], "a", {"path": "a"}, None])
def test_malformed_entries_are_refused(item: Any) -> None:
    with pytest.raises(ManifestError):
        _entries(item).parsed()


def test_a_huge_batch_is_refused() -> None:
    items = [[f"f{i:06d}"] + GOOD[1:] for i in range(am.MAX_DRY_BATCH + 1)]
    with pytest.raises(ManifestError, match="more than"):
        _entries(*items).parsed()
    with pytest.raises(ManifestError):
        am.Event.decode(json.dumps({"event": "dry-entries", "entries": "not a list"}))


class FakeAgent:
    """The events a hostile source says, in order; records what the replica sends."""

    def __init__(self, events: List[am.Event]):
        self.events, self.sent = list(events), []

    def send(self, cmd: am.Command) -> None:
        self.sent.append(cmd)

    def expect_any(self, kinds: Any, timeout: Any = None) -> am.Event:
        ev = self.events.pop(0)
        assert isinstance(ev, kinds)
        return ev

    def expect(self, kind: Any, timeout: Any = None) -> am.Event:
        return self.expect_any((kind,))

    def close(self) -> None:
        pass


def _view(*events: am.Event) -> RemoteSourceView:
    v = RemoteSourceView.__new__(RemoteSourceView)
    v.spec = __import__("discrep.protocol.filterspec", fromlist=["FilterSpec"]).FilterSpec()
    v.agent = FakeAgent(list(events))   # type: ignore[assignment]
    return v


def _batch(*paths_modes: Any) -> am.DryEntries:
    return am.DryEntries(entries=[[p, m, 0, 0, 0, 0, "t" if m == LINK else None, None] for p, m in paths_modes])


def test_a_well_formed_walk_is_taken() -> None:
    v = _view(_batch(("a", DIR), ("a/b", FILE)), _batch(("a/c", LINK), ("z", FILE)), am.DryWalked(count=4))
    assert [e.path for e in v.entries()] == [b"a", b"a/b", b"a/c", b"z"]
    assert isinstance(v.agent.sent[0], am.DryWalk)


@pytest.mark.parametrize("walk", [
    [("b", FILE), ("a", FILE)],            # out of order
    [("a", FILE), ("a", FILE)],            # twice
    [("a", DIR), ("a/b", FILE), ("a", FILE)],
    [("x/y", FILE)],                       # parent never said
    [("x", FILE), ("x/y", FILE)],          # parent is no directory
    [("l", LINK), ("l/etc", FILE)],        # beneath a symlink
])
def test_a_walk_out_of_order_or_outside_its_directories_is_refused(walk: Any) -> None:
    v = _view(_batch(*walk), am.DryWalked(count=len(walk)))
    with pytest.raises(ManifestError):
        list(v.entries())


@pytest.mark.parametrize("count", [0, 1, 3, -1, 1 << 62])
def test_a_wrong_count_is_refused(count: int) -> None:
    v = _view(_batch(("a", FILE), ("b", FILE)), am.DryWalked(count=count))
    with pytest.raises(ManifestError, match="entries"):
        list(v.entries())


def test_a_huge_walk_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dryview_client, "MAX_DRY_ENTRIES", 5)
    batches = [_batch(*[(f"f{b}{i}", FILE) for i in range(3)]) for b in range(3)]
    v = _view(*batches, am.DryWalked(count=9))
    with pytest.raises(ManifestError, match="more than 5"):
        list(v.entries())


def _req(fine: Any = b"\0" * 16) -> SignRequest:
    return SignRequest(b"d/f", 100, 4096, 256, fine)


def test_answers_are_checked_against_their_request() -> None:
    ok = am.DrySigned(path="d/f", whole="ab" * 16, differ=50)
    assert ok.answer(_req()).differ == 50 and ok.answer(_req()).whole == bytes.fromhex("ab" * 16)
    assert am.DrySigned(path="d/f").answer(_req()).whole is None
    for bad in (am.DrySigned(path="d/g", whole="ab" * 16, differ=1),          # another file
                am.DrySigned(path="../d/f", whole="ab" * 16, differ=1),
                am.DrySigned(path="d/f", whole="ab" * 16, differ=101),        # more than the file
                am.DrySigned(path="d/f", whole="ab" * 16, differ=-1),
                am.DrySigned(path="d/f", whole="ab" * 16),                    # no count asked for
                am.DrySigned(path="d/f", whole="xyz", differ=1),
                am.DrySigned(path="d/f", whole="a" * 1000, differ=1)):
        with pytest.raises(ManifestError):
            bad.answer(_req())


def test_sign_answers_come_in_order_through_the_window() -> None:
    reqs = [SignRequest(b"f%d" % i, 10, 4096, 256) for i in range(dryview_client.WINDOW * 2 + 3)]
    v = _view(*[am.DrySigned(path=f"f{i}", whole="00" * 16) for i in range(len(reqs))])
    assert len(v.sign(reqs)) == len(reqs)
    assert [c.path for c in v.agent.sent] == [f"f{i}" for i in range(len(reqs))]
    v = _view(am.DrySigned(path="f1", whole="00" * 16))
    with pytest.raises(ManifestError):
        v.sign(reqs[:1])


def test_a_good_sign_request_round_trips() -> None:
    req = _req()
    assert am.Command.decode(am.DrySign.of(req).encode()).request() == req
    assert am.Command.decode(am.DrySign.of(_req(None)).encode()).request() == _req(None)


@pytest.mark.parametrize("field,value", [
    ("path", "/etc/shadow"), ("path", "../x"), ("path", ".discrep/replica.db"), ("path", "a\0"),
    ("size", -1), ("size", 1 << 63), ("block_size", 0), ("block_size", 1 << 31), ("factor", 0),
    ("factor", 1 << 25), ("size", 1 << 40),       # (1 TiB at 4 KiB: too many blocks for one request)
    ("fine", "not base64!"), ("fine", base64.b64encode(b"\0" * 7).decode()),
    ("fine", "A" * (am.MAX_DRY_FINE * 2)), ("size", True), ("fine", 5),
])
def test_bad_sign_requests_are_refused(field: str, value: Any) -> None:
    obj = json.loads(am.DrySign.of(_req()).encode())
    obj[field] = value
    with pytest.raises(ManifestError):
        am.Command.decode(json.dumps(obj)).request()


def test_an_over_long_event_line_is_refused() -> None:
    import io
    from types import SimpleNamespace
    from discrep.transport.agent_client import AgentClient
    c = AgentClient.__new__(AgentClient)
    c.timeout, c.max_line = 5.0, 1000
    c.ch = SimpleNamespace(settimeout=lambda t: None)
    c.conn = SimpleNamespace(cfg=SimpleNamespace(alias="src"))
    c.out = io.BytesIO(b'{"event": "dry-walked", "count": 0' + b" " * 2000 + b"}\n")
    with pytest.raises(ManifestError, match="longer than 1000"):
        c.expect(am.DryWalked)
    c.out = io.BytesIO(b'{"event": "dry-walked", "count": 0}\n')
    assert c.expect(am.DryWalked).count == 0


def test_the_replica_asks_only_for_signable_files() -> None:
    assert am.dry_signable(100, 4096) and am.dry_signable(0, 1)
    assert am.dry_signable(am.MAX_DRY_FINE // 8 * 4096, 4096)
    assert not am.dry_signable(am.MAX_DRY_FINE // 8 * 4096 + 1, 4096)
    assert not am.dry_signable(1 << 40, 4096) and not am.dry_signable(10, 0)

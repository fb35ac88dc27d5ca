"""--bwlimit: rsync's rate syntax, the token bucket's accounting (on a fake clock: no timed
assertion), the paced socket over a real socketpair, and the jobs-file key."""
from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from discrep.run.config import ConfigError, parse
from discrep.transport import pace
from discrep.transport.pace import PacedSocket, TokenBucket, parse_rate, window_for

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, bps", [
    ("500", 500 * 1024), ("0", 0), ("1", 1024), ("2M", 2 << 20), ("2m", 2 << 20), ("1.5K", 1536),
    ("1G", 1 << 30), ("2MiB", 2 << 20), ("2MB", 2_000_000), ("10KB", 10_000), ("3k", 3072),
])
def test_parse_rate_like_rsync(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["", "fast", "2X", "-5", "0.5", "1e3", "2 M B", "5Mi", "1T"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError):
        parse_rate(text)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.now += s


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1024, 1 << 30), sizes=st.lists(st.tuples(st.integers(1, 1 << 20), st.floats(0, 2)),
                                                        min_size=1, max_size=60))
def test_bucket_never_runs_ahead_of_rate_plus_burst(rate, sizes):
    """Whatever the sizes and idle gaps: bytes released by time T <= burst + rate * (T - start)."""
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pace.time, "monotonic", clock.monotonic)
        mp.setattr(pace.time, "sleep", clock.sleep)
        b = TokenBucket(rate)
        start, released = clock.now, 0
        for n, idle in sizes:
            clock.now += idle
            b.take(n)
            released += n
            assert released <= b.burst + rate * (clock.now - start) + 1e-6 * rate
    assert b.total == released


def test_windows_are_small_under_a_limit():
    assert window_for(2 << 20) == int((2 << 20) * pace.WINDOW_S)
    assert window_for(10 * 1024) == pace.MIN_WINDOW
    assert pace.max_packet_for(1024) == pace.MIN_WINDOW // 2 and pace.max_packet_for(1 << 30) == pace.MAX_PACKET


def test_paced_socket_moves_every_byte_and_charges_both_directions():
    a, b = socket.socketpair()
    bucket = TokenBucket(1 << 30)
    ps = PacedSocket(a, bucket)
    data = bytes(range(256)) * 4000
    got = bytearray()

    def reader() -> None:
        while len(got) < len(data):
            got.extend(b.recv(65536))
    t = threading.Thread(target=reader)
    t.start()
    view = memoryview(data)
    while view:
        view = view[ps.send(view):]
    t.join(10)
    assert bytes(got) == data
    b.sendall(b"x" * 5000)
    back = b""
    while len(back) < 5000:
        back += ps.recv(1 << 20)
    assert back == b"x" * 5000 and bucket.total == len(data) + 5000
    ps.close()
    assert ps.closed
    b.close()


def test_jobs_file_bwlimit():
    cfg = parse({"jobs": {"a": {"source": "h:/s", "dest": "/d", "every": "1m", "bwlimit": "2M"},
                          "b": {"source": "h:/s", "dest": "/e", "every": "1m", "bwlimit": 500},
                          "c": {"source": "h:/s", "dest": "/f", "every": "1m"}}}, "x.toml")
    assert cfg.jobs["a"].options.ssh.bwlimit == 2 << 20
    assert cfg.jobs["b"].options.ssh.bwlimit == 500 * 1024
    assert cfg.jobs["c"].options.ssh.bwlimit == 0
    for bad in ("fast", True, 1.5, -1):
        with pytest.raises(ConfigError, match="bwlimit"):
            parse({"jobs": {"a": {"source": "h:/s", "dest": "/d", "every": "1m", "bwlimit": bad}}}, "x.toml")

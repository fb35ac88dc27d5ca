"""``--bwlimit``: one token bucket under the SSH connection's socket, both directions.

``parse_rate("2M")`` reads a rate like rsync's ``--bwlimit`` (KiB/s without a suffix; ``K``,
``M``, ``G`` are powers of 1024, ``KB``, ``MB``, ``GB`` powers of 1000; ``0`` means no limit)
and returns bytes per second.

``PacedSocket(sock, bucket)`` is what paramiko's Transport gets instead of the TCP socket (or
the ProxyCommand): every byte it sends is charged before it goes, every byte it receives is
charged when it arrives, against one ``TokenBucket`` shared by both directions.  Sends are paced
exactly; what the peer may send ahead of the paced reads is bounded by the SSH channel windows,
which the connection keeps small under a limit (``window_for``), so the sum of both directions
stays within the rate over any few seconds (plus one window and one burst).

Threading: ``TokenBucket.take`` is safe from any thread (a lock around the balance; sleeping is
done outside it).  ``PacedSocket`` is used by paramiko's transport thread (recv) and by the
threads that write packets (send, under paramiko's write lock).
"""
from __future__ import annotations

import re
import threading
import time
from typing import Any

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgKMG]?)([iI]?[bB]?)\s*$")
MIN_RATE = 1024                 # 1 KiB/s: below this the SSH keepalives alone would not fit
BURST_S = 0.05                  # the bucket holds at most this many seconds of rate
WINDOW_S = 0.2                  # an SSH channel window under a limit: this many seconds of rate
MIN_WINDOW = 16 * 1024         # at very low rates what a peer may have in flight stays well under --timeout
MAX_PACKET = 32 * 1024
MIN_PACKET = 4 * 1024


def parse_rate(text: str) -> int:
    """rsync's ``--bwlimit`` syntax -> bytes per second (0: no limit); ValueError if malformed."""
    m = _RATE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a rate: use KiB/s (500), or a number with K, M or G (2M)")
    num, unit, tail = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    if tail == "i":
        raise ValueError(f"{text!r} is not a rate: write KiB, MiB, GiB or K, M, G")
    base = 1000 if tail == "b" else 1024
    power = {"": 1, "K": 1, "M": 2, "G": 3}[unit]
    rate = int(num * base ** power)
    if rate and rate < MIN_RATE:
        raise ValueError(f"{text!r} is below the smallest limit, 1 KiB/s")
    return rate


def window_for(rate: int) -> int:
    """The SSH channel window under a limit of ``rate`` bytes/s (what the peer may send ahead)."""
    return max(MIN_WINDOW, int(rate * WINDOW_S))


def max_packet_for(rate: int) -> int:
    """The largest SSH packet we accept under a limit: at most half a window."""
    return max(MIN_PACKET, min(MAX_PACKET, window_for(rate) // 2))


class TokenBucket:
    """``rate`` bytes per second with at most ``burst`` bytes saved up; ``take`` waits off any debt."""

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        self.rate = float(rate)
        self.burst = max(float(burst or rate * BURST_S), 4096.0)
        self.tokens = self.burst
        self.stamp = time.monotonic()
        self.lock = threading.Lock()
        self.total = 0

    def take(self, n: int) -> None:
        """Charge ``n`` bytes; return once the balance is paid back (sleeps, never raises)."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - n
            self.stamp = now
            self.total += n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)

    def refund(self, n: int) -> None:
        with self.lock:
            self.tokens += n
            self.total -= n

    def chunk(self) -> int:
        """The largest piece to charge at once (a fraction of the burst, so waits stay short)."""
        return max(1024, int(self.burst // 2))


class PacedSocket:
    """A socket-like object for paramiko: ``send``/``recv`` go through ``bucket``; the rest is passed on."""

    def __init__(self, sock: Any, bucket: TokenBucket) -> None:
        self.sock = sock
        self.bucket = bucket

    def send(self, data: bytes) -> int:
        n = min(len(data), self.bucket.chunk())
        self.bucket.take(n)
        sent = 0
        try:
            sent = self.sock.send(data[:n])
        finally:
            if 0 <= sent < n:          # give back what did not go (a timeout or a short send)
                self.bucket.refund(n - sent)
        return sent

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(min(n, self.bucket.chunk()))
        if data:
            self.bucket.take(len(data))
        return data

    def settimeout(self, t: Any) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        self.sock.close()

    @property
    def _closed(self) -> bool:     # paramiko's Transport.join looks at its socket's _closed
        return bool(getattr(self.sock, "_closed", getattr(self.sock, "closed", False)))

    @property
    def closed(self) -> bool:
        return self._closed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

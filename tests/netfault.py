"""A TCP forwarder on 127.0.0.1 for fault injection and wire counting in tests and benchmarks.

``Forwarder(target_port)`` listens on a free loopback port and forwards every connection to
``127.0.0.1:target_port``.  While it runs, a test can

- ``stall()``: stop moving bytes (both directions) but keep the sockets open -- a network that
  hangs without a reset; ``resume()`` moves them again;
- ``drop()``: close every open connection at once (a reset link); new connections still work;
- ``trickle(bytes_per_s)``: move at most that many bytes per second per direction;
- read ``bytes_up`` / ``bytes_down`` and ``samples`` (per 0.5 s, bytes of both directions) to
  measure what crossed the wire.

Only loopback addresses are used.  Threads: one accept thread and two pump threads per
connection, all daemon threads; ``close()`` stops them and closes every socket.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional, Tuple

SAMPLE_S = 0.5


class Forwarder:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.moving = threading.Event()
        self.moving.set()
        self.rate: Optional[float] = None
        self.conns: List[Tuple[socket.socket, socket.socket]] = []
        self.bytes_up = self.bytes_down = 0
        self.samples: List[Tuple[float, int]] = []     # (time, bytes moved in that SAMPLE_S slot)
        self._slot = (time.monotonic(), 0)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="netfault-accept").start()

    # -- control -------------------------------------------------------------
    def stall(self) -> None:
        self.moving.clear()

    def resume(self) -> None:
        self.moving.set()

    def trickle(self, bytes_per_s: Optional[float]) -> None:
        self.rate = bytes_per_s

    def drop(self) -> None:
        with self.lock:
            conns, self.conns = self.conns, []
        for a, b in conns:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def reset_counts(self) -> None:
        with self.lock:
            self.bytes_up = self.bytes_down = 0
            self.samples = []
            self._slot = (time.monotonic(), 0)

    def close(self) -> None:
        self.closed = True
        self.moving.set()
        try:
            self.lsock.close()
        except OSError:
            pass
        self.drop()

    def max_rate(self, window_s: float = 5.0) -> float:
        """The highest mean rate (bytes/s) over any window of ``window_s`` seconds of samples."""
        with self.lock:
            samples = list(self.samples)
        per = max(1, int(round(window_s / SAMPLE_S)))
        if len(samples) < per:
            return sum(n for _, n in samples) / max(window_s, SAMPLE_S * max(1, len(samples)))
        best = 0
        for i in range(len(samples) - per + 1):
            best = max(best, sum(n for _, n in samples[i:i + per]))
        return best / (per * SAMPLE_S)

    # -- pumping ---------------------------------------------------------------
    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.lsock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=10)
                b.settimeout(None)
            except OSError:
                a.close()
                continue
            with self.lock:
                self.conns.append((a, b))
            threading.Thread(target=self._pump, args=(a, b, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()

    def _count(self, n: int, up: bool) -> None:
        now = time.monotonic()
        with self.lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n
            start, got = self._slot
            while now - start >= SAMPLE_S:
                self.samples.append((start, got))
                start, got = start + SAMPLE_S, 0
            self._slot = (start, got + n)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while not self.closed:
                data = src.recv(65536 if self.rate is None else max(1, min(65536, int(self.rate / 20))))
                if not data:
                    break
                self.moving.wait()
                if self.rate is not None:
                    time.sleep(len(data) / self.rate)
                self.moving.wait()
                dst.sendall(data)
                self._count(len(data), up)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

"""The replica's side of the source agent: ``AgentClient`` and ``CycleStream``.

``AgentClient`` starts ``discrep agent`` on the source over one exec channel of the
session's SSH connection and speaks its JSON-lines protocol (the messages are
protocol.agent_messages; the agent's side is source.agent): ``send`` a command,
``expect`` the next event -- an ``error`` event raises the agent's error here, any
other event than the expected ones raises TransportError, a line that is no event
raises ManifestError.  The agent's stderr is collected on a helper thread: its
``discrep: warning:`` lines become the cycle's warnings (``warnings_into``), its last
line explains a failure.

``CycleStream`` is the replica's view of a cycle the agent streams (``seg`` events):
the header, then the segments as they are announced, then the ``built`` event; the
replica applies segments while the source still builds the rest (replica.sync /
replica.stream use it).

Thread-safety: an ``AgentClient`` is used by one thread at a time (its stderr thread
only appends to a list; its ping thread only ``send``s, under a lock).  Every wait on the
agent ends after the session's timeout without a line (the agent says ``alive`` while busy).  ``CycleStream`` runs one helper thread that reads the agent's
announcements until ``built``; see its doc.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple, Type, TypeVar, Union, cast

from discrep.core.errors import ManifestError, TransportError, WarningList
from discrep.protocol import layout
from discrep.protocol.agent_messages import (HINT, Alive, Built, Command, Event, Export, Failed, Ping, Ready, Segment,
                                             Verified, Verify, below, parse_warning)
from discrep.protocol.manifest import FRAME_SLACK, MAX_MANIFEST_BYTES, MAX_SEGMENT_BYTES, Entry, read_segment
from discrep.transport.ssh import Connection, HostConfig, q

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds without a line from the agent (it says ``alive`` every timeout/4 s)

E = TypeVar("E", bound=Event)


def agent_command(exe: str, src: str, rcycle: Optional[int], snapshot_kind: str, stream: bool, totals: bool,
                  timeout: float = DEFAULT_TIMEOUT, read_live: bool = False, on_demand: bool = False) -> str:
    """The remote command line that starts the agent and its first cycle (``rcycle`` None: the
    first cycle waits for a ``cycle`` command, which can carry what a command line should not;
    ``on_demand``: built cycles are exported only on ``export``)."""
    first = "" if rcycle is None else f"--replica-cycle {int(rcycle)} "
    return (f"{q(exe)} agent {first}--snapshot {q(snapshot_kind)} --timeout {float(timeout)} "
            f"{'--stream ' if stream else ''}{'' if totals else '--no-totals '}{'--read-live ' if read_live else ''}"
            f"{'--export-on-demand ' if on_demand else ''}-- {q(src)}")


class AgentClient:
    """The source's ``discrep agent`` on one exec channel (JSON lines, see source.agent)."""

    def __init__(self, conn: Connection, exe: str, src: str, rcycle: Optional[int], snapshot_kind: str,
                 stream: bool = False, totals: bool = True, timeout: float = DEFAULT_TIMEOUT, read_live: bool = False,
                 on_demand: bool = False, command: Optional[str] = None):
        """``command``: another remote command line speaking the same protocol (the dry-run agent)."""
        self.conn = conn
        self.timeout = timeout
        self.max_line: Optional[int] = None     # longest event line taken (None: no bound)
        self.ch = conn.start(command or agent_command(exe, src, rcycle, snapshot_kind, stream, totals, timeout,
                                                      read_live, on_demand))
        self.out = self.ch.makefile("rb")
        self._stderr: List[bytes] = []
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._read_err, daemon=True, name="discrep-agent-stderr")
        self._t.start()
        threading.Thread(target=self._ping, daemon=True, name="discrep-agent-ping").start()

    def _ping(self) -> None:
        """``ping`` every timeout/4 s: the agent ends when it hears nothing for its timeout."""
        while not self._stop.wait(max(0.5, self.timeout / 4)):
            try:
                self.send(Ping())
            except Exception:  # the channel is gone: the reads notice
                return

    def _read_err(self) -> None:
        try:
            for line in self.ch.makefile_stderr("rb"):
                self._stderr.append(line)
                if len(self._stderr) > 400:
                    del self._stderr[:200]
        except Exception:  # connection gone: what we have is enough
            pass

    def expect(self, kind: Type[E], timeout: Optional[float] = None) -> E:
        """The agent's next event, which must be a ``kind``."""
        return cast(E, self.expect_any((kind,), timeout))

    def expect_any(self, kinds: Tuple[Type[Event], ...], timeout: Optional[float] = None) -> Event:
        """The agent's next event, which must be one of ``kinds`` (an ``error`` event raises its error);
        ``alive`` events are skipped; TransportError after ``timeout`` (default: the session's) s
        without any line."""
        timeout = timeout or self.timeout
        self.ch.settimeout(timeout)
        try:
            while True:
                line = self.out.readline(self.max_line) if self.max_line else self.out.readline()
                if not line:
                    break
                if self.max_line and len(line) >= self.max_line and not line.endswith(b"\n"):
                    raise ManifestError(f"the source agent on {self.conn.cfg.alias} sent a line longer than "
                                        f"{self.max_line} bytes", hint=HINT)
                line = line.strip()
                if not line.startswith(b"{"):
                    continue
                event = Event.decode(line)
                if isinstance(event, Alive):
                    continue
                if isinstance(event, Failed):
                    self._t.join(1)
                    raise event.to_error(self.conn.cfg.alias)
                if not isinstance(event, kinds):
                    wanted: Union[str, Tuple[str, ...]] = \
                        kinds[0].NAME if len(kinds) == 1 else tuple(k.NAME for k in kinds)
                    raise TransportError(f"the source agent on {self.conn.cfg.alias} said {event.NAME!r} "
                                         f"where {wanted!r} was expected", hint=HINT)
                return event
        except socket.timeout:
            raise TransportError(f"the source on {self.conn.cfg.alias} did not answer within {timeout:.0f}s "
                                 f"({self.stderr_tail()})") from None
        raise self._stopped()

    def _stopped(self) -> TransportError:
        """Why the agent's output ended."""
        self.ch.status_event.wait(5)
        rc = self.ch.recv_exit_status() if self.ch.exit_status_ready() else -1
        self._t.join(2)
        if rc == 127:
            return _missing_discrep(self.conn.cfg, "discrep")
        if not self.conn.transport_alive():
            return TransportError(f"the SSH connection to {self.conn.cfg.describe()} was lost",
                                  hint="the replica stays at its last committed cycle; run again")
        return TransportError(f"the source agent on {self.conn.cfg.alias} stopped (exit status {rc}): "
                              f"{self.stderr_tail()}")

    def send(self, cmd: Command) -> None:
        with self._send_lock:
            self.ch.sendall(cmd.encode().encode())

    def live_changed(self) -> bool:
        """A cycle built with ``read_live`` was read: did any file read live change meanwhile (agent
        ``verify``)?  Then the replica must not commit what it read."""
        self.send(Verify())
        v = self.expect(Verified)
        return bool(v.redo or v.gone)

    def exited(self) -> bool:
        """The agent process has ended."""
        return bool(self.ch.exit_status_ready())

    def warnings_into(self, warnings: WarningList) -> None:
        """The agent's warnings so far, as ``host:path`` warnings of this run."""
        host = self.conn.cfg.alias
        for line in b"".join(self._stderr).decode(errors="replace").splitlines():
            w = parse_warning(line)
            if w is not None:
                path, msg = w
                warnings.add(f"{host}:{path}" if path is not None else host, msg)

    def stderr_tail(self) -> str:
        lines = [ln.decode(errors="replace").strip() for ln in self._stderr if ln.strip()]
        return lines[-1] if lines else "no error output"

    def close(self, timeout: float = 10.0) -> None:
        """EOF to the agent: it unmounts the export and removes its directory; wait, then close."""
        self._stop.set()
        try:
            if self.conn.transport_alive() and not self.ch.closed:
                self.ch.shutdown_write()
                if not self.ch.status_event.wait(timeout):
                    log.warning("the source agent on %s did not stop within %.0fs", self.conn.cfg.alias, timeout)
        except Exception as e:  # the connection may be gone: the agent cleans up on EOF/SIGHUP itself
            log.debug("closing the agent channel: %s", e)
        try:
            self.ch.close()
        except Exception:
            pass


def _missing_discrep(cfg: HostConfig, exe: str) -> TransportError:
    return TransportError(f"discrep is not installed on {cfg.alias} (the remote shell cannot run {exe!r})",
                          hint="install discrep on the source host, or pass --remote-discrep PATH")


class StreamReader(Protocol):
    """What ``CycleStream`` needs of its reader (run.remote.DirectDataReader is one)."""

    want_export: Optional[Callable[[], str]]

    def read_all(self, rel: bytes, max_size: int = MAX_MANIFEST_BYTES) -> bytes: ...


class CycleStream:
    """The replica's view of a cycle the source agent streams (source.agent, ``seg`` events): the
    header, then validated entry batches as segments are announced, then ``finish()`` (the cycle
    is built).  Used by replica.sync; reads go through ``reader``.  Segments, packs and file data
    are read straight from the source's cycle and snapshot directories; the FUSE export is
    mounted only if a read needs it (``export()``, through ``reader.want_export``): a first
    copy of small files never starts it.

    Thread-safety: one helper thread reads the agent's announcements as they come (so
    ``packs_known`` runs ahead of the segment being applied, for pack read-ahead) until
    ``built``; ``export()`` may run in a reader thread once that helper has ended (the reader
    serializes it); everything else runs in the caller's thread."""

    pack_rel = layout.CYCLE_DIR + layout.PACK_FILE

    def __init__(self, first: Segment, agent: AgentClient, reader: StreamReader, state_dir: str):
        if first.header is None:
            raise TransportError("the source agent streamed a cycle without its header", hint=HINT)
        self.header: Dict[str, Any] = first.header
        self.totals: Dict[str, Any] = first.totals or {}
        self._agent, self._reader, self._state_dir = agent, reader, state_dir
        self._q: "queue.Queue[Union[Segment, Built, BaseException]]" = queue.Queue()
        self._q.put(first)
        self._n = 0
        self._done = False
        self.packs_known = first.packs
        self.built: Optional[Built] = None
        self.ready: Optional[Ready] = None
        self._t = threading.Thread(target=self._listen, daemon=True, name="discrep-stream")
        self._t.start()
        reader.want_export = self.export

    def _listen(self) -> None:
        try:
            while True:
                msg = self._agent.expect_any((Segment, Built))
                if isinstance(msg, Segment):
                    self.packs_known = max(self.packs_known, msg.packs)
                self._q.put(cast(Union[Segment, Built], msg))
                if isinstance(msg, Built):
                    return
        except BaseException as e:   # handed to the applying thread
            self._q.put(e)

    def announced(self) -> Iterator[Tuple[int, int]]:
        """(segment number, packs written so far) as segments are announced, until ``built``."""
        while not self._done:
            msg = self._q.get()
            if isinstance(msg, BaseException):
                self._done = True
                raise msg
            if isinstance(msg, Built):
                self.built = msg
                self._done = True
                return
            if msg.seg != self._n:
                raise TransportError(f"the source agent announced segment {msg.seg} where {self._n} was due")
            self._n += 1
            yield self._n - 1, msg.packs

    def raw(self, n: int) -> Iterator[Dict[str, Any]]:
        """Segment ``n``'s raw entry dicts (not validated yet)."""
        data = self._reader.read_all(layout.CYCLE_DIR + layout.SEGMENT_FILE % n, MAX_SEGMENT_BYTES + FRAME_SLACK)
        return read_segment(data, n)

    def entries(self, n: int) -> List[Entry]:
        """Segment ``n``'s validated entries."""
        return [Entry(r) for r in self.raw(n)]

    def segments(self) -> Iterator[Tuple[List[Entry], int]]:
        for n, packs in self.announced():
            yield self.entries(n), packs

    def finish(self) -> None:
        """Every segment consumed (the rest is read and dropped) and ``built`` received."""
        for _ in self.announced():
            pass
        self._t.join()

    def verify(self) -> Tuple[List[Entry], List[bytes]]:
        """Every file was read: have the source check the large ones it let us read live (see
        source.agent ``verify``).  Returns (entries to read again from ``redo_rel``, paths to drop)."""
        self.finish()
        self._agent.send(Verify())
        msg = self._agent.expect(Verified)
        return [Entry(r) for r in msg.redo], [Entry({"op": "delete", "path": p}).path for p in msg.gone]

    @staticmethod
    def redo_rel(idx: int) -> bytes:
        """Where the source put its copy of file ``idx`` that changed while it was read."""
        return layout.CYCLE_DIR + layout.REDO_FILE % idx

    def export(self) -> str:
        """Have the agent mount the built cycle's export; its directory below the state dir, for the reader."""
        self.finish()
        if self.ready is None:
            t = time.monotonic()
            self._agent.send(Export())
            self.ready = self._agent.expect(Ready)
            log.info("the source exported the streamed cycle in %.2fs", time.monotonic() - t)
        return below(self.ready.mountpoint, self._state_dir, "the export's mountpoint")

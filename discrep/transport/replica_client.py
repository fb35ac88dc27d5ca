"""The pushing source's side of ``discrep replica-agent``: ``ReplicaAgentClient`` and the export server.

``ReplicaAgentClient(conn, command)`` starts the replica agent on an exec channel of the
session's one SSH connection and speaks protocol.replica_messages with it: ``send`` a command,
``expect`` the next event (``error`` raises the replica's error here, ``alive`` is skipped, any
other event raises TransportError; no line for ``timeout`` s raises TransportError).  Its stderr
is collected by a helper thread: ``discrep: warning:`` lines become the cycle's warnings.

``ExportServer(conn, command, root)`` opens a second exec channel running the replica host's
SFTP relay and serves ``root`` (the cycle's FUSE export) on it with the confined read-only
server (transport.sftp_serve) in a helper thread, until the replica's sshfs ends the stream or
``close`` closes the channel.

Thread-safety: a client is used by one thread at a time (its stderr thread only appends to a
list; its ping thread only sends, under a lock).  ``ExportServer``'s thread owns the channel's
reads and writes; ``close`` (owner) closes the channel and joins it.
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Callable, List, Optional, Tuple, Type, TypeVar, cast

from discrep.core.errors import TransportError, WarningList
from discrep.protocol.agent_messages import HINT, Alive, Failed, Message, parse_warning
from discrep.protocol.replica_messages import PushCommand, PushPing, decode_event
from discrep.transport.sftp_serve import SftpProtocolError, serve
from discrep.transport.ssh import Connection

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Message)
MAX_LINE = 1 << 20


class ReplicaAgentClient:
    """``discrep replica-agent`` on one exec channel (JSON lines, see run.replica_agent)."""

    def __init__(self, conn: Connection, command: str, timeout: float) -> None:
        self.conn, self.timeout = conn, timeout
        self.ch = conn.start(command)
        self.out = self.ch.makefile("rb")
        self._stderr: List[bytes] = []
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._read_err, daemon=True, name="discrep-replica-agent-stderr")
        self._t.start()
        threading.Thread(target=self._ping, daemon=True, name="discrep-replica-agent-ping").start()

    def _ping(self) -> None:
        while not self._stop.wait(max(0.5, self.timeout / 4)):
            try:
                self.send(PushPing())
            except Exception:  # the channel is gone: the reads notice
                return

    def _read_err(self) -> None:
        try:
            for line in self.ch.makefile_stderr("rb"):
                self._stderr.append(line[:4096])
                if len(self._stderr) > 400:
                    del self._stderr[:200]
        except Exception:  # the connection is gone: what we have is enough
            pass

    def send(self, cmd: PushCommand) -> None:
        with self._send_lock:
            self.ch.sendall(cmd.encode().encode())

    def expect(self, kind: Type[E]) -> E:
        """The replica agent's next event, which must be a ``kind``."""
        self.ch.settimeout(self.timeout)
        try:
            while True:
                line = self.out.readline(MAX_LINE)
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"{"):
                    continue
                event = decode_event(line)
                if isinstance(event, Alive):
                    continue
                if isinstance(event, Failed):
                    self._t.join(1)
                    raise event.to_error(self.conn.cfg.alias)
                if not isinstance(event, kind):
                    raise TransportError(f"the replica agent on {self.conn.cfg.alias} said {event.NAME!r} where "
                                         f"{kind.NAME!r} was expected", hint=HINT)
                return cast(E, event)
        except socket.timeout:
            raise TransportError(f"the replica on {self.conn.cfg.alias} did not answer within {self.timeout:.0f}s "
                                 f"({self.stderr_tail()})") from None
        raise self._stopped()

    def _stopped(self) -> TransportError:
        self.ch.status_event.wait(5)
        rc = self.ch.recv_exit_status() if self.ch.exit_status_ready() else -1
        self._t.join(2)
        if rc == 127:
            return TransportError(f"discrep is not installed on {self.conn.cfg.alias} (exit 127)",
                                  hint="install discrep on the replica host, or pass --remote-discrep PATH")
        if not self.conn.transport_alive():
            return TransportError(f"the SSH connection to {self.conn.cfg.describe()} was lost",
                                  hint="the replica stays at its last committed cycle; run again")
        return TransportError(f"the replica agent on {self.conn.cfg.alias} stopped (exit status {rc}): "
                              f"{self.stderr_tail()}")

    def stderr_tail(self) -> str:
        lines = [ln.decode(errors="replace").strip() for ln in self._stderr]
        lines = [ln for ln in lines if ln and parse_warning(ln) is None]
        return lines[-1] if lines else "no message"

    def warnings_into(self, warnings: WarningList) -> None:
        self._t.join(2)
        for raw in self._stderr:
            w = parse_warning(raw.decode(errors="replace").rstrip("\n"))
            if w is not None:
                warnings.add(f"{self.conn.cfg.alias}:{w[0]}" if w[0] else self.conn.cfg.alias, w[1])
        self._stderr.clear()

    def close(self) -> None:
        """EOF to the agent (it cleans up and exits); waits a little for its exit."""
        self._stop.set()
        try:
            if self.conn.transport_alive():      # a dead connection: the remote side ends on its own
                self.ch.shutdown_write()
                self.ch.status_event.wait(15)
        except Exception as e:  # the connection is gone: the remote side cleans up on its own
            log.debug("closing the replica agent: %s", e)
        finally:
            self.ch.close()


class ExportServer:
    """The cycle's export served read-only on a relay channel (see module doc)."""

    def __init__(self, conn: Connection, command: str, root: str,
                 direct: Optional[Callable[[bytes], Optional[int]]] = None) -> None:
        self.ch = conn.start(command)
        self.root, self.direct = root, direct
        self.result: List[Tuple[str, object]] = []
        self.t = threading.Thread(target=self._run, daemon=True, name="discrep-sftp-serve")
        self.t.start()

    def _run(self) -> None:
        try:
            self.result.append(("served", serve(self.ch, self.root, self.direct)))
        except (SftpProtocolError, OSError, EOFError) as e:
            log.info("the export's SFTP session ended: %s", e)
            self.result.append(("error", e))
        except Exception as e:  # paramiko errors on a dropped connection
            log.info("the export's SFTP session ended: %s", e)
            self.result.append(("error", e))
        finally:
            try:
                self.ch.shutdown_write()
            except Exception:  # already closed
                pass

    def close(self, timeout: float = 15.0) -> Optional[str]:
        """Close the channel and join the server; a reason if it did not end."""
        try:
            self.ch.close()
        except Exception as e:  # already closed
            log.debug("closing the relay channel: %s", e)
        self.t.join(timeout)
        return "the export's SFTP server does not end" if self.t.is_alive() else None

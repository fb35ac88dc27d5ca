"""The replica host's side of push mode: ``discrep replica-agent DEST`` and its SFTP relay.

A pushing source (run.push) starts ``discrep replica-agent [options] -- DEST`` on an exec channel
of its one SSH connection and speaks protocol.replica_messages with it on stdin/stdout:

1. the agent checks DEST (run.local.prepare_dest), makes a private 0700 directory with a unix
   socket in it, and says ``hello`` with DEST's last committed cycle and the socket's path;
2. the source builds and exports the cycle, starts ``discrep replica-agent --sftp-relay SOCK`` on a
   second channel of the same connection (``run_sftp_relay``: copies its stdin/stdout to and from
   the socket) and serves its export on that channel (transport.sftp_serve);
3. on ``apply`` the agent accepts the relay's connection and runs ``sshfs -o passive`` with its
   stdin/stdout on it (transport.passive.SocketSshfsMount): the replica reads the cycle through a
   mount of the source's export, as a pull does, and ``replica.sync`` patches and commits DEST
   (the source is untrusted: sync validates what it reads through the mount);
4. it says ``applied`` with the result's numbers; the source acknowledges the cycle on its side.

On ``bye``, EOF, a stalled connection (``--timeout``), an error or a signal the agent unmounts,
closes the socket and removes its directory (finally).  Warnings go to stderr as
``discrep: warning:`` lines.

Threading: the agent runs in the caller's thread; AgentOutput's heartbeat thread says ``alive``;
the relay runs one thread per direction.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import replace
from typing import Iterator, Optional

from discrep.core.errors import Error, TransportError, WarningList
from discrep.protocol.filterspec import FilterSpec
from discrep.protocol.agent_messages import Failed
from discrep.protocol.replica_messages import Applied, Apply, PushBye, PushPing, ReplicaHello, decode_command
from discrep.replica.options import ReplicaOptions
from discrep.replica.sync import result_fields, sync
from discrep.run.local import prepare_dest
from discrep.source.agent import AgentOutput, agent_output, read_lines

log = logging.getLogger(__name__)

SOCKET_NAME = "sftp"
ACCEPT_TIMEOUT = 30.0
CHUNK = 256 * 1024


def run_replica_agent(dest: str, ropts: ReplicaOptions, warnings: WarningList, timeout: Optional[float]) -> int:
    """Serve a pushing source on stdin/stdout until ``bye`` or EOF; the process's exit code."""
    out = agent_output(timeout)
    work: Optional[str] = None
    listener: Optional[socket.socket] = None
    try:
        try:
            dest = os.path.abspath(dest)
            rcycle = prepare_dest(dest, force=ropts.force)
            work = tempfile.mkdtemp(prefix="discrep-push-")      # 0700: only we may connect
            sock_path = os.path.join(work, SOCKET_NAME)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock_path)
            listener.listen(1)
            listener.settimeout(ACCEPT_TIMEOUT)
            out.say(ReplicaHello(cycle=rcycle, socket=sock_path))
            _serve(read_lines(sys.stdin.buffer.fileno(), timeout), dest, ropts, listener, work, warnings, out)
            return 0
        except Error as e:
            out.warn(warnings)
            out.say(Failed.of(e))
            return e.exit_code
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    finally:
        out.stop()
        if listener is not None:
            listener.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _serve(lines: Iterator[str], dest: str, ropts: ReplicaOptions, listener: socket.socket, work: str,
           warnings: WarningList, out: AgentOutput) -> None:
    first = True
    for line in lines:
        if not line.strip().startswith("{"):
            continue
        cmd = decode_command(line)
        if isinstance(cmd, PushPing):
            continue
        if isinstance(cmd, PushBye):
            return
        if isinstance(cmd, Apply):
            spec = FilterSpec.from_wire(cmd.filters, cmd.delete_excluded)
            opts = replace(ropts, filters=spec, force=ropts.force and first)
            res = apply_cycle(dest, opts, listener, work, warnings)
            first = False
            out.warn(warnings)
            out.say(Applied(cycle=cmd.cycle, result=res))


def apply_cycle(dest: str, ropts: ReplicaOptions, listener: socket.socket, work: str,
                warnings: WarningList) -> dict:
    """Accept the relay, mount the source's export through it, sync DEST; the result's numbers."""
    from discrep.transport.mount_reader import MountReader
    from discrep.transport.push_mount import SocketSshfsMount
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        raise TransportError(f"the source's SFTP relay did not connect within {ACCEPT_TIMEOUT:.0f}s",
                             hint="the replica stays at its last committed cycle; run again") from None
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, mode=0o700, exist_ok=True)
    mount = SocketSshfsMount(conn, mnt)
    try:
        mount.start()
        reader = MountReader(mnt)
        try:
            stats = sync(reader, os.fsencode(dest), ropts, warnings=warnings)
        except OSError as e:
            if not mount.alive():
                raise TransportError(f"the connection to the source was lost during the cycle ({e})",
                                     hint="the replica stays at its last committed cycle; run again") from None
            raise
        finally:
            reader.close()
        return result_fields(stats)
    finally:
        mount.stop()
        try:
            os.rmdir(mnt)
        except OSError as e:
            log.warning("cannot remove %s: %s", mnt, e)


def relay_socket_ok(sock_path: str) -> bool:
    """``sock_path`` is a replica agent's socket: ``<tmp>/discrep-push-*/sftp``, a socket in a 0700
    directory of ours (the relay connects to nothing else the source names)."""
    d, name = os.path.split(sock_path)
    if name != SOCKET_NAME or not os.path.basename(d).startswith("discrep-push-") or not os.path.isabs(d):
        return False
    try:
        dst, sst = os.lstat(d), os.lstat(sock_path)
    except OSError:
        return False
    return (stat.S_ISDIR(dst.st_mode) and stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == os.getuid()
            and stat.S_ISSOCK(sst.st_mode))


def run_sftp_relay(sock_path: str) -> int:
    """Copy stdin to the unix socket ``sock_path`` and the socket to stdout until either ends."""
    if not relay_socket_ok(sock_path):
        log.error("%s is not a replica agent's socket", sock_path)
        return 11
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    except OSError as e:
        log.error("cannot connect to %s: %s", sock_path, e.strerror)
        return 11

    def up() -> None:
        try:
            while True:
                d = os.read(0, CHUNK)
                if not d:
                    break
                s.sendall(d)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    t = threading.Thread(target=up, daemon=True, name="discrep-relay-up")
    t.start()
    try:
        while True:
            d = s.recv(CHUNK)
            if not d:
                break
            _write_all(1, d)
    except OSError:
        return 11
    finally:
        s.close()
    return 0


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]

"""One whole cycle from a remote source: ``discrep replicate [USER@]HOST:PATH DEST``.

The replica drives everything over ONE paramiko connection (discrep.transport.ssh),
in a ``RemoteSession``:

1. the source agent starts on an exec channel (transport.agent_client.AgentClient,
   source.agent) and says ``hello`` with the source's state directory and its export
   parent directory; meanwhile the replica imports replica.sync and, over the one
   connection (sshfs with ``-o passive``), opens an SFTP session in a helper thread --
   or, for a streamed first copy or an sshfs without passive mode, starts the local sshfs
   mount of ``SRC/.discrep`` (``sshfs -o passive`` on a second channel of the same
   connection, served by the source's ``sftp`` subsystem, transport.passive; or sshfs's own
   ssh connection, whose handshake overlaps the snapshot);
2. the agent settles the source against the replica's last committed cycle R and
   builds cycle N > R (``built``); over the one connection it exports only when asked
   (``--export-on-demand``), else it mounts its FUSE export at once (``ready``) -- or, for
   a streamed first copy, announces manifest segments as it builds them (``seg``,
   transport.agent_client.CycleStream) and exports only if a read needs it;
3. the replica reads the cycle description, manifest and packs from the cycle directory
   over the SFTP session (transport.cycle_reader.CycleDirReader); only a read that needs
   more (a signature, a large file's data) has the agent export the cycle (``export`` ->
   ``ready``) while sshfs mounts ``SRC/.discrep``, then reads through the mount with
   ``DirectDataReader`` (file data straight from the snapshot) -- or, with ``--transport
   sftp``, through ``SftpReader`` on the same connection; ``replica.sync`` patches DEST;
4. ``ack`` N to the agent, which unmounts its export and acknowledges the cycle.

``--bwlimit`` paces the one connection (transport.pace under transport.ssh.Connection);
with a two-connection sshfs it is refused for ``--transport sshfs`` and ``auto`` reads
through the SFTP reader instead.

In continuous mode the session (connection, agent, SFTP session, sshfs mount once
mounted) stays up between cycles.  On any failure, Ctrl-C or a dropped connection the session is closed
(finally): local unmount, EOF to the agent (it unmounts its export and removes
its directory); the source keeps the built-but-unacknowledged cycle N and the
next cycle settles it.

Thread-safety: runs in the caller's thread; one helper thread mounts sshfs, one opens the
SFTP session, the agent client and cycle stream run their own (see transport.agent_client);
the on-demand export runs in whichever reader thread needs it first (CycleDirReader
serializes it), while the caller's thread waits in replica.sync.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple, Type, Union, cast

from blockdiff.errors import BlockdiffError

from discrep.core import errors as errmod
from discrep.core.beneath import open_beneath
from discrep.core.errors import Error, LiveChangedError, LiveReadError, ManifestError, TransportError, WarningList
from discrep.core.paths import holds_only_state, show
from discrep.protocol import layout
from discrep.protocol.agent_messages import Ack, Acked, Built, Event, Export, Hello, Ready, Segment, StartCycle, below
from discrep.replica.runlock import run_lock
from discrep.replica.options import ReplicaOptions
from discrep.run.local import prepare_dest, prepare_replica
from discrep.run.options import CycleOptions
from discrep.transport.agent_client import AgentClient, CycleStream
from discrep.transport.mount_reader import MountReader
from discrep.transport.ssh import Connection, parse_remote, resolve

log = logging.getLogger(__name__)


class DirectDataReader(MountReader):
    """MountReader over an sshfs mount of the source's ``SRC/.discrep``: control files come from the export
    (``<export>/.discrep/...``), but ``.discrep/data/<idx>`` is read straight from the immutable
    snapshot file it aliases (``<snapshot>/<path>``), skipping the source's Python FUSE hop
    (measured: export 333-516 MB/s vs the snapshot's filesystem at GB/s).  Falls back to the
    export's alias when the snapshot file cannot be opened.  Every path is relative to the mount's
    root and opened strictly beneath it (core.beneath): whatever the agent names, no read leaves it.
    """

    def __init__(self, root_mnt: str, export_rel: str, snapshot_rel: str, cycle_rel: str = "", **kw):
        super().__init__(root_mnt, base=os.fsencode(export_rel), **kw)
        self.root_mnt = root_mnt.rstrip("/")
        self.snap = os.fsencode(snapshot_rel).strip(b"/")
        self.cycle_rel = os.fsencode(cycle_rel).strip(b"/")
        self.cycle_dir = os.fsencode(self.root_mnt) + b"/" + self.cycle_rel if self.cycle_rel else None
        self.paths: Dict[int, bytes] = {}
        self.live: Set[int] = set()        # files the source lets us read live (snapshot symlinks)
        self.want_export: Optional[Callable[[], str]] = None   # a streamed cycle: export on first need
        self._export_lock = threading.Lock()

    def set_export(self, export_rel: str) -> None:
        """The export is mounted (a streamed cycle starts reading before it is)."""
        self.base = os.fsencode(export_rel).strip(b"/")
        self.want_export = None

    def know_files(self, paths: Dict[int, bytes], live: Iterable[int] = ()) -> None:
        self.paths = paths
        self.live = set(live)

    def _open(self, rel: bytes) -> int:
        if rel.startswith(layout.CYCLE_DIR):   # a streamed cycle's segments and packs, written before announced
            name = rel[len(layout.CYCLE_DIR):]
            if b"/" in name or not name or not self.cycle_rel:
                raise ManifestError(f"bad cycle file name {show(name)}")
            return self.open_below(self.cycle_rel, name)
        if rel.startswith(layout.DATA_PREFIX):
            name = rel.rsplit(b"/", 1)[1]
            p = self.paths.get(int(name)) if name.isdigit() else None
            if p is not None:
                try:
                    return open_beneath(self.root_fd, self.snap + b"/" + p)
                except OSError as e:
                    if int(name) in self.live:   # the export has no better copy: the source settles it
                        raise LiveReadError(f"cannot open {show(p)} on the source: {e.strerror}") from None
                    # not in the snapshot dir (e.g. captured into a pack): the export's alias
        if self.want_export is not None:     # a streamed cycle's export is mounted only when needed
            with self._export_lock:
                if self.want_export is not None:
                    self.set_export(self.want_export())
        return super()._open(rel)


def _choose_transport(want: str, passive: bool = True, bwlimit: int = 0) -> Tuple[str, bool]:
    """(transport, sshfs over the one connection): the reader of the export and how sshfs connects."""
    from discrep.transport.passive import passive_supported
    from discrep.transport.sshfs import available
    if want == "sftp":
        return "sftp", False
    why = available()
    unpaced = False
    if not why:
        passive = passive and passive_supported()
        if bwlimit and not passive:   # sshfs's own ssh would be a second connection, outside the limit
            why, unpaced = "sshfs cannot run over the limited connection (it needs -o passive, sshfs 3.7+)", True
    if want == "sshfs":
        if unpaced:
            raise errmod.UsageError(f"--bwlimit with --transport sshfs: {why}",
                                    hint="pass --transport sftp (the built-in reader shares the limited "
                                         "connection), or install sshfs 3.7 or later")
        if why:
            raise errmod.FuseUnavailableError(f"cannot use sshfs: {why}",
                                              hint="install sshfs and fuse3, or pass --transport sftp")
        return "sshfs", passive
    if why:
        log.info("using the built-in SFTP reader: %s", why)
        return "sftp", False
    return "sshfs", passive


def replicate_remote(opts: CycleOptions, warnings: Optional[WarningList] = None,
                     progress=None) -> Dict[str, Any]:
    """One remote cycle: open a session, run the cycle, close everything."""
    session = RemoteSession(opts)
    try:
        return session.cycle(warnings if warnings is not None else WarningList(), progress)
    finally:
        t = time.monotonic()
        session.close()
        log.info("session closed in %.2fs", time.monotonic() - t)


class RemoteSession:
    """One SSH connection, one source agent and one sshfs mount of ``SRC/.discrep``, for one cycle or,
    in continuous mode, for many (the session stays up between cycles; each cycle gets a fresh export
    mountpoint on the source).  After a failed cycle the caller closes the session and opens a new one.
    """

    def __init__(self, opts: CycleOptions):
        self.opts = opts
        self.user, self.host, self.rpath = parse_remote(opts.src)
        self.dest = os.path.abspath(opts.dest)
        self.exe = opts.ssh.remote_discrep or "discrep"
        self.cfg = resolve(self.user, self.host, opts.ssh.ssh_config)
        self.cfg.io_timeout = float(opts.ssh.timeout)
        self.bwlimit = int(opts.ssh.bwlimit or 0)
        self.transport, self.passive = _choose_transport(opts.ssh.transport or "auto", opts.ssh.passive,
                                                         self.bwlimit)
        self.snapshot_kind = opts.snapshot or "auto"
        self.conn: Optional[Connection] = None
        self.agent: Optional[AgentClient] = None
        self.mount = None
        self.mount_thread: Optional[threading.Thread] = None
        self.mount_err: list = []
        self.local_dir: Optional[str] = None
        self.state_dir = self.remote_dir = ""
        self.cycles = 0
        self.read_live = True           # large files of a copy snapshot read live, verified before commit
        self.replica_id: Optional[str] = None     # this replica's position on the source
        # one connection: a built cycle is read from its cycle directory over SFTP; the source exports
        # it and sshfs mounts it only when a read needs more (a signature, a file's data)
        self.on_demand = self.transport == "sshfs" and self.passive
        self.mounted = False            # this cycle read through the sshfs mount
        self.sftp: Any = None           # the session's SFTP client (cycle directories), opened early
        self.sftp_thread: Optional[threading.Thread] = None
        self.sftp_got: list = []

    # -- set-up ----------------------------------------------------------
    def _start_mount(self, target: str) -> None:
        from discrep.transport.passive import PassiveSshfsMount
        from discrep.transport.sshfs import SshfsMount
        self.local_dir = self.local_dir or tempfile.mkdtemp(prefix="discrep-sshfs-")
        if self.passive:     # SFTP on a channel of the one connection: no second handshake, one --bwlimit
            self.mount = mount = PassiveSshfsMount(self._conn(), target, self.local_dir)
        else:
            self.mount = mount = SshfsMount(self.cfg, target, self.local_dir)
        self.mount_err.clear()

        def do_mount() -> None:
            try:
                mount.start()
            except BaseException as e:  # handed to the main thread
                self.mount_err.append(e)
        self.mount_thread = threading.Thread(target=do_mount, daemon=True, name="discrep-sshfs-mount")
        self.mount_thread.start()

    def _open(self, rcycle: Optional[int], stream: bool = False, totals: bool = True) -> None:
        """Connect; sshfs connects while the agent starts and builds the first cycle."""
        self.conn = Connection(self.cfg, bwlimit=self.bwlimit)
        self.conn.connect()
        if self.transport == "sshfs" and (stream or not self.on_demand):  # SRC/.discrep exists after the first cycle
            self._start_mount(self.rpath.rstrip("/") + "/.discrep")
        elif self.on_demand:            # the SFTP server starts while the agent starts and builds
            self._start_sftp()
        self.agent = AgentClient(self.conn, self.exe, self.rpath, rcycle, self.snapshot_kind, stream, totals,
                                 timeout=self.cfg.io_timeout, read_live=self.read_live, on_demand=self.on_demand)
        hello = self.agent.expect(Hello)
        below(hello.dir, hello.state_dir, "the agent's export directory")
        self.state_dir, self.remote_dir = hello.state_dir, hello.dir
        if self.mount_thread is not None and not self.mount_thread.is_alive() and self.mount_err:
            self.mount.stop()
            self._start_mount(self.state_dir)

    def _start_sftp(self) -> None:
        def run() -> None:
            try:
                self.sftp_got.append(self._conn().sftp())
            except BaseException as e:  # handed to the main thread
                self.sftp_got.append(e)
        self.sftp_thread = threading.Thread(target=run, daemon=True, name="discrep-sftp-open")
        self.sftp_thread.start()

    def _session_sftp(self) -> Any:
        """The session's SFTP client (kept for the session's cycles)."""
        if self.sftp_thread is not None:
            self.sftp_thread.join()
            self.sftp_thread = None
            got = self.sftp_got.pop() if self.sftp_got else TransportError("the SFTP session did not open")
            if isinstance(got, BaseException):
                raise got
            self.sftp = got
        if self.sftp is None:
            self.sftp = self._conn().sftp()
        return self.sftp

    def _ensure_mount(self) -> None:
        """The sshfs mount of the state directory is up (started now if it was not)."""
        if self.mount is None:
            self._start_mount(self.state_dir)
        self._mount_ready()
        self.mounted = True

    def _mount_ready(self) -> None:
        if self.mount_thread is None:
            return
        self.mount_thread.join()
        if self.mount_err:               # the early mount could not see SRC/.discrep: once more, by the
            self.mount.stop()            # path the agent reported
            self._start_mount(self.state_dir)
            self.mount_thread.join()
        self.mount_thread = None
        if self.mount_err:
            raise self.mount_err[0]

    # -- one cycle ---------------------------------------------------------
    def cycle(self, warnings: WarningList, progress=None) -> Dict[str, Any]:
        """One cycle on this session: the source builds it, DEST is patched, the source is told.  A
        file read live that changed meanwhile rolls the cycle back: it is run again with copies.  A
        second run into DEST meanwhile is refused at once (``replica.sync.run_lock``)."""
        # --force lets only the first cycle of a session into a non-empty DEST
        ropts = self.opts.replica if self.cycles == 0 else replace(self.opts.replica, force=False)
        prepare_dest(self.dest, force=ropts.force)
        with run_lock(os.fsencode(self.dest)):
            first = WarningList()
            try:
                res = self._cycle(ropts, first, progress)
            except LiveChangedError as e:
                log.info("%s; running the cycle again with the changed files copied", e)
                self.read_live = False
                try:
                    return self._cycle(ropts, warnings, progress)
                finally:
                    self.read_live = True
            warnings.items.extend(first.items)
            return res

    def _cycle(self, ropts: ReplicaOptions, warnings: WarningList, progress) -> Dict[str, Any]:
        t0 = time.monotonic()
        rcycle, rid = prepare_replica(self.dest, force=ropts.force)   # what DEST committed, now that we hold it
        self.replica_id = self.opts.replica_id or rid
        # a first copy into an empty DEST is applied while the source still builds it
        want_stream = self.transport == "sshfs" and rcycle == 0 and holds_only_state(self.dest)
        marks = {"start": t0}
        reader = None
        self.mounted = False
        try:
            # progress shows fixed totals, which cost the source a walk before it streams: only if shown
            first = self._start_cycle(rcycle, want_stream, progress is not None)
            marks["conn"] = time.monotonic()
            reader, stream = self._open_reader(first, marks)
            marks["mount"] = time.monotonic()
            stats, built = self._apply(reader, stream, first, ropts, warnings, progress)
            from discrep.replica.sync import result_fields
            marks["sync"] = time.monotonic()
            reader.close()
            reader = None
            _log_times(built, stream is not None, marks)
            self._ack(built.cycle, warnings)
            self.agent.warnings_into(warnings)
        except (socket.error, EOFError) as e:
            raise TransportError(f"the SSH connection to {self.cfg.describe()} failed: {e}",
                                 hint="the replica stays at its last committed cycle; run again") from None
        finally:
            if reader is not None:
                try:
                    reader.close()
                except Exception as e:
                    log.debug("closing the reader: %s", e)
        self.cycles += 1
        return {
            "cycle": built.cycle, "base": built.base, "change_source": built.change_source,
            "snapshot": built.snapshot, "entries": built.entries, **result_fields(stats),
            "duration_s": round(time.monotonic() - t0, 3), "warnings": len(warnings),
            "transport": self.transport, "session_cycle": self.cycles,
            "connections": 2 if self.transport == "sshfs" and not self.passive else 1,
            "mounted": self.mounted,
            **({"bwlimit": self.bwlimit} if self.bwlimit else {}),
        }

    def _start_cycle(self, rcycle: int, stream: bool, totals: bool) -> Union[Segment, Built]:
        """Have the agent build the next cycle: its first segment (streamed) or ``built``."""
        spec = self.opts.replica.filter_spec()
        # rules and the replica id travel in the cycle command (validated and bounded there), never
        # on a command line
        if self.agent is None:
            self._open(None, stream, totals)
        self._agent().send(StartCycle(replica_cycle=rcycle, stream=stream, totals=totals, read_live=self.read_live,
                                      filters=spec.wire(), delete_excluded=spec.delete_excluded,
                                      replica_id=self.replica_id))
        import discrep.replica.sync  # noqa: F401  (the replica's imports, while the agent starts and builds)
        kinds: Tuple[Type[Event], ...] = (Segment, Built) if stream else (Built,)
        return cast(Union[Segment, Built], self._agent().expect_any(kinds))

    def _open_reader(self, first: Union[Segment, Built], marks: Dict[str, float]
                     ) -> Tuple[Any, Optional[CycleStream]]:
        """The reader of the cycle (and the stream, for a streamed one); its export is ready."""
        export_rel = below(self.remote_dir, self.state_dir, "the agent's export directory")
        if isinstance(first, Segment):
            self._ensure_mount()
            reader = DirectDataReader(self.local_dir, export_rel, below(first.snapshot, self.state_dir, "the snapshot"),
                                      cycle_rel=below(first.dir, self.state_dir, "the cycle directory"))
            stream = CycleStream(first, self._agent(), reader, self.state_dir)
            marks["snap"] = marks["ready"] = time.monotonic()
            return reader, stream
        marks["snap"] = time.monotonic()
        snap_rel = below(first.path, self.state_dir, "the snapshot") if self.transport == "sshfs" else ""
        if self.on_demand:
            from discrep.transport.cycle_reader import CycleDirReader
            marks["ready"] = time.monotonic()
            cdir = self.state_dir.rstrip("/") + "/" + os.fsdecode(layout.cycle_dir_rel(first.cycle))
            return CycleDirReader(self._session_sftp(), cdir, lambda: self._export_reader(export_rel, snap_rel)), None
        ready = self._agent().expect(Ready)
        marks["ready"] = time.monotonic()
        mnt_rel = below(ready.mountpoint, self.remote_dir, "the export's mountpoint")
        if self.transport == "sshfs":
            self._ensure_mount()
            return DirectDataReader(self.local_dir, export_rel + "/" + mnt_rel, snap_rel), None
        from discrep.transport.sftp_reader import SftpReader
        return SftpReader(self.conn.sftp(), ready.mountpoint), None

    def _export_reader(self, export_rel: str, snap_rel: str) -> DirectDataReader:
        """A read needs the export: the agent mounts it while sshfs mounts the state directory."""
        t = time.monotonic()
        self._agent().send(Export())
        if self.mount is None:
            self._start_mount(self.state_dir)
        ready = self._agent().expect(Ready)
        mnt_rel = below(ready.mountpoint, self.remote_dir, "the export's mountpoint")
        self._ensure_mount()
        log.info("exported and mounted on demand in %.2fs", time.monotonic() - t)
        return DirectDataReader(self._local_dir(), export_rel + "/" + mnt_rel, snap_rel)

    def _local_dir(self) -> str:
        if self.local_dir is None:
            raise TransportError("the sshfs mount is not set up")
        return self.local_dir

    def _apply(self, reader: Any, stream: Optional[CycleStream], first: Union[Segment, Built],
               ropts: ReplicaOptions, warnings: WarningList, progress) -> Tuple[Any, Built]:
        """Patch DEST from ``reader``: (sync's stats, the built cycle)."""
        from discrep.replica.sync import sync
        watch = StallWatch(reader, self.cfg.io_timeout, self._abort_mount, self.cfg.describe(), self._mount_io)
        try:
            stats = sync(reader, os.fsencode(self.dest), ropts, warnings=warnings, progress=progress,
                         stream=stream, live_changed=self._agent().live_changed if stream is None else None)
            if stream is not None:
                stream.finish()
        except (OSError, Error, BlockdiffError) as e:
            # a vanished export looks like a missing file, EIO or a short read from the reader: a lost
            # connection is checked first, then data from the source that blockdiff cannot parse is malformed
            lost = watch.reason or _lost_reason(self.conn, self.agent, self.mount)
            if lost:
                raise TransportError(f"{lost} during the cycle ({e})",
                                     hint="the replica stays at its last committed cycle; run again") from None
            if isinstance(e, BlockdiffError):
                raise ManifestError(f"the source sent data that cannot be parsed: {e}") from None
            raise
        finally:
            watch.stop()
        built = stream.built if stream is not None else first
        if not isinstance(built, Built):
            raise TransportError("the source agent streamed a cycle without building it")
        return stats, built

    def _mount_io(self) -> int:
        proc = getattr(self.mount, "proc", None)
        return _bytes_received(proc.pid) if proc is not None else 0

    def _abort_mount(self) -> None:
        """End sshfs (stopped or stuck; SIGKILL ends a stopped process too): the kernel fails every
        read still waiting on the mount; the session's cleanup removes the mount itself."""
        proc = getattr(self.mount, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _ack(self, n: int, warnings: WarningList) -> None:
        """The replica committed cycle ``n``: tell the source (a failure here is settled by the next run)."""
        try:
            t_ack = time.monotonic()
            self._agent().send(Ack(cycle=n, replica_id=self.replica_id))
            self._agent().expect(Acked)
            log.info("remote cycle %d: acknowledged in %.2fs", n, time.monotonic() - t_ack)
        except (TransportError, OSError, socket.error, EOFError) as e:
            warnings.add(f"{self.cfg.alias}:{self.rpath}", f"cycle {n} is committed on the replica but the source "
                                                          f"was not told ({e}); the next run acknowledges it")

    def _conn(self) -> Connection:
        if self.conn is None:
            raise TransportError("the SSH connection is not open")
        return self.conn

    def _agent(self) -> AgentClient:
        if self.agent is None:
            raise TransportError("the source agent is not running")
        return self.agent

    def close(self) -> None:
        """Unmount, stop the agent (it unmounts its export and removes its dir), disconnect."""
        try:
            if self.conn is not None:
                _cleanup(self.mount_thread, self.mount, self.local_dir, self.agent)
                if self.sftp_thread is not None:
                    self.sftp_thread.join(40)
                for c in [self.sftp] + [g for g in self.sftp_got if not isinstance(g, BaseException)]:
                    if c is not None:
                        try:
                            c.close()
                        except Exception as e:   # the connection may be gone
                            log.debug("closing the SFTP session: %s", e)
        finally:
            if self.conn is not None:
                self.conn.close()
            self.conn = self.agent = self.mount = self.mount_thread = None
            self.sftp = self.sftp_thread = None
            self.sftp_got = []
            self.local_dir = None


def _log_times(built: Built, streamed: bool, marks: Dict[str, float]) -> None:
    m = marks
    log.info("remote cycle %d: connect %.2fs, snapshot %.2fs, export %.2fs, mount wait %.2fs, "
             "sync %.2fs%s", built.cycle, m["conn"] - m["start"], m["snap"] - m["conn"], m["ready"] - m["snap"],
             m["mount"] - m["ready"], m["sync"] - m["mount"],
             f" (streamed; source built in {built.build_s}s)" if streamed else "")


class StallWatch:
    """--timeout for what the SSH connection's keepalives cannot see (rsync's meaning: no data for
    that long): while reads through the mount wait and no data arrives -- neither a read completes
    nor does sshfs receive ``MIN_PROGRESS`` bytes of answers (``io``) -- for ``timeout`` s, the
    source agent, its export or sshfs stopped answering: ``abort`` ends the mount, the blocked
    reads fail and the cycle ends with exit 11 and ``reason``.  A slow link is progress, not a
    stall.  One thread, polling ``reader.stalled_for()`` while a cycle applies."""

    MIN_PROGRESS = 16 << 10

    def __init__(self, reader: Any, timeout: float, abort: Callable[[], None], desc: str,
                 io: Callable[[], int] = lambda: 0):
        self.reason: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        stalled = getattr(reader, "stalled_for", None)
        if stalled is None or timeout <= 0:
            return

        def watch() -> None:
            mark = (time.monotonic(), reader.bytes_read, io())
            while not self._stop.wait(min(1.0, timeout / 4)):
                now, done, got = time.monotonic(), reader.bytes_read, io()
                if stalled() == 0.0 or done != mark[1] or got - mark[2] >= self.MIN_PROGRESS:
                    mark = (now, done, got)          # nothing waits, or data arrived: not stalled
                elif now - mark[0] > timeout:
                    self.reason = (f"no data through the mount of {desc} for {now - mark[0]:.0f}s "
                                   f"(--timeout {timeout:g})")
                    log.error("%s: ending the mount", self.reason)
                    abort()
                    return
        self._thread = threading.Thread(target=watch, daemon=True, name="discrep-stall-watch")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _bytes_received(pid: int) -> int:
    """Bytes process ``pid`` has read so far (/proc/PID/io rchar; 0 when it is gone): for sshfs,
    the SFTP answers arriving from its ssh."""
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _lost_reason(conn: Connection, export: Optional[AgentClient], mount) -> Optional[str]:
    """Why the cycle's connection is unusable (None if it still works); probes with a no-op command."""
    desc = conn.cfg.describe()
    if not conn.transport_alive():
        return f"the SSH connection to {desc} was lost"
    try:
        if conn.run("true", timeout=5).rc != 0:
            return f"the SSH connection to {desc} does not work any more"
    except Error:
        return f"the SSH connection to {desc} was lost"
    if export is not None and export.exited():
        return f"the export on {conn.cfg.alias} stopped ({export.stderr_tail()})"
    if mount is not None and not mount.alive():
        err = mount.stderr().strip().splitlines()
        return f"the sshfs connection to {desc} was lost" + (f" ({err[-1]})" if err else "")
    return None


def _cleanup(mount_thread, mount, local_dir, agent) -> None:
    """Undo everything in reverse order; never raises (a second Ctrl-C aside)."""
    if mount_thread is not None:
        mount_thread.join(40)
    if mount is not None:
        mount.stop()
    if local_dir is not None:
        try:
            os.rmdir(local_dir)
        except OSError as e:
            log.warning("cannot remove %s: %s", local_dir, e)
    if agent is not None:
        agent.close()

"""``discrep agent``: the source's side of one remote cycle, on one SSH exec channel.

Each separate remote command costs an SSH session set-up (~0.3 s here), so the
replica runs one agent per cycle and talks to it in JSON lines (the messages are
protocol.agent_messages; the names below are their wire names):

    agent -> hello {state_dir: ".../SRC/.discrep", dir: ".../export.XXXX"}
    (with --replica-cycle R, or on replica -> cycle {replica_cycle: R, filters: RULES-JSON,
    delete_excluded: B}: a replica with filter rules always sends them this way, and the agent
    bounds and validates them (protocol.filterspec) before the build applies them:)
    agent -> seg {seg: S, packs: K, dir: ...}  (only for a streamed cycle: --stream /
              "stream": true; manifest segment S and packs < K are on disk; seg 0 also carries
              the cycle header, the snapshot path and totals -- unless --no-totals /
              "totals": false: then a first copy streams as it walks the tree; see source.build)
    agent -> built {cycle: N, base: B, ...}     (journal cut, snapshot, manifest)
    agent -> ready {mountpoint: ".../export.XXXX/m<k>"}  (FUSE export mounted; a streamed
              cycle -- and every cycle with --export-on-demand -- is exported only on
              replica -> export: its replica reads the cycle and snapshot directories
              directly and may never need the export)
    replica -> verify            (a streamed cycle, once its replica read every file: its large
              files were read live) agent checks they did not change ->
              verified {redo: [entry, ...], gone: [path, ...]}: files that changed, copied now
              to the cycle directory as ``redo-<idx>`` (read them again), and files dropped
              from the cycle (gone, or still changing: left for the next cycle).  Also a cycle
              built with ``--read-live`` / "read_live": true (copy snapshot, large files not
              copied: the export reads them live), before its replica commits; the replica then
              rolls back if any changed and asks for the cycle again without "read_live"
    replica -> ack {cycle: N}    agent acknowledges, -> acked {cycle: N}, then unmounts
    replica -> done              (the cycle failed) agent unmounts, -> ended
    replica -> bye, or EOF       agent unmounts the export, removes its dir, exits 0
    agent -> error {error: ..., kind: ..., exit_code: ...}  on failure

One agent can serve many cycles (continuous mode keeps the SSH session and the
sshfs mount up between cycles); each cycle's export gets a fresh mountpoint.
A line that is no command this version knows is ignored; a known command with
malformed fields is answered with ``error``.

"hello" comes before the build, so the replica can mount ``state_dir`` with sshfs
while the snapshot is being taken.  A dropped connection (EOF, SIGHUP, SIGPIPE)
is cleaned up like "bye": the export is unmounted, the built cycle stays for
the next run to settle.  Warnings go to stderr as ``discrep: warning: ...``.
Everything the agent writes goes through one ``AgentOutput``.

With ``--timeout`` the agent says ``alive`` every timeout/4 s and ends (exit 11) when the
replica has sent nothing (its ``ping`` included) for that long.  Cleanup is bounded
(``stop_export``: unmount, lazy unmount, the export child ended by pid) and ignores further
hang-up signals, so the agent never outlives its session.

Thread-safety: single-threaded but for the heartbeat thread, which only writes through
``AgentOutput`` (a lock keeps lines whole); the export is served by a child process.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Tuple

from discrep.core.errors import Error, FuseUnavailableError, SourceError, TransportError, WarningList
from discrep.core.paths import enc
from discrep.protocol.agent_messages import (Ack, Acked, Alive, Built, Bye, Command, Done, Ended, Event, Export, Failed,
                                             Hello, Ready, StartCycle, UnknownMessage, Verified, Verify,
                                             warning_line)
from discrep.source.build import BuiltCycle
from discrep.source.hooks import build_with_hooks, load_hook_file
from discrep.source.catalog import CATALOG_FILE
from discrep.source.cycles import ack_cycle, disk_full_said, settle_source
from discrep.source.positions import store_for
from discrep.source.deferred import close_deferred, settle_deferred
from discrep.source.filtering import prepare_filters
from discrep.protocol.filterspec import FilterSpec

if TYPE_CHECKING:
    import fuse_export

UNMOUNT_WAIT = 3.0   # seconds for one unmount attempt or one wait for the export child


class AgentOutput:
    """The agent's only writer: events to stdout (one JSON line each, flushed), warnings to stderr.
    A heartbeat thread (``beat``) says ``alive`` every ``interval`` seconds; a lock keeps lines whole."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def say(self, event: Event) -> None:
        with self._lock:
            sys.stdout.write(event.encode())
            sys.stdout.flush()

    def beat(self, interval: float) -> None:
        """Say ``alive`` every ``interval`` seconds until ``stop`` (or stdout is gone)."""
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.say(Alive())
                except (OSError, ValueError):
                    return
        threading.Thread(target=run, daemon=True, name="discrep-agent-alive").start()

    def stop(self) -> None:
        self._stop.set()

    def warn(self, warnings: WarningList) -> None:
        """Write and forget the warnings collected so far."""
        for w in warnings:
            print(warning_line(w), file=sys.stderr, flush=True)
        warnings.items.clear()


def _hang_up(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def agent_output(timeout: Optional[float]) -> AgentOutput:
    """The output of a process serving its peer on stdin/stdout (the source agent, the dry-run
    agent, the replica agent): hang-up signals end it as Ctrl-C would (its cleanup runs), and with
    ``timeout`` it says ``alive`` every timeout/4 s."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, _hang_up)
    out = AgentOutput()
    if timeout:
        out.beat(max(0.5, timeout / 4))
    return out


def run_agent(src: str, replica_cycle: Optional[int], snapshot_kind: str, warnings: WarningList,
              stream: bool = False, totals: bool = True, timeout: Optional[float] = None,
              read_live: bool = False, export_on_demand: bool = False) -> int:
    """Serve the replica on stdin/stdout until ``bye`` or EOF; the process's exit code.  With
    ``timeout``: say ``alive`` every timeout/4 s, and end (exit 11) after ``timeout`` s without a line
    from the replica (a stalled network: the replica sends ``ping`` every few seconds).
    ``export_on_demand``: no cycle is exported before the replica asks (``export``)."""
    out = agent_output(timeout)
    agent: Optional[_Agent] = None
    try:
        try:
            real = os.path.realpath(src)
            if not os.path.isdir(real):
                raise SourceError(f"source {src} does not exist or is not a directory", hint="check the path")
            agent = _Agent(real, snapshot_kind, warnings, out)
            agent.on_demand = export_on_demand
            agent.hello()
            if replica_cycle is not None:
                agent.cycle(replica_cycle, stream, totals, read_live)
            agent.serve(read_lines(sys.stdin.buffer.fileno(), timeout))
            return 0
        except Error as e:
            out.say(Failed.of(e))
            return e.exit_code
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    finally:
        out.stop()
        if agent is not None:
            agent.close()


def _fusermount(mnt: str, lazy: bool) -> None:
    import fuse_export
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmds = [[tool, "-uz" if lazy else "-u", "-q", mnt]] if tool else []
    cmds.append(["umount"] + (["-l"] if lazy else []) + [mnt])
    for cmd in cmds:
        try:
            subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=UNMOUNT_WAIT)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if not fuse_export.mounted(mnt):
            return


def stop_export(export: "fuse_export.BackgroundExport") -> None:
    """Unmount ``export`` and end its child within about 20 s whatever holds it: an unmount, a lazy
    one (``-uz``) if the mount is busy (a file open on it) or slow, then the child is ended by pid
    (SIGTERM, SIGKILL) -- the agent must never outlive its session waiting for it."""
    import fuse_export
    mnt = os.fsdecode(export.mountpoint)
    proc = export.proc
    if fuse_export.mounted(mnt):
        _fusermount(mnt, lazy=False)
    if fuse_export.mounted(mnt):
        _fusermount(mnt, lazy=True)
    if proc is not None:
        proc.join(UNMOUNT_WAIT)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not proc.is_alive() or proc.pid is None:
                break
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                break
            proc.join(UNMOUNT_WAIT)
        export.proc = None
    if fuse_export.mounted(mnt):     # the child was killed with the mount still there
        _fusermount(mnt, lazy=True)


def read_lines(fd: int, timeout: Optional[float]) -> Iterator[str]:
    """The lines of ``fd`` until EOF; TransportError after ``timeout`` s without any input."""
    buf = b""
    while True:
        if timeout:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise TransportError(f"no word from the replica for {timeout:.0f}s: the connection is stalled",
                                     hint="the built cycle stays for the next run to settle")
        chunk = os.read(fd, 65536)
        if not chunk:
            if buf:
                yield buf.decode(errors="replace")
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode(errors="replace") + "\n"


class _Agent:
    """The agent's state across the cycles of one session: its working directory (one export
    mountpoint per cycle), the cycle being served and its export."""

    def __init__(self, real: str, snapshot_kind: str, warnings: WarningList, out: AgentOutput):
        self.bsrc = os.fsencode(real)
        self.snapshot_kind, self.warnings, self.out = snapshot_kind, warnings, out
        self.export: Optional["fuse_export.BackgroundExport"] = None
        self.to_export: List[Tuple[int, str]] = []        # (cycle, mountpoint) built, not exported yet
        self.built: Optional[BuiltCycle] = None           # the cycle being served
        self.settled: Optional[Tuple[List[Dict[str, Any]], List[bytes]]] = None   # its deferred files
        self.served = 0
        self.replica_id: Optional[str] = None              # whose position the cycle is built against
        self.store = CATALOG_FILE
        self.streamed = False                              # the cycle being served was streamed
        self.on_demand = False                             # export only when the replica asks
        self.state_dir = os.path.join(real, ".discrep")
        os.makedirs(self.state_dir, exist_ok=True)
        self.workdir = tempfile.mkdtemp(prefix="export.", dir=self.state_dir)

    def hello(self) -> None:
        self.out.say(Hello(state_dir=self.state_dir, dir=self.workdir))

    def close(self) -> None:
        """Unmount the export, end its child, remove the working directory: bounded (see
        ``stop_export``), and not interrupted by a hang-up arriving meanwhile."""
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if self.export is not None:
            stop_export(self.export)
            self.export = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def serve(self, lines: Iterable[str]) -> None:
        """Answer commands until ``bye`` or the end of ``lines``; a failed command ends its cycle."""
        for line in lines:
            try:
                cmd = Command.decode(line)
                if isinstance(cmd, Bye):
                    break
                self.handle(cmd)
            except UnknownMessage:
                continue                      # not a command of this version: ignored
            except Error as e:
                self.end_cycle()
                self.out.say(Failed.of(e))

    def handle(self, cmd: Command) -> None:
        if isinstance(cmd, Ack):
            # the export serves cycle N, which the ack keeps (it releases older ones): answer first,
            # unmount after (the replica closes its side meanwhile instead of waiting for ours)
            if cmd.replica_id != self.replica_id:     # a replica moves only its own position
                raise SourceError("the ack names another replica than the cycle was built for")
            ack_cycle(self.bsrc, cmd.cycle, self.store)
            self.out.say(Acked(cycle=cmd.cycle))
            self.end_cycle()
        elif isinstance(cmd, Export):          # the replica needs the export (streamed, or on demand)
            if self.export is None:
                if not self.to_export:
                    raise SourceError("no built cycle to export")
                self.start_export()
            else:
                self.out.say(Ready(mountpoint=self.export.mountpoint))
        elif isinstance(cmd, Verify):          # files read live were read: did any change?
            redo, gone = self.settle()
            self.out.say(Verified(redo=redo, gone=[enc(p) for p in gone]))
        elif isinstance(cmd, Done):            # the cycle failed on the replica: just end it
            self.end_cycle()
            self.out.say(Ended())
        elif isinstance(cmd, StartCycle):      # the next cycle (continuous mode: same session)
            self.end_cycle()
            self.cycle(cmd.replica_cycle, cmd.stream, cmd.totals, cmd.read_live,
                       FilterSpec.from_wire(cmd.filters, cmd.delete_excluded), cmd.replica_id)

    def cycle(self, rcycle: int, stream: bool, totals: bool = True, read_live: bool = False,
              filters: Optional[FilterSpec] = None, replica_id: Optional[str] = None) -> None:
        """Settle against the replica's cycle ``rcycle``, build the next one with the replica's
        ``filters``, export it (unless streamed).  ``read_live``: the replica verifies before it
        commits (``verify``), so the export serves the large files of a copy snapshot from the
        live files, held open, instead of copies.  ``replica_id`` (checked on decode): the
        position the cycle is built against and acknowledged in (source.positions)."""
        if self.built is not None:
            close_deferred(self.built)
        self.served += 1
        self.built = self.settled = None
        mnt = os.path.join(self.workdir, f"m{self.served}")   # a fresh path per cycle: no stale caches
        os.mkdir(mnt)
        self.to_export.clear()
        self.replica_id = replica_id
        self.store = store_for(self.bsrc, replica_id, rcycle)
        settle_source(self.bsrc, rcycle, self.store)
        spec = filters or FilterSpec()
        rescan = prepare_filters(self.bsrc, spec, self.store)
        t_build = time.monotonic()
        self.streamed = stream
        with disk_full_said(self.bsrc):
            b = build_with_hooks(self.bsrc, load_hook_file(self.bsrc), snapshot_kind=self.snapshot_kind,
                                 min_cycle=rcycle + 1, warnings=self.warnings,
                                 on_segment=self.out.say if stream else None, totals=totals,
                                 read_live=read_live and not stream, force_scan=rescan, filters=spec,
                                 store=self.store)
        self.out.say(Built(cycle=b.cycle, base=b.base, entries=b.entries, snapshot=b.provider,
                           change_source=b.change_source, path=os.fsdecode(b.snapshot),
                           build_s=round(time.monotonic() - t_build, 3)))
        self.out.warn(self.warnings)
        self.built = b
        self.to_export.append((b.cycle, mnt))
        if not stream and not self.on_demand:
            self.start_export()

    def settle(self, materialize: bool = False) -> Tuple[List[Dict[str, Any]], List[bytes]]:
        """The served cycle's deferred files, checked once: (entries to read again, paths dropped)."""
        if self.settled is None:
            self.settled = settle_deferred(self.bsrc, self.built, self.warnings, materialize) \
                if self.built else ([], [])
            self.out.warn(self.warnings)
        return self.settled

    def start_export(self) -> None:
        import fuse_export      # (a cycle the replica reads from its directory alone never loads FUSE)

        from discrep.source.export import make_view
        live: Dict[bytes, bytes] = {}
        if self.built is not None and self.built.deferred:
            if self.streamed:       # its replica has read them already: the export serves copies
                self.settle(materialize=True)
            else:                   # read through the export, checked on ``verify``
                live = {p: b"/proc/%d/fd/%d" % (os.getpid(), fd) for p, (_i, _b, fd) in self.built.deferred.items()}
        n, mnt = self.to_export.pop()
        try:
            self.export = fuse_export.BackgroundExport(make_view(self.bsrc, n, live, self.store), mnt).start()
        except (fuse_export.FuseUnavailable, fuse_export.MountError) as e:
            raise FuseUnavailableError(f"cannot mount the export on the source: {e}") from None
        self.out.say(Ready(mountpoint=mnt))

    def end_cycle(self) -> None:
        self.to_export.clear()
        if self.built is not None:
            close_deferred(self.built)           # (settled ones are closed already)
        if self.export is not None:
            stop_export(self.export)
            self.export = None

"""Push mode: one whole cycle from a local source to a remote replica, ``discrep replicate SRC [USER@]HOST:DEST``.

The source host drives everything over ONE paramiko connection (transport.ssh, with the same
OpenSSH configuration, host-key rules, ``--timeout`` and ``--bwlimit`` pacing as a pull):

1. ``discrep replica-agent DEST`` starts on an exec channel (transport.replica_client,
   run.replica_agent) and says ``hello`` with DEST's last committed cycle R and the unix socket
   of its SFTP relay;
2. the source settles against R and builds cycle N > R with its journal, snapshot and hooks
   exactly as a local cycle does (source.hooks.build_with_hooks), then mounts its FUSE export on
   a private mountpoint (source.export.make_view, fuse_export.BackgroundExport);
3. a second exec channel runs ``discrep replica-agent --sftp-relay SOCK`` and the source serves
   the export on it with its own confined read-only SFTP server (transport.sftp_serve: nothing
   outside the export, no writes); ``apply`` N tells the replica agent to mount the export with
   ``sshfs -o passive`` through the relay and patch DEST (replica.sync), as a pull does;
4. ``applied`` N: the replica committed; the source acknowledges N (source.cycles.ack_cycle).

On any failure, Ctrl-C or a dropped connection everything is undone in ``finally``: the relay
channel and the server thread, the export's unmount, EOF to the replica agent (which unmounts,
removes its directory and exits; a dropped connection ends it too), the connection.  The source
keeps the built-but-unacknowledged cycle N and the next cycle settles it; the replica stays at
its last committed cycle.

Thread-safety: runs in the caller's thread; the client's stderr/ping threads and the export
server's thread are described in transport.replica_client.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from typing import Any, Dict, List, Optional

from discrep.core.errors import FuseUnavailableError, TransportError, UsageError, WarningList
from discrep.replica.options import ReplicaOptions
from discrep.protocol.replica_messages import Applied, Apply, PushBye, ReplicaHello, result_of
from discrep.run.options import CycleOptions
from discrep.transport.ssh import Connection, parse_remote, q, resolve

log = logging.getLogger(__name__)


def replica_agent_command(exe: str, dest: str, ropts: ReplicaOptions, timeout: float) -> str:
    """The remote command line of the replica agent (numbers and flags only; rules go in ``apply``)."""
    args: List[str] = [q(exe), "replica-agent", "--timeout", str(float(timeout)), "--keep-last", str(int(ropts.keep_last))]
    if ropts.force:
        args.append("--force")
    if ropts.numeric_ids:
        args.append("--numeric-ids")
    if ropts.nosuid:
        args.append("--nosuid")
    if ropts.keep_within_s:
        args += ["--keep-within", f"{float(ropts.keep_within_s)}s"]
    if ropts.max_delete is not None:
        args += ["--max-delete", str(int(ropts.max_delete))]
    elif ropts.max_delete_pct is not None:
        args += ["--max-delete", f"{float(ropts.max_delete_pct)}%"]
    return " ".join(args + ["--", q(dest)])


def check_push(opts: CycleOptions) -> None:
    """What push mode does not do (yet): refused before anything starts."""
    r = opts.replica
    why = ("a remote SRC" if opts.remote_source else "--every" if opts.every is not None else
           "--dry-run" if r.dry_run else "--checksum" if r.checksum else "--keep" if r.keep_grid else None)
    if why:
        raise UsageError(f"push mode (a remote DEST) does not take {why} yet",
                         hint="run the cycle from the replica host (pull), or leave the option out")


def replicate_push(opts: CycleOptions, warnings: Optional[WarningList] = None) -> Dict[str, Any]:
    """One pushed cycle: connect, start the replica agent, build and export, serve, acknowledge."""
    check_push(opts)
    warnings = warnings if warnings is not None else WarningList()
    t0 = time.monotonic()
    user, host, rdest = parse_remote(opts.dest)
    src = os.path.abspath(opts.src)
    if not os.path.isdir(src):
        raise UsageError(f"source {src} does not exist or is not a directory", hint="check the SRC path")
    from discrep.run.local import need_fuse
    need_fuse()
    cfg = resolve(user, host, opts.ssh.ssh_config)
    cfg.io_timeout = float(opts.ssh.timeout)
    bwlimit = int(opts.ssh.bwlimit or 0)
    exe = opts.ssh.remote_discrep or "discrep"
    conn = Connection(cfg, bwlimit=bwlimit)
    conn.connect()
    log.info("connected in %.2fs", time.monotonic() - t0)
    from discrep.transport.replica_client import ReplicaAgentClient
    client: Optional[ReplicaAgentClient] = None
    try:
        client = ReplicaAgentClient(conn, replica_agent_command(exe, rdest, opts.replica, cfg.io_timeout),
                                    cfg.io_timeout)
        hello = client.expect(ReplicaHello)
        log.info("replica agent ready after %.2fs", time.monotonic() - t0)
        res = _cycle(opts, conn, client, hello, exe, warnings)
        client.send(PushBye())
        client.warnings_into(warnings)
    except (socket.error, EOFError) as e:
        raise TransportError(f"the SSH connection to {cfg.describe()} failed: {e}",
                             hint="the replica stays at its last committed cycle; run again") from None
    finally:
        if client is not None:
            client.close()
        conn.close()
    res.update({"duration_s": round(time.monotonic() - t0, 3), "warnings": len(warnings), "direction": "push",
                "connections": 1, **({"bwlimit": bwlimit} if bwlimit else {})})
    return res


class DirectFiles:
    """The export's big byte aliases opened straight from where they live, skipping the FUSE hop (as a
    pull's DirectDataReader does): ``.discrep/data/<idx>`` from the snapshot, ``.discrep/pack/<k>`` from
    the cycle directory.  Everything else (and anything that cannot be opened so) goes through the
    export.  The manifest is the source's own; paths are opened beneath their directories anyway."""

    def __init__(self, bsrc: bytes, cycle: int, snapshot: bytes) -> None:
        from discrep.core.paths import dec
        from discrep.protocol import layout
        from discrep.protocol.manifest import read_lines
        from discrep.source.cycles import cycle_dir
        self.layout = layout
        cdir = cycle_dir(bsrc, cycle)
        with open(os.path.join(cdir, layout.MANIFEST_FILE), "rb") as f:
            _header, entries = read_lines(f.read())
        self.files: Dict[int, bytes] = {int(e["idx"]): dec(e["path"]) for e in entries
                                        if e.get("op") == "file" and not e.get("live")}
        self.snap_fd = os.open(snapshot, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.cycle_fd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __call__(self, rel: bytes) -> Optional[int]:
        from discrep.core.beneath import open_beneath
        lay = self.layout
        kind, _, name = rel.rpartition(b"/")
        if not name.isdigit() or len(name) > 18:
            return None
        try:
            if kind == lay.CONTROL + b"/" + lay.DATA and int(name) in self.files:
                return open_beneath(self.snap_fd, self.files[int(name)], os.O_RDONLY | os.O_NONBLOCK)
            if kind == lay.CONTROL + b"/" + lay.PACK:
                return open_beneath(self.cycle_fd, lay.PACK_FILE % int(name), os.O_RDONLY)
        except OSError:
            return None
        return None

    def close(self) -> None:
        os.close(self.snap_fd)
        os.close(self.cycle_fd)



def _cycle(opts: CycleOptions, conn: Connection, client: Any, hello: ReplicaHello, exe: str,
           warnings: WarningList) -> Dict[str, Any]:
    """Build, export and serve cycle N; the replica applies it; acknowledge N on the source."""
    import fuse_export

    from discrep.source import cycles
    from discrep.source.export import make_view
    from discrep.source.filtering import prepare_filters
    from discrep.source.hooks import build_with_hooks, load_hook_file
    from discrep.transport.replica_client import ExportServer
    bsrc = os.fsencode(os.path.abspath(opts.src))
    rcycle = hello.cycle
    t0 = time.monotonic()
    if rcycle < 0:
        raise TransportError(f"the replica agent reported cycle {rcycle}")
    spec = opts.replica.filter_spec()
    cycles.settle_source(bsrc, rcycle)
    rescan = prepare_filters(bsrc, spec)
    hooks = opts.hooks if opts.hooks is not None else load_hook_file(bsrc)
    built = build_with_hooks(bsrc, hooks, snapshot_kind=opts.snapshot, min_cycle=rcycle + 1, warnings=warnings,
                             force_scan=rescan, filters=spec)
    t_built = time.monotonic()
    mnt = tempfile.mkdtemp(prefix="discrep-export-")
    try:
        try:
            export = fuse_export.BackgroundExport(make_view(bsrc, built.cycle), mnt).start()
            t_export = time.monotonic()
        except fuse_export.MountError as e:
            raise FuseUnavailableError(f"cannot mount the export: {e}") from None
        direct = DirectFiles(bsrc, built.cycle, built.snapshot)
        try:
            server = ExportServer(conn, f"{q(exe)} replica-agent --sftp-relay {q(hello.socket)}", mnt, direct)
            try:
                client.send(Apply(cycle=built.cycle, filters=spec.wire(), delete_excluded=spec.delete_excluded))
                applied = client.expect(Applied)
                log.info("push cycle %d: build %.2fs, export %.2fs, replica applied in %.2fs", built.cycle,
                         t_built - t0, t_export - t_built, time.monotonic() - t_export)
            finally:
                stuck = server.close()
                if stuck:
                    log.warning("%s", stuck)
        finally:
            direct.close()
            export.stop()
    finally:
        shutil.rmtree(mnt, ignore_errors=True)
    if applied.cycle != built.cycle:
        raise TransportError(f"the replica applied cycle {applied.cycle}, not {built.cycle}")
    cycles.ack_cycle(bsrc, built.cycle)
    return {"cycle": built.cycle, "base": built.base, "change_source": built.change_source,
            "snapshot": built.provider, "entries": built.entries, **result_of(applied.result),
            "transport": "sshfs", "session_cycle": 1}

"""``discrep agent``: the source's side of one remote cycle, on one SSH exec channel.

Each separate remote command costs an SSH session set-up (~0.3 s here), so the
replica runs one agent per cycle and talks to it in JSON lines:

    agent -> {"event": "hello", "state_dir": ".../SRC/.discrep", "dir": ".../export.XXXX"}
    (with --replica-cycle R, or on replica -> {"cmd": "cycle", "replica_cycle": R}:)
    agent -> {"event": "seg", "seg": S, "packs": K, "dir": ...}  (only for a streamed cycle:
              --stream / "stream": true; manifest segment S and packs < K are on disk; seg 0
              also carries the cycle header, the snapshot path and totals -- unless --no-totals /
              "totals": false: then a first copy streams as it walks the tree; see source.build_cycle)
    agent -> {"event": "built", "cycle": N, "base": B, ...}     (journal cut, snapshot, manifest)
    agent -> {"event": "ready", "mountpoint": ".../export.XXXX/m<k>"}  (FUSE export mounted; a
              streamed cycle is exported only on replica -> {"cmd": "export"}: its replica reads
              the cycle and snapshot directories directly and may never need the export)
    replica -> {"cmd": "verify"}            (a streamed cycle, once its replica read every file:
              its large files were read live) agent checks they did not change ->
              {"event": "verified", "redo": [entry, ...], "gone": [path, ...]}: files that changed,
              copied now to the cycle directory as ``redo-<idx>`` (read them again), and files
              dropped from the cycle (gone, or still changing: left for the next cycle)
    replica -> {"cmd": "ack", "cycle": N}   agent unmounts, -> {"event": "acked", "cycle": N}
    replica -> {"cmd": "done"}              (the cycle failed) agent unmounts, -> {"event": "ended"}
    replica -> {"cmd": "bye"} or EOF       agent unmounts the export, removes its dir, exits 0
    agent -> {"event": "error", "error": ..., "kind": ..., "exit_code": ...}  on failure

One agent can serve many cycles (continuous mode keeps the SSH session and the
sshfs mount up between cycles); each cycle's export gets a fresh mountpoint.

"hello" comes before the build, so the replica can mount ``state_dir`` with sshfs
while the snapshot is being taken.  A dropped connection (EOF, SIGHUP, SIGPIPE)
is cleaned up like "bye": the export is unmounted, the built cycle stays for
the next run to settle.  Warnings go to stderr as ``discrep: warning: ...``.

Thread-safety: single-threaded (the export is served by a child process).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Dict, Optional

from discrep.core.errors import Error, FuseUnavailableError, SourceError, WarningList


def _say(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def run_agent(src: str, replica_cycle: Optional[int], snapshot_kind: str, warnings: WarningList,
              stream: bool = False, totals: bool = True) -> int:
    import fuse_export

    from discrep.source.export import make_view
    from discrep.source.build import settle_source
    from discrep.core.paths import enc
    from discrep.source.build import BuiltCycle, ack_cycle, build_cycle, close_deferred, settle_deferred

    def hang_up(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, hang_up)
    export: Optional[Any] = None
    workdir: Optional[str] = None
    try:
        try:
            real = os.path.realpath(src)
            if not os.path.isdir(real):
                raise SourceError(f"source {src} does not exist or is not a directory", hint="check the path")
            state = os.path.join(real, ".discrep")
            os.makedirs(state, exist_ok=True)
            workdir = tempfile.mkdtemp(prefix="export.", dir=state)
            bsrc = os.fsencode(real)
            _say({"event": "hello", "state_dir": state, "dir": workdir})
            served = 0

            to_export: list = []                    # (cycle, mountpoint) built, not exported yet
            built: Optional[BuiltCycle] = None      # the cycle being served
            settled: Optional[tuple] = None         # its deferred files, checked (redo, gone)

            def say_warnings() -> None:
                for w in warnings:
                    print(f"discrep: warning: {w}", file=sys.stderr, flush=True)
                warnings.items.clear()

            def settle(materialize: bool = False) -> tuple:
                nonlocal settled
                if settled is None:
                    settled = settle_deferred(bsrc, built, warnings, materialize) if built else ([], [])
                    say_warnings()
                return settled

            def start_export() -> None:
                nonlocal export
                if built is not None and built.deferred:   # the export serves real files only
                    settle(materialize=True)
                n, mnt = to_export.pop()
                try:
                    export = fuse_export.BackgroundExport(make_view(bsrc, n), mnt).start()
                except (fuse_export.FuseUnavailable, fuse_export.MountError) as e:
                    raise FuseUnavailableError(f"cannot mount the export on the source: {e}") from None
                _say({"event": "ready", "mountpoint": mnt})

            def cycle(rcycle: int, stream: bool, totals: bool = True) -> None:
                nonlocal served, built, settled
                if built is not None:
                    close_deferred(built)
                served += 1
                built = settled = None
                mnt = os.path.join(workdir, f"m{served}")   # a fresh path per cycle: no stale caches
                os.mkdir(mnt)
                to_export.clear()
                settle_source(bsrc, rcycle)
                t_build = time.monotonic()
                b = build_cycle(bsrc, snapshot_kind=snapshot_kind, min_cycle=rcycle + 1, warnings=warnings,
                                on_segment=(lambda m: _say(dict(m, event="seg"))) if stream else None,
                                totals=totals)
                _say({"event": "built", "cycle": b.cycle, "base": b.base, "entries": b.entries,
                      "snapshot": b.provider, "change_source": b.change_source, "path": os.fsdecode(b.snapshot),
                      "build_s": round(time.monotonic() - t_build, 3)})
                say_warnings()
                built = b
                to_export.append((b.cycle, mnt))
                if not stream:
                    start_export()

            def end_cycle() -> None:
                nonlocal export
                to_export.clear()
                if built is not None:
                    close_deferred(built)           # (settled ones are closed already)
                if export is not None:
                    export.stop()
                    export = None

            if replica_cycle is not None:
                cycle(replica_cycle, stream, totals)
            for line in sys.stdin:
                try:
                    cmd = json.loads(line)
                except ValueError:
                    continue
                what = cmd.get("cmd")
                try:
                    if what == "ack":
                        end_cycle()
                        ack_cycle(bsrc, int(cmd["cycle"]))
                        _say({"event": "acked", "cycle": int(cmd["cycle"])})
                    elif what == "export":           # a streamed cycle's replica needs the export
                        if export is None:
                            if not to_export:
                                raise SourceError("no built cycle to export")
                            start_export()
                        else:
                            _say({"event": "ready", "mountpoint": export.mountpoint})
                    elif what == "verify":           # a streamed cycle's files were read: did any change?
                        redo, gone = settle()
                        _say({"event": "verified", "redo": redo, "gone": [enc(p) for p in gone]})
                    elif what == "done":             # the cycle failed on the replica: just end it
                        end_cycle()
                        _say({"event": "ended"})
                    elif what == "cycle":            # continuous mode: the next cycle, same session
                        end_cycle()
                        cycle(int(cmd["replica_cycle"]), bool(cmd.get("stream")), bool(cmd.get("totals", True)))
                    elif what == "bye":
                        break
                except Error as e:
                    end_cycle()
                    _say({"event": "error", "error": str(e), "kind": type(e).__name__, "exit_code": e.exit_code})
            return 0
        except Error as e:
            _say({"event": "error", "error": str(e), "kind": type(e).__name__, "exit_code": e.exit_code})
            return e.exit_code
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    finally:
        if export is not None:
            export.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

"""``discrep watch ROOT``: journal every change under ROOT as it happens (foreground)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any, Dict

from discrep.core.errors import WarningList
from discrep.core.paths import join

log = logging.getLogger(__name__)

NAME = "watch"
HELP = "journal every change under ROOT as it happens (foreground; Ctrl-C stops)"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--backend", default="auto", choices=["auto", "fanotify", "inotify"],
                    help="change source (default auto: fanotify filesystem mark when permitted, else inotify)")
    sp.add_argument("--no-catch-up", dest="catch_up", action="store_false",
                    help="do not close journal gaps (the start, an overflow) with a background scan of the "
                         "watcher's own; the next cycle scans instead")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.journal.watcher import Watcher
    from discrep.source.catchup import CatchUp
    w = Watcher(a.root, a.backend)
    w.start()
    # the gaps the watcher opens (its start, an overflow) are closed by its own scan, in the background
    catch = CatchUp(w).start() if a.catch_up else None
    old = {}
    if threading.current_thread() is threading.main_thread():
        def on_sig(signum, frame):
            w.stop()
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, on_sig)
    log.warning("watching %s with %s (journal %s); stop with Ctrl-C", os.fsdecode(w.root), w.backend.name,
                os.fsdecode(join(w.state_dir, b"journal.db")))
    t0 = time.monotonic()
    backend = w.backend.name
    try:
        w.run()
    finally:
        if catch is not None:
            catch.stop()
        w.close()
        for s, h in old.items():
            signal.signal(s, h)
    return {"root": os.fsdecode(w.root), "backend": backend, "events": w.events, "rows": w.rows,
            "gaps": len(w.gaps), "duration_s": round(time.monotonic() - t0, 3)}

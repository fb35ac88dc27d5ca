"""``discrep export SRC MOUNTPOINT``: serve a built cycle read-only over FUSE (foreground)."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict

from discrep.core.errors import FuseUnavailableError, UsageError, WarningList

log = logging.getLogger(__name__)

NAME = "export"
HELP = "serve a built cycle read-only over FUSE (foreground)"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("src", metavar="SRC")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--cycle", type=int, help="cycle to export (default: the last built one)")
    sp.add_argument("--allow-other", action="store_true", help="let other users read the mount (sshfs as non-root)")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    import fuse_export

    from discrep.source.cycles import pending_cycle
    from discrep.source.export import make_view
    src = os.fsencode(os.path.abspath(a.src))
    n = a.cycle
    if n is None:
        p = pending_cycle(src)
        if p is None:
            raise UsageError("no built cycle to export", hint="run 'discrep snapshot SRC' first")
        n = p.cycle
    view = make_view(src, n)
    if not os.path.isdir(a.mountpoint):
        raise UsageError(f"mount point {a.mountpoint} is not a directory")
    log.warning("exporting cycle %d of %s on %s (read-only); stop with Ctrl-C or 'fusermount3 -u %s'",
                n, a.src, a.mountpoint, a.mountpoint)
    try:
        fuse_export.serve(view, a.mountpoint, allow_other=a.allow_other)
    except fuse_export.FuseUnavailable as e:
        raise FuseUnavailableError(str(e)) from None
    return {"cycle": n, "exported": a.mountpoint}

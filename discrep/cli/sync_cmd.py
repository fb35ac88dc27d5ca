"""``discrep sync MOUNTPOINT DEST``: apply the cycle exported at MOUNTPOINT to DEST."""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict

from discrep.cli import common
from discrep.core.errors import UsageError, WarningList

NAME = "sync"
HELP = "apply the cycle exported at MOUNTPOINT to DEST"


def register(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("dest", metavar="DEST")
    common.add_replica_args(sp, "allow a first cycle into a non-empty DEST")


def run(a: argparse.Namespace, warnings: WarningList) -> Dict[str, Any]:
    from discrep.replica.sync import sync
    from discrep.run.local import prepare_dest
    from discrep.transport.mount_reader import MountReader
    if not os.path.isfile(os.path.join(a.mountpoint, ".discrep", "cycle")):
        raise UsageError(f"{a.mountpoint} does not look like a discrep export (no .discrep/cycle)",
                         hint="mount the export there first ('discrep export' or sshfs)")
    opts = common.replica_options(a)
    prepare_dest(a.dest, force=opts.force)
    reader = MountReader(a.mountpoint)
    try:
        st = sync(reader, os.fsencode(os.path.abspath(a.dest)), opts, warnings=warnings,
                  progress=common.progress_printer(a))
    finally:
        reader.close()
    return {"cycle": st.cycle, "base": st.base, "files_changed": st.files_changed,
            "files_deleted": st.files_deleted, "files_renamed": st.files_renamed, "files_repaired": st.files_repaired,
            "bytes_transferred": st.bytes_transferred, "bytes_written": st.bytes_written,
            "duration_s": round(st.duration_s, 3), "already_committed": st.already_committed}


def show(a: argparse.Namespace, res: Dict[str, Any]) -> None:
    print(f"cycle {res['cycle']}: {res['files_changed']} files changed, {res['bytes_transferred']} bytes "
          f"read, {res['bytes_written']} written"
          + (f", {res['files_repaired']} repaired" if res.get("files_repaired") else "")
          + (" (already committed)" if res["already_committed"] else ""))

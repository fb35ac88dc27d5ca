"""Reading a built cycle without its export until something needs the export.

``CycleDirReader(sftp, cycle_dir, make_full)`` (``sftp``: the session's SFTP client, left open)
satisfies the replica's ``Reader`` protocol
(structurally, as ``MountReader`` does).  The cycle description (``.discrep/cycle``: the
manifest's header line), the manifest and the packs of small files are read straight from
the source's cycle directory (``<state dir>/cycles/<N>``: ``manifest.zst``, ``pack-<k>``)
through an ``SftpReader`` on the session's one connection -- no FUSE export on the source,
no sshfs mount on the replica.  Any other read (a signature, a file's data, a range batch,
a changed-block map) first calls ``make_full()`` once, which exports the cycle and mounts
it (run.remote), and goes through the reader it returns from then on.  So a cycle that
changed nothing, or only small files, never waits for an export or a mount.

Names crossing here are built from ``protocol.layout`` constants and validated integers;
the cycle directory is a path the agent reported below its state directory.

Thread-safety: every method may be called from several threads; the full reader is made
once, under a lock (concurrent callers wait for it); the SFTP reader serializes its calls.
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from discrep.core.errors import ManifestError
from discrep.protocol import layout
from discrep.protocol.manifest import MAX_MANIFEST_BYTES, read_lines
from discrep.transport.sftp_reader import SftpReader

PACK_PREFIX = layout.CONTROL + b"/" + layout.PACK + b"/"


def cycle_file(rel: bytes) -> Optional[bytes]:
    """The name in the cycle directory of reader file ``rel`` (None: only the export has it)."""
    if rel == layout.MANIFEST_REL:
        return layout.MANIFEST_FILE
    if rel.startswith(PACK_PREFIX):
        k = rel[len(PACK_PREFIX):]
        if k.isdigit() and len(k) < 12:
            return layout.PACK_FILE % int(k)
    return None


class CycleDirReader:
    """A cycle's reader that reads its cycle directory first and exports on demand (module doc)."""

    cycle_dir: Optional[bytes] = None   # (for a second applying process: streamed cycles only)

    def __init__(self, sftp: Any, cycle_dir: str, make_full: Callable[[], Any], *, workers: int = 8):
        self.small = SftpReader(sftp, cycle_dir, owns_sftp=False)     # the session's SFTP: it closes it
        self._make_full = make_full
        self._full: Optional[Any] = None
        self._lock = threading.Lock()
        self._files: Tuple[Dict[int, bytes], Iterable[int]] = ({}, ())
        self._manifest: Optional[bytes] = None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="discrep-read")

    @property
    def exported(self) -> bool:
        """Whether a read needed the export."""
        return self._full is not None

    @property
    def bytes_read(self) -> int:
        full = self._full
        return self.small.bytes_read + (full.bytes_read if full is not None else 0)

    def add_bytes_read(self, n: int) -> None:
        self.small.add_bytes_read(n)

    def stalled_for(self) -> float:
        """How long a read through the export's mount has waited (run.remote's stall watch; reads
        of the cycle directory go over the SSH connection, whose keepalives watch them)."""
        full = self._full
        stalled = getattr(full, "stalled_for", None)
        return stalled() if stalled is not None else 0.0

    def know_files(self, paths: Dict[int, bytes], live: Iterable[int] = ()) -> None:
        self._files = (paths, list(live))
        if self._full is not None:
            self._full.know_files(paths, self._files[1])

    def full(self) -> Any:
        """The export's reader, made on first need."""
        with self._lock:
            if self._full is None:
                full = self._make_full()
                full.know_files(*self._files)
                self._full = full
            return self._full

    def _manifest_bytes(self) -> bytes:
        if self._manifest is None:
            self._manifest = self.small.read_all(layout.MANIFEST_FILE)
        return self._manifest

    def read_all(self, rel: bytes, max_size: int = MAX_MANIFEST_BYTES) -> bytes:
        if rel == layout.CYCLE_REL:          # the export serves the manifest's header line
            header, _ = read_lines(self._manifest_bytes())
            data = json.dumps(header).encode() + b"\n"
            if len(data) > max_size:
                raise ManifestError(f"the cycle description is larger than {max_size} bytes")
            return data
        if rel == layout.MANIFEST_REL and self._manifest is not None:
            data, self._manifest = self._manifest, None      # read once, for the header and for this
            if len(data) > max_size:
                raise ManifestError(f"the manifest is larger than {max_size} bytes")
            return data
        name = cycle_file(rel)
        if name is not None:
            return self.small.read_all(name, max_size)
        return self.full().read_all(rel, max_size)

    def pread(self, rel: bytes, size: int, offset: int) -> bytes:
        name = cycle_file(rel)
        if name is not None:
            return self.small.pread(name, size, offset)
        return self.full().pread(rel, size, offset)

    def preads(self, reqs: Sequence[Tuple[bytes, int, int]]) -> List[bytes]:
        if all(cycle_file(r[0]) is not None for r in reqs):
            return self.small.preads([(cycle_file(r[0]) or b"", r[1], r[2]) for r in reqs])
        return list(self.pool.map(lambda r: self.pread(r[0], r[2], r[1]), reqs))

    def copy_ranges(self, rel: bytes, ranges: Iterable[Tuple[int, int]], out_fd: int,
                    on_data: Optional[Callable[[int, bytes], None]] = None) -> int:
        name = cycle_file(rel)
        if name is not None:
            return self.small.copy_ranges(name, ranges, out_fd, on_data)
        return self.full().copy_ranges(rel, ranges, out_fd, on_data)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        try:
            if self._full is not None:
                self._full.close()
        finally:
            self.small.close()

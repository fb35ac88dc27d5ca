"""The figures of one applied cycle (``SyncStats``): what ``replica.sync`` returns; ``Progress``.

Every part of the applying cycle adds to the one SyncStats the cycle owns; the catalog
stores it with the committed cycle (``asdict``), and ``sync.result_fields`` puts it into a
cycle's result.

Thread-safety: a plain value, changed by the applying thread only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class SyncStats:
    cycle: int = 0
    base: int = 0
    files_changed: int = 0
    files_deleted: int = 0
    files_renamed: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_transferred: int = 0
    bytes_written: int = 0
    files_unchanged: int = 0
    files_meta_changed: int = 0  # files whose content was unchanged but metadata was not
    files_repaired: int = 0      # --checksum: files whose bytes in DEST were not what the catalog recorded
    already_committed: bool = False
    history_records: int = 0
    history_bytes: int = 0
    duration_s: float = 0.0
    streamed: bool = False       # applied while the source was still building it (replica.stream)
    worker_segments: int = 0     # of those, manifest segments a second process applied (replica.worker)
    consistency: str = ""        # the source's snapshot hooks: "app", "crash-fallback" (pre hook failed) or ""


# progress(files done, files in all, bytes read, bytes of files done, bytes of files in all)
Progress = Callable[[int, int, int, int, int], None]

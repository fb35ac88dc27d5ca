"""Typed options of the replica side (history retention, owners, first-cycle safety, filters).

Built by the CLI (``replicate``, ``sync``) and, later, by the jobs file; library code takes
these, never an argparse namespace.

Thread-safety: immutable values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:                          # (the rule engine is imported when a cycle needs it)
    from discrep.protocol.filterspec import FilterSpec


@dataclass(frozen=True)
class ReplicaOptions:
    """How the replica applies and keeps cycles."""
    keep_last: int = 10                    # recovery points to keep history for
    keep_within_s: Optional[float] = None  # also keep points younger than this
    keep_grid: Tuple[Tuple[int, float], ...] = ()   # newest point per period: ((24, 3600.0), ...) (retention)
    numeric_ids: bool = False              # keep owner numbers (default: map by name, like rsync)
    force: bool = False                    # allow a first cycle into a non-empty DEST
    max_delete: Optional[int] = None       # refuse a cycle deleting more entries (None: no limit)
    max_delete_pct: Optional[float] = None  # ... or more than this percentage of the replica's entries
    checksum: bool = False                 # compare DEST's actual bytes, not the catalog's signatures
    dry_run: bool = False                  # say what the cycle would do; change nothing
    max_file_size: int = 1 << 46           # refuse a cycle declaring a larger file (bounds memory and space);
    #                                        protocol.manifest.MAX_FILE_SIZE, not imported here (CLI start-up)
    nosuid: bool = False                   # strip setuid/setgid bits and file capabilities on the replica
    filters: Optional["FilterSpec"] = None  # rsync rules selecting what is replicated (None: none)

    def filter_spec(self) -> "FilterSpec":
        """``filters``, or the empty spec (everything replicated, nothing deleted as excluded)."""
        from discrep.protocol.filterspec import FilterSpec
        return self.filters if self.filters is not None else FilterSpec()

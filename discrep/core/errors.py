"""One error tree for discrep; every class carries the process exit code.

Exit codes: 0 ok, 1 finished with warnings, 2 generic error, 3-99 specific
errors listed below.  The CLI has the single top-level handler that turns an
``Error`` into its one-line message and exit code; library code raises, never
exits or prints.  Per-file problems that do not stop a cycle are collected as
``Warning`` records (see ``WarningList``) and make the run exit 1.

Thread-safety: the classes are immutable values; ``WarningList`` is guarded by
a lock so worker threads may add to it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import List, Optional

EXIT_OK = 0
EXIT_WARNINGS = 1
EXIT_ERROR = 2


class Error(Exception):
    """Base of every discrep error.  ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_ERROR
    #: a short hint that tells the user what to do; appended to the message
    hint: Optional[str] = None

    def __init__(self, message: str, *, hint: Optional[str] = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:  # one line: message, then the hint
        msg = super().__str__()
        return f"{msg} ({self.hint})" if self.hint else msg


class UsageError(Error):
    """Wrong arguments: bad paths, DEST inside SRC, unknown options."""

    exit_code = 3


class SourceError(Error):
    """The source tree is missing, unreadable, or changed in a way we cannot capture."""

    exit_code = 4


class DestinationError(Error):
    """The replica directory cannot be written, or its state is not what we expect."""

    exit_code = 5


class UnsafePathError(Error):
    """A manifest or signature path is absolute, has '..', NUL, or would leave DEST."""

    exit_code = 6


class ManifestError(Error):
    """The export's manifest or signatures are malformed or do not fit the replica's state."""

    exit_code = 7


class FuseUnavailableError(Error):
    """No FUSE on this machine (no /dev/fuse, no libfuse, no fusermount3)."""

    exit_code = 8
    hint = "install fuse3 (apt-get install fuse3) and make sure /dev/fuse exists"


class SnapshotError(Error):
    """A snapshot could not be taken, found, or released."""

    exit_code = 9


class HookFailedError(SnapshotError):
    """A pre_snapshot hook failed or timed out and the job wants no crash-consistent point instead."""

    exit_code = 9


class JournalError(Error):
    """The journal is unreadable or has a gap that a catch-up scan must close."""

    exit_code = 10


class TransportError(Error):
    """SSH connection, authentication, host key or remote command failure."""

    exit_code = 11


class HostKeyError(TransportError):
    """The remote host key is unknown or changed."""

    exit_code = 12


class LiveReadError(TransportError):
    """A file the source let the replica read live could not be read whole (it changed or went
    away meanwhile); the source's check after the reads (agent ``verify``) says what became of it."""

    exit_code = 11


class LiveChangedError(TransportError):
    """Files the replica read live (an incremental cycle's large files, not copied first) changed
    while it read them: the cycle is rolled back and run again with those files copied."""

    exit_code = 11


class LockedError(Error):
    """Another discrep run holds the lock on this DEST or SRC."""

    exit_code = 13


class CycleMismatchError(Error):
    """The export's base cycle is not the replica's last committed cycle."""

    exit_code = 14


class RecoveryNeededError(Error):
    """The replica holds an interrupted cycle; ``discrep recover DEST`` must run first."""

    exit_code = 15


class HistoryCorruptError(Error):
    """A history record failed its checksum and was not used."""

    exit_code = 16


class VerifyMismatchError(Error):
    """``discrep verify`` found differences."""

    exit_code = 17


class DiskFullError(DestinationError):
    """The replica filesystem ran out of space; the cycle was rolled back."""

    exit_code = 18
    hint = "free space on the replica filesystem, then run the same command again"


class SourceDiskFullError(SourceError):
    """The source filesystem ran out of space while a cycle was built (its snapshot copy, manifest
    or catalog); the cycle was dropped, the replica not touched."""

    exit_code = 20
    hint = "free space on the source filesystem (a copy snapshot needs room for the changed files), then run again"


class MaxDeleteError(Error):
    """A cycle would delete more entries than ``--max-delete`` allows; nothing was changed."""

    exit_code = 19


class Interrupted(Error):
    """SIGINT/SIGTERM stopped the run; the replica stays at its last committed cycle."""

    exit_code = 130


@dataclass
class Warning_:
    """One per-file problem that did not stop the cycle."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class WarningList:
    """Thread-safe collector of per-file warnings."""

    items: List[Warning_] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, path: str, message: str) -> None:
        with self._lock:
            self.items.append(Warning_(path, message))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(list(self.items))

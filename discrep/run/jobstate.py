"""The service's per-job state: one small JSON file in the state directory.

``discrep daemon`` keeps, per job of the jobs file, when its last cycle started and ended, the last
success, the last cycle's figures and result, the last error, the failure count and the next run
(``JobState``), in ``STATE_DIR/state.json`` (default state directory ``/var/lib/discrep``, mode
0700).  ``discrep status -c FILE`` reads it.  Written atomically: a temporary file in the same
directory, fsync, rename, fsync of the directory -- a reader sees the old file or the new one,
and a crash leaves one of them.

Times are Unix seconds (floats).  ``last_success`` is when the last good cycle (exit 0 or 1)
ended; ``source_time`` is the snapshot time of the replica's newest committed cycle (what the lag
and the RPO are measured against); ``first_seen`` is when the daemon first knew the job (the lag of
a job that never succeeded counts from there, so it cannot stay silent).

Thread-safety: plain functions and a value class; the daemon writes from its main thread only.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

from discrep.core.errors import UsageError

DEFAULT_STATE_DIR = "/var/lib/discrep"
STATE_FILE = "state.json"
VERSION = 1
RESULTS = ("ok", "warning", "error")       # how a cycle ended (the label of discrep_cycles_total)


@dataclass
class JobState:
    """What the daemon knows about one job."""
    first_seen: float = 0.0
    last_start: Optional[float] = None
    last_end: Optional[float] = None
    last_status: Optional[str] = None             # ok | warning | error | interrupted
    last_result: Optional[Dict[str, Any]] = None  # the last finished cycle's figures
    last_success: Optional[float] = None
    source_time: Optional[float] = None
    last_error: Optional[str] = None
    last_error_time: Optional[float] = None
    consecutive_failures: int = 0
    cycles: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in RESULTS})
    next_run: Optional[float] = None
    running: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "JobState":
        """Tolerant: unknown keys are ignored, missing ones take their defaults."""
        names = {f.name for f in fields(cls)}
        st = cls(**{k: v for k, v in d.items() if k in names})
        st.cycles = {r: int((st.cycles or {}).get(r, 0)) for r in RESULTS}
        return st


def ensure_dir(path: str) -> str:
    """Create the state directory (mode 0700) or tighten an existing one to 0700; its absolute path."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as e:
        raise UsageError(f"cannot use state directory {path}: {e.strerror}",
                         hint="run as root, or choose one with --state-dir") from None
    return path


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by ``data`` atomically: temp file in the same directory, fsync, rename."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=d)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(state_dir: str, jobs: Dict[str, JobState], extra: Dict[str, Any]) -> None:
    doc = dict(extra, version=VERSION, jobs={n: s.to_dict() for n, s in sorted(jobs.items())})
    write_atomic(state_path(state_dir), (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())


def load(state_dir: str) -> Dict[str, Any]:
    """The state file as a dict with ``jobs`` as ``JobState`` values; an empty state when there is
    none yet.  A damaged file counts as none (the daemon rewrites it; nothing in it is precious)."""
    try:
        with open(state_path(state_dir), "rb") as f:
            doc = json.loads(f.read())
        if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), dict):
            raise ValueError("not a state document")
        jobs = {str(n): JobState.from_dict(d) for n, d in doc["jobs"].items() if isinstance(d, dict)}
    except FileNotFoundError:
        return {"jobs": {}}
    except PermissionError:
        raise UsageError(f"cannot read the daemon's state in {state_dir}: permission denied",
                         hint="run as root (the state directory is 0700)") from None
    except (OSError, ValueError, TypeError):
        return {"jobs": {}, "damaged": True}
    return dict(doc, jobs=jobs)

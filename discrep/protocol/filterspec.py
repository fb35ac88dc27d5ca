"""A replica's filter settings as a cycle carries and records them; reading dir-merge files safely.

Role: ``FilterSpec`` pairs the replica's ``FilterRules`` (protocol.filters) with its
``--delete-excluded``.  Filters belong to the replica: it sends its spec to the source with
every cycle (``wire``: the rules' JSON text in the agent's ``cycle`` command, validated and
bounded by ``FilterSpec.from_wire`` on the source); the source applies the rules to its scan
and journal and records the spec in the cycle (``record()``: in ``cycle.json``'s header, which
the replica checks and keeps in its catalog, and in the source catalog's cycle row, which the
next build compares with to notice a rule change).  ``beneath_reader`` reads per-directory merge
files strictly beneath a directory fd (no symlink followed anywhere on the way), for either side.

Thread-safety: immutable values; a reader is a pure function of its (caller-owned) fd.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from discrep.core.errors import UsageError
from discrep.protocol.filters import MAX_JSON, FilterRules, MergeReader, read_rule_fd


@dataclass(frozen=True)
class FilterSpec:
    """The replica's rules and whether excluded files are deleted from it (rsync's --delete-excluded)."""
    rules: FilterRules = field(default_factory=FilterRules)
    delete_excluded: bool = False

    @property
    def active(self) -> bool:
        """Whether any rule selects anything (an empty rule list selects everything)."""
        return not self.rules.is_empty()

    def wire(self) -> Optional[str]:
        """The rules as they travel to the source agent (None: no rules)."""
        return self.rules.to_json() if self.active else None

    @classmethod
    def from_wire(cls, rules_json: Optional[str], delete_excluded: bool) -> "FilterSpec":
        """The spec a replica sent (untrusted: size-bounded and validated, UsageError otherwise)."""
        if rules_json is None:
            return cls(FilterRules(), bool(delete_excluded))
        if len(rules_json) > MAX_JSON:
            raise UsageError(f"the replica sent filter rules larger than {MAX_JSON} bytes")
        return cls(FilterRules.from_json(rules_json), bool(delete_excluded))

    def record(self) -> Dict[str, Any]:
        """What a cycle records of the rules it used (JSON-able)."""
        return {"rules": self.rules.to_json(), "delete_excluded": self.delete_excluded}

    @classmethod
    def from_record(cls, rec: Any) -> "FilterSpec":
        """The spec a cycle recorded (None or missing: no rules, as before filters existed)."""
        if not isinstance(rec, dict):
            return cls()
        text = rec.get("rules")
        return cls(FilterRules.from_json(text) if isinstance(text, str) else FilterRules(),
                   rec.get("delete_excluded") is True)


def beneath_reader(root_fd: int) -> MergeReader:
    """A ``read_merge`` for the tree of directory fd ``root_fd``: a regular file's bytes; None when
    absent or reached through a symlink (never followed); b"" for another file type (rsync reads
    a directory as empty).  A file over MAX_RULE_FILE raises UsageError."""
    from discrep.core.beneath import EscapeError, open_beneath   # (ctypes: not at CLI start-up)

    def read(dir_rel: bytes, name: bytes) -> Optional[bytes]:
        rel = dir_rel + b"/" + name if dir_rel else name
        try:
            fd = open_beneath(root_fd, rel, os.O_RDONLY | os.O_NONBLOCK)
        except EscapeError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
        return read_rule_fd(fd, repr(os.fsdecode(rel)))
    return read

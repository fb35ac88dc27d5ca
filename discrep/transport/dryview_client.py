"""``RemoteSourceView``: SRC on another host as a dry run sees it, through the dry-run agent.

Role: the remote implementation of ``protocol.sourceview.SourceView``.  It starts ``discrep agent
--dry-run SRC`` on an exec channel of the session's one SSH connection (AgentClient: heartbeats,
``--timeout``, errors mapped; ``--bwlimit`` paces the connection), sends the replica's rules
(``dry-walk``) and yields the entries the agent streams, then asks it to sign the files the
replica needs, a window of requests in flight at a time (source.dryview has the protocol).

The source is untrusted: every batch is checked by ``DryEntries.parsed`` (relative paths, types,
ranges), and here the walk must be in strictly increasing manifest order (no duplicates), every
entry's parent must be a directory the walk said before, the count must match ``dry-walked`` and
stay below MAX_DRY_ENTRIES, no line may exceed MAX_DRY_LINE; every answer must name the file asked
about, in order, with counts in range (``DrySigned.answer``).

Thread-safety: used by one thread (AgentClient's helper threads aside).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Set

from discrep.core.errors import ManifestError
from discrep.core.paths import parent
from discrep.protocol.agent_messages import (HINT, MAX_DRY_ENTRIES, MAX_DRY_LINE, Bye, DryEntries, DrySign,
                                             DrySigned, DryWalk, DryWalked)
from discrep.protocol.filterspec import FilterSpec
from discrep.protocol.sourceview import SignAnswer, SignRequest, SrcEntry
from discrep.transport.agent_client import DEFAULT_TIMEOUT, AgentClient
from discrep.transport.ssh import Connection, q

WINDOW = 32          # sign requests in flight


def dry_agent_command(exe: str, src: str, timeout: float) -> str:
    return f"{q(exe)} agent --dry-run --timeout {float(timeout)} -- {q(src)}"


def manifest_key(path: bytes) -> bytes:
    """The walk's order (core.walk): a directory's subtree right after it."""
    return path.replace(b"/", b"\0")


class RemoteSourceView:
    """The dry-run agent on ``conn`` serving ``src`` with the replica's ``spec`` (see module doc)."""

    def __init__(self, conn: Connection, exe: str, src: str, spec: Optional[FilterSpec] = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.spec = spec or FilterSpec()
        self.agent = AgentClient(conn, exe, src, None, "auto", timeout=timeout,
                                 command=dry_agent_command(exe, src, timeout))
        self.agent.max_line = MAX_DRY_LINE

    def entries(self) -> Iterator[SrcEntry]:
        self.agent.send(DryWalk(filters=self.spec.wire(), delete_excluded=self.spec.delete_excluded))
        dirs: Set[bytes] = {b""}
        last: Optional[bytes] = None
        n = 0
        while True:
            ev = self.agent.expect_any((DryEntries, DryWalked))
            if isinstance(ev, DryWalked):
                if ev.count != n:
                    raise ManifestError(f"the source's dry walk said {n} entries but counted {ev.count!r:.20}",
                                        hint=HINT)
                return
            for e in ev.parsed():
                n += 1
                if n > MAX_DRY_ENTRIES:
                    raise ManifestError(f"the source's dry walk has more than {MAX_DRY_ENTRIES} entries", hint=HINT)
                key = manifest_key(e.path)
                if last is not None and key <= last:
                    raise ManifestError("the source's dry walk is out of order or repeats a path", hint=HINT)
                if parent(e.path) not in dirs:
                    raise ManifestError("the source's dry walk names an entry outside the directories it said",
                                        hint=HINT)
                last = key
                if e.is_dir:
                    dirs.add(e.path)
                yield e

    def sign(self, requests: List[SignRequest]) -> List[SignAnswer]:
        answers: List[SignAnswer] = []
        sent = 0
        while len(answers) < len(requests):
            while sent < len(requests) and sent - len(answers) < WINDOW:
                self.agent.send(DrySign.of(requests[sent]))
                sent += 1
            answers.append(self.agent.expect(DrySigned).answer(requests[len(answers)]))
        return answers

    def close(self) -> None:
        try:
            self.agent.send(Bye())
        except Exception:  # the channel may be gone: close() copes
            pass
        self.agent.close()

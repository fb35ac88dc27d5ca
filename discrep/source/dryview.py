"""The source's side of ``replicate -n``: SRC as it is now, read-only (``LocalSourceView``), and the
agent's dry-run mode that serves it to a remote replica (``serve_dry_run``, ``discrep agent
--dry-run``).

``LocalSourceView`` walks SRC with the replica's ``FilterSpec`` (core.walk with SourceFilter:
excluded directories never descended, dir-merge files read beneath SRC), yields one
``SrcEntry`` per object (lstat, symlink target, xattrs digest) and answers sign requests
(protocol.sourceview.sign_answer), opening each file strictly beneath SRC without following
symlinks.  Nothing here writes: SRC/.discrep is neither created nor read (no journal cut, no
catalog, no snapshot).

The dry-run agent speaks the agent protocol's dry-run messages (protocol.agent_messages):

    replica -> dry-walk {filters, delete_excluded}    (the replica's rules: bounded, validated)
    agent   -> dry-entries {entries: [...]} ...        (batches of at most MAX_DRY_BATCH)
    agent   -> dry-walked {count: N}
    replica -> dry-sign {path, size, block_size, factor, fine?}   (only files the walk said)
    agent   -> dry-signed {path, whole, differ}
    replica -> bye, or EOF: the agent exits 0
    agent   -> error {...}  on failure; alive every timeout/4 s with --timeout

The replica is untrusted too: its lines are bounded (MAX_DRY_LINE), its paths checked, and it
may only have files signed that the walk reported as regular files.

Thread-safety: single-threaded but for the agent's heartbeat thread (AgentOutput).
"""
from __future__ import annotations

import logging
import os
import select
import stat as statmod
from typing import Iterator, List, Optional, Set

from discrep.core.errors import Error, ManifestError, SourceError, TransportError, WarningList
from discrep.core.paths import join
from discrep.core.walk import walk
from discrep.core.xattrs import read_xattrs
from discrep.protocol.agent_messages import (MAX_DRY_BATCH, MAX_DRY_LINE, Bye, Command, DryEntries, DrySign,
                                             DrySigned, DryWalk, DryWalked, Failed, Ping, UnknownMessage)
from discrep.protocol.filterspec import FilterSpec
from discrep.protocol.sourceview import SignAnswer, SignRequest, SrcEntry, sign_answer, xattr_digest
from discrep.source.agent import AgentOutput, agent_output
from discrep.source.filtering import SourceFilter

log = logging.getLogger(__name__)


class LocalSourceView:
    """SRC on this host, read-only (see module doc); ``close`` when done."""

    def __init__(self, src: bytes, spec: Optional[FilterSpec] = None):
        self.src = src
        spec = spec or FilterSpec()
        self.sflt = SourceFilter(src, spec) if spec.active else None
        self._root: Optional[int] = None

    def entries(self) -> Iterator[SrcEntry]:
        for rel, st in walk(self.src, keep=self.sflt.keep if self.sflt is not None else None):
            path = join(self.src, rel)
            link = statmod.S_ISLNK(st.st_mode)
            target = os.readlink(path) if link else None
            xat = None if link else xattr_digest(read_xattrs(path), os.geteuid() == 0)
            yield SrcEntry(rel, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target, xat)

    def sign(self, requests: List[SignRequest]) -> List[SignAnswer]:
        return [self.sign_one(r) for r in requests]

    def sign_one(self, req: SignRequest) -> SignAnswer:
        """``req`` answered from the file beneath SRC (not a regular file, gone or shorter: no digest)."""
        from blockdiff.errors import BlockdiffError
        from discrep.core.beneath import open_beneath
        if self._root is None:
            self._root = os.open(self.src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_beneath(self._root, req.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            log.info("cannot open %r to sign it: %s", req.path, e)
            return SignAnswer(None)
        try:
            if not statmod.S_ISREG(os.fstat(fd).st_mode):
                return SignAnswer(None)
            return sign_answer(fd, req)
        except (OSError, BlockdiffError) as e:
            log.info("cannot sign %r: %s", req.path, e)
            return SignAnswer(None)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.sflt is not None:
            self.sflt.close()
            self.sflt = None
        if self._root is not None:
            os.close(self._root)
            self._root = None


def bounded_lines(fd: int, timeout: Optional[float], limit: int = MAX_DRY_LINE) -> Iterator[bytes]:
    """The lines of ``fd`` until EOF, none longer than ``limit`` (ManifestError); TransportError
    after ``timeout`` s without input."""
    parts: List[bytes] = []          # the line so far (each chunk scanned once)
    size = 0
    while True:
        if timeout:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                raise TransportError(f"no word from the replica for {timeout:.0f}s: the connection is stalled")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return
        start = 0
        while True:
            i = chunk.find(b"\n", start)
            if i < 0:
                break
            parts.append(chunk[start:i + 1])
            yield b"".join(parts)
            parts, size, start = [], 0, i + 1
        if start < len(chunk):
            parts.append(chunk[start:])
            size += len(chunk) - start
        if size > limit:
            raise ManifestError(f"the replica sent a line longer than {limit} bytes")


def serve_dry_run(src: str, warnings: WarningList, timeout: Optional[float] = None) -> int:
    """``discrep agent --dry-run SRC``: serve dry-run commands on stdin/stdout; the exit code."""
    out = agent_output(timeout)
    view: Optional[LocalSourceView] = None
    try:
        real = os.path.realpath(src)
        if not os.path.isdir(real):
            raise SourceError(f"source {src} does not exist or is not a directory", hint="check the path")
        walked: Set[bytes] = set()        # the regular files the walk said: the only ones signed
        for line in bounded_lines(0, timeout):
            try:
                cmd = Command.decode(line)
            except UnknownMessage:
                continue
            if isinstance(cmd, Bye):
                break
            if isinstance(cmd, Ping):
                continue
            if isinstance(cmd, DryWalk):
                if view is not None:
                    view.close()
                view = LocalSourceView(os.fsencode(real), FilterSpec.from_wire(cmd.filters, cmd.delete_excluded))
                walked = _walk(view, out)
            elif isinstance(cmd, DrySign) and view is not None:
                req = cmd.request()
                if req.path not in walked:
                    raise ManifestError("the replica asked to sign a file the dry walk did not report")
                out.say(DrySigned.of(req, view.sign_one(req)))
            else:
                raise ManifestError(f"the {cmd.NAME!r} command is not served in dry-run mode")
            out.warn(warnings)
        return 0
    except Error as e:
        out.say(Failed.of(e))
        return e.exit_code
    except OSError as e:
        err = SourceError(f"cannot read the source: {e}")
        out.say(Failed.of(err))
        return err.exit_code
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    finally:
        out.stop()
        if view is not None:
            view.close()


def _walk(view: LocalSourceView, out: AgentOutput) -> Set[bytes]:
    """Say the entries of ``view`` in batches, then their count; the regular files' paths."""
    files: Set[bytes] = set()
    batch: List[SrcEntry] = []
    n = 0
    for e in view.entries():
        n += 1
        if e.is_reg:
            files.add(e.path)
        batch.append(e)
        if len(batch) >= MAX_DRY_BATCH:
            out.say(DryEntries.of(batch))
            batch = []
    if batch:
        out.say(DryEntries.of(batch))
    out.say(DryWalked(count=n))
    return files

"""A confined, read-only SFTP v3 server over any byte stream: how a pushing source serves its export.

``serve(stream, root)`` answers the SFTP requests a replica host's ``sshfs -o passive`` sends
(through a channel of the one SSH connection) with what lies beneath directory ``root`` (the
cycle's FUSE export) and nothing else.  The peer is untrusted (the replica host), so:

* the virtual root ``/`` is ``root``; every path is resolved component by component strictly
  beneath an fd of ``root`` (core.beneath: no ``..``, no NUL, no symlink on the way, not even the
  last component for STAT/OPEN/OPENDIR -- a symlink is only ever LSTATed or READLINKed as text);
* only INIT, REALPATH, STAT, LSTAT, FSTAT, OPEN (read-only), READ, CLOSE, OPENDIR, READDIR and
  READLINK are served; every write, create, remove, rename, setstat or extension is refused
  (``OP_UNSUPPORTED`` / ``PERMISSION_DENIED``) and changes nothing;
* a packet is at most ``MAX_PACKET`` bytes, a read at most ``MAX_READ``, at most ``MAX_HANDLES``
  handles are open at once; a malformed packet ends the session (``SftpProtocolError``).

Names are bytes end to end (non-UTF-8 file names pass as they are).

Threading: ``serve`` runs in its caller's thread and owns every fd it opens (closed when the
stream ends); the stream's ``recv``/``sendall`` are only used from that thread.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from typing import Any, Callable, Optional

from discrep.core.beneath import EscapeError, components, open_beneath

log = logging.getLogger(__name__)

VERSION = 3
MAX_PACKET = 256 * 1024 + 1024
MAX_READ = 256 * 1024
MAX_HANDLES = 1024
READDIR_BATCH = 128

# packet types
INIT, VERSION_T, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
SETSTAT, FSETSTAT, OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT = 9, 10, 11, 12, 13, 14, 15, 16, 17
RENAME, READLINK, SYMLINK, EXTENDED = 18, 19, 20, 200
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
# status codes
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE, BAD_MESSAGE, OP_UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8
# open flags and attribute flags
FXF_READ, FXF_WRITE, FXF_APPEND, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 1, 2, 4, 8, 16, 32
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 1, 2, 4, 8

WRITES = (WRITE, SETSTAT, FSETSTAT, REMOVE, MKDIR, RMDIR, RENAME, SYMLINK)


class SftpProtocolError(Exception):
    """The peer sent something that is not SFTP v3: the session ends."""


class Unpacker:
    """Reads the fields of one packet's payload (bounds-checked)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SftpProtocolError("a packet ends early")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u32())


def pack_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def pack_attrs(st: os.stat_result | None) -> bytes:
    if st is None:
        return struct.pack(">I", 0)
    return struct.pack(">IQIIIII", ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME, st.st_size,
                       st.st_uid, st.st_gid, st.st_mode, int(st.st_atime) & 0xFFFFFFFF,
                       int(st.st_mtime) & 0xFFFFFFFF)


def longname(name: bytes, st: os.stat_result) -> bytes:
    return stat.filemode(st.st_mode).encode() + b" 1 %d %d %d 0 %s" % (st.st_uid, st.st_gid, st.st_size, name)


def relative(path: bytes) -> bytes:
    """The export-relative form of a client path ('' for the root); EscapeError for '..' or NUL."""
    p = path.strip(b"/")
    if not p or p == b".":
        if b"\0" in path:
            raise EscapeError(errno.EXDEV, "NUL in a path")
        return b""
    return b"/".join(components(p))


def _status_of(e: OSError) -> int:
    if isinstance(e, EscapeError) or e.errno in (errno.EACCES, errno.EPERM, errno.EXDEV, errno.ELOOP):
        return PERMISSION_DENIED
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return NO_SUCH_FILE
    return FAILURE


class Session:
    """One SFTP session's state: the root fd and the open handles (see module doc)."""

    def __init__(self, root_fd: int, direct: Optional[Callable[[bytes], Optional[int]]] = None) -> None:
        self.root_fd = root_fd
        self.direct = direct        # rel -> an fd of the same bytes opened another way, or None
        self.files: dict[bytes, int] = {}
        self.dirs: dict[bytes, list[bytes]] = {}
        self.dir_fds: dict[bytes, int] = {}
        self.next_handle = 1

    # -- paths ---------------------------------------------------------------
    def open_path(self, path: bytes, flags: int) -> int:
        rel = relative(path)
        if not rel:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.root_fd)
        return open_beneath(self.root_fd, rel, flags)

    def lstat(self, path: bytes) -> os.stat_result:
        rel = relative(path)
        if not rel:
            return os.fstat(self.root_fd)
        parent, _, name = rel.rpartition(b"/")
        pfd = self.open_path(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)

    def stat(self, path: bytes) -> os.stat_result:
        fd = self.open_path(path, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        rel = relative(path)
        if not rel:
            raise OSError(errno.EINVAL, "the root is no symlink")
        parent, _, name = rel.rpartition(b"/")
        pfd = self.open_path(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return os.readlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    # -- handles -------------------------------------------------------------
    def new_handle(self) -> bytes:
        if len(self.files) + len(self.dirs) >= MAX_HANDLES:
            raise OSError(errno.EMFILE, "too many open handles")
        h = b"%d" % self.next_handle
        self.next_handle += 1
        return h

    def close_all(self) -> None:
        for fd in list(self.files.values()) + list(self.dir_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self.files.clear()
        self.dirs.clear()
        self.dir_fds.clear()

    # -- requests ------------------------------------------------------------
    def handle(self, kind: int, rid: int, u: Unpacker) -> bytes:
        """The reply packet (type byte + payload) to request ``kind`` number ``rid``."""
        try:
            return self._dispatch(kind, rid, u)
        except OSError as e:
            return status(rid, _status_of(e), e.strerror or str(e))

    def _dispatch(self, kind: int, rid: int, u: Unpacker) -> bytes:
        hdr = struct.pack(">I", rid)
        if kind == REALPATH:
            rel = relative(u.string())
            name = b"/" + rel
            return bytes([NAME]) + hdr + struct.pack(">I", 1) + pack_string(name) + pack_string(name) \
                + pack_attrs(None)
        if kind in (STAT, LSTAT):
            path = u.string()
            return bytes([ATTRS]) + hdr + pack_attrs(self.stat(path) if kind == STAT else self.lstat(path))
        if kind == FSTAT:
            fd = self.files.get(u.string())
            if fd is None:
                return status(rid, FAILURE, "bad handle")
            return bytes([ATTRS]) + hdr + pack_attrs(os.fstat(fd))
        if kind == OPEN:
            path, pflags = u.string(), u.u32()
            if pflags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC | FXF_EXCL):
                return status(rid, PERMISSION_DENIED, "the export is read-only")
            h = self.new_handle()
            rel = relative(path)
            fd = self.direct(rel) if self.direct is not None and rel else None
            if fd is None:
                fd = self.open_path(path, os.O_RDONLY | os.O_NONBLOCK)   # a FIFO must not block the session
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return status(rid, FAILURE, "not a regular file")
            self.files[h] = fd
            return bytes([HANDLE]) + hdr + pack_string(h)
        if kind == READ:
            h, off, n = u.string(), u.u64(), u.u32()
            fd = self.files.get(h)
            if fd is None:
                return status(rid, FAILURE, "bad handle")
            data = os.pread(fd, min(n, MAX_READ), off)
            if not data:
                return status(rid, EOF, "end of file")
            return bytes([DATA]) + hdr + pack_string(data)
        if kind == OPENDIR:
            return self._opendir(rid, u.string())
        if kind == READDIR:
            return self._readdir(rid, u.string())
        if kind == CLOSE:
            h = u.string()
            fd = self.files.pop(h, None)
            if fd is None:
                fd = self.dir_fds.pop(h, None)
                if self.dirs.pop(h, None) is None:
                    return status(rid, FAILURE, "bad handle")
            if fd is not None:
                os.close(fd)
            return status(rid, OK, "")
        if kind == READLINK:
            target = self.readlink(u.string())
            return bytes([NAME]) + hdr + struct.pack(">I", 1) + pack_string(target) + pack_string(target) \
                + pack_attrs(None)
        if kind in WRITES:
            return status(rid, PERMISSION_DENIED, "the export is read-only")
        return status(rid, OP_UNSUPPORTED, "not supported")

    def _opendir(self, rid: int, path: bytes) -> bytes:
        h = self.new_handle()
        fd = self.open_path(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = [os.fsencode(e.name) for e in os.scandir(fd)]
        except OSError:
            os.close(fd)
            raise
        self.dirs[h] = [b".", b".."] + names
        self.dir_fds[h] = fd
        return bytes([HANDLE]) + struct.pack(">I", rid) + pack_string(h)

    def _readdir(self, rid: int, h: bytes) -> bytes:
        names, fd = self.dirs.get(h), self.dir_fds.get(h)
        if names is None or fd is None:
            return status(rid, FAILURE, "bad handle")
        if not names:
            return status(rid, EOF, "end of directory")
        batch, self.dirs[h] = names[:READDIR_BATCH], names[READDIR_BATCH:]
        out: list[bytes] = []
        for name in batch:
            try:
                st = os.fstat(fd) if name in (b".", b"..") else os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:       # gone meanwhile (an export does not change; a live tree might)
                continue
            out.append(pack_string(name) + pack_string(longname(name, st)) + pack_attrs(st))
        return bytes([NAME]) + struct.pack(">II", rid, len(out)) + b"".join(out)


def status(rid: int, code: int, msg: str) -> bytes:
    return bytes([STATUS]) + struct.pack(">II", rid, code) + pack_string(msg.encode()) + pack_string(b"")


def _recv_exact(stream: Any, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        d = stream.recv(n - len(buf))
        if not d:
            if buf:
                raise SftpProtocolError("the stream ended inside a packet")
            return None
        buf += d
    return bytes(buf)


def read_packet(stream: Any) -> tuple[int, bytes] | None:
    """(type, payload) of the next packet; None at a clean end of the stream."""
    head = _recv_exact(stream, 4)
    if head is None:
        return None
    (length,) = struct.unpack(">I", head)
    if length < 1 or length > MAX_PACKET:
        raise SftpProtocolError(f"a packet of {length} bytes")
    body = _recv_exact(stream, length)
    if body is None:
        raise SftpProtocolError("the stream ended inside a packet")
    return body[0], body[1:]


def send_packet(stream: Any, body: bytes) -> None:
    stream.sendall(struct.pack(">I", len(body)) + body)


def serve(stream: Any, root: str, direct: Optional[Callable[[bytes], Optional[int]]] = None) -> int:
    """Serve ``root`` read-only on ``stream`` (``recv``/``sendall``) until it ends; the requests served.
    ``direct(rel)``: the caller's own fd for a validated relative path whose bytes it can open faster
    than through ``root`` (push mode: a data alias of the FUSE export, straight from the snapshot), or
    None to open it beneath ``root``."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    sess = Session(root_fd, direct)
    served = 0
    try:
        first = read_packet(stream)
        if first is None:
            return 0
        if first[0] != INIT:
            raise SftpProtocolError(f"the first packet is type {first[0]}, not INIT")
        send_packet(stream, bytes([VERSION_T]) + struct.pack(">I", VERSION))
        while True:
            pkt = read_packet(stream)
            if pkt is None:
                return served
            kind, payload = pkt
            u = Unpacker(payload)
            rid = u.u32()
            send_packet(stream, sess.handle(kind, rid, u))
            served += 1
    finally:
        sess.close_all()
        os.close(root_fd)

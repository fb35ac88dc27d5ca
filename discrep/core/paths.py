"""Untrusted-path handling: every path from a manifest goes through here.

Paths are bytes relative to a tree root (``b""`` is the root).  ``check_rel``
refuses absolute paths, ``..``/``.`` components, empty components, NUL, and the
reserved top-level name ``.discrep``.  ``DirFd``-style helpers open parents
component by component with ``O_NOFOLLOW`` so a symlink placed inside DEST can
never redirect a write outside it (``safe_parent``).

Also: encoding of byte paths into JSON-safe strings (``enc``/``dec``: the
``surrogateescape`` convention; names that are not UTF-8, or contain newlines,
round-trip exactly).

Thread-safety: pure functions; the fds returned belong to the caller.
"""
from __future__ import annotations

import errno
import os
from typing import Tuple

from discrep.core.errors import UnsafePathError

STATE_DIR = b".discrep"


def holds_only_state(dest) -> bool:
    """Directory ``dest`` holds nothing but discrep's own ``.discrep`` (str or bytes path)."""
    return all(os.fsencode(n) == STATE_DIR for n in os.listdir(dest))


def state_dir(root: bytes) -> bytes:
    """``ROOT/.discrep``: where discrep keeps its state on either side."""
    return join(root, STATE_DIR)


def enc(path: bytes) -> str:
    """bytes path -> str for JSON (lone surrogates stand for non-UTF-8 bytes)."""
    return os.fsdecode(path)


def dec(text: str) -> bytes:
    """Inverse of :func:`enc`."""
    if not isinstance(text, str):
        raise UnsafePathError(f"path is not a string: {text!r}")
    try:
        return os.fsencode(text)
    except UnicodeEncodeError as e:  # a surrogate that is not an escaped byte
        raise UnsafePathError(f"path {text!r} cannot be encoded: {e}") from None


def show(path: bytes) -> str:
    """Printable form for messages (escapes control bytes and non-UTF-8)."""
    s = path.decode("utf-8", "backslashreplace")
    return s.encode("unicode_escape").decode("ascii").replace("\\\\x", "\\x") if any(
        c < 32 or c == 127 for c in path) else s


def check_rel(path: bytes, *, allow_root: bool = False) -> bytes:
    """Validate an untrusted relative path; returns it unchanged or raises UnsafePathError.

    Substring tests (C speed: a manifest holds millions of paths) with the same meaning as a
    component-by-component check: no NUL, not absolute, no empty, ``.`` or ``..`` component, not
    inside the reserved top-level ``.discrep``."""
    if not isinstance(path, (bytes, bytearray)):
        raise UnsafePathError(f"path is not bytes: {path!r}")
    path = bytes(path)
    if not path:
        if allow_root:
            return path
        raise UnsafePathError("empty path")
    if b"\x00" in path:
        raise UnsafePathError(f"path contains NUL: {show(path)}")
    if path[0] == 0x2F:
        raise UnsafePathError(f"absolute path refused: {show(path)}")
    if b"//" in path or path[-1] == 0x2F:
        raise UnsafePathError(f"empty path component refused in {show(path)}")
    if b"." in path:
        wrapped = b"/" + path + b"/"
        if b"/./" in wrapped or b"/../" in wrapped:
            raise UnsafePathError(f"path component '.' or '..' refused in {show(path)}")
        if path == STATE_DIR or path.startswith(STATE_DIR + b"/"):
            raise UnsafePathError(f"path inside the reserved {STATE_DIR.decode()}/ refused: {show(path)}")
    return path


def join(root: bytes, rel: bytes) -> bytes:
    return root if not rel else root.rstrip(b"/") + b"/" + rel


def parent(rel: bytes) -> bytes:
    i = rel.rfind(b"/")
    return b"" if i < 0 else rel[:i]


def basename(rel: bytes) -> bytes:
    return rel[rel.rfind(b"/") + 1:]


def is_under(path: bytes, prefix: bytes) -> bool:
    """True when ``path`` equals ``prefix`` or lies below it (component-wise)."""
    if not prefix:
        return True
    return path == prefix or path.startswith(prefix + b"/")


def depth(rel: bytes) -> int:
    return 0 if not rel else rel.count(b"/") + 1


def open_dir_nofollow(root_fd: int, rel: bytes, *, create: bool = False, mode: int = 0o755) -> int:
    """Open directory ``rel`` below ``root_fd`` walking component by component.

    No component may be a symlink (``O_NOFOLLOW``): a symlink inside DEST is
    refused with UnsafePathError instead of being followed.  With ``create``,
    missing directories are made.  Returns a new fd the caller closes.
    """
    fd = os.dup(root_fd)
    if not rel:
        return fd
    try:
        for comp in rel.split(b"/"):
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                nfd = os.open(comp, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(comp, mode, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = os.open(comp, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(
                        f"refusing to pass through {show(comp)} in {show(rel)}: not a directory "
                        f"(a symlink or file inside the destination)") from None
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def safe_parent(root_fd: int, rel: bytes, *, create: bool = False) -> Tuple[int, bytes]:
    """(fd of the parent directory of ``rel``, final name) with no symlink followed."""
    check_rel(rel)
    return open_dir_nofollow(root_fd, parent(rel), create=create), basename(rel)


def nested(a: str, b: str) -> bool:
    """True when real path ``a`` equals ``b`` or lies inside it."""
    ra = os.path.realpath(a)
    rb = os.path.realpath(b)
    return ra == rb or ra.startswith(rb.rstrip("/") + "/")

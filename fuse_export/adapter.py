"""Thin FUSE adapter over ``ExportView`` plus mount helpers (serve, mounted, unmount, BackgroundExport).

Role: translate mfusepy's ``str`` paths to the view's BYTES paths and back,
map ``ExportError`` to ``OSError(errno)`` at the edge and let nothing else
escape into libfuse (unexpected exceptions are logged and become EIO).  Every
mutating operation fails with EROFS.

Paths: mfusepy decodes the raw bytes libfuse hands it with
``encoding='utf-8', errors='surrogateescape'`` and encodes our ``str`` results
the same way.  UTF-8 decoding with surrogateescape is injective on arbitrary
bytes and ``encode`` inverts it exactly (even for bytes that look like encoded
surrogates, which Python's UTF-8 codec rejects and therefore escapes), so
non-UTF-8 names, newlines and any other byte except ``/`` and NUL round-trip.
The adapter passes both parameters explicitly so a changed default cannot
break this.

mfusepy is imported lazily (``load_fuse``): importing it raises OSError when
libfuse is missing; that becomes ``FuseUnavailable``.  This module imports only
the stdlib at import time, so it can be imported on hosts without libfuse.

Threading: ``serve`` runs libfuse's multi-threaded loop by default; the
adapter methods are called concurrently and keep per-thread read buffers only.
``BackgroundExport`` runs ``serve`` in a forked child PROCESS; create, enter and
exit it from one thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Optional, TypeVar, Union

from .errors import ExportError
from .model import ExportView, stable_ino

__all__ = [
    "FuseUnavailable",
    "MountError",
    "load_fuse",
    "FuseAdapter",
    "serve",
    "mounted",
    "mount_entry",
    "wait_mounted",
    "unmount",
    "BackgroundExport",
    "ENCODING",
    "ERRORS",
    "to_bytes",
    "to_str",
]

log = logging.getLogger(__name__)

ENCODING = "utf-8"
ERRORS = "surrogateescape"
#: largest read we keep a per-thread buffer for (libfuse3 + kernel max_pages: 1 MiB)
_MAX_READ = 1 << 20

PathLike = Union[str, bytes, "os.PathLike[str]"]
F = TypeVar("F", bound=Callable[..., Any])


class FuseUnavailable(RuntimeError):
    """The FUSE binding or libfuse itself cannot be loaded."""


class MountError(RuntimeError):
    """Mounting or unmounting failed (the child died, a timeout, fusermount3 refused)."""


_fuse_module: Optional[ModuleType] = None


def load_fuse() -> ModuleType:
    """Import mfusepy once; ``FuseUnavailable`` with an install hint if that fails."""
    global _fuse_module
    if _fuse_module is None:
        try:
            with _library_named():
                import mfusepy  # noqa: WPS433 - lazy on purpose
        except ImportError as e:
            raise FuseUnavailable(f"the FUSE binding mfusepy is not installed ({e}); pip install mfusepy") from e
        except (OSError, AttributeError) as e:
            raise FuseUnavailable(
                f"libfuse cannot be loaded ({e}); install fuse3 (Debian/Ubuntu: apt-get install fuse3 libfuse3-3)"
            ) from e
        _fuse_module = mfusepy
    return _fuse_module


# what mfusepy's search (ctypes.util.find_library: 'fuse', then 'fuse3') finds on Linux, by soname
_SONAMES = ("libfuse.so.2", "libfuse3.so.3")


@contextlib.contextmanager
def _library_named() -> Iterator[None]:
    """mfusepy looks libfuse up with ``ctypes.util.find_library``, which runs ``ldconfig -p`` and
    then a compiler for each name it does not find (20-50 ms at every agent start).  Unless the
    user chose a library (FUSE_LIBRARY_PATH / FUSE_LIBRARY_NAME), name the one its search would
    find (FUSE 2 first) by soname for the import: dlopen finds it through the loader cache."""
    if sys.platform != "linux" or os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME"):
        yield
        return
    for name in _SONAMES:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        os.environ["FUSE_LIBRARY_PATH"] = name
        try:
            yield
        finally:
            os.environ.pop("FUSE_LIBRARY_PATH", None)
        return
    yield                                # none by soname: mfusepy's own search says what is missing


def to_bytes(path: str) -> bytes:
    """mfusepy path (``"/a/b"``) -> view path (``b"a/b"``; ``b""`` for the root)."""
    return path.encode(ENCODING, ERRORS).lstrip(b"/")


def to_str(name: bytes) -> str:
    """Bytes from the view -> the str mfusepy encodes back to the same bytes."""
    return name.decode(ENCODING, ERRORS)


def _erofs() -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS))


def _edge(func: F) -> F:
    """Run an operation; ExportError -> OSError(errno), other errors -> logged EIO."""

    @functools.wraps(func)
    def wrapper(self: "FuseAdapter", *args: Any) -> Any:
        try:
            return func(self, *args)
        except ExportError as e:
            raise OSError(e.errno, os.strerror(e.errno)) from None
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                log.debug("FUSE %s%r: %s", func.__name__, args, e)
                raise OSError(e.errno, os.strerror(e.errno)) from None
            log.exception("FUSE %s%r failed with a bad OSError", func.__name__, args)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None
        except Exception:
            log.exception("FUSE %s%r failed unexpectedly; returning EIO", func.__name__, args)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from None

    return wrapper  # type: ignore[return-value]


class FuseAdapter:
    """mfusepy operations object over an ``ExportView``.

    Deliberately not a subclass of ``mfusepy.Operations`` so that this module
    imports without libfuse: mfusepy only looks the callbacks up by name (any
    method defined here is registered with libfuse, nothing else is).
    """

    #: timestamps in the stat dicts are integer nanoseconds
    use_ns = True

    def __init__(self, view: ExportView, *, mountpoint: Optional[PathLike] = None, read_ahead_kb: int = 0) -> None:
        self.view = view
        self.mountpoint = mountpoint
        self.read_ahead_kb = read_ahead_kb
        self._tls = threading.local()

    # -- lifecycle ----------------------------------------------------------
    def init(self, path: str) -> None:
        """libfuse is initialised; the mount exists but INIT is not answered yet: tune it from a thread."""
        if self.read_ahead_kb > 0 and self.mountpoint is not None:
            t = threading.Thread(
                target=_raise_read_ahead,
                args=(self.mountpoint, self.read_ahead_kb),
                name="discrep-readahead",
                daemon=True,
            )
            t.start()

    # -- reading --------------------------------------------------------------
    @_edge
    def getattr(self, path: str, fh: Optional[int] = None) -> Dict[str, int]:
        return self.view.getattr(to_bytes(path))

    @_edge
    def readdir(self, path: str, fh: int) -> List[Any]:
        """Entries with their ``st_ino`` (no per-entry stat).

        With ``use_ino`` libfuse copies each entry's st_ino into the dirent;
        mfusepy's plain-name form would give inode 0, which readdir(3) skips.
        """
        p = to_bytes(path)
        prefix = p + b"/" if p else b""
        parent = p.rpartition(b"/")[0]
        out: List[Any] = [(".", {"st_ino": stable_ino(p)}, 0), ("..", {"st_ino": stable_ino(parent)}, 0)]
        for name in self.view.readdir(p):
            out.append((to_str(name), {"st_ino": stable_ino(prefix + name)}, 0))
        return out

    @_edge
    def readlink(self, path: str) -> str:
        return to_str(self.view.readlink(to_bytes(path)))

    @_edge
    def open(self, path: str, flags: int) -> int:
        return self.view.open(to_bytes(path), flags)

    @_edge
    def read(self, path: str, size: int, offset: int, fh: int) -> Any:
        """Fill a per-thread buffer and hand mfusepy a ctypes view of it (it memmoves from it).

        Avoids a fresh 1 MiB ``bytes`` per request (glibc would mmap/munmap it:
        a page-fault storm).  mfusepy only needs ``len()``, truthiness and a
        pointer for ``ctypes.memmove``; a ``(c_char * n).from_buffer`` has all three.
        """
        if size <= 0:
            return b""
        if size > _MAX_READ:
            return self.view.read(to_bytes(path), size, offset, fh)
        tls = self._tls
        buf = getattr(tls, "buf", None)
        if buf is None:
            buf = tls.buf = bytearray(_MAX_READ)
            tls.mv = memoryview(buf)
        n = self.view.readinto(to_bytes(path), tls.mv[:size], offset, fh)
        if n <= 0:
            return b""
        return (ctypes.c_char * n).from_buffer(buf)

    @_edge
    def release(self, path: Optional[str], fh: int) -> int:
        self.view.release(fh)
        return 0

    @_edge
    def getxattr(self, path: str, name: str, *position: int) -> bytes:
        return self.view.getxattr(to_bytes(path), name.encode(ENCODING, ERRORS))

    @_edge
    def listxattr(self, path: str) -> List[str]:
        return [to_str(n) for n in self.view.listxattr(to_bytes(path))]

    @_edge
    def statfs(self, path: str) -> Dict[str, int]:
        return self.view.statfs()

    @_edge
    def access(self, path: str, amode: int) -> int:
        self.view.access(to_bytes(path), amode)
        return 0

    # -- everything that would write: EROFS -------------------------------------
    def write(self, path: Optional[str], data: bytes, offset: int, fh: int) -> int:
        raise _erofs()

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        raise _erofs()

    def mkdir(self, path: str, mode: int) -> int:
        raise _erofs()

    def mknod(self, path: str, mode: int, dev: int) -> int:
        raise _erofs()

    def unlink(self, path: str) -> int:
        raise _erofs()

    def rmdir(self, path: str) -> int:
        raise _erofs()

    def rename(self, old: str, new: str) -> int:
        raise _erofs()

    def symlink(self, target: str, source: str) -> int:
        raise _erofs()

    def link(self, target: str, source: str) -> int:
        raise _erofs()

    def chmod(self, path: Optional[str], mode: int) -> int:
        raise _erofs()

    def chown(self, path: Optional[str], uid: int, gid: int) -> int:
        raise _erofs()

    def truncate(self, path: Optional[str], length: int, fh: Optional[int] = None) -> int:
        raise _erofs()

    def utimens(self, path: Optional[str], times: Any = None) -> int:
        raise _erofs()

    def setxattr(self, path: str, name: str, value: bytes, options: int, *position: int) -> int:
        raise _erofs()

    def removexattr(self, path: str, name: str) -> int:
        raise _erofs()


# ---------------------------------------------------------------------------
# mount table


def _norm_mountpoint(mountpoint: PathLike) -> bytes:
    """Absolute, symlink-free path WITHOUT touching the mountpoint itself (a hung mount would block)."""
    p = os.path.abspath(os.fsencode(mountpoint))
    parent, base = os.path.split(p)
    if not base:
        return p
    return os.path.join(os.path.realpath(parent), base)


_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field)


def mount_entry(mountpoint: PathLike) -> Optional[Dict[str, bytes]]:
    """The topmost /proc/self/mountinfo entry for ``mountpoint``: keys dev (b"maj:min"), fstype, source."""
    target = _norm_mountpoint(mountpoint)
    found: Optional[Dict[str, bytes]] = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            if len(fields) < 7 or _unescape(fields[4]) != target:
                continue
            try:
                sep = fields.index(b"-", 6)
            except ValueError:
                continue
            found = {
                "dev": fields[2],
                "fstype": fields[sep + 1] if len(fields) > sep + 1 else b"",
                "source": _unescape(fields[sep + 2]) if len(fields) > sep + 2 else b"",
            }
    return found


def mounted(mountpoint: PathLike) -> bool:
    """Whether something is mounted on ``mountpoint`` (per /proc/self/mountinfo)."""
    return mount_entry(mountpoint) is not None


def _proc_alive(proc: Any) -> Optional[bool]:
    if proc is None:
        return None
    if hasattr(proc, "is_alive"):
        return bool(proc.is_alive())
    if hasattr(proc, "poll"):
        return proc.poll() is None
    if isinstance(proc, int):
        try:
            pid, _status = os.waitpid(proc, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0
    return None


def wait_mounted(mountpoint: PathLike, timeout: float = 10.0, proc: Any = None) -> None:
    """Wait until ``mountpoint`` is mounted; MountError on timeout or when ``proc`` died first.

    ``proc``: a multiprocessing.Process, a subprocess.Popen or a child pid.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if mounted(mountpoint):
            return
        if _proc_alive(proc) is False:
            code = getattr(proc, "exitcode", None)
            if code is None:
                code = getattr(proc, "returncode", None)
            raise MountError(f"the FUSE server exited (code {code}) before {mountpoint!r} was mounted")
        if time.monotonic() >= deadline:
            raise MountError(f"{mountpoint!r} not mounted after {timeout:.1f}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def unmount(mountpoint: PathLike, lazy: bool = False) -> None:
    """Unmount with ``fusermount3 -u [-z]``, falling back to ``umount [-l]``; MountError if it stays mounted."""
    mp = os.fsencode(os.path.abspath(os.fsencode(mountpoint)))
    errors: List[str] = []
    commands: List[List[bytes]] = []
    for tool in ("fusermount3", "fusermount"):
        exe = shutil.which(tool)
        if exe:
            commands.append([os.fsencode(exe), b"-u"] + ([b"-z"] if lazy else []) + [b"-q", mp])
            break
    umount = shutil.which("umount")
    if umount:
        commands.append([os.fsencode(umount)] + ([b"-l"] if lazy else []) + [mp])
    for cmd in commands:
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{os.fsdecode(cmd[0])}: {e}")
            continue
        if r.returncode == 0:
            return
        errors.append(f"{os.fsdecode(cmd[0])}: {r.stderr.decode(errors='replace').strip() or r.returncode}")
        if not mounted(mountpoint):
            return
    if mounted(mountpoint):
        raise MountError(f"cannot unmount {mountpoint!r}: " + "; ".join(errors or ["no unmount tool found"]))


def _raise_read_ahead(mountpoint: PathLike, kb: int, timeout: float = 30.0) -> None:
    """Set the mount's bdi read_ahead_kb once the mount is up; failures are only logged."""
    try:
        deadline = time.monotonic() + timeout
        entry = mount_entry(mountpoint)
        while entry is None and time.monotonic() < deadline:
            time.sleep(0.01)
            entry = mount_entry(mountpoint)
        if entry is None:
            log.debug("read_ahead: %r never appeared in mountinfo", mountpoint)
            return
        # stat waits until the kernel has processed our INIT reply, which
        # clamps the bdi read-ahead to max_readahead: set ours after that
        os.stat(mountpoint)
        dev = entry["dev"].decode()
        path = f"/sys/class/bdi/{dev}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
        log.debug("read_ahead: %s = %d", path, kb)
    except Exception as e:  # never fatal
        log.info("could not raise read_ahead_kb of %r to %d: %s", mountpoint, kb, e)


# ---------------------------------------------------------------------------
# serving


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(threshold: int = 64 << 20) -> bool:
    """Stop glibc from mmap/munmap-ing every 1 MiB read buffer (a page-fault storm per request).

    libfuse's high-level read path mallocs a ``size`` buffer per request and
    frees it after the reply; above the mmap threshold each one is fresh
    zero pages.  Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD keeps such
    buffers in the (per-thread) arenas.  Process-wide; only ``serve`` calls it
    since it owns its process, and only when asked: with the per-thread
    read buffer of ``FuseAdapter.read`` no fault storm was measurable here
    (libfuse 3.14, ~5 minor faults per 1 MiB request with or without it).
    False when not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, min(threshold, 32 << 20)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, threshold)) and ok
    return ok


def fuse_options(
    *, threads: bool = True, foreground: bool = True, allow_other: bool = False, options: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """The keyword options ``serve`` gives mfusepy.FUSE (``options`` override; a None value removes one)."""
    opts: Dict[str, Any] = {
        "foreground": foreground,
        "nothreads": not threads,
        "ro": True,
        "default_permissions": False,
        "kernel_cache": True,
        "attr_timeout": 60,
        "entry_timeout": 60,
        "negative_timeout": 60,
        "use_ino": True,
        "fsname": "discrep",
        "subtype": "discrep",
    }
    if threads:
        # libfuse 3.14 defaults max_idle_threads to UINT_MAX and then logs "Ignoring invalid max
        # threads value" on every mount; an explicit value keeps stderr clean (same behaviour)
        opts["max_idle_threads"] = 10
    if allow_other:
        # other users may read the mount, but only what the files' owners and modes allow them:
        # the kernel checks permissions (default_permissions) instead of letting everyone read all
        opts["allow_other"] = True
        opts["default_permissions"] = True
    for key, value in (options or {}).items():
        if value is None:
            opts.pop(key, None)
        else:
            opts[key] = value
    return {k: v for k, v in opts.items() if v is not False}


def serve(
    view: ExportView,
    mountpoint: PathLike,
    *,
    foreground: bool = True,
    threads: bool = True,
    allow_other: bool = False,
    options: Optional[Dict[str, Any]] = None,
    read_ahead_kb: int = 1024,
    malloc_tuning: bool = False,
) -> None:
    """Mount ``view`` read-only on ``mountpoint`` and serve until unmounted (blocking).

    ``foreground=False`` lets libfuse daemonize: the CALLING process exits and
    a detached child serves; use ``BackgroundExport`` to serve from a managed
    child instead.  ``read_ahead_kb`` > 0 raises the mount's bdi read-ahead
    after the mount is up (ignored when not permitted).  ``malloc_tuning``:
    see ``tune_malloc`` (process-wide).
    """
    fuse = load_fuse()
    if malloc_tuning:
        tune_malloc()
    kwargs = fuse_options(threads=threads, foreground=foreground, allow_other=allow_other, options=options)
    adapter = FuseAdapter(view, mountpoint=mountpoint, read_ahead_kb=read_ahead_kb)
    log.info("serving export on %r with options %s", mountpoint, kwargs)
    fuse.FUSE(adapter, os.fsdecode(mountpoint), encoding=ENCODING, errors=ERRORS, **kwargs)
    log.info("export on %r ended", mountpoint)


def _child_main(view: ExportView, mountpoint: PathLike, kwargs: Dict[str, Any]) -> None:
    # libfuse installs its own SIGTERM/SIGINT/SIGHUP handlers (exit the loop and
    # unmount) only if they are at their default: make sure they are
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent()
    serve(view, mountpoint, **kwargs)


def _die_with_parent() -> None:
    """SIGTERM this child when the parent dies (even by SIGKILL): libfuse then unmounts and exits."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(0)
    except (OSError, AttributeError):
        log.debug("PR_SET_PDEATHSIG unavailable", exc_info=True)


class BackgroundExport:
    """Serve ``view`` on ``mountpoint`` from a forked child process for the duration of a ``with`` block.

    On enter: fork, mount, wait until mounted (MountError if the child dies or
    ``timeout`` passes).  On exit (always): unmount, join; SIGTERM then SIGKILL
    the child by pid if it does not end; a lazy unmount if still mounted.
    The child works on a forked COPY of ``view``: state built while serving
    (e.g. a ``LazyFile``'s bytes) is not seen by the parent.
    """

    def __init__(
        self,
        view: ExportView,
        mountpoint: PathLike,
        *,
        timeout: float = 10.0,
        join_timeout: float = 10.0,
        threads: bool = True,
        allow_other: bool = False,
        options: Optional[Dict[str, Any]] = None,
        read_ahead_kb: int = 1024,
        malloc_tuning: bool = False,
    ) -> None:
        self.view = view
        self.mountpoint = mountpoint
        self.timeout = timeout
        self.join_timeout = join_timeout
        self._kwargs: Dict[str, Any] = dict(
            foreground=True, threads=threads, allow_other=allow_other, options=options, read_ahead_kb=read_ahead_kb,
            malloc_tuning=malloc_tuning,
        )
        self.proc: Optional[multiprocessing.process.BaseProcess] = None

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def start(self) -> "BackgroundExport":
        load_fuse()  # fail early, in the parent, with the install hint
        if mounted(self.mountpoint):
            raise MountError(f"{self.mountpoint!r} is already a mount point")
        ctx = multiprocessing.get_context("fork")
        self.proc = ctx.Process(
            target=_child_main, args=(self.view, self.mountpoint, self._kwargs), name="discrep-export", daemon=False
        )
        self.proc.start()
        try:
            wait_mounted(self.mountpoint, self.timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Unmount and reap the child; idempotent, never leaves the child or the mount behind if it can help it."""
        proc = self.proc
        try:
            if mounted(self.mountpoint) and (proc is None or proc.is_alive()):
                try:
                    unmount(self.mountpoint)
                except MountError as e:
                    log.warning("%s; stopping the server instead", e)
        finally:
            if proc is not None:
                proc.join(self.join_timeout)
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    if not proc.is_alive():
                        break
                    log.warning("export child %d still running; sending %s", proc.pid, sig.name)
                    try:
                        os.kill(proc.pid, sig)  # type: ignore[arg-type]
                    except ProcessLookupError:
                        break
                    proc.join(5.0)
                self.proc = None
            if mounted(self.mountpoint):
                try:
                    unmount(self.mountpoint, lazy=True)
                except MountError as e:
                    log.error("%s", e)

    def __enter__(self) -> "BackgroundExport":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

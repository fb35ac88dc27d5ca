"""Shared test helpers: tool checks, independent replica comparison, sample trees, cleanup.

Role: imported by tests as ``import helpers`` (tests/conftest.py puts this
directory on sys.path).  Nothing here imports discrep: the replica checks
(``tree_equal`` with rsync, ``python_tree_diff`` in pure Python) must stay
independent of the code under test.

Test directories: every scratch directory is created by ``new_test_dir`` as
``$DISCREP_TEST_TMPDIR`` (default /tmp) ``/discrep-test-<random>/`` and holds an
owner file with the creating process's pid and start time.  ``sweep_stale``
(run at session start) only unmounts, detaches or kills things belonging to a
``discrep-test-`` directory whose owner is gone, so concurrent test sessions
do not hurt each other.

Threading: helpers are meant for the test's main thread; they keep no state.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import pytest

log = logging.getLogger(__name__)

TEST_PREFIX = "discrep-test-"
OWNER_FILE = ".discrep-test-owner"
OWNERLESS_GRACE = 3600.0  # seconds; see _owner_alive
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# names created by make_sample_tree (relative to its root)
SAMPLE_BIG = "data/big.bin"  # 3 MiB
SAMPLE_SPARSE = "data/sparse.img"  # 64 MiB, 4 KiB of data at 32 MiB
SAMPLE_EMPTY_FILE = "empty.txt"
SAMPLE_EMPTY_DIR = "empty_dir"
SAMPLE_HARDLINKS = ("hard/h1", "hard/h2", "dir_a/h3")
SAMPLE_SYMLINKS = {"links/abs": "/etc/passwd", "links/rel": "../dir_a/small1.txt",
                   "links/dangling": "does/not/exist"}
SAMPLE_NON_UTF8 = b"caf\xe9"
SAMPLE_NEWLINE = "new\nline.txt"
SAMPLE_XATTR_FILE = "attrs.txt"
SAMPLE_XATTR = ("user.discrep.test", b"value\x00bin")
SAMPLE_MODE_640 = "modes/m640"
SAMPLE_MODE_SUID = "modes/suid"
SAMPLE_MTIME_FILE = "times/fixed.txt"
SAMPLE_MTIME_NS = 1_600_000_000_123_456_789
SAMPLE_FIFO = "special/fifo"


# --------------------------------------------------------------------------- tools

def find_tool(name: str) -> Optional[str]:
    """Path of executable ``name`` on PATH or in the sbin directories, else None."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    return None


def require_tool(name: str) -> str:
    """Path of ``name``; skips the test (a failure under CI=true for fuse/ssh/root tests) if missing."""
    found = find_tool(name)
    if not found:
        pytest.skip(f"required tool {name!r} not installed (run scripts/setup.sh)")
    return found


def require_fuse() -> None:
    """Skip (a failure in CI) unless FUSE exports can be mounted and replicas checked here."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine (run scripts/setup.sh)")
    require_tool("fusermount3")
    require_tool("rsync")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def run(cmd: List[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command capturing text output; on failure raise with its stderr in the message."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          encoding="utf-8", errors="surrogateescape")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def discrep_cli(*args: str, code: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m discrep ARGS`` (a subprocess: nothing here imports discrep) and assert its exit code."""
    import sys
    p = subprocess.run([sys.executable, "-m", "discrep", *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == code, f"exit {p.returncode} (wanted {code}): {p.stdout}{p.stderr}"
    return p


def tree_digest(root: os.PathLike | str, *, dir_mtimes: bool = True, volatile: Iterable[str] = ()) -> str:
    """A digest of every name, type and mode under ``root``, each regular file's size, mtime and
    bytes, and (``dir_mtimes``) every directory's mtime.  Files named in ``volatile`` (a lock file a
    run rewrites) count by name and mode only.  For "nothing changed here" checks."""
    import hashlib
    skip = set(volatile)
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + dirs:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            h.update(os.fsencode(os.path.relpath(p, root)) + b"\0%o" % st.st_mode)
            if stat.S_ISDIR(st.st_mode) and dir_mtimes:
                h.update(b" %d" % st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode) and name not in skip:
                h.update(b" %d %d" % (st.st_size, st.st_mtime_ns))
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


# --------------------------------------------------------------------------- test dirs

def _proc_start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # field 22 (starttime); comm (field 2) may hold spaces, so split after the last ')'
    return data[data.rindex(b")") + 2:].split()[19].decode()


def new_test_dir(base: Optional[str] = None) -> Path:
    """Create ``<base>/discrep-test-<random>/`` with an owner file naming this process."""
    base = base or os.environ.get("DISCREP_TEST_TMPDIR") or "/tmp"
    path = Path(tempfile.mkdtemp(prefix=TEST_PREFIX, dir=base))
    (path / OWNER_FILE).write_text(f"{os.getpid()} {_proc_start_time(os.getpid())}\n")
    return path


def _owner_alive(test_dir: str) -> bool:
    """Is the session that created ``test_dir`` still running?

    A directory without an owner file (made by code that does not use
    ``new_test_dir``) counts as alive for ``OWNERLESS_GRACE`` seconds after its
    last change, so a concurrent run's fresh directory is never swept.
    """
    try:
        pid_s, start = Path(test_dir, OWNER_FILE).read_text().split()
    except FileNotFoundError:
        try:
            return time.time() - os.stat(test_dir).st_mtime < OWNERLESS_GRACE
        except OSError:
            return False
    except (OSError, ValueError):
        return False
    return _proc_start_time(int(pid_s)) == start


def _test_root_of(path: str) -> Optional[str]:
    """The ``.../discrep-test-xxx`` directory component of ``path``, if any."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part.startswith(TEST_PREFIX):
            return "/".join(parts[:i + 1])
    if TEST_PREFIX in path:  # e.g. an image file named discrep-test-*.img
        return path[:path.index(TEST_PREFIX)] + path[path.index(TEST_PREFIX):].split("/")[0]
    return None


def is_stale(path: str) -> bool:
    """True when ``path`` lies in a ``discrep-test-`` directory whose owner process is gone."""
    root = _test_root_of(path)
    if root is None:
        return False
    if os.path.isdir(root):
        return not _owner_alive(root)
    # backing file of an image: its owner dir is the nearest discrep-test- parent directory
    parent = os.path.dirname(root)
    test_root = _test_root_of(parent)
    return not (test_root and _owner_alive(test_root))


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> List[Tuple[str, str, str]]:
    """(mountpoint, fstype, source) for every mount in /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 2:
                out.append((_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return out


def unmount(mountpoint: str, fstype: str = "") -> bool:
    """Unmount (FUSE via fusermount3 -uz, others umount then umount -l); True when gone."""
    cmds: List[List[str]] = []
    if fstype.startswith("fuse") and find_tool("fusermount3"):
        cmds.append(["fusermount3", "-uz", mountpoint])
    cmds += [["umount", mountpoint], ["umount", "-l", mountpoint]]
    for cmd in cmds:
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if not any(m[0] == mountpoint for m in mounts()):
            return True
    return False


def loop_devices() -> List[Tuple[str, str]]:
    """(device, backing file) for every attached loop device (from sysfs)."""
    out = []
    for dev in sorted(Path("/sys/block").glob("loop*")):
        try:
            back = (dev / "loop" / "backing_file").read_text().rstrip("\n")
        except OSError:
            continue
        out.append((f"/dev/{dev.name}", back))
    return out


def detach_loop(device: str) -> None:
    for _ in range(5):
        if subprocess.run(["losetup", "-d", device], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0:
            return
        time.sleep(0.2)
    log.warning("could not detach %s", device)


def unmount_under(path: str) -> List[str]:
    """Unmount everything mounted at or below ``path`` (deepest first); returns leftovers."""
    prefix = os.path.realpath(path).rstrip("/") + "/"
    left = []
    for mnt, fstype, _src in sorted(mounts(), key=lambda m: -len(m[0])):
        if (mnt + "/").startswith(prefix) and not unmount(mnt, fstype):
            left.append(mnt)
    return left


def sweep_stale() -> List[str]:
    """Clean leftovers of dead test sessions; returns what was done (for logging).

    Unmounts mounts whose mountpoint contains ``discrep-test-``, detaches loop
    devices whose backing file path contains it, kills sshd processes whose
    command line contains it -- only when the owning test directory's process is
    gone (a directory without owner file counts as alive for OWNERLESS_GRACE
    seconds).  Then removes the dead directories under the default base.
    """
    done: List[str] = []
    for mnt, fstype, _src in sorted(mounts(), key=lambda m: -len(m[0])):
        if TEST_PREFIX in mnt and is_stale(mnt):
            done.append(f"unmount {mnt}: {'ok' if unmount(mnt, fstype) else 'FAILED'}")
    for dev, back in loop_devices():
        if TEST_PREFIX in back and is_stale(back.replace(" (deleted)", "")):
            detach_loop(dev)
            done.append(f"detach {dev} ({back})")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not os.path.basename(argv[0]).startswith(b"sshd"):
            continue
        # sshd rewrites its title into argv[0] ("sshd: /usr/sbin/sshd -D -f /tmp/discrep-test-x/... [listener]"):
        # look at each word, not each argv element, or a live session's sshd looks stale
        words = [w.decode(errors="surrogateescape") for a in argv for w in a.split()]
        hits = [w.split("=", 1)[-1] for w in words if TEST_PREFIX in w]
        if hits and is_stale(hits[0]):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                done.append(f"kill sshd {proc.name}")
            except OSError:
                pass
    base = os.environ.get("DISCREP_TEST_TMPDIR") or "/tmp"
    try:
        entries = list(os.scandir(base))
    except OSError:
        entries = []
    for ent in entries:
        if ent.name.startswith(TEST_PREFIX) and ent.is_dir(follow_symlinks=False) \
                and not _owner_alive(ent.path):
            remove_tree(ent.path)
            done.append(f"remove {ent.path}")
    return done


def remove_tree(path: os.PathLike | str) -> None:
    """rm -rf that unmounts what is mounted below first and never descends into a mount.

    Problems are logged, not raised (used in teardown).
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    left = set(unmount_under(path))
    if left:
        log.warning("still mounted below %s, not removing them: %s", path, sorted(left))
    prefix = os.path.realpath(path).rstrip("/") + "/"
    for dev, back in loop_devices():
        if back.startswith(prefix):
            detach_loop(dev)

    def onerror(func, p, exc_info):  # make read-only dirs writable and retry once
        exc = exc_info[1]
        if isinstance(exc, PermissionError):
            try:
                os.chmod(os.path.dirname(p), 0o700)
                func(p)
                return
            except OSError:
                pass
        log.warning("cannot remove %s: %s", p, exc)

    def walk(d: str) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError as exc:
            log.warning("cannot list %s: %s", d, exc)
            return
        for ent in entries:
            if ent.path in left:
                continue
            if ent.is_dir(follow_symlinks=False):
                walk(ent.path)
                try:
                    os.rmdir(ent.path)
                except OSError as exc:
                    onerror(os.rmdir, ent.path, (type(exc), exc, None))
            else:
                try:
                    os.unlink(ent.path)
                except OSError as exc:
                    onerror(os.unlink, ent.path, (type(exc), exc, None))

    if os.path.isdir(path) and not os.path.islink(path):
        walk(path)
        if not left:
            try:
                os.rmdir(path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc)
    else:
        os.unlink(path)


# --------------------------------------------------------------------------- replica checks

def tree_equal(src: os.PathLike | str, dst: os.PathLike | str) -> List[str]:
    """Independent replica check with rsync: itemized differences (empty list = identical).

    ``rsync -aHAXnci --delete --exclude=/.discrep/ SRC/ DST/`` in dry-run with
    full checksums: content, perms, owner, group, times, hard links, ACLs, xattrs,
    extra files in DST; ``--modify-window=-1`` compares mtimes to the nanosecond
    (rsync >= 3.1.3).  Raises RuntimeError if rsync itself fails.
    """
    rsync = require_tool("rsync")
    cmd = [rsync, "-aHAXnci", "--delete", "--modify-window=-1", "--exclude=/.discrep/",
           os.fspath(src).rstrip("/") + "/", os.fspath(dst).rstrip("/") + "/"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"rsync failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    return [line for line in proc.stdout.decode(errors="surrogateescape").splitlines() if line.strip()]


def _show(rel: bytes) -> str:
    return repr(os.fsdecode(rel)) if rel else "'.'"


def _walk(root: bytes, exclude: Set[bytes]) -> Dict[bytes, os.stat_result]:
    out: Dict[bytes, os.stat_result] = {b"": os.lstat(root)}

    def rec(rel: bytes) -> None:
        full = os.path.join(root, rel) if rel else root
        for ent in sorted(os.scandir(full), key=lambda e: e.name):
            child = os.path.join(rel, ent.name) if rel else ent.name
            if not rel and ent.name in exclude:
                continue
            st = os.lstat(ent.path)
            out[child] = st
            if stat.S_ISDIR(st.st_mode):
                rec(child)

    rec(b"")
    return out


def _user_xattrs(path: bytes) -> Dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names if n.startswith("user.")}


def _same_bytes(a: bytes, b: bytes) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                return False
            if not ca:
                return True


def _is_sparse(st: os.stat_result) -> bool:
    return st.st_blocks * 512 < st.st_size


def python_tree_diff(src: os.PathLike | str, dst: os.PathLike | str,
                     exclude: Iterable[str] = (".discrep",), *, check_sparse: bool = False,
                     check_mtime: bool = True) -> List[str]:
    """Pure-Python replica check: human-readable differences (empty list = identical).

    Walks both trees with lstat (never following symlinks) and compares type,
    mode, uid, gid, mtime_ns (files, symlinks, dirs, the root too), size,
    contents, symlink targets, device numbers, user.* xattrs and hard-link
    grouping (the set of paths sharing an inode).  ``exclude`` names top-level
    entries to ignore.  With ``check_sparse`` a file that is sparse on one side
    (allocated < size) but not on the other is reported as ``sparse: ...``.
    """
    sroot, droot = os.fsencode(os.fspath(src)), os.fsencode(os.fspath(dst))
    excl = {os.fsencode(e) for e in exclude}
    s_ent, d_ent = _walk(sroot, excl), _walk(droot, excl)
    diffs: List[str] = []
    for rel in sorted(set(s_ent) - set(d_ent)):
        diffs.append(f"{_show(rel)}: only in source")
    for rel in sorted(set(d_ent) - set(s_ent)):
        diffs.append(f"{_show(rel)}: only in destination")

    def groups(ents: Dict[bytes, os.stat_result]) -> Dict[bytes, FrozenSet[bytes]]:
        by_ino: Dict[Tuple[int, int], Set[bytes]] = {}
        for rel, st in ents.items():
            if not stat.S_ISDIR(st.st_mode):
                by_ino.setdefault((st.st_dev, st.st_ino), set()).add(rel)
        return {rel: frozenset(g) for g in by_ino.values() for rel in g}

    s_grp, d_grp = groups(s_ent), groups(d_ent)
    reported_groups: Set[FrozenSet[bytes]] = set()
    for rel in sorted(set(s_ent) & set(d_ent)):
        s, d = s_ent[rel], d_ent[rel]
        name = _show(rel)
        sp, dp = os.path.join(sroot, rel) if rel else sroot, os.path.join(droot, rel) if rel else droot
        if stat.S_IFMT(s.st_mode) != stat.S_IFMT(d.st_mode):
            diffs.append(f"{name}: type {stat.filemode(s.st_mode)[0]} != {stat.filemode(d.st_mode)[0]}")
            continue
        if stat.S_IMODE(s.st_mode) != stat.S_IMODE(d.st_mode) and not stat.S_ISLNK(s.st_mode):
            diffs.append(f"{name}: mode {oct(stat.S_IMODE(s.st_mode))} != {oct(stat.S_IMODE(d.st_mode))}")
        if (s.st_uid, s.st_gid) != (d.st_uid, d.st_gid):
            diffs.append(f"{name}: owner {s.st_uid}:{s.st_gid} != {d.st_uid}:{d.st_gid}")
        kind = stat.S_IFMT(s.st_mode)
        if check_mtime and kind in (stat.S_IFREG, stat.S_IFLNK, stat.S_IFDIR) \
                and s.st_mtime_ns != d.st_mtime_ns:
            diffs.append(f"{name}: mtime_ns {s.st_mtime_ns} != {d.st_mtime_ns}")
        if kind in (stat.S_IFREG, stat.S_IFLNK) and s.st_size != d.st_size:
            diffs.append(f"{name}: size {s.st_size} != {d.st_size}")
        elif kind == stat.S_IFREG and not _same_bytes(sp, dp):
            diffs.append(f"{name}: contents differ")
        if kind == stat.S_IFLNK and os.readlink(sp) != os.readlink(dp):
            diffs.append(f"{name}: symlink {os.fsdecode(os.readlink(sp))!r} != "
                         f"{os.fsdecode(os.readlink(dp))!r}")
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and s.st_rdev != d.st_rdev:
            diffs.append(f"{name}: rdev {s.st_rdev} != {d.st_rdev}")
        if kind != stat.S_IFLNK:
            sx, dx = _user_xattrs(sp), _user_xattrs(dp)
            if sx != dx:
                diffs.append(f"{name}: user xattrs {sorted(sx.items())} != {sorted(dx.items())}")
        if rel in s_grp and s_grp[rel] != d_grp.get(rel):
            key = s_grp[rel] | d_grp.get(rel, frozenset())
            if key not in reported_groups:
                reported_groups.add(key)
                diffs.append(f"{name}: hard links {sorted(map(_show, s_grp[rel]))} != "
                             f"{sorted(map(_show, d_grp.get(rel, frozenset())))}")
        if check_sparse and kind == stat.S_IFREG and _is_sparse(s) != _is_sparse(d):
            diffs.append(f"sparse: {name}: source {'sparse' if _is_sparse(s) else 'dense'}, "
                         f"destination {'sparse' if _is_sparse(d) else 'dense'}")
    return diffs


# --------------------------------------------------------------------------- sample tree

def make_sample_tree(root: os.PathLike | str, *, with_special: bool = False,
                     xattrs: bool = True) -> Path:
    """Fill ``root`` (created if needed) with every kind of entry a replica must reproduce.

    Nested and empty dirs, small files, a 3 MiB file, a 0-byte file, a 64 MiB
    sparse file, absolute/relative/dangling symlinks, a 3-link hard-link group,
    a non-UTF-8 name, a name with a newline, a user xattr, modes 0640 and 04755,
    a file with a fixed mtime in ns; with ``with_special`` also a FIFO.  Names
    are the SAMPLE_* constants of this module.  Deterministic contents.
    """
    r = Path(root)
    rng = random.Random(1234)
    for d in ("dir_a/dir_b/dir_c", SAMPLE_EMPTY_DIR, "data", "links", "hard", "modes", "times"):
        (r / d).mkdir(parents=True, exist_ok=True)
    (r / "dir_a/small1.txt").write_bytes(b"hello\n")
    (r / "dir_a/small2.bin").write_bytes(rng.randbytes(1000))
    (r / "dir_a/dir_b/dir_c/deep.txt").write_bytes(b"deep file\n" * 10)
    (r / "top.txt").write_bytes(b"top level\n")
    (r / SAMPLE_BIG).write_bytes(rng.randbytes(3 << 20))
    (r / SAMPLE_EMPTY_FILE).write_bytes(b"")
    with open(r / SAMPLE_SPARSE, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(32 << 20)
        fh.write(b"S" * 4096)
    for link, target in SAMPLE_SYMLINKS.items():
        os.symlink(target, r / link)
    (r / SAMPLE_HARDLINKS[0]).write_bytes(b"hard linked content\n")
    for other in SAMPLE_HARDLINKS[1:]:
        os.link(r / SAMPLE_HARDLINKS[0], r / other)
    with open(os.path.join(os.fsencode(os.fspath(r)), SAMPLE_NON_UTF8), "wb") as fh:
        fh.write(b"latin-1 name\n")
    (r / SAMPLE_NEWLINE).write_bytes(b"newline in name\n")
    (r / SAMPLE_XATTR_FILE).write_bytes(b"has an xattr\n")
    if xattrs:
        os.setxattr(r / SAMPLE_XATTR_FILE, *SAMPLE_XATTR)
    (r / SAMPLE_MODE_640).write_bytes(b"0640\n")
    os.chmod(r / SAMPLE_MODE_640, 0o640)
    (r / SAMPLE_MODE_SUID).write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(r / SAMPLE_MODE_SUID, 0o4755)
    (r / SAMPLE_MTIME_FILE).write_bytes(b"fixed mtime\n")
    os.utime(r / SAMPLE_MTIME_FILE, ns=(SAMPLE_MTIME_NS - 10**9, SAMPLE_MTIME_NS))
    if with_special:
        (r / SAMPLE_FIFO).parent.mkdir(exist_ok=True)
        os.mkfifo(r / SAMPLE_FIFO, 0o644)
    return r

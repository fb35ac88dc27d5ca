"""The one facade for Linux-specific filesystem calls (reflink, FIEMAP, holes, btrfs).

Role: every other module goes through here for anything beyond plain POSIX I/O:
FICLONE reflinks, ``copy_file_range``, SEEK_DATA/SEEK_HOLE, hole punching,
FIEMAP extent maps, statfs filesystem types, btrfs subvolumes and snapshots, and
fsync of paths.  ``probe()`` answers "what does the filesystem under this
directory support" by *trying* each operation on a scratch file, because flags
in /proc or the fs type alone lie (xfs without ``reflink=1``, NFS, FUSE, ...).

Errors: an operation the kernel or filesystem cannot do raises ``NotSupported``
(a subclass of ``OSError`` that keeps the original ``errno``; the errnos that
mean "not supported" are ``FALLBACK_ERRNOS``).  Every other ``OSError``
(ENOSPC, EACCES, EROFS, EIO, ...) propagates unchanged, so callers write::

    try:
        platform.reflink(src_fd, dst_fd)
    except platform.NotSupported:
        ...fall back...

``NotSupported`` subclasses ``OSError`` so that a caller which only knows about
``OSError`` still treats it as an I/O-level failure; catch ``NotSupported``
first when you want the fallback.

btrfs: snapshots, deletion and subvolume ids use the btrfs ioctls directly
(BTRFS_IOC_SNAP_CREATE_V2, BTRFS_IOC_SNAP_DESTROY, BTRFS_IOC_INO_LOOKUP) rather
than the ``btrfs`` command: no btrfs-progs needed on the machine, the real errno
comes back (EEXIST, EROFS, ENOSPC ...) instead of parsed CLI text, and no
subprocess per cycle.  The struct layouts are the stable kernel UAPI.

Threading: all functions are safe to call from several threads at once; they
hold no state except the ``probe()`` cache, which is guarded by a lock.  Functions
taking an fd never move its file position (``data_extents`` restores it),
except ``copy_range``'s pread/pwrite fallback which also uses explicit offsets.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

log = logging.getLogger(__name__)

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
Range = Tuple[int, int]

#: errnos that mean "this filesystem/kernel cannot do that" -> NotSupported
FALLBACK_ERRNOS = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)


class NotSupported(OSError):
    """The operation is not supported here (filesystem, kernel, or cross-device).

    Subclass of ``OSError``; ``errno`` is the kernel's errno (one of
    ``FALLBACK_ERRNOS``, or EOPNOTSUPP when we decided it ourselves).
    """


def _not_supported(op: str, exc: OSError) -> NotSupported:
    err = exc.errno if exc.errno is not None else errno.EOPNOTSUPP
    return NotSupported(err, f"{op} not supported: {os.strerror(err)}")


# --------------------------------------------------------------------------- ioctl numbers

def _ioc_layout() -> Tuple[int, int, int, int]:
    """(NONE, WRITE, READ, SIZEBITS) for this CPU's ioctl encoding."""
    machine = os.uname().machine.lower()     # (the platform module costs ms of regex compiles)
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return 1, 4, 2, 13
    return 0, 1, 2, 14


_IOC_NONE, _IOC_WRITE, _IOC_READ, _IOC_SIZEBITS = _ioc_layout()


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << (16 + _IOC_SIZEBITS)) | (size << 16) | (typ << 8) | nr


FICLONE = _ioc(_IOC_WRITE, 0x94, 9, 4)  # 0x40049409 on x86
FS_IOC_FIEMAP = _ioc(_IOC_READ | _IOC_WRITE, ord("f"), 11, 32)  # 0xC020660B
_BTRFS_VOL_ARGS_SIZE = 4096
BTRFS_IOC_SNAP_DESTROY = _ioc(_IOC_WRITE, 0x94, 15, _BTRFS_VOL_ARGS_SIZE)
BTRFS_IOC_INO_LOOKUP = _ioc(_IOC_READ | _IOC_WRITE, 0x94, 18, _BTRFS_VOL_ARGS_SIZE)
BTRFS_IOC_SNAP_CREATE_V2 = _ioc(_IOC_WRITE, 0x94, 23, _BTRFS_VOL_ARGS_SIZE)
BTRFS_IOC_SUBVOL_GETFLAGS = _ioc(_IOC_READ, 0x94, 25, 8)
BTRFS_IOC_SUBVOL_SETFLAGS = _ioc(_IOC_WRITE, 0x94, 26, 8)
BTRFS_SUBVOL_RDONLY = 1 << 1
BTRFS_FIRST_FREE_OBJECTID = 256

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# FIEMAP
FIEMAP_FLAG_SYNC = 0x0001
FIEMAP_MAX_OFFSET = 0xFFFFFFFFFFFFFFFF
FIEMAP_EXTENT_LAST = 0x0001
FIEMAP_EXTENT_UNKNOWN = 0x0002
FIEMAP_EXTENT_DELALLOC = 0x0004
FIEMAP_EXTENT_ENCODED = 0x0008
FIEMAP_EXTENT_DATA_ENCRYPTED = 0x0080
FIEMAP_EXTENT_NOT_ALIGNED = 0x0100
FIEMAP_EXTENT_DATA_INLINE = 0x0200
FIEMAP_EXTENT_DATA_TAIL = 0x0400
FIEMAP_EXTENT_UNWRITTEN = 0x0800
FIEMAP_EXTENT_MERGED = 0x1000
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HDR = struct.Struct("=QQIIII")  # fm_start fm_length fm_flags fm_mapped fm_count reserved
_FIEMAP_EXT = struct.Struct("=QQQ16xI12x")  # logical physical length reserved64[2] flags reserved[3]
_FIEMAP_BATCH = 256
#: extents whose physical address does not identify the bytes one to one
_FIEMAP_UNRELIABLE = (
    FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DATA_TAIL
)

# statfs f_type magics
_FS_MAGIC: Dict[int, str] = {
    0x9123683E: "btrfs",
    0x58465342: "xfs",
    0xEF53: "ext4",  # ext2/ext3/ext4 share the magic
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x65735546: "fuse",
    0x794C7630: "overlay",
    0x6969: "nfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
    0x73717368: "squashfs",
    0xE0F5E1E2: "erofs",
    0xCA451A4E: "bcachefs",
    0x9FA0: "proc",
    0x62656572: "sysfs",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x4D44: "vfat",
    0x2011BAB0: "exfat",
    0x5346544E: "ntfs",
    0x00C36400: "ceph",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x6165676C: "pstorefs",
    0x1CD1: "devpts",
}

_COPY_CHUNK = 1 << 30  # copy_file_range request size
_RW_CHUNK = 1 << 20  # pread/pwrite fallback buffer


# --------------------------------------------------------------------------- libc

_libc_lock = threading.Lock()
_libc: Optional[ctypes.CDLL] = None


def load_libc() -> ctypes.CDLL:
    """A fresh C library handle (``use_errno``): by its glibc soname (``find_library`` costs ms)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _get_libc() -> ctypes.CDLL:
    global _libc
    with _libc_lock:
        if _libc is None:
            _libc = load_libc()
        return _libc


def _raise_errno(op: str, path: Optional[PathLike] = None) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), *( [os.fsdecode(path)] if path is not None else []))


# --------------------------------------------------------------------------- reflink / copy

def reflink(src_fd: int, dst_fd: int) -> None:
    """Make ``dst_fd`` share all of ``src_fd``'s blocks (FICLONE); dst's old content is replaced.

    Raises ``NotSupported`` when the filesystem cannot reflink or the files are on
    different filesystems.
    """
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in FALLBACK_ERRNOS:
            raise _not_supported("reflink", exc) from exc
        raise


def _copy_rw(src_fd: int, dst_fd: int, length: int, src_off: int, dst_off: int) -> int:
    done = 0
    while done < length:
        buf = os.pread(src_fd, min(_RW_CHUNK, length - done), src_off + done)
        if not buf:
            break  # EOF
        view = memoryview(buf)
        while view:
            n = os.pwrite(dst_fd, view, dst_off + done)
            view = view[n:]
            done += n
    return done


def copy_range(src_fd: int, dst_fd: int, length: int, src_off: int = 0, dst_off: int = 0) -> int:
    """Copy ``length`` bytes from ``src_off`` to ``dst_off``; returns bytes copied (short at EOF).

    Uses ``copy_file_range`` (which may itself reflink or copy in-kernel) and falls
    back to pread/pwrite when it is unsupported or returns 0 before EOF (procfs,
    some FUSE filesystems).  File positions are not used or changed.
    """
    if length <= 0:
        return 0
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < length and use_cfr:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(_COPY_CHUNK, length - done),
                                   src_off + done, dst_off + done)
        except OSError as exc:
            if exc.errno in FALLBACK_ERRNOS or exc.errno in (errno.EBADF, errno.EPERM):
                # EBADF/EPERM: some kernels reject special/immutable/unsupported fds here;
                # pread/pwrite below re-raises if the fds are really unusable.
                log.debug("copy_file_range unavailable (%s), using pread/pwrite", exc)
                use_cfr = False
                break
            raise
        if n == 0:
            use_cfr = False  # EOF, or a filesystem that returns 0 spuriously: let pread decide
            break
        done += n
    if done < length:
        done += _copy_rw(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
    return done


def data_extents(fd: int, size: int) -> List[Range]:
    """(offset, length) of the data regions of ``fd`` below ``size``, via SEEK_DATA/SEEK_HOLE.

    A filesystem without hole reporting yields ``[(0, size)]``.  The fd's file
    position is restored.
    """
    if size <= 0:
        return []
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    out: List[Range] = []
    try:
        off = 0
        while off < size:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # no data after off
                if exc.errno in FALLBACK_ERRNOS:
                    return [(0, size)]
                raise
            if data >= size:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
            if hole <= data:  # defensive: never loop forever
                hole = size
            out.append((data, hole - data))
            off = hole
    finally:
        os.lseek(fd, pos, os.SEEK_SET)
    return out


def punch_hole(fd: int, off: int, length: int) -> None:
    """Deallocate ``[off, off+length)`` keeping the file size (reads return zeros).

    Raises ``NotSupported`` when the filesystem cannot punch holes.
    """
    if length <= 0:
        return
    libc = _get_libc()
    func = getattr(libc, "fallocate64", None) or libc.fallocate
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    if func(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length) != 0:
        err = ctypes.get_errno()
        exc = OSError(err, os.strerror(err))
        if err in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise _not_supported("punch_hole", exc)
        raise exc


def clone_file(src: PathLike, dst: PathLike, *, preserve_sparse: bool = True) -> str:
    """Create/overwrite ``dst`` with ``src``'s bytes; returns ``'reflink'`` or ``'copy'``.

    Reflinks when the filesystem can, else copies with ``copy_file_range``, only
    the data regions when ``preserve_sparse`` (holes stay holes; the size is set
    with ftruncate).  ``dst`` is created mode 0600 and no metadata is copied (use
    ``copy_metadata``).  On failure a partial ``dst`` is removed.
    """
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sst = os.fstat(sfd)
        size = sst.st_size
        try:
            dst_st = os.stat(dst)
        except FileNotFoundError:
            pass
        else:
            if (dst_st.st_dev, dst_st.st_ino) == (sst.st_dev, sst.st_ino):
                raise OSError(errno.EINVAL, "source and destination are the same file", os.fsdecode(dst))
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                reflink(sfd, dfd)
                return "reflink"
            except NotSupported as exc:
                log.debug("clone_file %s: %s; copying", os.fsdecode(src), exc)
            extents = data_extents(sfd, size) if preserve_sparse else [(0, size)]
            for off, length in extents:
                n = copy_range(sfd, dfd, length, off, off)
                if n != length:
                    raise OSError(errno.EIO, f"source shrank while copying ({n} of {length} bytes "
                                  f"at offset {off})", os.fsdecode(src))
            os.ftruncate(dfd, size)
            return "copy"
        except BaseException:
            try:
                os.unlink(dst)
            except OSError:
                pass
            raise
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


# --------------------------------------------------------------------------- metadata

def copy_metadata(src_path: PathLike, dst_path: PathLike, st: Optional[os.stat_result] = None) -> None:
    """Copy owner, mode, xattrs and times from ``src_path`` (lstat ``st``) to ``dst_path``.

    Order matters: owner first (chown clears setuid/setgid), then mode (not on
    symlinks), then xattrs (incl. POSIX ACLs stored as system.posix_acl_*), then
    atime/mtime in ns last, all without following symlinks.  xattrs present on
    dst but not on src are removed.  An xattr the destination filesystem cannot
    store (ENOTSUP), or may not store (EPERM for non-user namespaces), is logged
    as a warning and skipped; other errors propagate.
    """
    if st is None:
        st = os.lstat(src_path)
    is_link = stat.S_ISLNK(st.st_mode)
    dst_st = os.lstat(dst_path)
    if (dst_st.st_uid, dst_st.st_gid) != (st.st_uid, st.st_gid):
        os.chown(dst_path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not is_link:
        os.chmod(dst_path, stat.S_IMODE(st.st_mode))
    _copy_xattrs(src_path, dst_path)
    os.utime(dst_path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _list_xattrs(path: PathLike) -> List[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def _copy_xattrs(src: PathLike, dst: PathLike) -> None:
    src_attrs: Dict[str, bytes] = {}
    for name in _list_xattrs(src):
        try:
            src_attrs[name] = os.getxattr(src, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EPERM, errno.EACCES, errno.ENOTSUP):
                log.debug("xattr %s of %s not readable: %s", name, os.fsdecode(src), exc)
                continue
            raise
    try:
        dst_names = _list_xattrs(dst)
    except OSError:
        dst_names = []
    for name in dst_names:
        if name in src_attrs or name.startswith("security.selinux"):
            continue
        try:
            os.removexattr(dst, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                log.debug("cannot remove xattr %s of %s: %s", name, os.fsdecode(dst), exc)
                continue
            raise
    for name, value in src_attrs.items():
        try:
            if name in dst_names and os.getxattr(dst, name, follow_symlinks=False) == value:
                continue
        except OSError:
            pass
        try:
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) or (
                exc.errno in (errno.EPERM, errno.EACCES) and not name.startswith("user.")
            ):
                log.warning("xattr %s not copied to %s: %s", name, os.fsdecode(dst), exc.strerror)
                continue
            raise


# --------------------------------------------------------------------------- FIEMAP

@dataclass(frozen=True)
class Extent:
    """One FIEMAP extent: byte offsets in the file (logical) and on the device (physical)."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)

    @property
    def last(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_LAST)

    @property
    def end(self) -> int:
        return self.logical + self.length


def fiemap(fd: int, *, sync: bool = True) -> List[Extent]:
    """All extents of ``fd`` (FS_IOC_FIEMAP), fetched in batches.

    ``sync`` (FIEMAP_FLAG_SYNC) flushes dirty data first so that delayed
    allocations and copy-on-write remaps are visible.  Raises ``NotSupported``
    when the filesystem has no FIEMAP (tmpfs, most FUSE).
    """
    out: List[Extent] = []
    start = 0
    buf = bytearray(_FIEMAP_HDR.size + _FIEMAP_EXT.size * _FIEMAP_BATCH)
    while True:
        buf[:] = bytes(len(buf))
        _FIEMAP_HDR.pack_into(buf, 0, start, FIEMAP_MAX_OFFSET - start,
                              FIEMAP_FLAG_SYNC if sync else 0, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            if exc.errno in FALLBACK_ERRNOS or exc.errno == errno.EBADR:
                raise _not_supported("fiemap", exc) from exc
            raise
        mapped = _FIEMAP_HDR.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last: Optional[Extent] = None
        for i in range(mapped):
            lo, ph, ln, fl = _FIEMAP_EXT.unpack_from(buf, _FIEMAP_HDR.size + i * _FIEMAP_EXT.size)
            last = Extent(lo, ph, ln, fl)
            out.append(last)
        assert last is not None
        if last.last or last.end <= start:
            break
        start = last.end
    return out


def shared_ranges(fd_a: int, fd_b: int) -> List[Range]:
    """Logical (offset, length) ranges where both files map the same physical bytes.

    Such ranges are reflink-shared and unchanged since the clone, so their
    contents are equal without reading them.  Only ranges at the same logical
    offset in both files count, clipped to the smaller file size; extents whose
    physical address is not a plain byte mapping (delalloc, encoded/compressed,
    inline, unknown) never count.  Raises ``NotSupported`` without FIEMAP.
    """
    limit = min(os.fstat(fd_a).st_size, os.fstat(fd_b).st_size)
    if limit == 0:
        return []
    ea = [e for e in fiemap(fd_a) if not e.flags & _FIEMAP_UNRELIABLE]
    eb = [e for e in fiemap(fd_b) if not e.flags & _FIEMAP_UNRELIABLE]
    out: List[Range] = []
    i = j = 0
    while i < len(ea) and j < len(eb):
        a, b = ea[i], eb[j]
        lo, hi = max(a.logical, b.logical), min(a.end, b.end, limit)
        if lo < hi and a.physical - a.logical == b.physical - b.logical \
                and (a.flags & FIEMAP_EXTENT_UNWRITTEN) == (b.flags & FIEMAP_EXTENT_UNWRITTEN):
            if out and out[-1][0] + out[-1][1] == lo:
                out[-1] = (out[-1][0], hi - out[-1][0])
            else:
                out.append((lo, hi - lo))
        if a.end <= b.end:
            i += 1
        else:
            j += 1
    return out


# --------------------------------------------------------------------------- fs type

class _Statfs(ctypes.Structure):
    # only f_type is read; the buffer is oversized for every ABI
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248)]


def _statfs_magic(path: PathLike) -> int:
    libc = _get_libc()
    func = getattr(libc, "statfs64", None) or libc.statfs
    func.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
    func.restype = ctypes.c_int
    buf = _Statfs()
    if func(os.fsencode(path), ctypes.byref(buf)) != 0:
        _raise_errno("statfs", path)
    return buf.f_type & 0xFFFFFFFF


def _mountinfo_fstype(path: PathLike) -> Optional[str]:
    """fs type of the mount holding ``path`` from /proc/self/mountinfo (longest prefix)."""
    real = os.path.realpath(os.fsdecode(path))
    best, best_type = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mnt = _unescape_mount(fields[4])
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, right.split()[0]
    except OSError:
        return None
    return best_type


def _unescape_mount(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fs_type(path: PathLike) -> str:
    """Short filesystem type name of ``path``: 'btrfs', 'xfs', 'ext4', 'tmpfs', 'fuse', ...

    From statfs ``f_type``; unknown magics fall back to /proc/self/mountinfo, then
    to ``'0x<magic>'``.  ext2/ext3 report as 'ext4' (same magic).
    """
    magic = _statfs_magic(path)
    name = _FS_MAGIC.get(magic)
    if name is not None:
        return name
    name = _mountinfo_fstype(path)
    return name.split(".")[0] if name else f"0x{magic:x}"


# --------------------------------------------------------------------------- btrfs

def _open_dir(path: PathLike) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def is_btrfs_subvolume(path: PathLike) -> bool:
    """True when ``path`` is the root directory of a btrfs subvolume or snapshot."""
    st = os.stat(path)
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_FIRST_FREE_OBJECTID \
        and fs_type(path) == "btrfs"


def btrfs_subvolume_id(path: PathLike) -> int:
    """Id of the btrfs subvolume containing ``path`` (BTRFS_IOC_INO_LOOKUP; no root needed)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(_BTRFS_VOL_ARGS_SIZE)
        struct.pack_into("=QQ", buf, 0, 0, BTRFS_FIRST_FREE_OBJECTID)
        try:
            fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, buf, True)
        except OSError as exc:
            if exc.errno in FALLBACK_ERRNOS:
                raise _not_supported("btrfs_subvolume_id", exc) from exc
            raise
        return struct.unpack_from("=Q", buf, 0)[0]
    finally:
        os.close(fd)


def _split_dst(dst: PathLike) -> Tuple[str, bytes]:
    dst_s = os.path.abspath(os.fsdecode(dst)).rstrip("/")
    parent, name = os.path.split(dst_s)
    bname = os.fsencode(name)
    if not bname or len(bname) >= 4040:
        raise OSError(errno.EINVAL, "bad snapshot name", dst_s)
    return parent or "/", bname


def btrfs_snapshot(src_subvol: PathLike, dst: PathLike, readonly: bool = True) -> None:
    """Snapshot subvolume ``src_subvol`` to the new path ``dst`` (same btrfs filesystem).

    Uses BTRFS_IOC_SNAP_CREATE_V2 (flag BTRFS_SUBVOL_RDONLY when ``readonly``).
    ``NotSupported`` when src is not a btrfs subvolume root or dst is on another
    filesystem; EEXIST etc. propagate.  Needs root (or CAP_SYS_ADMIN) on most kernels.
    """
    if not is_btrfs_subvolume(src_subvol):
        raise NotSupported(errno.EINVAL, f"not a btrfs subvolume: {os.fsdecode(src_subvol)}")
    parent, name = _split_dst(dst)
    sfd = _open_dir(src_subvol)
    try:
        pfd = _open_dir(parent)
        try:
            buf = bytearray(_BTRFS_VOL_ARGS_SIZE)
            # fd(s64) transid(u64) flags(u64) union{size,qgroup_inherit*|unused[4]}(32) name[4040]
            struct.pack_into("=qQQ32x", buf, 0, sfd, 0, BTRFS_SUBVOL_RDONLY if readonly else 0)
            buf[56:56 + len(name)] = name
            try:
                fcntl.ioctl(pfd, BTRFS_IOC_SNAP_CREATE_V2, buf, True)
            except OSError as exc:
                if exc.errno in FALLBACK_ERRNOS:
                    raise _not_supported("btrfs_snapshot", exc) from exc
                raise
        finally:
            os.close(pfd)
    finally:
        os.close(sfd)
    log.debug("btrfs snapshot %s -> %s (readonly=%s)", os.fsdecode(src_subvol), os.fsdecode(dst), readonly)


def _btrfs_set_readonly(path: PathLike, readonly: bool) -> None:
    fd = _open_dir(path)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, buf, True)
        flags = struct.unpack("=Q", buf)[0]
        flags = flags | BTRFS_SUBVOL_RDONLY if readonly else flags & ~BTRFS_SUBVOL_RDONLY
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, struct.pack("=Q", flags))
    finally:
        os.close(fd)


def btrfs_delete_subvolume(path: PathLike) -> None:
    """Delete the subvolume/snapshot at ``path`` (read-only ones too; it must hold no nested
    subvolumes).  BTRFS_IOC_SNAP_DESTROY on the parent; as root a read-only snapshot is
    deleted directly.  If the kernel refuses with EPERM/EACCES (unprivileged with
    ``user_subvol_rm_allowed``) the read-only flag is cleared once and the delete retried.
    """
    if not is_btrfs_subvolume(path):
        raise NotSupported(errno.EINVAL, f"not a btrfs subvolume: {os.fsdecode(path)}")
    parent, name = _split_dst(path)

    def destroy() -> None:
        pfd = _open_dir(parent)
        try:
            buf = bytearray(_BTRFS_VOL_ARGS_SIZE)
            struct.pack_into("=q", buf, 0, 0)
            buf[8:8 + len(name)] = name
            fcntl.ioctl(pfd, BTRFS_IOC_SNAP_DESTROY, buf, True)
        finally:
            os.close(pfd)

    try:
        destroy()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            log.debug("delete %s: %s; clearing read-only flag and retrying", os.fsdecode(path), exc)
            _btrfs_set_readonly(path, False)
            destroy()
        elif exc.errno in FALLBACK_ERRNOS:
            raise _not_supported("btrfs_delete_subvolume", exc) from exc
        else:
            raise


# --------------------------------------------------------------------------- fsync

def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that entries created/renamed in it are durable."""
    fd = _open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: PathLike) -> None:
    """fsync the file or directory at ``path`` (follows symlinks)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- probe

@dataclass(frozen=True)
class Capabilities:
    """What the filesystem under a directory really supports (tried, not guessed).

    ``btrfs_subvolume``: the fs is btrfs and the subvolume ioctls answer, so
    subvolumes/snapshots can be used there (not: "this directory is a subvolume";
    use ``is_btrfs_subvolume`` for that).
    """

    fs_type: str
    reflink: bool
    fiemap: bool
    seek_data: bool
    punch_hole: bool
    btrfs_subvolume: bool


_probe_cache: Dict[int, Capabilities] = {}
_probe_lock = threading.Lock()
_PROBE_SIZE = 1 << 20


def clear_probe_cache() -> None:
    """Forget cached probe results (tests, or after remounting with other options)."""
    with _probe_lock:
        _probe_cache.clear()


def _try(op: str, func) -> bool:
    try:
        func()
        return True
    except NotSupported as exc:
        log.debug("probe: %s not supported: %s", op, exc)
        return False
    except OSError as exc:
        log.warning("probe: %s failed: %s; treating as unsupported", op, exc)
        return False


def probe(path: PathLike) -> Capabilities:
    """Try reflink, FIEMAP, SEEK_HOLE, hole punching and btrfs ioctls inside directory ``path``.

    Creates two scratch files named ``.discrep-probe-*`` in ``path`` and removes them.
    The result is cached per ``st_dev`` (on btrfs: per subvolume).  Errors creating
    the scratch files (EROFS, EACCES, ENOSPC) propagate.
    """
    dev = os.stat(path).st_dev
    with _probe_lock:
        cached = _probe_cache.get(dev)
    if cached is not None:
        return cached
    fstype = fs_type(path)
    fd_a, name_a = tempfile.mkstemp(prefix=".discrep-probe-", dir=os.fsdecode(path))
    fd_b, name_b = -1, None
    try:
        os.pwrite(fd_a, b"\xa5" * 65536, 0)
        os.ftruncate(fd_a, _PROBE_SIZE)
        os.fsync(fd_a)
        fd_b, name_b = tempfile.mkstemp(prefix=".discrep-probe-", dir=os.fsdecode(path))

        def seek() -> None:
            hole = os.lseek(fd_a, 0, os.SEEK_HOLE)
            if hole >= _PROBE_SIZE:
                raise NotSupported(errno.EOPNOTSUPP, "SEEK_HOLE finds no hole")
            os.lseek(fd_a, 0, os.SEEK_SET)

        caps = Capabilities(
            fs_type=fstype,
            reflink=_try("reflink", lambda: reflink(fd_a, fd_b)),
            fiemap=_try("fiemap", lambda: fiemap(fd_a)),
            seek_data=_try("seek_data", seek),
            punch_hole=_try("punch_hole", lambda: punch_hole(fd_a, 0, 4096)),
            btrfs_subvolume=fstype == "btrfs" and _try(
                "btrfs_subvolume", lambda: btrfs_subvolume_id(path)),
        )
    finally:
        os.close(fd_a)
        os.unlink(name_a)
        if fd_b >= 0:
            os.close(fd_b)
        if name_b is not None:
            os.unlink(name_b)
    log.debug("probe %s: %s", os.fsdecode(path), caps)
    with _probe_lock:
        _probe_cache[dev] = caps
    return caps

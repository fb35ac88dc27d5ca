"""discrep.core.platform on ordinary filesystems (the /tmp fs and tmpfs), plus helper self-checks."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

import helpers
from discrep.core import platform

pytestmark = pytest.mark.fs

MiB = 1 << 20


@pytest.fixture
def shm_dir():
    """A discrep-test- directory on tmpfs (/dev/shm); skipped when /dev/shm is not tmpfs."""
    if not os.path.isdir("/dev/shm") or platform.fs_type("/dev/shm") != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs")
    path = helpers.new_test_dir("/dev/shm")
    yield path
    helpers.remove_tree(path)


def _sparse_file(path: Path, size: int = 64 * MiB, at: int = 32 * MiB, data: bytes = b"D" * 8192) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.seek(at)
        fh.write(data)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# --------------------------------------------------------------------------- clone / copy

@pytest.mark.parametrize("where", ["work", "shm"])
def test_clone_file_copies_bytes_and_keeps_sparse(where, work_dir, request):
    d = work_dir if where == "work" else request.getfixturevalue("shm_dir")
    src, dst = d / "src.img", d / "dst.img"
    _sparse_file(src)
    expect = "reflink" if platform.probe(d).reflink else "copy"
    assert platform.clone_file(src, dst) == expect
    assert dst.stat().st_size == 64 * MiB
    assert dst.read_bytes() == src.read_bytes()
    assert _allocated(dst) < 1 * MiB, "holes were filled in"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o600


def test_clone_file_on_tmpfs_is_a_copy(shm_dir):
    src = shm_dir / "a"
    src.write_bytes(os.urandom(100_000))
    assert platform.clone_file(src, shm_dir / "b") == "copy"
    assert (shm_dir / "b").read_bytes() == src.read_bytes()


def test_clone_file_dense_when_asked(work_dir):
    src, dst = work_dir / "src.img", work_dir / "dst.img"
    _sparse_file(src, size=4 * MiB, at=MiB)
    if platform.probe(work_dir).reflink:
        pytest.skip("reflink fs: clone shares extents instead of copying")
    assert platform.clone_file(src, dst, preserve_sparse=False) == "copy"
    assert dst.read_bytes() == src.read_bytes()
    assert _allocated(dst) >= 4 * MiB


def test_clone_file_overwrites_and_handles_odd_sizes(work_dir):
    src, dst = work_dir / "src", work_dir / "dst"
    dst.write_bytes(b"x" * 500_000)
    data = os.urandom(123_457)
    src.write_bytes(data)
    platform.clone_file(src, dst)
    assert dst.read_bytes() == data
    src.write_bytes(b"")
    platform.clone_file(src, dst)
    assert dst.read_bytes() == b""


def test_clone_file_onto_itself_refused(work_dir):
    (work_dir / "f").write_bytes(b"keep me")
    os.link(work_dir / "f", work_dir / "g")
    with pytest.raises(OSError) as info:
        platform.clone_file(work_dir / "f", work_dir / "g")
    assert info.value.errno == errno.EINVAL
    assert (work_dir / "f").read_bytes() == b"keep me"


def test_clone_file_missing_source(work_dir):
    with pytest.raises(FileNotFoundError):
        platform.clone_file(work_dir / "nope", work_dir / "dst")
    assert not (work_dir / "dst").exists()


def test_copy_range_offsets_and_eof(work_dir):
    data = os.urandom(300_000)
    (work_dir / "s").write_bytes(data)
    sfd = os.open(work_dir / "s", os.O_RDONLY)
    dfd = os.open(work_dir / "d", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert platform.copy_range(sfd, dfd, 1000, src_off=5000, dst_off=10) == 1000
        assert os.pread(dfd, 1000, 10) == data[5000:6000]
        assert platform.copy_range(sfd, dfd, 10 * MiB, src_off=299_000) == 1000  # short at EOF
        assert platform.copy_range(sfd, dfd, 0) == 0
        assert os.lseek(sfd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(sfd)
        os.close(dfd)


def test_copy_range_from_procfs_falls_back(work_dir):
    want = Path("/proc/version").read_bytes()
    sfd = os.open("/proc/version", os.O_RDONLY)
    dfd = os.open(work_dir / "d", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert platform.copy_range(sfd, dfd, 65536) == len(want)
        assert (work_dir / "d").read_bytes() == want
    finally:
        os.close(sfd)
        os.close(dfd)


def test_reflink_not_supported_is_oserror(work_dir, shm_dir):
    (work_dir / "a").write_bytes(b"a" * 8192)
    sfd = os.open(work_dir / "a", os.O_RDONLY)
    dfd = os.open(shm_dir / "b", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(platform.NotSupported) as info:
            platform.reflink(sfd, dfd)  # across filesystems: never possible
        assert isinstance(info.value, OSError)
        assert info.value.errno in platform.FALLBACK_ERRNOS
    finally:
        os.close(sfd)
        os.close(dfd)


def test_reflink_bad_fd_propagates(work_dir):
    (work_dir / "a").write_bytes(b"a")
    fd = os.open(work_dir / "a", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            platform.reflink(fd, fd)  # dst opened read-only -> EBADF, not NotSupported
        assert info.value.errno == errno.EBADF
        assert not isinstance(info.value, platform.NotSupported)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- metadata

def test_copy_metadata_file(work_dir):
    src, dst = work_dir / "src", work_dir / "dst"
    src.write_bytes(b"s")
    dst.write_bytes(b"d")
    if os.geteuid() == 0:
        os.chown(src, 1234, 5678)  # before chmod: chown clears setuid
    os.chmod(src, 0o4755)
    os.setxattr(src, "user.one", b"1")
    os.setxattr(dst, "user.stale", b"gone")
    os.utime(src, ns=(1_500_000_000_000_000_001, 1_600_000_000_123_456_789))
    platform.copy_metadata(src, dst)
    s, d = os.lstat(src), os.lstat(dst)
    assert stat.S_IMODE(d.st_mode) == 0o4755, "setuid lost (chmod must come after chown)"
    assert (d.st_uid, d.st_gid) == (s.st_uid, s.st_gid)
    assert d.st_mtime_ns == 1_600_000_000_123_456_789
    assert d.st_atime_ns == 1_500_000_000_000_000_001
    assert os.listxattr(dst) == ["user.one"]
    assert os.getxattr(dst, "user.one") == b"1"


def test_copy_metadata_symlink_and_dir(work_dir):
    target = work_dir / "target"
    target.write_bytes(b"t")
    os.chmod(target, 0o600)
    before = os.stat(target)
    src_link, dst_link = work_dir / "l1", work_dir / "l2"
    os.symlink("target", src_link)
    os.symlink("target", dst_link)
    os.utime(src_link, ns=(10**18, 1_234_567_890_123_456_789), follow_symlinks=False)
    platform.copy_metadata(src_link, dst_link)
    assert os.lstat(dst_link).st_mtime_ns == 1_234_567_890_123_456_789
    after = os.stat(target)
    assert (stat.S_IMODE(after.st_mode), after.st_mtime_ns) == (0o600, before.st_mtime_ns)

    sdir, ddir = work_dir / "sd", work_dir / "dd"
    sdir.mkdir(mode=0o750)
    ddir.mkdir()
    os.chmod(sdir, 0o2750)
    os.utime(sdir, ns=(5, 7))
    platform.copy_metadata(sdir, ddir, os.lstat(sdir))
    d = os.lstat(ddir)
    assert (stat.S_IMODE(d.st_mode), d.st_mtime_ns) == (0o2750, 7)


def test_copy_metadata_xattr_enotsup_warns(work_dir, monkeypatch, caplog):
    src, dst = work_dir / "src", work_dir / "dst"
    src.write_bytes(b"s")
    dst.write_bytes(b"d")
    os.setxattr(src, "user.x", b"1")
    os.utime(src, ns=(1, 2))

    def enotsup(*_a, **_k):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(platform.os, "setxattr", enotsup)
    with caplog.at_level(logging.WARNING, logger="discrep.core.platform"):
        platform.copy_metadata(src, dst)
    assert "user.x" in caplog.text
    assert os.lstat(dst).st_mtime_ns == 2, "times must still be set after the xattr warning"


def test_copy_metadata_other_errors_propagate(work_dir):
    (work_dir / "src").write_bytes(b"s")
    with pytest.raises(FileNotFoundError):
        platform.copy_metadata(work_dir / "src", work_dir / "missing")


# --------------------------------------------------------------------------- holes / extents

@pytest.mark.parametrize("where", ["work", "shm"])
def test_data_extents_and_punch_hole(where, work_dir, request):
    d = work_dir if where == "work" else request.getfixturevalue("shm_dir")
    caps = platform.probe(d)
    path = d / "f"
    _sparse_file(path, size=16 * MiB, at=4 * MiB, data=b"A" * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        os.lseek(fd, 1234, os.SEEK_SET)
        ext = platform.data_extents(fd, 16 * MiB)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1234, "file position must be restored"
        if caps.seek_data:
            assert ext == [(4 * MiB, MiB)]
        else:
            assert ext == [(0, 16 * MiB)]
        assert platform.data_extents(fd, 0) == []
        assert platform.data_extents(fd, 4 * MiB) == ([] if caps.seek_data else [(0, 4 * MiB)])
        assert caps.punch_hole, f"{caps.fs_type} should punch holes"
        platform.punch_hole(fd, 4 * MiB + 256 * 1024, 256 * 1024)
        assert os.fstat(fd).st_size == 16 * MiB
        assert os.pread(fd, 256 * 1024, 4 * MiB + 256 * 1024) == bytes(256 * 1024)
        assert os.pread(fd, 4096, 4 * MiB) == b"A" * 4096
        if caps.seek_data:
            assert platform.data_extents(fd, 16 * MiB) == [
                (4 * MiB, 256 * 1024), (4 * MiB + 512 * 1024, 512 * 1024)]
        platform.punch_hole(fd, 0, 0)  # no-op
    finally:
        os.close(fd)


def test_punch_hole_bad_fd_propagates():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            platform.punch_hole(w, 0, 4096)
        assert not isinstance(info.value, platform.NotSupported)
    finally:
        os.close(r)
        os.close(w)


def test_fiemap_on_tmpfs_not_supported(shm_dir):
    (shm_dir / "f").write_bytes(b"x" * 10000)
    fd = os.open(shm_dir / "f", os.O_RDONLY)
    try:
        with pytest.raises(platform.NotSupported):
            platform.fiemap(fd)
        with pytest.raises(platform.NotSupported):
            platform.shared_ranges(fd, fd)
    finally:
        os.close(fd)


def test_fiemap_on_work_dir(work_dir):
    if not platform.probe(work_dir).fiemap:
        pytest.skip("no FIEMAP on the work dir filesystem")
    path = work_dir / "f"
    _sparse_file(path, size=8 * MiB, at=2 * MiB, data=os.urandom(MiB))
    fd = os.open(path, os.O_RDONLY)
    try:
        ext = platform.fiemap(fd)
        assert ext and ext[-1].last
        assert sum(e.length for e in ext) == MiB
        assert ext[0].logical == 2 * MiB
        assert not any(e.shared for e in ext)
        assert platform.shared_ranges(fd, fd) == [(2 * MiB, MiB)]  # a file shares with itself
    finally:
        os.close(fd)


def test_fiemap_many_extents(work_dir):
    """More extents than one FIEMAP batch (256) must all come back."""
    if not platform.probe(work_dir).fiemap:
        pytest.skip("no FIEMAP on the work dir filesystem")
    path = work_dir / "f"
    with open(path, "wb") as fh:
        for i in range(600):
            fh.seek(i * 65536)
            fh.write(b"z" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        ext = platform.fiemap(fd)
        assert len(ext) >= 600 or sum(e.length for e in ext) >= 600 * 4096
        assert [e.logical for e in ext] == sorted(e.logical for e in ext)
        assert {e.logical for e in ext} >= {i * 65536 for i in range(0, 600, 50)}
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- fs type / probe

def test_fs_type_known():
    assert platform.fs_type("/proc") == "proc"
    assert platform.fs_type("/") in {"ext4", "xfs", "btrfs", "overlay", "tmpfs", "zfs", "f2fs"} \
        or platform.fs_type("/")
    with pytest.raises(FileNotFoundError):
        platform.fs_type("/nonexistent/discrep")


def test_probe_work_dir(work_dir):
    platform.clear_probe_cache()
    caps = platform.probe(work_dir)
    assert caps.fs_type == platform.fs_type(work_dir)
    assert caps.seek_data and caps.punch_hole
    if caps.fs_type in ("ext4", "tmpfs"):
        assert not caps.reflink
    if caps.fs_type in ("ext4", "xfs", "btrfs"):
        assert caps.fiemap
    assert caps.btrfs_subvolume == (caps.fs_type == "btrfs")
    assert [p.name for p in work_dir.iterdir() if p.name.startswith(".discrep-probe")] == []
    assert platform.probe(work_dir) is caps  # cached per st_dev


def test_probe_tmpfs(shm_dir):
    platform.clear_probe_cache()
    caps = platform.probe(shm_dir)
    assert caps == platform.Capabilities("tmpfs", reflink=False, fiemap=False, seek_data=True,
                                         punch_hole=True, btrfs_subvolume=False)
    assert list(shm_dir.iterdir()) == [shm_dir / helpers.OWNER_FILE]


def test_probe_threads(work_dir):
    platform.clear_probe_cache()
    results, errors = [], []

    def worker() -> None:
        try:
            results.append(platform.probe(work_dir))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1


def test_probe_read_only_dir_propagates(work_dir):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = work_dir / "ro"
    ro.mkdir(mode=0o555)
    platform.clear_probe_cache()
    with pytest.raises(PermissionError):
        platform.probe(ro)


def test_btrfs_calls_elsewhere(work_dir):
    if platform.fs_type(work_dir) == "btrfs":
        pytest.skip("work dir is on btrfs")
    assert not platform.is_btrfs_subvolume(work_dir)
    with pytest.raises(platform.NotSupported):
        platform.btrfs_snapshot(work_dir, work_dir / "snap")
    with pytest.raises(platform.NotSupported):
        platform.btrfs_subvolume_id(work_dir)


def test_fsync_helpers(work_dir):
    (work_dir / "f").write_bytes(b"x")
    platform.fsync_path(work_dir / "f")
    platform.fsync_path(work_dir)
    platform.fsync_dir(work_dir)
    with pytest.raises(NotADirectoryError):
        platform.fsync_dir(work_dir / "f")


# --------------------------------------------------------------------------- replicate with platform

def _replicate(src: Path, dst: Path) -> None:
    """Minimal replica built with platform calls only (dirs, files, symlinks, hard links)."""
    seen = {}
    dst.mkdir(exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(src)):
        rel = os.path.relpath(dirpath, os.fsencode(src))
        for name in dirnames + filenames:
            s = os.path.join(dirpath, name)
            d = os.path.join(os.fsencode(dst), rel, name)
            st = os.lstat(s)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(d)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(s), d)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
                    os.link(seen[(st.st_dev, st.st_ino)], d)
                    continue
                seen[(st.st_dev, st.st_ino)] = d
                platform.clone_file(s, d)
            else:
                continue
            if not stat.S_ISDIR(st.st_mode):
                platform.copy_metadata(s, d, st)
    for dirpath, dirnames, _ in os.walk(os.fsencode(src), topdown=False):
        rel = os.path.relpath(dirpath, os.fsencode(src))
        platform.copy_metadata(dirpath, os.path.join(os.fsencode(dst), rel))


def test_replicate_sample_tree_with_platform(work_dir):
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src)
    _replicate(src, dst)
    assert helpers.python_tree_diff(src, dst, check_sparse=True) == []
    assert helpers.tree_equal(src, dst) == []


# --------------------------------------------------------------------------- helper self-checks

def test_helpers_detect_differences(work_dir):
    src, dst = work_dir / "src", work_dir / "dst"
    helpers.make_sample_tree(src, with_special=True)
    helpers.require_tool("cp")
    subprocess.run(["cp", "-a", "--", f"{src}/.", str(dst)], check=True)
    assert helpers.python_tree_diff(src, dst) == []
    assert helpers.tree_equal(src, dst) == []
    (dst / ".discrep").mkdir()
    (dst / ".discrep" / "state").write_bytes(b"ignored")
    os.utime(dst, ns=(os.lstat(src).st_atime_ns, os.lstat(src).st_mtime_ns))
    assert helpers.python_tree_diff(src, dst) == []
    assert helpers.tree_equal(src, dst) == []

    # a series of single changes, each must be seen by both checks
    big = dst / helpers.SAMPLE_BIG
    st = big.stat()
    with open(big, "r+b") as fh:
        fh.seek(MiB)
        fh.write(b"\x00" if fh.read(1) != b"\x00" else b"\x01")
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size+mtime: only contents differ
    os.chmod(dst / helpers.SAMPLE_MODE_640, 0o644)
    os.removexattr(dst / helpers.SAMPLE_XATTR_FILE, helpers.SAMPLE_XATTR[0])
    os.unlink(dst / helpers.SAMPLE_HARDLINKS[2])
    shutil.copy2(dst / helpers.SAMPLE_HARDLINKS[0], dst / helpers.SAMPLE_HARDLINKS[2])
    os.unlink(dst / "links/rel")
    os.symlink("elsewhere", dst / "links/rel")
    os.utime(dst / helpers.SAMPLE_MTIME_FILE, ns=(0, helpers.SAMPLE_MTIME_NS + 1))
    (dst / "extra").write_bytes(b"")
    os.unlink(os.path.join(os.fsencode(str(dst)), helpers.SAMPLE_NON_UTF8))

    diffs = "\n".join(helpers.python_tree_diff(src, dst))
    for needle in ("data/big.bin': contents differ", "modes/m640': mode", "attrs.txt': user xattrs",
                   "hard links", "links/rel': symlink", "times/fixed.txt': mtime_ns",
                   "'extra': only in destination", "'caf\\udce9': only in source"):
        assert needle in diffs, (needle, diffs)
    rs = "\n".join(helpers.tree_equal(src, dst))
    for needle in ("data/big.bin", "modes/m640", "attrs.txt", "links/rel", "times/fixed.txt",
                   "deleting   extra", "caf"):
        assert needle in rs, (needle, rs)


def test_python_tree_diff_sparse_flag(work_dir):
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    dst.mkdir()
    _sparse_file(src / "s", size=8 * MiB, at=MiB)
    (dst / "s").write_bytes((src / "s").read_bytes())
    shutil.copystat(src / "s", dst / "s")
    shutil.copystat(src, dst)
    assert helpers.python_tree_diff(src, dst) == []
    assert helpers.python_tree_diff(src, dst, check_sparse=True) == [
        "sparse: 's': source sparse, destination dense"]


def test_new_test_dir_owner_and_staleness(tmp_path):
    d = helpers.new_test_dir(str(tmp_path))
    assert d.name.startswith(helpers.TEST_PREFIX)
    assert not helpers.is_stale(str(d / "mnt"))
    (d / helpers.OWNER_FILE).write_text("999999999 1\n")
    assert helpers.is_stale(str(d / "mnt"))
    assert not helpers.is_stale("/tmp/some-other-dir/mnt")
    helpers.remove_tree(d)
    assert not d.exists()

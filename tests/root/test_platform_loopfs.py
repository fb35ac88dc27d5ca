"""discrep.core.platform on real loop-mounted xfs (reflink=1), btrfs and ext4 filesystems (needs root)."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

import helpers
from discrep.core import platform

pytestmark = pytest.mark.root

MiB = 1 << 20
KiB = 1 << 10


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _check_reflink_and_shared_ranges(mnt: Path) -> None:
    platform.clear_probe_cache()
    caps = platform.probe(mnt)
    assert caps.reflink, caps
    assert caps.fiemap and caps.seek_data and caps.punch_hole, caps

    size = 2 * MiB
    data = os.urandom(size)
    a, b = mnt / "a.bin", mnt / "b.bin"
    _write(a, data)
    assert platform.clone_file(a, b) == "reflink"
    assert b.read_bytes() == data

    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDWR)
    try:
        ext_a, ext_b = platform.fiemap(fa), platform.fiemap(fb)
        assert ext_a and ext_b
        assert all(e.shared for e in ext_a), ext_a
        assert all(e.shared for e in ext_b), ext_b
        assert platform.shared_ranges(fa, fb) == [(0, size)]

        # a 4 KiB overwrite of the clone is copied on write: that range is no longer shared
        os.pwrite(fb, b"\xff" * 4096, 512 * KiB)
        os.fsync(fb)
        assert platform.shared_ranges(fa, fb) == [(0, 512 * KiB), (516 * KiB, size - 516 * KiB)]
        assert a.read_bytes() == data, "the source must not change"
        assert b.read_bytes() == data[:512 * KiB] + b"\xff" * 4096 + data[516 * KiB:]

        # reflink() directly: the clone gets all of a's blocks back
        platform.reflink(fa, fb)
        assert platform.shared_ranges(fa, fb) == [(0, size)]
    finally:
        os.close(fa)
        os.close(fb)


def test_xfs_reflink_fiemap_shared_ranges(loopfs):
    mnt = loopfs("xfs")
    assert platform.fs_type(mnt) == "xfs"
    _check_reflink_and_shared_ranges(mnt)


def test_btrfs_reflink_fiemap_shared_ranges(loopfs):
    mnt = loopfs("btrfs")
    assert platform.fs_type(mnt) == "btrfs"
    _check_reflink_and_shared_ranges(mnt)


def test_xfs_clone_sparse_file_stays_sparse(loopfs):
    mnt = loopfs("xfs")
    src = mnt / "sparse"
    with open(src, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(32 * MiB)
        fh.write(b"S" * 8192)
    assert platform.clone_file(src, mnt / "clone") == "reflink"
    assert (mnt / "clone").stat().st_blocks * 512 < MiB
    assert (mnt / "clone").read_bytes() == src.read_bytes()


def test_ext4_loop_has_no_reflink(loopfs):
    mnt = loopfs("ext4")
    assert platform.fs_type(mnt) == "ext4"
    platform.clear_probe_cache()
    caps = platform.probe(mnt)
    assert caps == platform.Capabilities("ext4", reflink=False, fiemap=True, seek_data=True,
                                         punch_hole=True, btrfs_subvolume=False)
    data = os.urandom(MiB)
    _write(mnt / "a", data)
    assert platform.clone_file(mnt / "a", mnt / "b") == "copy"
    fa, fb = os.open(mnt / "a", os.O_RDONLY), os.open(mnt / "b", os.O_RDONLY)
    try:
        assert platform.shared_ranges(fa, fb) == []
    finally:
        os.close(fa)
        os.close(fb)


def test_reflink_across_loop_filesystems_not_supported(loopfs):
    x1, x2 = loopfs("xfs"), loopfs("xfs")
    _write(x1 / "a", b"a" * 65536)
    assert platform.clone_file(x1 / "a", x2 / "b") == "copy"
    assert (x2 / "b").read_bytes() == b"a" * 65536


def test_btrfs_subvolume_snapshot_delete(loopfs):
    btrfs = helpers.require_tool("btrfs")
    mnt = loopfs("btrfs")
    platform.clear_probe_cache()
    caps = platform.probe(mnt)
    assert caps.fs_type == "btrfs" and caps.reflink and caps.btrfs_subvolume, caps

    sv = mnt / "sv"
    helpers.run([btrfs, "subvolume", "create", str(sv)])
    (sv / "dir").mkdir()
    (sv / "dir" / "f").write_bytes(b"snapshot me\n")
    assert platform.is_btrfs_subvolume(mnt)  # the top-level subvolume (id 5)
    assert platform.is_btrfs_subvolume(sv)
    assert not platform.is_btrfs_subvolume(sv / "dir")
    assert platform.btrfs_subvolume_id(mnt) == 5
    sv_id = platform.btrfs_subvolume_id(sv)
    assert sv_id > 5
    assert platform.btrfs_subvolume_id(sv / "dir" / "f") == sv_id
    assert platform.probe(sv).btrfs_subvolume

    snap = mnt / "snap-ro"
    platform.btrfs_snapshot(sv, snap)  # readonly by default
    assert platform.is_btrfs_subvolume(snap)
    assert platform.btrfs_subvolume_id(snap) not in (5, sv_id)
    assert (snap / "dir" / "f").read_bytes() == b"snapshot me\n"
    assert helpers.run([btrfs, "property", "get", "-ts", str(snap), "ro"]).stdout.strip() == "ro=true"
    with pytest.raises(OSError) as info:
        (snap / "dir" / "new").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    with pytest.raises(OSError) as info:
        (snap / "dir" / "f").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    # the source stays writable and the snapshot does not follow it
    (sv / "dir" / "f").write_bytes(b"changed\n")
    assert (snap / "dir" / "f").read_bytes() == b"snapshot me\n"

    with pytest.raises(FileExistsError):
        platform.btrfs_snapshot(sv, snap)
    with pytest.raises(platform.NotSupported):
        platform.btrfs_snapshot(sv / "dir", mnt / "bad")

    rw = mnt / "snap-rw"
    platform.btrfs_snapshot(sv, rw, readonly=False)
    (rw / "dir" / "new").write_bytes(b"writable")
    assert helpers.run([btrfs, "property", "get", "-ts", str(rw), "ro"]).stdout.strip() == "ro=false"

    platform.btrfs_delete_subvolume(snap)  # read-only: deleted without clearing ro first
    platform.btrfs_delete_subvolume(rw)
    assert not snap.exists() and not rw.exists()
    listing = helpers.run([btrfs, "subvolume", "list", str(mnt)]).stdout
    assert "snap-ro" not in listing and "snap-rw" not in listing and " sv\n" in listing + "\n"
    with pytest.raises(platform.NotSupported):
        platform.btrfs_delete_subvolume(sv / "dir")


def test_btrfs_probe_caches_per_subvolume(loopfs):
    btrfs = helpers.require_tool("btrfs")
    mnt = loopfs("btrfs")
    helpers.run([btrfs, "subvolume", "create", str(mnt / "sv")])
    assert os.stat(mnt).st_dev != os.stat(mnt / "sv").st_dev
    platform.clear_probe_cache()
    assert platform.probe(mnt) is not platform.probe(mnt / "sv")
    assert platform.probe(mnt / "sv") == platform.probe(mnt)


def test_loopfs_fixture_cleans_up(loopfs):
    mnt = loopfs("ext4", size_mb=64)
    dev = next(src for m, _t, src in helpers.mounts() if m == str(mnt))
    assert dev.startswith("/dev/loop")
    backing = dict(helpers.loop_devices())[dev]
    assert helpers.TEST_PREFIX in backing
    assert subprocess.run(["findmnt", "-n", str(mnt)], stdout=subprocess.DEVNULL).returncode == 0

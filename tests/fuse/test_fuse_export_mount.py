"""A real read-only FUSE mount of a tmp tree through fuse_export.BackgroundExport."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat

import pytest

from fuse_export.adapter import BackgroundExport, FuseUnavailable, load_fuse, mount_entry, mounted, unmount
from fuse_export.model import BytesFile, DictControlTree, DirectorySource, ExportView, LazyFile

pytestmark = pytest.mark.fuse

BAD_NAME = b"caf\xe9-\xff\xfe"  # not UTF-8
SURROGATE_NAME = b"s\xed\xb2\x80"  # UTF-8-encoded surrogate: invalid UTF-8, must survive too
NL_NAME = b"line1\nline2"


def _skip_reason() -> str:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    try:
        load_fuse()
    except FuseUnavailable as e:
        return str(e)
    return ""


_REASON = _skip_reason()
if _REASON:
    pytestmark = [pytest.mark.fuse, pytest.mark.skip(reason=_REASON)]


@pytest.fixture
def src_tree(tmp_path):
    root = os.fsencode(tmp_path / "src")
    os.makedirs(root + b"/dir/sub")
    os.mkdir(root + b"/empty")
    with open(root + b"/small.txt", "wb") as f:
        f.write(b"hello world\n")
    with open(root + b"/dir/sub/deep.bin", "wb") as f:
        f.write(b"\x00\x01\x02" * 1000)
    big = os.urandom(5 << 20)
    with open(root + b"/big.bin", "wb") as f:
        f.write(big)
    with open(root + b"/" + BAD_NAME, "wb") as f:
        f.write(b"latin-1 name")
    with open(root + b"/" + SURROGATE_NAME, "wb") as f:
        f.write(b"surrogate name")
    with open(root + b"/" + NL_NAME, "wb") as f:
        f.write(b"newline name")
    os.symlink(b"/etc/passwd", root + b"/abs-link")
    os.symlink(b"/does/not/exist", root + b"/dangling")
    os.symlink(b"dir/" + BAD_NAME, root + b"/bad-link")
    os.mkdir(root + b"/.discrep")
    with open(root + b"/.discrep/private", "wb") as f:
        f.write(b"state")
    xattr = True
    try:
        os.setxattr(root + b"/small.txt", b"user.foo", b"bar-\xff")
    except OSError:
        xattr = False
    return root, hashlib.sha256(big).hexdigest(), xattr


@pytest.fixture
def mountpoint(tmp_path):
    mp = tmp_path / "mnt point"  # a space: exercises the octal escapes of mountinfo
    mp.mkdir()
    yield os.fsencode(mp)
    if mounted(mp):  # belt and braces: never leave a mount behind
        unmount(mp, lazy=True)


def test_mount_round_trip(src_tree, mountpoint):
    root, big_sha, xattr = src_tree
    control = DictControlTree(
        {b"cycle": BytesFile(b"cycle 1\n"), b"manifest": LazyFile(lambda: b"m" * 70000)},
        resolver=lambda rel: BytesFile(b"sig:" + rel) if rel.split(b"/")[-1].isdigit() else None,
        dynamic_dirs=[b"sig"],
    )
    source = DirectorySource(root)
    view = ExportView(source, control)
    mp = mountpoint
    try:
        with BackgroundExport(view, mp, timeout=15) as exp:
            assert mounted(mp)
            entry = mount_entry(mp)
            assert entry is not None and entry["fstype"] == b"fuse.discrep", entry
            assert exp.pid and exp.pid != os.getpid()

            names = set(os.listdir(mp))
            assert names == {
                b"dir", b"empty", b"small.txt", b"big.bin", BAD_NAME, SURROGATE_NAME, NL_NAME,
                b"abs-link", b"dangling", b"bad-link", b".discrep",
            }
            assert os.listdir(mp + b"/empty") == []
            assert os.listdir(mp + b"/dir") == [b"sub"]

            # bytes
            with open(mp + b"/small.txt", "rb") as f:
                assert f.read() == b"hello world\n"
            with open(mp + b"/dir/sub/deep.bin", "rb") as f:
                f.seek(1500)
                assert f.read(6) == b"\x00\x01\x02\x00\x01\x02"
            h = hashlib.sha256()
            with open(mp + b"/big.bin", "rb") as f:
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
            assert h.hexdigest() == big_sha
            assert os.stat(mp + b"/big.bin").st_size == 5 << 20

            # odd names round-trip exactly
            for name, content in ((BAD_NAME, b"latin-1 name"), (SURROGATE_NAME, b"surrogate name"),
                                  (NL_NAME, b"newline name")):
                with open(mp + b"/" + name, "rb") as f:
                    assert f.read() == content
                assert os.stat(mp + b"/" + name).st_size == len(content)

            # symlinks are exported as symlinks, never followed
            assert os.readlink(mp + b"/abs-link") == b"/etc/passwd"
            assert os.readlink(mp + b"/dangling") == b"/does/not/exist"
            assert os.readlink(mp + b"/bad-link") == b"dir/" + BAD_NAME
            assert stat.S_ISLNK(os.lstat(mp + b"/dangling").st_mode)

            # xattrs
            if xattr:
                assert b"user.foo" in [os.fsencode(n) for n in os.listxattr(mp + b"/small.txt")]
                assert os.getxattr(mp + b"/small.txt", b"user.foo") == b"bar-\xff"
            with pytest.raises(OSError) as ei:
                os.getxattr(mp + b"/small.txt", b"user.none")
            assert ei.value.errno == errno.ENODATA

            # read-only everywhere
            for action in (
                lambda: open(mp + b"/small.txt", "r+b"),
                lambda: open(mp + b"/new.txt", "wb"),
                lambda: os.mkdir(mp + b"/newdir"),
                lambda: os.unlink(mp + b"/small.txt"),
                lambda: os.rename(mp + b"/small.txt", mp + b"/moved"),
                lambda: os.chmod(mp + b"/small.txt", 0o600),
                lambda: os.symlink(b"x", mp + b"/newlink"),
                lambda: os.truncate(mp + b"/small.txt", 0),
                lambda: os.setxattr(mp + b"/small.txt", b"user.new", b"1"),
                lambda: os.rmdir(mp + b"/empty"),
                lambda: os.utime(mp + b"/small.txt", (1, 1)),
            ):
                with pytest.raises(OSError) as ei:
                    action()
                assert ei.value.errno == errno.EROFS, (action, ei.value)
            assert os.statvfs(mp).f_flag & os.ST_RDONLY

            # the control tree; the source's own .discrep stays hidden
            assert sorted(os.listdir(mp + b"/.discrep")) == [b"cycle", b"manifest", b"sig"]
            with open(mp + b"/.discrep/cycle", "rb") as f:
                assert f.read() == b"cycle 1\n"
            with open(mp + b"/.discrep/manifest", "rb") as f:
                assert f.read() == b"m" * 70000
            with open(mp + b"/.discrep/sig/17", "rb") as f:
                assert f.read() == b"sig:sig/17"
            assert not os.path.exists(mp + b"/.discrep/private")
            assert not os.path.exists(mp + b"/.discrep/sig/x")
            st = os.stat(mp + b"/.discrep/cycle")
            assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_uid == 0
        assert not mounted(mp)
        assert exp.proc is None
    finally:
        if mounted(mp):
            unmount(mp, lazy=True)
        source.close()
    assert not mounted(mp)


def test_child_killed_mount_cleaned_up(src_tree, mountpoint):
    """If the server dies, leaving the context still removes the dead mount."""
    root, _sha, _x = src_tree
    with DirectorySource(root) as source:
        exp = BackgroundExport(ExportView(source), mountpoint, timeout=15)
        try:
            with exp:
                assert os.path.exists(mountpoint + b"/small.txt")
                os.kill(exp.pid, 9)
                exp.proc.join(5)
        finally:
            if mounted(mountpoint):
                unmount(mountpoint, lazy=True)
        assert not mounted(mountpoint)

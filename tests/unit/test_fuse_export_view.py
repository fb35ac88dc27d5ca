"""The fuse_export view model without FUSE: listing, stat, reads, control tree, errors."""
from __future__ import annotations

import errno
import os
import stat
import threading

import pytest

from fuse_export.adapter import FuseAdapter, to_bytes, to_str
from fuse_export.model import (
    DIR,
    BytesFile,
    DictControlTree,
    DirectorySource,
    ExportError,
    ExportView,
    InvalidArgument,
    IsADirectory,
    LazyFile,
    NoAttribute,
    NotADirectory,
    NotFound,
    ReadOnly,
    from_oserror,
)

BAD_NAME = b"caf\xe9-\xff\xfe"  # latin-1, not UTF-8
NL_NAME = b"two\nlines"


def _xattrs_supported(path: bytes) -> bool:
    try:
        os.setxattr(path, b"user.probe", b"1")
        os.removexattr(path, b"user.probe")
        return True
    except OSError:
        return False


@pytest.fixture
def tree(tmp_path):
    root = os.fsencode(tmp_path / "src")
    os.mkdir(root)
    os.makedirs(root + b"/dir/sub")
    os.mkdir(root + b"/empty")
    with open(root + b"/dir/file.txt", "wb") as f:
        f.write(b"0123456789")
    with open(root + b"/" + BAD_NAME, "wb") as f:
        f.write(b"bad")
    with open(root + b"/" + NL_NAME, "wb") as f:
        f.write(b"nl")
    os.symlink(b"/etc", root + b"/abs-link")
    os.symlink(b"dir", root + b"/rel-link")
    os.symlink(b"/nonexistent/target", root + b"/dangling")
    os.mkdir(root + b"/.discrep")  # the source's own state dir: must stay hidden
    with open(root + b"/.discrep/secret", "wb") as f:
        f.write(b"secret")
    return root


@pytest.fixture
def source(tree):
    src = DirectorySource(tree)
    yield src
    src.close()


@pytest.fixture
def control():
    return DictControlTree(
        {
            b"cycle": BytesFile(b"cycle 7\n"),
            b"manifest": LazyFile(lambda: b"M" * 100),
            b"packs/0": BytesFile(b"pack0"),
        },
        resolver=lambda rel: BytesFile(b"sig of " + rel.split(b"/")[-1]) if rel.split(b"/")[-1].isdigit() else None,
        dynamic_dirs=[b"sig"],
    )


@pytest.fixture
def view(source, control):
    return ExportView(source, control)


@pytest.mark.fs
def test_root_listing_hides_source_state_and_shows_control(view):
    names = view.readdir(b"")
    assert sorted(names) == sorted(
        [b"dir", b"empty", BAD_NAME, NL_NAME, b"abs-link", b"rel-link", b"dangling", b".discrep"]
    )
    assert names.count(b".discrep") == 1
    # the source's .discrep does not show through: the control tree does
    assert sorted(view.readdir(b".discrep")) == [b"cycle", b"manifest", b"packs", b"sig"]
    with pytest.raises(NotFound):
        view.getattr(b".discrep/secret")


@pytest.mark.fs
def test_exclude_top_without_control(source):
    v = ExportView(source)
    assert b".discrep" not in v.readdir(b"")
    with pytest.raises(NotFound):
        v.getattr(b".discrep")
    with pytest.raises(NotFound):
        v.read(b".discrep/secret", 10, 0)


@pytest.mark.fs
def test_exclude_top_custom(tree):
    with DirectorySource(tree, exclude_top={b"dir"}) as src:
        v = ExportView(src)
        names = v.readdir(b"")
        assert b"dir" not in names and b".discrep" in names
        with pytest.raises(NotFound):
            v.getattr(b"dir/file.txt")


@pytest.mark.fs
def test_stat_of_files_dirs_links(view, tree):
    a = view.getattr(b"dir/file.txt")
    st = os.lstat(tree + b"/dir/file.txt")
    assert stat.S_ISREG(a["st_mode"]) and a["st_mode"] == st.st_mode
    assert a["st_size"] == 10
    assert a["st_mtime"] == st.st_mtime_ns and isinstance(a["st_mtime"], int)
    assert a["st_uid"] == st.st_uid and a["st_gid"] == st.st_gid
    assert a["st_ino"] == view.getattr(b"dir/file.txt")["st_ino"]  # stable
    assert a["st_ino"] != view.getattr(b"dir")["st_ino"]
    assert view.getattr(b"")["st_ino"] == 1
    assert stat.S_ISDIR(view.getattr(b"dir")["st_mode"])
    assert stat.S_ISDIR(view.getattr(b"empty")["st_mode"])
    assert view.readdir(b"empty") == []
    link = view.getattr(b"abs-link")
    assert stat.S_ISLNK(link["st_mode"]) and link["st_size"] == len(b"/etc")


@pytest.mark.fs
def test_symlinks_are_not_followed(view):
    assert view.readlink(b"abs-link") == b"/etc"
    assert view.readlink(b"dangling") == b"/nonexistent/target"
    assert view.readlink(b"rel-link") == b"dir"
    assert stat.S_ISLNK(view.getattr(b"dangling")["st_mode"])
    # not even in intermediate components
    with pytest.raises(NotADirectory):
        view.getattr(b"abs-link/passwd")
    with pytest.raises(NotADirectory):
        view.getattr(b"rel-link/file.txt")
    with pytest.raises(NotADirectory):
        view.readdir(b"rel-link")
    with pytest.raises(ExportError) as ei:
        view.open(b"abs-link", os.O_RDONLY)
    assert ei.value.errno == errno.ELOOP
    with pytest.raises(ExportError) as ei:
        view.read(b"rel-link", 10, 0)
    assert ei.value.errno == errno.ELOOP
    with pytest.raises(InvalidArgument):
        view.readlink(b"dir")


@pytest.mark.fs
def test_read_ranges(view):
    fh = view.open(b"dir/file.txt", os.O_RDONLY)
    assert fh > 0
    assert view.read(b"dir/file.txt", 4, 0, fh) == b"0123"
    assert view.read(b"dir/file.txt", 4, 8, fh) == b"89"
    assert view.read(b"dir/file.txt", 4, 10, fh) == b""
    assert view.read(b"dir/file.txt", 100, 3, fh) == b"3456789"
    buf = bytearray(6)
    assert view.readinto(b"dir/file.txt", memoryview(buf), 2, fh) == 6 and bytes(buf) == b"234567"
    view.release(fh)
    assert view.open_handles == 0
    # without a handle the path is used
    assert view.read(b"dir/file.txt", 3, 1) == b"123"


@pytest.mark.fs
def test_big_read_and_many_files_through_fd_cache(tree):
    data = os.urandom(3 << 20)
    with open(tree + b"/big", "wb") as f:
        f.write(data)
    for i in range(20):
        with open(tree + b"/dir/sub/f%d" % i, "wb") as f:
            f.write(b"%d" % i)
    with DirectorySource(tree, max_fds=4) as src:  # tiny cache: eviction under use
        v = ExportView(src)
        out = bytearray()
        fh = v.open(b"big", os.O_RDONLY)
        while True:
            chunk = v.read(b"big", 1 << 20, len(out), fh)
            if not chunk:
                break
            out += chunk
        assert bytes(out) == data
        errors = []

        def worker(k: int) -> None:
            try:
                for _ in range(50):
                    for i in range(20):
                        assert v.read(b"dir/sub/f%d" % i, 10, 0) == b"%d" % i
                    assert sorted(v.readdir(b"dir/sub")) == sorted(b"f%d" % i for i in range(20))
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors


@pytest.mark.fs
def test_write_flags_refused(view):
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_CREAT, os.O_APPEND):
        with pytest.raises(ReadOnly) as ei:
            view.open(b"dir/file.txt", flags)
        assert ei.value.errno == errno.EROFS
        with pytest.raises(ReadOnly):
            view.open(b".discrep/cycle", flags)
    with pytest.raises(ReadOnly):
        view.access(b"dir/file.txt", os.W_OK)
    view.access(b"dir/file.txt", os.R_OK)
    view.access(b".discrep/cycle", os.R_OK | os.X_OK)
    with pytest.raises(NotFound):
        view.access(b"nope", os.F_OK)


@pytest.mark.fs
def test_open_directory_is_eisdir(view):
    with pytest.raises(IsADirectory):
        view.open(b"dir", os.O_RDONLY)
    with pytest.raises(IsADirectory):
        view.open(b".discrep/sig", os.O_RDONLY)


@pytest.mark.fs
def test_non_utf8_and_newline_names(view):
    assert BAD_NAME in view.readdir(b"")
    assert view.getattr(BAD_NAME)["st_size"] == 3
    assert view.read(BAD_NAME, 10, 0) == b"bad"
    assert view.read(NL_NAME, 10, 0) == b"nl"
    # the adapter's str form round-trips exactly
    for name in (BAD_NAME, NL_NAME, b"\xed\xb2\x80", "é".encode()):
        assert to_bytes("/" + to_str(name)) == name


@pytest.mark.fs
def test_errors_map_to_errno(view, tree):
    cases = [
        (lambda: view.getattr(b"missing"), errno.ENOENT),
        (lambda: view.getattr(b"dir/file.txt/x"), errno.ENOTDIR),
        (lambda: view.readdir(b"dir/file.txt"), errno.ENOTDIR),
        (lambda: view.readlink(b"missing"), errno.ENOENT),
        (lambda: view.getattr(b"dir//file.txt"), errno.ENOENT),
        (lambda: view.getattr(b"dir/../dir"), errno.ENOENT),
        (lambda: view.getxattr(b"dir/file.txt", b"user.none"), errno.ENODATA),
        (lambda: view.getattr(b".discrep/nope"), errno.ENOENT),
        (lambda: view.readdir(b".discrep/cycle"), errno.ENOTDIR),
        (lambda: view.read(b".discrep/cycle", -1, 0), errno.EINVAL),
    ]
    for fn, code in cases:
        with pytest.raises(ExportError) as ei:
            fn()
        assert ei.value.errno == code, (fn, ei.value)
    e = from_oserror(OSError(errno.EACCES, "denied"), b"x")
    assert e.errno == errno.EACCES and type(e).__name__ == "AccessDenied"
    e = from_oserror(OSError(errno.EIO, "io"))
    assert type(e) is ExportError and e.errno == errno.EIO
    e = from_oserror(PermissionError(errno.EPERM, "perm"))
    assert e.errno == errno.EPERM


@pytest.mark.fs
def test_control_files(view):
    a = view.getattr(b".discrep")
    assert a["st_mode"] == stat.S_IFDIR | 0o555 and a["st_uid"] == 0 and a["st_gid"] == 0
    c = view.getattr(b".discrep/cycle")
    assert c["st_mode"] == stat.S_IFREG | 0o444 and c["st_size"] == 8
    assert c["st_mtime"] == view.created_ns
    fh = view.open(b".discrep/cycle", os.O_RDONLY)
    assert view.read(b".discrep/cycle", 100, 0, fh) == b"cycle 7\n"
    assert view.read(b".discrep/cycle", 3, 6, fh) == b"7\n"
    view.release(fh)
    assert view.readdir(b".discrep/packs") == [b"0"]
    # dynamic names: resolvable but not enumerable
    assert view.readdir(b".discrep/sig") == []
    assert view.read(b".discrep/sig/42", 100, 0) == b"sig of 42"
    assert view.getattr(b".discrep/sig/42")["st_size"] == 9
    with pytest.raises(NotFound):
        view.getattr(b".discrep/sig/notanumber")
    assert view.listxattr(b".discrep/cycle") == []
    with pytest.raises(NoAttribute):
        view.getxattr(b".discrep/cycle", b"user.x")
    with pytest.raises(InvalidArgument):
        view.readlink(b".discrep/cycle")


@pytest.mark.unit
def test_lazy_file_built_once():
    calls = []
    gate = threading.Event()

    def factory() -> bytes:
        calls.append(1)
        gate.wait(1)
        return b"payload"

    f = LazyFile(factory)
    assert not f.built and not calls
    results = []
    threads = [threading.Thread(target=lambda: results.append(f.pread(3, 1))) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert results == [b"ayl"] * 8
    assert f.size() == 7 and f.built and len(calls) == 1


@pytest.mark.unit
def test_lazy_control_file_via_view_built_once(tmp_path):
    calls = []
    tree = DictControlTree({b"manifest": LazyFile(lambda: calls.append(1) or b"x" * 5)})
    with DirectorySource(tmp_path) as src:
        v = ExportView(src, tree)
        assert v.readdir(b".discrep") == [b"manifest"]
        assert not calls  # listing does not build
        assert v.getattr(b".discrep/manifest")["st_size"] == 5
        assert v.read(b".discrep/manifest", 10, 0) == b"xxxxx"
        assert len(calls) == 1


@pytest.mark.unit
def test_dict_control_tree_structure():
    t = DictControlTree({b"a/b/c": BytesFile(b"1"), b"top": BytesFile(b"2")}, dynamic_dirs=[b"sig"])
    assert t.lookup(b"") is DIR and t.lookup(b"a") is DIR and t.lookup(b"a/b") is DIR
    assert isinstance(t.lookup(b"a/b/c"), BytesFile)
    assert t.lookup(b"a/x") is None and t.lookup(b"sig/1") is None  # no resolver
    assert t.listdir(b"") == [b"a", b"sig", b"top"]
    t[b"a/d"] = BytesFile(b"3")
    assert t.listdir(b"a") == [b"b", b"d"]
    del t[b"a/d"]
    assert t.listdir(b"a") == [b"b"]
    with pytest.raises(NotADirectory):
        t.listdir(b"top")
    with pytest.raises(NotFound):
        t.listdir(b"zzz")
    with pytest.raises(ValueError):
        t[b"../x"] = BytesFile(b"")
    resolved = []
    t.resolver = lambda rel: resolved.append(rel) or BytesFile(rel)
    assert t.lookup(b"sig/9").pread(10, 0) == b"sig/9"
    assert t.lookup(b"sig/9") is t.lookup(b"sig/9")
    assert resolved == [b"sig/9"]  # cached
    assert t.lookup(b"other/9") is None  # not under a dynamic dir


@pytest.mark.fs
def test_xattrs(tree):
    path = tree + b"/dir/file.txt"
    if not _xattrs_supported(path):
        pytest.skip("user xattrs not supported on the tmp filesystem")
    os.setxattr(path, b"user.foo", b"bar\x00\xff")
    with DirectorySource(tree) as src:
        v = ExportView(src)
        assert b"user.foo" in v.listxattr(b"dir/file.txt")
        assert v.getxattr(b"dir/file.txt", b"user.foo") == b"bar\x00\xff"
        assert isinstance(v.listxattr(b""), list)
        assert v.listxattr(b"abs-link") == []  # the link itself, not /etc


@pytest.mark.fs
def test_statfs(view):
    s = view.statfs()
    assert s["f_bsize"] > 0 and s["f_namemax"] > 0 and s["f_bavail"] == 0


@pytest.mark.fs
def test_adapter_maps_errors_without_fuse(view, caplog):
    """The adapter is importable and usable without libfuse; errors become OSError(errno)."""
    ad = FuseAdapter(view)
    entries = ad.readdir("/", 0)
    assert [e[0] for e in entries[:2]] == [".", ".."]
    assert all(e[1]["st_ino"] > 0 for e in entries)
    assert (to_str(BAD_NAME), {"st_ino": view.getattr(BAD_NAME)["st_ino"]}, 0) in entries
    assert ad.getattr("/" + to_str(BAD_NAME))["st_size"] == 3
    fh = ad.open("/dir/file.txt", os.O_RDONLY)
    assert bytes(ad.read("/dir/file.txt", 4, 2, fh)) == b"2345"
    assert ad.read("/dir/file.txt", 4, 10, fh) == b""
    ad.release("/dir/file.txt", fh)
    assert bytes(ad.read("/.discrep/cycle", 100, 0, 0)) == b"cycle 7\n"
    with pytest.raises(OSError) as ei:
        ad.getattr("/missing")
    assert ei.value.errno == errno.ENOENT
    for call in (
        lambda: ad.write("/x", b"", 0, 0),
        lambda: ad.mkdir("/x", 0o755),
        lambda: ad.unlink("/dir/file.txt"),
        lambda: ad.rename("/a", "/b"),
        lambda: ad.chmod("/dir", 0o777),
        lambda: ad.truncate("/dir/file.txt", 0),
        lambda: ad.setxattr("/dir", "user.x", b"1", 0),
        lambda: ad.open("/dir/file.txt", os.O_WRONLY),
    ):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.EROFS

    class Broken:
        def lstat(self, path):
            raise ZeroDivisionError("boom")

    bad = FuseAdapter(ExportView(Broken()))  # type: ignore[arg-type]
    with pytest.raises(OSError) as ei:
        bad.getattr("/x")
    assert ei.value.errno == errno.EIO
    assert "boom" in caplog.text or "unexpectedly" in caplog.text


@pytest.mark.unit
def test_load_fuse_reports_missing_binding(monkeypatch):
    import sys

    import fuse_export.adapter as adapter

    monkeypatch.setattr(adapter, "_fuse_module", None)
    monkeypatch.setitem(sys.modules, "mfusepy", None)  # import raises ImportError
    with pytest.raises(adapter.FuseUnavailable, match="pip install mfusepy"):
        adapter.load_fuse()

    class NoLibfuse:
        def find_spec(self, name, path=None, target=None):
            if name == "mfusepy":
                raise OSError("Unable to find libfuse")
            return None

    monkeypatch.delitem(sys.modules, "mfusepy")
    monkeypatch.setattr(sys, "meta_path", [NoLibfuse()] + sys.meta_path)
    with pytest.raises(adapter.FuseUnavailable, match="install fuse3"):
        adapter.load_fuse()


@pytest.mark.unit
def test_mountinfo_unescape():
    from fuse_export.adapter import _unescape

    assert _unescape(rb"/tmp/a\040b\012c\134d") == b"/tmp/a b\nc\\d"

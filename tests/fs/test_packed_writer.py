"""The first copy's packed-file hot path (packed.PackedWriter) against hostile and odd
entries: it writes only what ``manifest.Entry`` would accept, hands anything unusual to the
general path, and leaves nothing behind when it refuses (tier: fs)."""
from __future__ import annotations

import os
import stat as statmod
from pathlib import Path

import blockdiff
import pytest

from discrep.core.errors import ManifestError, UnsafePathError
from discrep.replica.packed import PackedWriter
from discrep.protocol.manifest import Entry
from discrep.core.paths import parent
from discrep.replica.dirs import DirFds
from discrep.replica.owners import OwnerMap

pytestmark = pytest.mark.fs

BLOB = b"hello, world\n" * 300 + b"tail"


def _entry(**kw):
    data = BLOB[100:2100]
    e = {"path": "d/f", "mode": 0o640, "uid": os.geteuid(), "gid": os.getegid(), "user": None, "group": None,
         "mtime_ns": 1_600_000_000_123_456_789, "op": "file", "size": len(data), "idx": 0,
         "h": blockdiff.sign_small(data)[0].hex(), "pack": [0, 100]}
    e.update(kw)
    return e


@pytest.fixture
def writer(tmp_path: Path):
    dest = tmp_path / "dest"
    dest.mkdir()
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    dirs = DirFds(fd)
    try:
        yield PackedWriter(lambda rel: dirs.get(parent(rel), create=True), dirs.dirty,
                           OwnerMap(numeric_ids=True)), dest
    finally:
        dirs.clear()
        os.close(fd)


def test_writes_file_with_metadata_and_signature(writer):
    w, dest = writer
    row = w.write(_entry(), {0: BLOB}.__getitem__)
    f = dest / "d" / "f"
    st = f.lstat()
    assert f.read_bytes() == BLOB[100:2100]
    assert (statmod.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert row == (b"d/f", "file", 2000, 1_600_000_000_123_456_789, st.st_ino,
                   blockdiff.sign_bytes(BLOB[100:2100]).to_bytes())


@pytest.mark.parametrize("change", [dict(xattrs={}), dict(mode=0o10000), dict(mode="644"), dict(size=0),
                                    dict(pack=[0]), dict(pack=[-1, 0]), dict(h="zz"), dict(uid=-1),
                                    dict(op="dir"), dict(idx="1"), dict(path=b"d/f".hex())])
def test_unusual_entries_go_the_general_way(writer, change):
    w, dest = writer
    e = _entry(**change)
    if change.get("path"):
        e["path"] = 7          # not a string
    assert w.write(e, {0: BLOB}.__getitem__) is None
    assert not (dest / "d").exists()


@pytest.mark.parametrize("path", ["../escape", "/abs", "d/../../x", ".discrep/x", "a\x00b", "d//f"])
def test_hostile_paths_are_refused(writer, path, tmp_path):
    w, dest = writer
    with pytest.raises(UnsafePathError):
        w.write(_entry(path=path), {0: BLOB}.__getitem__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"] and not any(dest.iterdir())


def test_bytes_that_do_not_match_the_digest_are_refused(writer):
    w, dest = writer
    with pytest.raises(ManifestError):
        w.write(_entry(pack=[0, 101]), {0: BLOB}.__getitem__)
    with pytest.raises(ManifestError):     # the pack is shorter than the entry says
        w.write(_entry(pack=[0, len(BLOB) - 10]), {0: BLOB}.__getitem__)
    assert not (dest / "d" / "f").exists()


def test_an_existing_file_is_never_overwritten(writer):
    w, dest = writer
    (dest / "d").mkdir()
    (dest / "d" / "f").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        w.write(_entry(), {0: BLOB}.__getitem__)
    assert (dest / "d" / "f").read_bytes() == b"mine"


def test_write_entry_sets_xattrs_like_the_fast_path_sets_the_rest(writer):
    w, dest = writer
    e = Entry(_entry(xattrs={"user.note": "aGk="}))      # base64 of b"hi"
    warns = []
    row = w.write_entry(e, {0: BLOB}.__getitem__, warns)
    f = dest / "d" / "f"
    assert f.read_bytes() == BLOB[100:2100] and row[4] == f.lstat().st_ino
    assert os.getxattr(f, "user.note") == b"hi" and warns == []
    assert b"d" in w.dirty

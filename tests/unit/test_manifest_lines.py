"""The source's hand-formatted manifest lines against the JSON encoder (tier: unit)."""
from __future__ import annotations

import json
import os
import stat as statmod

import pytest

from discrep.protocol.manifest import Entry, ManifestWriter, entry_for, file_line, read_lines

pytestmark = pytest.mark.unit


def _st(**kw) -> os.stat_result:
    base = dict(mode=statmod.S_IFREG | 0o640, ino=7, dev=1, nlink=1, uid=0, gid=0, size=4096,
                atime=0, mtime=0, ctime=0)
    base.update(kw)
    st = os.stat_result((base["mode"], base["ino"], base["dev"], base["nlink"], base["uid"], base["gid"],
                         base["size"], base["atime"], base["mtime"], base["ctime"],
                         float(base["atime"]), float(base["mtime"]), float(base["ctime"]),
                         base["atime"] * 10**9, base["mtime"] * 10**9 + 123, base["ctime"] * 10**9))
    return st


@pytest.mark.parametrize("rel", [b"a", b"dir/sub/f.txt", "ünï/cödé".encode(), b"bad\xff\xfename", b"new\nline",
                                 b'quote"back\\slash', b"tab\tctl\x01"])
@pytest.mark.parametrize("xattrs", [{}, {"user.a": b"\x00\x01binary", "user.b": b"text"}])
@pytest.mark.parametrize("uid", [0, 4242])          # 4242: no name on this machine -> null
def test_file_line_is_what_the_encoder_writes(rel, xattrs, uid):
    st = _st(uid=uid, gid=uid, mtime=1_700_000_000)
    ref = entry_for(rel, b"/nonexistent", st, xattrs)
    ref.update(idx=12, h="ab" * 16, pack=[3, 8192])
    enc = json.JSONEncoder(separators=(",", ":")).encode
    assert file_line(rel, st, xattrs, 12, "ab" * 16, [3, 8192]) == enc(ref)
    ref = entry_for(rel, b"/nonexistent", st, xattrs)
    ref.update(idx=0)
    assert file_line(rel, st, xattrs, 0) == enc(ref)


def test_file_line_round_trips_through_a_manifest(tmp_path):
    path = str(tmp_path / "m.zst")
    mw = ManifestWriter(path, {"cycle": 1})
    rel = b"d/odd\xffname"
    mw.add_line(file_line(rel, _st(size=5), {"user.x": b"v"}, 4, "0f" * 16, [0, 10]))
    mw.close()
    header, ents = read_lines(open(path, "rb").read())
    e = Entry(next(ents))
    assert (e.path, e.size, e.idx, e.pack, e.h, e.mode, e.xattrs) == \
        (rel, 5, 4, (0, 10), bytes.fromhex("0f" * 16), 0o640, {"user.x": b"v"})
    assert header["cycle"] == 1 and mw.count == 1

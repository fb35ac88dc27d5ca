"""The cycle manifest: what changed since the base cycle, with full metadata.

Format: zstd-compressed JSON lines.  Line 1 is the header
``{"discrep_manifest": 1, "cycle": N, "base": B, ...}``; every further line is
one entry.  Paths are JSON strings in the ``surrogateescape`` convention
(``paths.enc``), so names that are not UTF-8 or hold newlines round-trip.

Entry kinds (``op``):

* ``move``   ``{"op":"move","path":NEW,"old":BASE}`` -- the replica moves its copy
  (set semantics; children of a moved directory follow).
* ``delete`` ``{"op":"delete","path":P}``
* ``dir`` / ``symlink`` / ``file`` -- an upsert with metadata: ``mode, uid, gid,
  user, group, mtime_ns, xattrs`` ({name: base64}); ``symlink`` has ``target``;
  ``file`` has ``size``, ``idx`` (its number for ``.discrep/sig|data|cdc/<idx>``),
  optionally ``h`` (hex whole-content digest, small files), ``pack`` ([k, offset])
  when its bytes travel inside ``.discrep/pack/<k>``, ``extents`` ([[off,len]...])
  for sparse files, ``link`` (path of the hard-link group member that carries the
  data), ``cbt`` (base cycle: ``.discrep/cbt/<idx>`` lists the only blocks that
  may differ from the base cycle's copy, see cbt.py), ``live`` (true: a streamed first
  copy reads this file live; the source checks afterwards that it did not change).

Everything read from a manifest is untrusted: ``validate`` refuses absolute
paths, ``..``, NUL, the reserved ``.discrep`` name, and malformed fields.

Thread-safety: pure functions and a streaming reader used by one thread.
"""
from __future__ import annotations

import base64
import grp
import io
import json
import os
import pwd
import stat as statmod
from typing import Any, Dict, Iterator, List, Optional, Tuple  # noqa: F401

import pyzstd
from blockdiff import framing
from blockdiff.errors import FrameError

from discrep.core.errors import ManifestError, UnsafePathError
from discrep.core.paths import check_rel, dec, enc
from discrep.core import xattrs

VERSION = 1
UPSERT_OPS = ("dir", "symlink", "file")
OPS = ("move", "delete") + UPSERT_OPS


_names: Dict[Tuple[int, int], Optional[str]] = {}


def _name_of(uid: int, table) -> Optional[str]:
    key = (id(table), uid)
    if key not in _names:
        try:
            _names[key] = table(uid)[0]
        except (KeyError, OverflowError):
            _names[key] = None
    return _names[key]


def read_xattrs(path: bytes) -> Dict[str, str]:
    """A path's xattrs as the manifest carries them (base64 values)."""
    return {k: base64.b64encode(v).decode() for k, v in xattrs.read_xattrs(path).items()}


def entry_for(rel: bytes, full: bytes, st: os.stat_result,
              xattrs: Optional[Dict[str, bytes]] = None) -> Dict[str, Any]:
    """The upsert entry of an existing snapshot path (without idx/pack/link); ``xattrs`` when
    the caller read them already (else they are read from ``full``)."""
    mode = st.st_mode
    e: Dict[str, Any] = {
        "path": enc(rel), "mode": statmod.S_IMODE(mode), "uid": st.st_uid, "gid": st.st_gid,
        "user": _name_of(st.st_uid, pwd.getpwuid), "group": _name_of(st.st_gid, grp.getgrgid),
        "mtime_ns": st.st_mtime_ns,
    }
    if statmod.S_ISDIR(mode):
        e["op"] = "dir"
    elif statmod.S_ISLNK(mode):
        e["op"] = "symlink"
        e["target"] = enc(os.readlink(full))
    elif statmod.S_ISREG(mode):
        e["op"] = "file"
        e["size"] = st.st_size
    else:
        raise ValueError("special file")
    if not statmod.S_ISLNK(mode):
        x = read_xattrs(full) if xattrs is None else \
            ({k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())} if xattrs else {})
        if x:
            e["xattrs"] = x
    return e


_json_str = json.encoder.encode_basestring_ascii      # what json.dumps does to a str
_owners: Dict[Tuple[int, int], str] = {}


def _owner_json(uid: int, gid: int) -> str:
    s = _owners.get((uid, gid))
    if s is None:
        s = _owners[(uid, gid)] = ',"uid":%d,"gid":%d,"user":%s,"group":%s' % (
            uid, gid, json.dumps(_name_of(uid, pwd.getpwuid)), json.dumps(_name_of(gid, grp.getgrgid)))
    return s


def file_line(rel: bytes, st: os.stat_result, xattrs: Dict[str, bytes], idx: int,
              h: Optional[str] = None, pack: Optional[List[int]] = None) -> str:
    """The JSON line of a regular file's upsert entry, as ``ManifestWriter.add`` would write
    ``entry_for(rel, ..., st, xattrs)`` plus ``idx`` and optional ``h``/``pack`` -- formatted
    directly: the source writes one per small file, and a dict through the encoder costs 5x."""
    line = '{"path":%s,"mode":%d%s,"mtime_ns":%d,"op":"file","size":%d' % (
        _json_str(enc(rel)), statmod.S_IMODE(st.st_mode), _owner_json(st.st_uid, st.st_gid),
        st.st_mtime_ns, st.st_size)
    if xattrs:
        line += ',"xattrs":' + json.dumps({k: base64.b64encode(v).decode() for k, v in sorted(xattrs.items())},
                                          separators=(",", ":"))
    line += ',"idx":%d' % idx
    if h is not None:
        line += ',"h":"%s"' % h
    if pack is not None:
        line += ',"pack":[%d,%d]' % (pack[0], pack[1])
    return line + "}"


class ManifestWriter:
    """Stream entries into a zstd-compressed JSON-lines file.

    The file is a sequence of zstd frames.  ``cut(path)`` ends the current frame and also writes
    the frames since the previous cut to ``path``: a *segment* a replica can apply while the rest
    of the cycle is still being built (segment 0 starts with the header line; the concatenation
    of all segments is the manifest)."""

    def __init__(self, path: str, header: Dict[str, Any]):
        self._raw = open(path, "wb")
        self._z = pyzstd.ZstdCompressor(3)
        self._seg: List[bytes] = []
        self.count = 0
        self._buf: List[str] = []
        self._enc = json.JSONEncoder(separators=(",", ":")).encode
        self._write(dict(header, discrep_manifest=VERSION))

    def _write(self, obj: Dict[str, Any]) -> None:
        self._buf.append(self._enc(obj))
        if len(self._buf) >= 2048:
            self._flush()

    def _out(self, data: bytes) -> None:
        if data:
            self._raw.write(data)
            self._seg.append(data)

    def _flush(self) -> None:
        if self._buf:
            self._out(self._z.compress(("\n".join(self._buf) + "\n").encode("utf-8", "surrogatepass")))
            self._buf = []

    def add(self, entry: Dict[str, Any]) -> None:
        self._write(entry)
        self.count += 1

    def add_line(self, line: str) -> None:
        """An entry already formatted as one JSON object (``file_line``)."""
        self._buf.append(line)
        if len(self._buf) >= 2048:
            self._flush()
        self.count += 1

    def cut(self, path: str) -> None:
        """End the frame; write everything since the last cut to segment file ``path``."""
        self._flush()
        self._out(self._z.flush(pyzstd.ZstdCompressor.FLUSH_FRAME))
        with open(path, "wb") as f:
            f.write(b"".join(self._seg))
        self._seg = []

    def close(self) -> None:
        self._flush()
        self._out(self._z.flush(pyzstd.ZstdCompressor.FLUSH_FRAME))
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()


MAX_MANIFEST_BYTES = 1 << 30   # a whole manifest, decompressed (a source's word is bounded)
MAX_SEGMENT_BYTES = 64 << 20   # one streamed manifest segment, decompressed (~8192 entries)
MAX_PACK_BYTES = 32 << 20      # one pack of small files, decompressed (the source packs 8 MiB + one file)
MAX_FILE_SIZE = 1 << 46        # the largest file size a manifest may declare (64 TiB)
DECOMPRESS_PIECE = 4 << 20
FRAME_SLACK = 4096             # a compressed frame may be this much larger than its content


def decompress_bounded(data: bytes, max_size: int, what: str) -> bytes:
    """The zstd frames of ``data`` (one or more, concatenated), decompressed: never more than
    ``max_size`` + 1 bytes are produced; ManifestError when there would be more, when the data
    is not zstd or ends inside a frame."""
    if not data:
        raise ManifestError(f"{what} is empty")
    d = pyzstd.EndlessZstdDecompressor()
    parts: List[bytes] = []
    got = 0
    try:
        while True:     # in pieces: a bomb is refused having produced max_size + 1 bytes, not more
            piece = d.decompress(data if not parts else b"", min(DECOMPRESS_PIECE, max_size + 1 - got))
            parts.append(piece)
            got += len(piece)
            if got > max_size:
                raise ManifestError(f"{what} decompresses to more than {max_size} bytes")
            if d.needs_input or not piece:
                break
    except pyzstd.ZstdError as e:
        raise ManifestError(f"{what} is not valid zstd: {e}") from None
    if not d.at_frame_edge:
        raise ManifestError(f"{what} ends inside a zstd frame")
    return b"".join(parts)


def unpack_frame(frame: bytes, max_size: int, what: str) -> bytes:
    """``blockdiff.framing.unpack`` of a frame the source sent: at most ``max_size`` bytes; a
    malformed frame (empty, corrupt, too large) is a ManifestError."""
    try:
        return framing.unpack(frame, max_size)
    except FrameError as e:
        raise ManifestError(f"{what}: {e}") from None


def read_segment(data: bytes, n: int, max_size: int = MAX_SEGMENT_BYTES) -> Iterator[Dict[str, Any]]:
    """Raw entry dicts of manifest segment ``n`` (see ManifestWriter.cut); segment 0's header
    line is checked and skipped."""
    if n == 0:
        return read_lines(data, max_size)[1]
    raw = decompress_bounded(data, max_size, f"manifest segment {n}")
    return _parse_lines(raw.rstrip(b"\n"), f"segment {n} line ", 1)


def read_lines(data: bytes, max_size: int = MAX_MANIFEST_BYTES) -> Tuple[Dict[str, Any], Iterator[Dict[str, Any]]]:
    """Parse a manifest blob: (header, iterator of raw entry dicts)."""
    raw = decompress_bounded(data, max_size, "the manifest")
    stream = io.BytesIO(raw)
    first = stream.readline()
    try:
        header = json.loads(first)
    except ValueError:
        raise ManifestError("manifest header is not JSON") from None
    if not isinstance(header, dict) or header.get("discrep_manifest") != VERSION:
        raise ManifestError(f"unsupported manifest version: {header!r:.80}")

    return header, _parse_lines(stream.read().rstrip(b"\n"), "manifest line ", 2)


def _parse_lines(rest: bytes, what: str, first: int) -> Iterator[Dict[str, Any]]:
    if not rest:
        return iter(())
    try:   # one parse for all lines (a JSON array), not one call per line
        objs = json.loads(b"[" + rest.replace(b"\n", b",") + b"]")
    except ValueError:
        objs = None
    if objs is None:        # say which line is bad
        for n, line in enumerate(rest.split(b"\n"), first):
            try:
                json.loads(line)
            except ValueError:
                raise ManifestError(f"{what}{n} is not JSON") from None
        raise ManifestError("manifest is not JSON lines")

    def it() -> Iterator[Dict[str, Any]]:
        for n, obj in enumerate(objs, first):
            if not isinstance(obj, dict):
                raise ManifestError(f"{what}{n} is not an object")
            yield obj
    return it()


def _int(e: Dict[str, Any], key: str, *, lo: int = 0, hi: int = 2 ** 63) -> int:
    v = e.get(key)
    if type(v) is not int or not lo <= v < hi:
        raise ManifestError(f"entry {e.get('path')!r:.80}: field {key} must be an integer in [{lo}, {hi})")
    return v


def local_id(name: Optional[str], cache: Dict[str, Optional[int]], lookup) -> Optional[int]:
    """This host's id for a user or group name (cached; None when the name is unknown here)."""
    if not name:
        return None
    if name not in cache:
        try:
            cache[name] = lookup(name)
        except KeyError:
            cache[name] = None
    return cache[name]


_local_id = local_id   # the name replica.worker imports today; new code imports local_id


def _extents(ex: Any, size: int) -> List[Tuple[int, int]]:
    """A sparse file's data extents ``[[offset, length], ...]``, each inside the file."""
    if not isinstance(ex, list):
        raise ManifestError("extents must be a list")
    out = []
    for x in ex:
        if not (isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) and v >= 0 for v in x)
                and x[0] + x[1] <= size):
            raise ManifestError(f"bad extent {x!r:.40}")
        out.append((x[0], x[1]))
    return out


class Entry:
    """A validated manifest entry with byte paths."""

    __slots__ = ("op", "path", "old", "mode", "uid", "gid", "mtime_ns", "xattrs", "target",
                 "size", "idx", "h", "pack", "extents", "link", "cbt", "user", "group", "live")

    def __init__(self, raw: Dict[str, Any]):
        op = raw.get("op")
        if op not in OPS:
            raise ManifestError(f"unknown manifest op {op!r:.40}")
        self.op: str = op
        self.path: bytes = check_rel(dec(raw.get("path")))
        self.old = self.target = self.h = self.pack = self.extents = self.link = None
        self.xattrs: Dict[str, bytes] = {}
        self.size = self.idx = self.cbt = None
        self.live = False
        self.user = self.group = None
        if op == "move":
            self.old = check_rel(dec(raw.get("old")))
            return
        if op == "delete":
            return
        self._meta(raw)
        if op == "symlink":
            t = dec(raw.get("target"))
            if b"\x00" in t or not t:
                raise UnsafePathError(f"bad symlink target for {raw.get('path')!r:.80}")
            self.target = t  # kept verbatim, never followed by the replica
        elif op == "file":
            self._file(raw)

    def _meta(self, raw: Dict[str, Any]) -> None:
        """An upsert's metadata: mode, owner, mtime, xattrs."""
        get = raw.get
        v = get("mode")   # the checks of _int, inline: this runs once per entry
        self.mode = v if type(v) is int and 0 <= v < 0o10000 else _int(raw, "mode", hi=0o10000)
        v = get("uid")
        self.uid = v if type(v) is int and 0 <= v < 2 ** 32 else _int(raw, "uid", hi=2 ** 32)
        v = get("gid")
        self.gid = v if type(v) is int and 0 <= v < 2 ** 32 else _int(raw, "gid", hi=2 ** 32)
        v = get("mtime_ns")
        self.mtime_ns = v if type(v) is int and -2 ** 63 <= v < 2 ** 63 else _int(raw, "mtime_ns", lo=-2 ** 63)
        v = get("user")
        self.user = v if type(v) is str else None
        v = get("group")
        self.group = v if type(v) is str else None
        xs = get("xattrs") or {}
        if type(xs) is not dict:
            raise ManifestError("xattrs must be an object")
        for k, v in xs.items():
            if not isinstance(k, str) or "\x00" in k or not isinstance(v, str):
                raise ManifestError(f"bad xattr {k!r:.40}")
            try:
                self.xattrs[k] = base64.b64decode(v, validate=True)
            except ValueError:
                raise ManifestError(f"xattr {k!r:.40} is not base64") from None

    def _file(self, raw: Dict[str, Any]) -> None:
        """A file's fields: size, idx, and the optional h, pack, extents, link, cbt, live."""
        get = raw.get
        v = get("size")
        self.size = v if type(v) is int and 0 <= v <= MAX_FILE_SIZE else _int(raw, "size", hi=MAX_FILE_SIZE + 1)
        v = get("idx")
        self.idx = v if type(v) is int and 0 <= v < 2 ** 63 else _int(raw, "idx")
        h = get("h")
        if h is not None:
            if type(h) is not str or len(h) != 32:
                raise ManifestError("h must be 32 hex digits")
            try:
                self.h = bytes.fromhex(h)
            except ValueError:
                raise ManifestError("h must be 32 hex digits") from None
        p = get("pack")
        if p is not None:
            if not (type(p) is list and len(p) == 2 and type(p[0]) is int and type(p[1]) is int
                    and p[0] >= 0 and p[1] >= 0):
                raise ManifestError("pack must be [k, offset]")
            self.pack = (p[0], p[1])
        if raw.get("extents") is not None:
            self.extents = _extents(raw["extents"], self.size)
        if raw.get("link") is not None:
            self.link = check_rel(dec(raw["link"]))
        if raw.get("cbt") is not None:
            self.cbt = _int(raw, "cbt")
        if raw.get("live") is not None:
            if type(raw["live"]) is not bool:
                raise ManifestError("live must be true or false")
            self.live = raw["live"]

    def map_owner(self, users: Dict[str, Optional[int]], groups: Dict[str, Optional[int]]) -> None:
        """rsync's default: owner and group by name where the name exists here, else by number."""
        uid = local_id(self.user, users, lambda n: pwd.getpwnam(n).pw_uid)
        gid = local_id(self.group, groups, lambda n: grp.getgrnam(n).gr_gid)
        if uid is not None:
            self.uid = uid
        if gid is not None:
            self.gid = gid

    @property
    def is_upsert(self) -> bool:
        return self.op in UPSERT_OPS

"""The virtual control tree shown under ``.discrep/`` in the export.

Role: files whose content discrep generates (cycle description, manifest,
per-file signatures, packs of small files).  A ``ControlTree`` maps a path
relative to the control directory (``b""`` is the control dir itself) to a
``ControlFile``, the ``DIR`` marker, or ``None``.  ``DictControlTree`` is the
stock implementation: a mutable mapping whose directories are implied by the
file paths, plus an optional ``resolver`` for names that cannot be enumerated
(e.g. ``sig/<n>`` under a dynamic directory ``sig``).

Content must not change while the export is mounted: the mount uses
``kernel_cache`` and 60 s attribute timeouts, so the kernel would keep serving
the old bytes.  Fill the tree before serving.

Threading: ``BytesFile`` is immutable; ``LazyFile`` builds its content once
under a lock (concurrent first readers wait for the one build); a
``DictControlTree`` guards its mapping, its directory index and its resolver
cache with one lock, and calls the resolver outside that lock.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import (
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Protocol,
    Set,
    Union,
    runtime_checkable,
)

from .errors import NotADirectory, NotFound

__all__ = [
    "ControlFile",
    "BytesFile",
    "LazyFile",
    "DIR",
    "ControlTree",
    "DictControlTree",
]


class _DirMarker:
    """Type of the ``DIR`` singleton returned by ``ControlTree.lookup`` for directories."""

    _instance: Optional["_DirMarker"] = None

    def __new__(cls) -> "_DirMarker":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DIR"


#: returned by ``ControlTree.lookup`` for a directory
DIR = _DirMarker()


@runtime_checkable
class ControlFile(Protocol):
    """A generated read-only file.  An optional ``mtime_ns`` attribute overrides the view's time."""

    def size(self) -> int: ...

    def pread(self, size: int, offset: int) -> bytes: ...


class BytesFile:
    """A control file over fixed bytes."""

    __slots__ = ("data", "mtime_ns")

    def __init__(self, data: bytes, mtime_ns: Optional[int] = None) -> None:
        self.data = bytes(data)
        self.mtime_ns = mtime_ns

    def size(self) -> int:
        return len(self.data)

    def pread(self, size: int, offset: int) -> bytes:
        if offset < 0 or size < 0:
            return b""
        return self.data[offset:offset + size]

    def __repr__(self) -> str:
        return f"BytesFile({len(self.data)} bytes)"


class LazyFile:
    """A control file whose bytes come from ``factory()``, called once on first ``size``/``pread``.

    If the factory raises, the error propagates to that caller and the next
    call tries again.
    """

    __slots__ = ("_factory", "_data", "_lock", "mtime_ns")

    def __init__(self, factory: Callable[[], bytes], mtime_ns: Optional[int] = None) -> None:
        self._factory: Optional[Callable[[], bytes]] = factory
        self._data: Optional[bytes] = None
        self._lock = threading.Lock()
        self.mtime_ns = mtime_ns

    @property
    def built(self) -> bool:
        return self._data is not None

    def _get(self) -> bytes:
        data = self._data
        if data is not None:
            return data
        with self._lock:
            if self._data is None:
                assert self._factory is not None
                self._data = bytes(self._factory())
                self._factory = None  # drop references the factory closed over
            return self._data

    def size(self) -> int:
        return len(self._get())

    def pread(self, size: int, offset: int) -> bytes:
        if offset < 0 or size < 0:
            return b""
        return self._get()[offset:offset + size]

    def __repr__(self) -> str:
        return f"LazyFile(built={self.built})"


@runtime_checkable
class ControlTree(Protocol):
    """Lookup and listing of the control directory; ``rel`` is relative to it (``b""`` = itself)."""

    def lookup(self, rel: bytes) -> Union[ControlFile, _DirMarker, None]: ...

    def listdir(self, rel: bytes) -> List[bytes]: ...


def _parent_of(rel: bytes) -> bytes:
    i = rel.rfind(b"/")
    return b"" if i < 0 else rel[:i]


class DictControlTree(MutableMapping[bytes, ControlFile]):
    """A mutable mapping ``rel path -> ControlFile``; directories are implied by the paths.

    ``resolver(rel)`` is asked for names directly under one of ``dynamic_dirs``
    that are not in the mapping (not enumerable: ``listdir`` shows only mapped
    names).  Its results (also ``None``) are cached, up to ``resolver_cache``
    entries, so a lazily built file is built once even though the kernel looks
    it up several times.  ``dynamic_dirs`` always exist as directories.
    """

    def __init__(
        self,
        files: Optional[Mapping[bytes, ControlFile]] = None,
        *,
        resolver: Optional[Callable[[bytes], Optional[ControlFile]]] = None,
        dynamic_dirs: Iterable[bytes] = (),
        resolver_cache: int = 4096,
    ) -> None:
        self._lock = threading.Lock()
        self._files: Dict[bytes, ControlFile] = {}
        self._index: Optional[Dict[bytes, Set[bytes]]] = None
        self.resolver = resolver
        self.dynamic_dirs: Set[bytes] = {d.strip(b"/") for d in dynamic_dirs}
        self._resolved: "OrderedDict[bytes, Optional[ControlFile]]" = OrderedDict()
        self._resolver_cache = resolver_cache
        if files:
            for k, v in files.items():
                self[k] = v

    # -- MutableMapping -------------------------------------------------
    @staticmethod
    def _check_key(rel: bytes) -> bytes:
        if not isinstance(rel, bytes):
            raise TypeError(f"control paths are bytes, got {type(rel).__name__}")
        parts = rel.split(b"/")
        if not rel or any(not p or p in (b".", b"..") or b"\0" in p for p in parts):
            raise ValueError(f"invalid control path {rel!r}")
        return rel

    def __setitem__(self, rel: bytes, f: ControlFile) -> None:
        rel = self._check_key(rel)
        with self._lock:
            self._files[rel] = f
            self._index = None
            self._resolved.pop(rel, None)

    def __delitem__(self, rel: bytes) -> None:
        with self._lock:
            del self._files[rel]
            self._index = None

    def __getitem__(self, rel: bytes) -> ControlFile:
        with self._lock:
            return self._files[rel]

    def __iter__(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._files))

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def add_dir(self, rel: bytes) -> None:
        """Make ``rel`` an (empty) directory even if no file lives under it."""
        self.dynamic_dirs.add(self._check_key(rel))
        with self._lock:
            self._index = None

    # -- ControlTree -----------------------------------------------------
    def _index_locked(self) -> Dict[bytes, Set[bytes]]:
        if self._index is None:
            index: Dict[bytes, Set[bytes]] = {b"": set()}
            for rel in list(self._files) + list(self.dynamic_dirs):
                child = rel
                parent = _parent_of(child)
                while True:
                    index.setdefault(parent, set()).add(child[len(parent) + 1 if parent else 0:])
                    if not parent:
                        break
                    child, parent = parent, _parent_of(parent)
            for d in self.dynamic_dirs:
                index.setdefault(d, set())
            self._index = index
        return self._index

    def lookup(self, rel: bytes) -> Union[ControlFile, _DirMarker, None]:
        with self._lock:
            f = self._files.get(rel)
            if f is not None:
                return f
            if rel in self._index_locked():
                return DIR
            if rel in self._resolved:
                self._resolved.move_to_end(rel)
                return self._resolved[rel]
            resolver = self.resolver
        if resolver is None or not rel or _parent_of(rel) not in self.dynamic_dirs:
            return None
        f = resolver(rel)
        with self._lock:
            if rel in self._resolved:  # another thread resolved it meanwhile: keep the first
                return self._resolved[rel]
            self._resolved[rel] = f
            while len(self._resolved) > self._resolver_cache:
                self._resolved.popitem(last=False)
            return self._resolved[rel]

    def listdir(self, rel: bytes) -> List[bytes]:
        with self._lock:
            children = self._index_locked().get(rel)
            if children is not None:
                return sorted(children)
            if rel in self._files:
                raise NotADirectory(f"control path {rel!r} is a file")
        raise NotFound(f"no control directory {rel!r}")

"""fuse_export: a read-only FUSE view of an immutable snapshot plus a virtual ``.discrep/`` control tree.

Layers: ``errors`` (domain errors with errno), ``source`` (the ``SnapshotSource``
protocol and ``DirectorySource``), ``control`` (generated control files),
``model`` (``ExportView``, testable without FUSE) and ``adapter`` (the thin
mfusepy adapter and the mount helpers).  A leaf package: it imports the stdlib
and, lazily, mfusepy; never discrep.  Importing this package does not load
libfuse.

Threading: see each module; views and sources are safe for FUSE worker threads.
"""
from .adapter import (
    BackgroundExport,
    FuseAdapter,
    FuseUnavailable,
    MountError,
    load_fuse,
    mounted,
    serve,
    unmount,
    wait_mounted,
)
from .control import DIR, BytesFile, ControlFile, ControlTree, DictControlTree, LazyFile
from .errors import (
    AccessDenied,
    ExportError,
    InvalidArgument,
    IsADirectory,
    NoAttribute,
    NotADirectory,
    NotFound,
    ReadOnly,
    from_oserror,
)
from .model import ExportView, stable_ino
from .source import DirectorySource, SnapshotSource

__all__ = [
    "AccessDenied", "BackgroundExport", "BytesFile", "ControlFile", "ControlTree", "DIR", "DictControlTree",
    "DirectorySource", "ExportError", "ExportView", "FuseAdapter", "FuseUnavailable", "InvalidArgument",
    "IsADirectory", "LazyFile", "MountError", "NoAttribute", "NotADirectory", "NotFound", "ReadOnly",
    "SnapshotSource", "from_oserror", "load_fuse", "mounted", "serve", "stable_ino", "unmount", "wait_mounted",
]

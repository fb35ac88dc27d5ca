"""Getting bytes from a source host: SSH connection, sshfs mounts, the readers of an export,
the client of the source agent.

Imports only discrep.core, discrep.protocol and the leaves.

Start-up: paramiko's config module imports ``invoke`` (~60 ms, a third of paramiko's import
time) only to run ``Match exec`` lines of an ssh config.  Importing this package puts a stand-in
module under that name (when invoke is installed and not yet imported): paramiko's ``import
invoke`` gets it at once, and the first attribute asked of it (``invoke.run``, for a ``Match
exec`` line) imports the real module, which replaces the stand-in.

Thread-safety: the stand-in is registered once, at import (under the import lock); loading the
real module goes through the import lock too.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Optional


class _Deferred(types.ModuleType):
    """``invoke`` until something uses it."""

    _real: Optional[types.ModuleType] = None

    def __getattr__(self, name: str) -> Any:
        real = type(self)._real
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = type(self)._real = importlib.import_module(self.__name__)
        return getattr(real, name)


def _defer_invoke() -> None:
    if "invoke" in sys.modules or "paramiko" in sys.modules:
        return
    try:
        if importlib.util.find_spec("invoke") is None:
            return              # not installed: paramiko's own ImportError path, unchanged
    except (ImportError, ValueError):
        return
    sys.modules["invoke"] = _Deferred("invoke")


_defer_invoke()

"""The source's change journal: the store, coalescing, and the watcher with its kernel backends.

Modules: store (the ``Journal`` SQLite store and ``Entry``), changes (``coalesce`` entries into a
change set), watcher (``Watcher``: batches, commits, gaps, the cycle barrier), sink (``Sink`` and
``Batch``: what a backend reports into), backends (inotify and fanotify event sources), inotify /
fanotify / libc (ctypes bindings).  Imports only discrep.core, discrep.protocol and the leaves.

Thread-safety: see each module; a watcher and its backend run in one thread.
"""

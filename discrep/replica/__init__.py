"""The replica side of a cycle: composed parts, driven by one cycle object.

``sync`` (the entry point: lock, checks, commit or roll back) drives an ``apply.Applier`` --
or, for a first copy the source still builds, a ``stream.StreamApplier`` over the same
parts: ``dest.Dest`` (every change to DEST, each after its undo record; ``dirs.DirFds``
below it), ``files.FilePatcher`` (file contents; ``fetch``, ``packs``), ``meta.MetaWriter``,
``owners.OwnerMap``, and for the first copy's hot path ``packed.PackedWriter`` and the second
applying process ``worker``.  ``catalog`` and ``history`` are the replica's stores;
``reader`` states what the replica needs from a transport.

Imports only discrep.core, discrep.protocol and the leaves; never source, journal or transport.
Thread-safety: see each module; a cycle is applied by one thread.
"""

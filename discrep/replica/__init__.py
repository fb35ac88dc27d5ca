"""The replica side of a cycle: sync, applying entries, patching files, the streamed first copy,
its worker process, the catalog and the history store (undo, restore, retention).

Imports only discrep.core, discrep.protocol and the leaves; never source, journal or transport.
"""

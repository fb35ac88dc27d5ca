"""discrep: discrete data replication.

Composes the leaf packages ``blockdiff`` (signatures, compare, patch) and
``fuse_export`` (read-only FUSE view of a snapshot) into the source side
(journal, snapshot, export) and the replica side (sync, catalog, commit) of a
replication cycle.  See README.md and ../shared/DESIGN.md.

Threading: importing the package starts nothing; each module states its own rules.
"""

__version__ = "0.1.0"

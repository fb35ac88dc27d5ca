"""The source side of a cycle: catch-up scan, snapshot providers, cycle build, catalog, export,
settle/ack/reset, and the agent a replica talks to.

Imports discrep.core, discrep.protocol, discrep.journal.store and the leaves; never replica or transport.
"""

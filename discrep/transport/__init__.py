"""Getting bytes from a source host: SSH connection, sshfs mounts, the readers of an export,
the client of the source agent.

Imports only discrep.core, discrep.protocol and the leaves.
"""

"""The contract between the two sides: manifest format, export layout names, range requests,
changed-block maps, the agent's messages.

Imports only discrep.core and the leaf packages.
"""

"""The source's change journal: the store, coalescing, and the watcher with its kernel backends.

Imports only discrep.core, discrep.protocol and the leaves.
"""

"""Shared core: errors, untrusted paths, locks, the platform facade, SQLite store, walk, metadata.

Imports nothing of discrep above it (no side, no protocol).
"""

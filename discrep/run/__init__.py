"""Wiring: one cycle on one host (local), from or to another host (remote), continuous mode
(daemon), status and verify.  The only layer that combines the sides.

Imports core, protocol, the sides and the leaves; never the CLI.
"""

"""Owners on the replica: rsync's default, by name where the name exists on this host.

A manifest entry carries the source's uid/gid and, where the source knows them, the user and
group names.  ``OwnerMap.ids`` gives the ids to set here: the local id of each name this host
knows, else the number as it came; with ``numeric_ids`` always the numbers.  Name lookups are
cached (one cycle asks for the same few names millions of times).  One OwnerMap serves a
whole cycle: the entries of its manifest, the top directory, the packed-file hot path.

Thread-safety: one OwnerMap per thread (plain dict caches).
"""
from __future__ import annotations

import grp
import pwd
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from discrep.protocol.manifest import Entry


def _uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid_of(name: str) -> int:
    return grp.getgrnam(name).gr_gid


class OwnerMap:
    """The replica's owners for the source's (see module doc)."""

    def __init__(self, numeric_ids: bool):
        self.numeric_ids = numeric_ids
        self._ids: Dict[Tuple[Optional[str], Optional[str], int, int], Tuple[int, int]] = {}
        self._names: Dict[Tuple[Callable[[str], int], str], Optional[int]] = {}

    def _local(self, name: Optional[str], lookup: Callable[[str], int]) -> Optional[int]:
        """This host's id for a user or group name; None when there is no such name here."""
        if not name:
            return None
        key = (lookup, name)
        if key not in self._names:
            try:
                self._names[key] = lookup(name)
            except KeyError:
                self._names[key] = None
        return self._names[key]

    def ids(self, user: Any, group: Any, uid: int, gid: int) -> Tuple[int, int]:
        """(uid, gid) to set for an object the source owns as ``user``/``group`` (``uid``/``gid``)."""
        if self.numeric_ids:
            return uid, gid
        user = user if type(user) is str else None     # as manifest.Entry reads them
        group = group if type(group) is str else None
        key = (user, group, uid, gid)
        got = self._ids.get(key)
        if got is None:
            u, g = self._local(user, _uid_of), self._local(group, _gid_of)
            got = self._ids[key] = (uid if u is None else u, gid if g is None else g)
        return got

    def map_entry(self, e: Entry) -> None:
        """Set ``e``'s uid/gid to this host's (a validated entry that sets an owner)."""
        e.uid, e.gid = self.ids(e.user, e.group, e.uid, e.gid)

    def map_entries(self, entries: Iterable[Entry]) -> None:
        """``map_entry`` for each entry that sets an owner (none to map with ``numeric_ids``)."""
        if self.numeric_ids:
            return
        for e in entries:
            if e.is_upsert:
                self.map_entry(e)

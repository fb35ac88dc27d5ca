"""Which recovery points a retention policy keeps: ``keep_last``, ``keep_within`` and a time grid.

A grid (``keep = "24x1h, 30x1d, 12x30d"``) keeps the newest recovery point in each of the last 24
hours, the last 30 days and the last 12 thirty-day periods.  Periods are buckets aligned to the
Unix epoch in UTC (an hour is ``[k*3600, (k+1)*3600)``, a day ``[k*86400, ...)``, 30d likewise); "the
last N" are the bucket holding *now* and the N-1 before it, whether or not they hold a point.  A point's
time is its source snapshot time (when it was taken), the commit time when that is unknown.

``select`` is a pure function: the rules that keep each point.  ``plan`` then says what the history
store can do: its reverse deltas chain every point to the newest (restoring point K undoes the
history of every later cycle), so history can only go from the old end: every point older than the
oldest selected one is dropped, and a point between selected ones that no rule selects stays
restorable ("needed by" the older kept point) -- a kept point is never broken.  Dropping such middle
points would need their reverse deltas merged into the next cycle's, which the store does not do yet.

Thread-safety: pure functions.
"""
from __future__ import annotations

import re
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from discrep.core.errors import UsageError

UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_RULES = 16
MAX_COUNT = 100_000
_RULE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*([mhdw])\s*$")

GridRule = Tuple[int, float]      # (count, period in seconds)


class Point(NamedTuple):
    cycle: int
    time_ns: int


class Decision(NamedTuple):
    cycle: int
    time_ns: int
    keep: bool
    reasons: Tuple[str, ...]      # the rules that select it; ("needed by N",) for a point kept only for N


def parse_grid(text: str) -> Tuple[GridRule, ...]:
    """``"24x1h, 30x1d, 12x30d"`` -> ((24, 3600.0), (30, 86400.0), (12, 2592000.0)); units m, h, d, w."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("keep: an empty grid", hint='write e.g. "24x1h, 30x1d, 12x30d"')
    out: List[GridRule] = []
    for part in text.split(","):
        m = _RULE.match(part)
        if not m:
            raise UsageError(f"keep: {part.strip()!r} is not COUNTxPERIOD",
                             hint='write e.g. "24x1h, 30x1d, 12x30d" (units m, h, d, w)')
        count, n = int(m.group(1)), int(m.group(2))
        if not 1 <= count <= MAX_COUNT or n < 1:
            raise UsageError(f"keep: {part.strip()!r}: the count must be 1 to {MAX_COUNT}, the period positive")
        out.append((count, float(n * UNITS[m.group(3)])))
    if len(out) > MAX_RULES:
        raise UsageError(f"keep: more than {MAX_RULES} rules")
    return tuple(out)


def grid_text(rule: GridRule) -> str:
    count, period = rule
    for unit in ("w", "d", "h", "m"):
        if period % UNITS[unit] == 0:
            return f"{count}x{int(period // UNITS[unit])}{unit}"
    return f"{count}x{period:g}s"


def select(points: Sequence[Point], now_ns: int, keep_last: int = 1, keep_within_s: Optional[float] = None,
           grid: Sequence[GridRule] = ()) -> Dict[int, List[str]]:
    """cycle -> the rules that keep it (only the selected cycles).  The newest point is always kept."""
    pts = sorted(points, key=lambda p: p.cycle)
    why: Dict[int, List[str]] = {}
    if not pts:
        return why
    for p in pts[-max(1, keep_last):]:
        why.setdefault(p.cycle, []).append(f"last {max(1, keep_last)}")
    if keep_within_s is not None:
        for p in pts:
            if now_ns - p.time_ns <= keep_within_s * 1e9:
                why.setdefault(p.cycle, []).append(f"within {keep_within_s:g}s")
    for rule in grid:
        count, period = rule
        period_ns = int(period * 1e9)
        first = now_ns // period_ns - count + 1
        newest: Dict[int, Point] = {}
        for p in pts:
            b = p.time_ns // period_ns
            if first <= b <= now_ns // period_ns and (b not in newest or (p.time_ns, p.cycle) >=
                                                       (newest[b].time_ns, newest[b].cycle)):
                newest[b] = p
        for p in newest.values():
            why.setdefault(p.cycle, []).append(grid_text(rule))
    return why


def plan(points: Sequence[Point], now_ns: int, keep_last: int = 1, keep_within_s: Optional[float] = None,
         grid: Sequence[GridRule] = ()) -> List[Decision]:
    """Every point, oldest first, with what the history store will do (see the module doc)."""
    pts = sorted(points, key=lambda p: p.cycle)
    why = select(pts, now_ns, keep_last, keep_within_s, grid)
    if not why:
        return []
    out = []
    below: Optional[int] = None         # the newest selected point older than the one looked at
    for p in pts:
        if p.cycle in why:
            out.append(Decision(p.cycle, p.time_ns, True, tuple(why[p.cycle])))
            below = p.cycle
        elif below is not None:
            out.append(Decision(p.cycle, p.time_ns, True, (f"needed by {below}",)))
        else:
            out.append(Decision(p.cycle, p.time_ns, False, ()))
    return out

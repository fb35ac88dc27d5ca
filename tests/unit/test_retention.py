"""Retention grids against hand-computed expectations (pure functions, no tree)."""
from __future__ import annotations

import pytest

from discrep.core.errors import UsageError
from discrep.replica.retention import Point, grid_text, parse_grid, plan, select

pytestmark = pytest.mark.unit

S = 1_000_000_000
H = 3600 * S
M = 60 * S
D = 86400 * S


def test_parse_grid():
    assert parse_grid("24x1h, 30x1d, 12x30d") == ((24, 3600.0), (30, 86400.0), (12, 30 * 86400.0))
    assert parse_grid(" 5 x 15m ,2x1w") == ((5, 900.0), (2, 7 * 86400.0))
    assert [grid_text(r) for r in parse_grid("24x1h, 30x1d, 12x30d, 4x15m, 2x2w")] == \
        ["24x1h", "30x1d", "12x30d", "4x15m", "2x2w"]
    for bad in ("", "24h", "x1h", "0x1h", "3x0h", "3x1y", "3x1h,", "-1x1h", "1x1h; 2x1d"):
        with pytest.raises(UsageError):
            parse_grid(bad)


def test_hourly_grid_by_hand():
    """now is 30 min past hour boundary B. 3x1h looks at hours [B, B+1h), [B-1h, B), [B-2h, B-1h)."""
    b = 500_000 * H
    now = b + 30 * M
    pts = [Point(1, now - 250 * M), Point(2, now - 180 * M), Point(3, now - 170 * M), Point(4, now - 140 * M),
           Point(5, now - 100 * M), Point(6, now - 65 * M), Point(7, now - 55 * M), Point(8, now - 5 * M)]
    # by hand, relative to B:
    #   1: B-220m (B-4h), 2: B-150m (B-3h), 3: B-140m (B-3h), 4: B-110m (B-2h), 5: B-70m (B-2h),
    #   6: B-35m (B-1h), 7: B-25m (B-1h), 8: B+25m (B)
    # newest per hour: B -> 8, B-1h -> 7, B-2h -> 5
    assert select(pts, now, keep_last=1, grid=parse_grid("3x1h")) == {8: ["last 1", "3x1h"], 7: ["3x1h"],
                                                                      5: ["3x1h"]}
    got = [(d.cycle, d.keep, d.reasons) for d in plan(pts, now, keep_last=1, grid=parse_grid("3x1h"))]
    assert got == [(1, False, ()), (2, False, ()), (3, False, ()), (4, False, ()),
                   (5, True, ("3x1h",)), (6, True, ("needed by 5",)), (7, True, ("3x1h",)),
                   (8, True, ("last 1", "3x1h"))]


def test_several_rules_keep_last_and_within():
    d0 = 20_000 * D                                   # a day boundary
    now = d0 + 12 * H
    pts = [Point(1, d0 - 40 * D), Point(2, d0 - 9 * D + H), Point(3, d0 - 9 * D + 2 * H),
           Point(4, d0 - 2 * D + H), Point(5, d0 - D + H), Point(6, d0 + H), Point(7, d0 + 2 * H),
           Point(8, d0 + 11 * H)]
    # 2x1d: today -> 8, yesterday -> 5;  2x1w (epoch-aligned 7-day buckets: d0 = 20000 days =
    # 2857 weeks + 1 day, so the current bucket is [d0-1d, d0+6d), holding 5..8): current -> 8, the one
    # before [d0-8d, d0-1d) -> 4;  keep_last 2 -> 7, 8;  within 11h30m -> 6 (11h old), 7, 8
    why = select(pts, now, keep_last=2, keep_within_s=11.5 * 3600, grid=parse_grid("2x1d, 2x1w"))
    assert why == {6: ["within 41400s"], 7: ["last 2", "within 41400s"],
                   8: ["last 2", "within 41400s", "2x1d", "2x1w"], 5: ["2x1d"], 4: ["2x1w"]}
    got = {d.cycle: (d.keep, d.reasons) for d in plan(pts, now, 2, 11.5 * 3600, parse_grid("2x1d, 2x1w"))}
    assert [c for c, (k, _r) in got.items() if not k] == [1, 2, 3]
    assert got[4] == (True, ("2x1w",)) and got[6] == (True, ("within 41400s",))


def test_ties_edges_and_defaults():
    now = 1000 * H
    # two points at the same time in one bucket: the higher cycle is the newest
    pts = [Point(1, now - 30 * M), Point(2, now - 30 * M), Point(3, now)]
    assert select(pts, now, keep_last=1, grid=parse_grid("2x1h")) == {3: ["last 1", "2x1h"], 2: ["2x1h"]}
    # the newest point is kept even with keep_last 0; nothing to do without points
    assert select([Point(4, 0)], now, keep_last=0) == {4: ["last 1"]}
    assert plan([], now) == []
    # a point exactly at the start of the oldest bucket of the window counts, one just before does not
    pts = [Point(1, now - 2 * H - 1), Point(2, now - 2 * H), Point(3, now)]
    assert set(select(pts, now, keep_last=1, grid=parse_grid("3x1h"))) == {2, 3}

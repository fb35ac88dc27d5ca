"""The live journal with the fanotify backend (filesystem mark, DFID_NAME, FAN_RENAME): root only.

Same scenarios as tests/fs/test_watcher_inotify.py (loaded from there by path), plus:
events elsewhere on the filesystem are not journaled, and a queue overflow
(forced with a small fs.fanotify.max_queued_events and a stopped watcher) opens
a gap that the next cycle's scan closes.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "watcher_scenarios", Path(__file__).resolve().parents[1] / "fs" / "test_watcher_inotify.py")
S = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(S)


@pytest.fixture(autouse=True)
def _need_fanotify(work_dir):
    if os.geteuid() != 0:
        pytest.skip("fanotify filesystem marks need root")
    from discrep.journal import fanotify
    try:
        fanotify.Fanotify(os.fsencode(str(work_dir))).close()
    except OSError as e:
        pytest.skip(f"fanotify unavailable here: {e}")


def test_fanotify_rename_storm(work_dir):
    S.scenario_rename_storm(work_dir, "fanotify")


def test_fanotify_create_delete_and_dir_rename(work_dir):
    S.scenario_create_delete_and_dir_rename(work_dir, "fanotify")


def test_fanotify_sigkill_restart(work_dir):
    S.scenario_sigkill_restart(work_dir, "fanotify")


def test_fanotify_rename_costs_nothing(work_dir):
    S.scenario_rename_costs_nothing(work_dir, "fanotify")


def test_fanotify_overflow_opens_gap(work_dir):
    knob = "/proc/sys/fs/fanotify/max_queued_events"
    with open(knob) as f:
        limit = int(f.read())
    with open(knob, "w") as f:
        f.write("256")
    try:
        S.scenario_overflow(work_dir, "fanotify", n=700, restore=(knob, limit))
    finally:
        with open(knob, "w") as f:
            f.write(str(limit))


def test_fanotify_ignores_the_rest_of_the_filesystem(work_dir):
    src = work_dir / "src"
    src.mkdir()
    outside = work_dir / "outside"
    outside.mkdir()
    p = S.start_watcher(src, "fanotify")
    try:
        S.sync_point(src)
        from discrep.journal.store import Journal
        j = Journal(str(src / ".discrep"))
        before = j.last_seq()
        for i in range(200):
            (outside / f"o{i}").write_bytes(b"not ours")
        os.rename(outside / "o0", outside / "o0b")
        (src / "mine").write_bytes(b"ours")
        os.rename(outside / "o1", src / "moved-in")           # crossing into ROOT is journaled
        os.rename(src / "mine", outside / "moved-out")         # ... and out of it
        S.sync_point(src)
        rows = [(e.op, e.path) for e in j.entries(before)]
        j.close()
        paths = {p_ for _op, p_ in rows}
        assert all(not p_.startswith(b"/") and not p_.startswith(b".discrep") for p_ in paths)
        assert not any(b"o1" in p_ or b"o0" in p_ for p_ in paths), rows
        assert ("create", b"moved-in") in rows and ("delete", b"mine") in rows, rows
        st = S.subprocess.run([S.DISCREP, "status", "--json", str(src)], stdout=S.subprocess.PIPE, timeout=30)
        import json
        assert json.loads(st.stdout.splitlines()[-1])["source"]["backend"] == "fanotify"
    finally:
        S.stop_watcher(p)


def test_fanotify_change_right_before_cycle(work_dir):
    S.scenario_change_right_before_cycle(work_dir, "fanotify")


def test_fanotify_stalled_watcher_only_delays(work_dir):
    S.scenario_stalled_watcher_only_delays(work_dir, "fanotify")

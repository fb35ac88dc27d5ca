"""The daemon's parts that need no cycle: when a job runs next (``first_run``), how a cycle
process's exit reads (``parse_outcome``), the state file (atomic, tolerant, 0700 directory), the
systemd notification and reading the jobs file with its exact bytes."""
from __future__ import annotations

import json
import os
import socket
import stat
import time

import pytest

from discrep.core.errors import UsageError
from discrep.run import jobstate
from discrep.run.children import parse_outcome
from discrep.run.config import ConfigError, parse
from discrep.run.jobstate import JobState
from discrep.run.service import first_run, read_config, sd_notify

pytestmark = pytest.mark.unit


def _jobs():
    cfg = parse({"jobs": {"e": {"source": "/s", "dest": "/d", "every": "10m"},
                          "c": {"source": "/s2", "dest": "/d2", "schedule": "0 * * * *"}}}, "x.toml")
    return cfg.jobs["e"], cfg.jobs["c"]


def test_first_run():
    every, cron = _jobs()
    now = time.mktime((2026, 12, 2, 10, 17, 0, 0, 0, -1))
    assert first_run(every, JobState(first_seen=now), now) == now                 # new: at once
    assert first_run(cron, JobState(first_seen=now), now) == now + 43 * 60          # new: next slot (11:00)
    ran = JobState(last_start=now - 120, last_status="ok")
    assert first_run(every, ran, now) == now - 120 + 600                          # 10 min after the last start
    assert first_run(every, JobState(last_start=now - 3600, last_status="ok"), now) == now   # overdue: now
    assert first_run(cron, JobState(last_start=now - 120, last_status="ok"), now) == now + 43 * 60
    # the 10:00 slot was missed while the daemon was down (last start 9:30): run at start
    assert first_run(cron, JobState(last_start=now - 47 * 60, last_status="ok"), now) == now
    for bad in (JobState(last_start=now - 10, last_status="error"),
                JobState(last_start=now - 10, last_status="interrupted"),
                JobState(last_start=now - 10, last_status="ok", running=True)):
        assert first_run(every, bad, now) == now


@pytest.mark.parametrize("rc, out, err, stop, status, text", [
    (0, b'{"cycle": 3, "files_changed": 1}\n', b"", False, "ok", None),
    (1, b'noise\n{"cycle": 3, "warnings": 2}\n', b"discrep: warning: x\n", False, "warning", None),
    (4, b'{"error": "source /s does not exist", "exit_code": 4}\n', b"", False, "error", "source /s does not exist"),
    (-9, b"", b"", False, "error", "killed by signal 9 (SIGKILL)"),
    (2, b"", b"line\ndiscrep: error: unexpected OSError: boom\n", False, "error", "exited with 2: unexpected OSError"),
    (130, b"", b"discrep: error: interrupted\n", False, "interrupted", None),
    (2, b'{"error": "broken pipe"}\n', b"", True, "interrupted", None),
    (-15, b"", b"", True, "interrupted", None),
    (0, b"not json\n", b"", False, "error", "exited with 0"),
])
def test_parse_outcome(rc, out, err, stop, status, text):
    o = parse_outcome(rc, out, err, stop)
    assert o.status == status
    if text:
        assert text in o.error
    if status in ("ok", "warning"):
        assert o.figures["cycle"] == 3 and o.reported


def test_state_file_roundtrip_atomic_and_tolerant(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    sd = jobstate.ensure_dir(str(d))
    assert stat.S_IMODE(os.stat(sd).st_mode) == 0o700
    st = JobState(first_seen=1.0, last_success=5.0, last_result={"cycle": 2}, consecutive_failures=0)
    st.cycles["ok"] = 2
    jobstate.save(sd, {"a": st}, {"daemon_pid": 42})
    assert sorted(os.listdir(sd)) == ["state.json"]                 # no temp file left
    assert stat.S_IMODE(os.stat(d / "state.json").st_mode) == 0o600
    doc = jobstate.load(sd)
    assert doc["daemon_pid"] == 42 and doc["jobs"]["a"] == st
    raw = json.loads((d / "state.json").read_text())
    raw["jobs"]["a"]["unknown_future_key"] = 1
    del raw["jobs"]["a"]["cycles"]
    (d / "state.json").write_text(json.dumps(raw))
    assert jobstate.load(sd)["jobs"]["a"].cycles == {"ok": 0, "warning": 0, "error": 0}
    (d / "state.json").write_text("{not json")
    assert jobstate.load(sd) == {"jobs": {}, "damaged": True}
    assert jobstate.load(str(tmp_path / "none")) == {"jobs": {}}


def test_state_dir_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="cannot use state directory"):
        jobstate.ensure_dir(str(tmp_path / "file" / "sub"))


def test_sd_notify(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd_notify("READY=1\nSTATUS=x")
        assert s.recv(100) == b"READY=1\nSTATUS=x"
    name = f"discrep-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)           # an abstract socket, as systemd passes it
        assert sd_notify("STOPPING=1")
        assert s.recv(100) == b"STOPPING=1"


def test_read_config_keeps_the_bytes(tmp_path):
    p = tmp_path / "j.toml"
    text = "# comment\n[jobs.a]\nsource = '/s'\ndest = '/d'\nevery = '1m'\n"
    p.write_text(text)
    cfg, data = read_config(str(p))
    assert data == text.encode() and set(cfg.jobs) == {"a"}
    p.write_text("[jobs.a\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config(str(p))
    with pytest.raises(ConfigError, match="no such file"):
        read_config(str(tmp_path / "missing.toml"))

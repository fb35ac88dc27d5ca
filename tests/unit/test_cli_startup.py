"""Start-up cost of the CLI: a command's run imports only what it needs.

``discrep agent`` starts once per remote cycle and ``discrep replicate`` once per cron run, so the
command table names modules instead of importing them, and the heavy parts (the other side, the
daemon, the FUSE bindings) are imported by the code that uses them.  Checked in a fresh
interpreter by the modules it loaded, not by time (no timed assertions)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from discrep.cli import main

pytestmark = pytest.mark.unit


def test_table_names_match_modules():
    for name, _module in main.COMMANDS:
        assert main.command_module(name).NAME == name


def test_only_the_named_command_is_registered():
    p = main.build_parser(["-vv", "ack", "/x", "3"])
    a = p.parse_args(["-vv", "ack", "/x", "3"])
    assert a.command.NAME == "ack" and a.verbose == 2
    full = main.build_parser()
    assert full.parse_args(["history", "/d"]).command.NAME == "history"


def _loaded(code: str) -> set:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
                         check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv, absent", [
    (["agent", "--help"], {"discrep.run.jobstate", "discrep.run.remote", "discrep.replica.sync", "paramiko"}),
    (["replicate", "--help"], {"discrep.run.jobstate", "discrep.source.agent", "fuse_export", "paramiko"}),
])
def test_a_command_imports_only_its_own_parts(argv, absent):
    code = (f"import sys\nfrom discrep.cli import main\ntry:\n    main.main({argv!r})\nexcept SystemExit:\n    pass")
    assert not (_loaded(code) & absent)


def test_the_remote_cycle_leaves_the_other_sides_parts_alone():
    """The replica's remote path imports neither the source side nor the first copy's worker
    process; the agent's imports no replica side."""
    rep = _loaded("import discrep.run.remote, discrep.run.local, discrep.run.daemon")
    assert not rep & {"discrep.source.build", "discrep.source.agent", "fuse_export", "discrep.replica.worker",
                      "platform"}
    agent = _loaded("import discrep.source.agent")
    assert not {m for m in agent if m.startswith(("discrep.replica", "discrep.run", "paramiko"))}


def test_messages_stay_cheap_to_define():
    """The agent protocol's message classes are plain classes (a dataclass costs ~1 ms to create)."""
    from discrep.protocol import agent_messages as am
    for cls in list(am.COMMANDS.values()) + list(am.EVENTS.values()):
        assert not hasattr(cls, "__dataclass_fields__"), cls


def test_messages_behave_as_frozen_values():
    from discrep.protocol import agent_messages as am
    a, b = am.Verified(), am.Verified()
    a.redo.append({"op": "file"})
    assert b.redo == [] and a != b                       # each message its own default list
    assert am.Ack(5) == am.Ack(cycle=5) and hash(am.Ack(5)) == hash(am.Ack(cycle=5)) and am.Ack(5) != am.Acked(5)
    assert repr(am.Ack(5)) == "Ack(cycle=5)"
    with pytest.raises(AttributeError):
        am.Ack(5).cycle = 6
    for bad in (lambda: am.Ack(), lambda: am.Ack(1, 2), lambda: am.Ack(cycle=1, x=2), lambda: am.Ack(1, cycle=1)):
        with pytest.raises(TypeError):
            bad()
    assert [n for n, _d in am.Failed.FIELDS] == ["error", "kind", "exit_code"]


def test_paramiko_starts_without_invoke_and_match_exec_still_works(tmp_path):
    """paramiko imports ``invoke`` only for ``Match exec``: a stand-in defers it, the real one runs the line."""
    cfg = tmp_path / "ssh_config"
    cfg.write_text('Match exec "test -e %s"\n  HostName matched.example\n' % (tmp_path / "ssh_config"))
    code = ("import sys\nimport discrep.transport\nimport paramiko\n"
            "assert 'invoke.tasks' not in sys.modules\n"
            f"print(paramiko.SSHConfig.from_path({str(cfg)!r}).lookup('h')['hostname'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "matched.example"

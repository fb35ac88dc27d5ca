"""scripts/discrep.service: the settings the daemon relies on (Type=notify, reload by SIGHUP,
KillMode=mixed, 30 s to stop, a 0700 state directory), and its command lines parse with discrep's
own argument parser (no option drift between the unit and the CLI)."""
from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from discrep.cli.main import build_parser

pytestmark = pytest.mark.unit

UNIT = Path(__file__).resolve().parents[2] / "scripts" / "discrep.service"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    return cp


def test_unit_settings():
    s = _unit()["Service"]
    assert s["Type"] == "notify" and s["KillMode"] == "mixed" and s["TimeoutStopSec"] == "30"
    assert shlex.split(s["ExecReload"])[-2:] == ["-HUP", "$MAINPID"]
    assert s["StateDirectory"] == "discrep" and s["StateDirectoryMode"] == "0700"


@pytest.mark.parametrize("key", ["ExecStart", "ExecStartPre"])
def test_unit_command_lines_parse(key):
    argv = shlex.split(_unit()["Service"][key])
    assert Path(argv[0]).name == "discrep"
    a = build_parser().parse_args(argv[1:])
    assert a.config == "/etc/discrep/discrep.toml"
    if key == "ExecStart":
        assert a.command.NAME == "daemon" and a.state_dir == "/var/lib/discrep"


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    text = UNIT.read_text().replace("/usr/local/bin/discrep", shutil.which("true") or "/bin/true")
    unit = tmp_path / "discrep.service"
    unit.write_text(text)
    p = subprocess.run([tool, "verify", str(unit)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=60)
    problems = [ln for ln in p.stdout.splitlines() if "discrep.service" in ln]
    assert problems == [], p.stdout


def test_readme_service_example_is_a_valid_jobs_file():
    """The complete example in the README's "Running as a service" section passes the checks."""
    import tomllib
    from discrep.run.config import parse
    readme = (UNIT.parents[1] / "README.md").read_text()
    section = readme.split("## Running as a service", 1)[1].split("\n## ", 1)[0]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = parse(tomllib.loads(block), "README.md")
    assert set(cfg.jobs) == {"home", "db", "www"} and cfg.metrics_listen == ("127.0.0.1", 9811)
    assert cfg.jobs["db"].options.hooks is not None and cfg.jobs["db"].options.hooks.on_failure == "crash-consistent"
    assert cfg.jobs["home"].rpo_s == 3600 and cfg.jobs["www"].options.remote_source

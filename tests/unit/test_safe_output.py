"""What the CLI prints never carries raw control characters; sshfs options survive commas; an
export shared with other users keeps the kernel's permission checks."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from discrep.cli.common import printable
from discrep.transport.ssh import HostConfig
from discrep.transport.sshfs import SshfsMount
from fuse_export.adapter import fuse_options

pytestmark = pytest.mark.unit

HOSTILE = "name\x1b]0;owned\x07 \x1b[2J\r\x08 \u202etxt.exe \x9b \udcff end"


def test_printable_escapes_every_control_and_format_character():
    out = printable(HOSTILE)
    assert all(c.isprintable() for c in out), out
    for raw in ("\x1b", "\x07", "\r", "\x08", "\u202e", "\x9b"):
        assert raw not in out
    assert "\\x1b" in out and "\\u202e" in out and "end" in out
    assert printable("plain text, ünïcode, 日本") == "plain text, ünïcode, 日本"


def test_cli_error_text_is_printed_escaped(tmp_path):
    """A path with an escape sequence in an error message reaches the terminal escaped."""
    bad = str(tmp_path / "x\x1b[31mred")
    r = subprocess.run([sys.executable, "-m", "discrep", "ack", bad, "1"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    assert r.returncode != 0
    assert b"\x1b" not in r.stderr and b"\\x1b" in r.stderr, r.stderr


def test_log_lines_are_escaped(capsys):
    from discrep.cli.main import _SafeFormatter
    rec = logging.LogRecord("discrep.x", logging.WARNING, __file__, 1, "remote said %s", (HOSTILE,), None)
    line = _SafeFormatter("discrep: %(message)s").format(rec)
    assert "\x1b" not in line and "\\x1b" in line


def _split_fuse_opts(s: str):
    """libfuse's -o splitting: commas separate, a backslash escapes the next character."""
    out, cur, esc = [], "", False
    for c in s:
        if esc:
            cur, esc = cur + c, False
        elif c == "\\":
            esc = True
        elif c == ",":
            out.append(cur)
            cur = ""
        else:
            cur += c
    return out + [cur]


def test_sshfs_options_escape_commas_and_backslashes():
    cfg = HostConfig(alias="h", hostname="127.0.0.1", port=2222, user="ad,min\\x")
    cmd = SshfsMount(cfg, "/srv", "/mnt/x").command()
    opts = _split_fuse_opts(cmd[cmd.index("-o") + 1])
    assert "User=ad,min\\x" in opts
    assert "ro" in opts and "Port=2222" in opts


def test_allow_other_keeps_default_permissions():
    assert "default_permissions" not in fuse_options(allow_other=False)
    opts = fuse_options(allow_other=True)
    assert opts.get("allow_other") and opts.get("default_permissions")

"""OpenSSH client configuration as users write it, against the test sshd on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import helpers
from conftest import ALIAS, REMOTE_DISCREP, Sshd, client_env, discrep_cmd

pytestmark = pytest.mark.ssh


def test_proxy_command_with_shell_syntax(sshd: Sshd, work_dir: Path) -> None:
    """OpenSSH runs ProxyCommand through the user's shell: variables and redirections work (split into
    words instead, ssh would get a literal '$DISCREP_PROXY_CFG' and the connection would fail)."""
    direct = sshd.client_config
    cfg = work_dir / "proxy_config"
    cfg.write_text(direct.read_text().replace(f"Host {ALIAS}\n", "Host direct\n")
                   + f"\nHost {ALIAS}\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
                   f"  IdentityFile {sshd.user_key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {sshd.known_hosts}\n"
                   f"  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
                   f"  ProxyCommand ssh -F \"$DISCREP_PROXY_CFG\" -W %h:%p direct 2>/dev/null\n")
    env = dict(client_env(sshd), DISCREP_PROXY_CFG=str(cfg))
    # the same file works for OpenSSH itself
    ok = subprocess.run(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", ALIAS, "true"], env=env, timeout=60)
    assert ok.returncode == 0
    src, dst = work_dir / "src", work_dir / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"through a proxy\n")
    r = subprocess.run(discrep_cmd("replicate", "--json", "--transport", "sftp", "-F", str(cfg),
                                   "--remote-discrep", REMOTE_DISCREP, f"{ALIAS}:{src}", str(dst)),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["cycle"] == 1
    assert helpers.tree_equal(src, dst) == []

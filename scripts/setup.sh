#!/usr/bin/env bash
# Idempotent setup of a (fresh) Debian machine for discrep development and tests.
#  - installs the system packages tests need (only the missing ones; apt-get update only then)
#  - creates <repo>/.venv with the system python3 and installs '.[test]' into it
#    (re-installs only when pyproject.toml changed: stamp file in .venv)
#  - loads the fuse module and makes sure /dev/fuse and /run/sshd exist (best effort)
# Run as root on a fresh machine.  As non-root it only checks: missing packages -> exit 1.
# Env: PYTHON (default python3) picks the interpreter for a new venv.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.discrep-install-stamp"
PYTHON="${PYTHON:-python3}"
export DEBIAN_FRONTEND=noninteractive

say() { echo "setup: $*"; }

# alternatives separated by '|': the first one apt knows is installed
# prometheus: for 'promtool' (tests/unit/test_monitoring.py checks and unit-tests the alert rules).  The
# package also ships a prometheus server unit; no test needs it running (on a machine without systemd,
# as in containers, nothing starts it).
PACKAGES=(
  fuse3 "libfuse3-3|libfuse3-4" sshfs openssh-server openssh-client rsync btrfs-progs
  xfsprogs attr acl iproute2 util-linux kmod e2fsprogs python3-venv
  prometheus
)

is_root() { [ "$(id -u)" -eq 0 ]; }

installed() {  # $1: package name
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for spec in "${PACKAGES[@]}"; do
    ok=0
    IFS='|' read -r -a alts <<<"$spec"
    for p in "${alts[@]}"; do
      if installed "$p"; then ok=1; break; fi
    done
    [ "$ok" -eq 1 ] || missing+=("$spec")
  done
else
  say "WARNING: no dpkg-query (not Debian?); not checking system packages"
fi

if [ "${#missing[@]}" -gt 0 ]; then
  if ! is_root; then
    say "missing packages: ${missing[*]}"
    say "run as root: $0   (or: apt-get install ${missing[*]//|/ or })"
    exit 1
  fi
  say "apt-get update"
  apt-get update -qq
  to_install=()
  for spec in "${missing[@]}"; do
    IFS='|' read -r -a alts <<<"$spec"
    pick=""
    for p in "${alts[@]}"; do
      if apt-cache show "$p" >/dev/null 2>&1; then pick="$p"; break; fi
    done
    if [ -z "$pick" ]; then say "ERROR: no installable package for: $spec"; exit 1; fi
    to_install+=("$pick")
  done
  say "installing: ${to_install[*]}"
  apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null
fi

# kernel side: fuse module, /dev/fuse, sshd privilege separation dir (best effort)
if is_root; then
  modprobe fuse 2>/dev/null || true
  if [ ! -e /dev/fuse ]; then
    say "creating /dev/fuse"
    mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || say "WARNING: could not create /dev/fuse"
  fi
  mkdir -p /run/sshd 2>/dev/null || true
  chmod 0755 /run/sshd 2>/dev/null || true
fi
[ -e /dev/fuse ] || say "WARNING: /dev/fuse missing; FUSE tests will not run"

# python venv
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  # never delete an existing venv automatically (it may belong to another user/interpreter)
  say "ERROR: $VENV exists but its python does not run for $(id -un); remove it and rerun"
  exit 1
fi
if [ ! -e "$VENV" ]; then
  say "creating $VENV with $PYTHON"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if is_root && command -v apt-get >/dev/null 2>&1; then
      ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
      say "python venv failed; installing python3-venv python$ver-venv"
      apt-get install -y -qq python3-venv "python$ver-venv" >/dev/null 2>&1 \
        || apt-get install -y -qq python3-venv >/dev/null
      "$PYTHON" -m venv "$VENV"
    else
      say "ERROR: $PYTHON -m venv failed (install python3-venv as root)"
      exit 1
    fi
  fi
fi

want="$(cat "$REPO/pyproject.toml" "$REPO/setup.cfg" 2>/dev/null | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  say "pip install -e '.[test]'"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[test]"
  echo "$want" >"$STAMP"
fi
say "ok"

#!/usr/bin/env bash
# Set the machine up (scripts/setup.sh), then run pytest from the repo's venv.
#   scripts/test.sh                 -> whole tests/ tree, -q
#   scripts/test.sh tests/fs -k foo  -> arguments go to pytest unchanged
# Exit code: pytest's; "no tests collected" (5) is reported as an error.
# CI=true makes skipped fuse/ssh/root tests fail (see tests/conftest.py).
# DISCREP_TEST_TIMEOUT (seconds, default 1500) kills a hung run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

"$REPO/scripts/setup.sh"

if [ -n "${CI:-}" ]; then export CI; fi
if [ "$#" -eq 0 ]; then set -- tests -q; fi

rc=0
timeout --kill-after=30 "${DISCREP_TEST_TIMEOUT:-1500}" \
  "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider "$@" || rc=$?

case "$rc" in
  5) echo "test.sh: ERROR: pytest collected no tests ($*)" >&2 ;;
  124|137) echo "test.sh: ERROR: test run timed out after ${DISCREP_TEST_TIMEOUT:-1500}s" >&2 ;;
esac
exit "$rc"

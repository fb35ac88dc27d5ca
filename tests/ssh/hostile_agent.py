"""A hostile source for attack tests: runs the real ``discrep agent`` and rewrites what it says.

Used as ``--remote-discrep`` through a small generated shell script (``make_hostile``) that sets
``HOSTILE_RULES`` (JSON) and execs this file with the agent's arguments.  Each rule is
``{"event": NAME, "set": {field: value}}`` (replace fields of that event, first occurrence or
``"every": true``), ``{"event": NAME, "drop": true}``, ``{"event": NAME, "raw": "text"}`` (send
this line instead), or ``{"stderr": "text"}`` (write to stderr first).  stdin goes to the agent
unchanged, so the replica talks to a real source whose words are lies.

Test-only code, run as its own process on the (test) source host.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading


def main() -> int:
    rules = json.loads(os.environ.get("HOSTILE_RULES", "[]"))
    real = os.environ["HOSTILE_REAL_DISCREP"]
    for r in rules:
        if "stderr" in r:
            sys.stderr.write(r["stderr"])
            sys.stderr.flush()
    p = subprocess.Popen([real] + sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def feed() -> None:
        try:
            for line in sys.stdin.buffer:
                p.stdin.write(line)
                p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        finally:
            try:
                p.stdin.close()
            except OSError:
                pass
    threading.Thread(target=feed, daemon=True).start()
    used = set()
    out = sys.stdout.buffer
    for line in p.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            out.write(line)
            out.flush()
            continue
        for i, r in enumerate(rules):
            if r.get("event") != msg.get("event") or (i in used and not r.get("every")):
                continue
            used.add(i)
            if r.get("drop"):
                line = b""
            elif "raw" in r:
                line = r["raw"].encode() + b"\n"
            else:
                msg.update(r.get("set", {}))
                line = json.dumps(msg).encode() + b"\n"
        out.write(line)
        out.flush()
    return p.wait()


if __name__ == "__main__":
    sys.exit(main())

"""Shared pytest infrastructure for discrep: CI skip rule, stale-state sweep, fixtures.

Role:
- puts tests/ on sys.path so tests can ``import helpers`` (works in any import mode);
- marks tests by directory: tests/<unit|fs|fuse|ssh|root>/... get that marker
  (markers are declared in pyproject.toml; nothing new is registered);
- CI rule: with env CI=true, a test marked fuse, ssh or root that ends SKIPPED is
  reported as FAILED ("skipped in CI: <reason>") -- in CI the environment must
  provide everything (scripts/setup.sh installs it).  A skip raised during setup
  (e.g. by a fixture) shows up as an error at setup, which also fails the run;
- session start: ``helpers.sweep_stale()`` unmounts, detaches and kills what dead
  test sessions left in ``discrep-test-`` directories (never anything else, never
  what a live concurrent session owns);
- fixtures ``work_dir`` (a fresh /tmp/discrep-test-*/ directory, removed after the
  test) and ``loopfs`` (factory for loop-mounted btrfs/xfs/ext4 filesystems).

Threading: pytest runs hooks and fixtures on its main thread; nothing here is shared.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402  (needs the sys.path line above)

log = logging.getLogger(__name__)

CI_STRICT_MARKERS = ("fuse", "ssh", "root")
DIR_MARKERS = ("unit", "fs", "fuse", "ssh", "root")
_TESTS_DIR = Path(__file__).resolve().parent


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


# --------------------------------------------------------------------------- hooks

def pytest_sessionstart(session: pytest.Session) -> None:
    try:
        done = helpers.sweep_stale()
    except Exception as exc:  # the sweep must never stop the test run
        done = [f"sweep failed: {exc!r}"]
    if done:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in done:
            if reporter is not None:
                reporter.write_line(f"discrep-test sweep: {line}")
            log.warning("discrep-test sweep: %s", line)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        try:
            rel = Path(str(item.fspath)).resolve().relative_to(_TESTS_DIR)
        except ValueError:
            continue
        if len(rel.parts) > 1 and rel.parts[0] in DIR_MARKERS \
                and item.get_closest_marker(rel.parts[0]) is None:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not (_in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    strict = [m for m in CI_STRICT_MARKERS if item.get_closest_marker(m) is not None]
    if strict:
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI: {_skip_reason(report.longrepr)} "
                           f"(tests marked {'/'.join(strict)} must run when CI=true)")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A fresh ``/tmp/discrep-test-<random>/`` (or under $DISCREP_TEST_TMPDIR), removed afterwards.

    On the root ext4 of the test machine, not tmpfs: big files are fine.  Anything
    still mounted below it at teardown is unmounted first; removal never descends
    into a mount.
    """
    path = helpers.new_test_dir()
    try:
        yield path
    finally:
        helpers.remove_tree(path)


_MKFS_ARGS: Dict[str, List[str]] = {
    "xfs": ["-q", "-f", "-m", "reflink=1"],
    "btrfs": ["-q", "-f"],
    "ext4": ["-q", "-F"],
}


def _kernel_has_fs(fstype: str) -> bool:
    def listed() -> bool:
        try:
            with open("/proc/filesystems") as fh:
                return any(line.split()[-1] == fstype for line in fh if line.strip())
        except OSError:
            return True  # cannot tell: let mount decide
    if listed():
        return True
    subprocess.run(["modprobe", fstype], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return listed()


@pytest.fixture
def loopfs(work_dir: Path):
    """Factory ``loopfs(fstype, size_mb=300, *, mkfs_args=(), mount_opts=None) -> Path``.

    Creates a sparse image ``discrep-test-<fstype>-<n>.img`` in ``work_dir``, attaches
    it with ``losetup --find --show``, runs mkfs (xfs with ``-m reflink=1``), mounts it
    and returns the mountpoint.  Teardown unmounts (lazily if busy), detaches and
    deletes the image.  Skips (a failure in CI) when not root or tools are missing.
    """
    created: List[Dict[str, Optional[object]]] = []

    def make(fstype: str, size_mb: int = 300, *, mkfs_args: Sequence[str] = (),
             mount_opts: Optional[str] = None) -> Path:
        helpers.require_root()
        losetup = helpers.require_tool("losetup")
        mkfs = helpers.require_tool(f"mkfs.{fstype}")
        helpers.require_tool("mount")
        if not _kernel_has_fs(fstype):
            pytest.skip(f"kernel cannot mount {fstype} (not in /proc/filesystems after modprobe)")
        n = len(created)
        img = work_dir / f"{helpers.TEST_PREFIX}{fstype}-{n}.img"
        mnt = work_dir / f"mnt-{fstype}-{n}"
        entry: Dict[str, Optional[object]] = {"img": img, "dev": None, "mnt": None}
        created.append(entry)
        with open(img, "wb") as fh:
            fh.truncate(size_mb << 20)
        proc = subprocess.run([losetup, "--find", "--show", str(img)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=60)
        if proc.returncode != 0:
            pytest.skip(f"losetup failed: {proc.stderr.strip()}")
        dev = proc.stdout.strip()
        entry["dev"] = dev
        helpers.run([mkfs, *_MKFS_ARGS.get(fstype, []), *mkfs_args, dev])
        mnt.mkdir()
        helpers.run(["mount", *(["-o", mount_opts] if mount_opts else []), dev, str(mnt)])
        entry["mnt"] = mnt
        return mnt

    yield make

    errors = []
    for entry in reversed(created):
        mnt, dev, img = entry["mnt"], entry["dev"], entry["img"]
        if mnt is not None:
            for attempt in range(3):
                if subprocess.run(["umount", str(mnt)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0:
                    break
                time.sleep(0.3)
            else:
                if not helpers.unmount(str(mnt)):
                    errors.append(f"could not unmount {mnt}")
        if dev is not None:
            helpers.detach_loop(str(dev))
        try:
            os.unlink(str(img))
        except FileNotFoundError:
            pass
    if errors:
        pytest.fail("; ".join(errors))

"""The state directory is opened by fd and checked: a swapped, foreign or symlinked one is refused."""
from __future__ import annotations

import os
import stat

import pytest

from discrep.core.errors import DestinationError, SourceError
from discrep.core.statedir import StateDir

pytestmark = pytest.mark.fs


def test_created_private_and_reached_through_the_fd(tmp_path):
    root = os.fsencode(tmp_path)
    with StateDir(root) as sd:
        st = os.lstat(tmp_path / ".discrep")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        with open(sd.file("x.db"), "w") as f:
            f.write("1")
        # the name is swapped after the check: the fd path still reaches the checked directory
        os.rename(tmp_path / ".discrep", tmp_path / "moved")
        os.mkdir(tmp_path / ".discrep", 0o700)
        with open(sd.file("x.db")) as f:
            assert f.read() == "1"
        assert not (tmp_path / ".discrep" / "x.db").exists()
    assert sd.fd == -1


def test_loose_modes_of_our_own_directory_are_tightened(tmp_path):
    os.mkdir(tmp_path / ".discrep", 0o755)
    os.chmod(tmp_path / ".discrep", 0o755)
    StateDir(os.fsencode(tmp_path)).close()
    assert stat.S_IMODE(os.lstat(tmp_path / ".discrep").st_mode) == 0o700


def test_symlink_in_place_of_the_state_directory_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / ".discrep")
    with pytest.raises(SourceError, match="not a plain directory"):
        StateDir(os.fsencode(tmp_path), error=SourceError)
    (tmp_path / ".discrep").unlink()
    (tmp_path / ".discrep").write_bytes(b"")
    with pytest.raises(DestinationError):
        StateDir(os.fsencode(tmp_path))


def test_missing_without_create(tmp_path):
    with pytest.raises(DestinationError, match="no state directory"):
        StateDir(os.fsencode(tmp_path), create=False)
    assert not (tmp_path / ".discrep").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory owned by another user needs root")
def test_foreign_owner_is_refused(tmp_path):
    os.mkdir(tmp_path / ".discrep", 0o700)
    os.chown(tmp_path / ".discrep", 4242, 4242)
    with pytest.raises(DestinationError, match="belongs to uid 4242"):
        StateDir(os.fsencode(tmp_path))


def test_bad_file_names(tmp_path):
    with StateDir(os.fsencode(tmp_path)) as sd:
        for bad in ("", ".", "..", "a/b"):
            with pytest.raises(ValueError):
                sd.file(bad)

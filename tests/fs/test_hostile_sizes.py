"""A source that lies about sizes cannot make the replica allocate by what it declares (issue 13
item 7): a whole fetch takes memory for the data that arrives (plus, for a sparse file's holes,
size / 512 bytes of digests, bounded by ``ReplicaOptions.max_file_size``); the second applying
process reads a segment or pack only up to its cap.  Hand-made exports read with the real
MountReader; peak memory measured with ``tracemalloc`` (tier: fs).
"""
from __future__ import annotations

import os
import shutil
import tracemalloc
from pathlib import Path

import pytest

from discrep.core.errors import ManifestError
from discrep.protocol import layout
from discrep.protocol.manifest import FRAME_SLACK, MAX_FILE_SIZE, MAX_PACK_BYTES, MAX_SEGMENT_BYTES
from discrep.replica.options import ReplicaOptions
from discrep.replica.sync import sync
from discrep.replica.worker import SegmentApplier
from discrep.transport.mount_reader import MountReader

from test_hostile_manifest import make_export, meta

hypothesis = pytest.importorskip("hypothesis")
given, settings, st, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.strategies, hypothesis.HealthCheck

pytestmark = [pytest.mark.fs, pytest.mark.hostile]

# what one cycle may allocate whatever the declared sizes: the reader's reads in flight (its pool's
# threads x 4 MiB pieces), JSON, SQLite -- not the declared size, whose digests alone are size / 512
SLACK = 48 << 20


def test_default_cap_is_the_protocols():
    assert ReplicaOptions().max_file_size == MAX_FILE_SIZE


def _apply(root: Path, size: int, data: bytes, extents, opts: ReplicaOptions):
    """Sync an export declaring file ``f`` of ``size`` bytes whose data file holds ``data``:
    (exception or None, peak bytes allocated by the sync, DEST)."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    ent = meta(op="file", path="f", size=size, idx=0)
    if extents is not None:
        ent["extents"] = extents
    exp = make_export(root, [ent])
    (exp / ".discrep" / "data").mkdir()
    (exp / ".discrep" / "data" / "0").write_bytes(data)
    dst = root / "dst"
    dst.mkdir()
    r = MountReader(str(exp))
    tracemalloc.start()
    err = None
    try:
        sync(r, os.fsencode(dst), opts)
    except ManifestError as e:
        err = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        r.close()
    return err, peak, dst


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(declared=st.integers(1, MAX_FILE_SIZE), sent=st.integers(0, 300_000))
def test_lying_size_of_a_whole_file(work_dir: Path, declared: int, sent: int):
    """Any declared size (up to the protocol's 64 TiB) with less data sent: refused at the first
    short read, having allocated about what arrived, never by the declared size."""
    sent = min(sent, declared - 1)
    err, peak, dst = _apply(work_dir / "x", declared, os.urandom(sent), None, ReplicaOptions())
    assert isinstance(err, ManifestError), "a file shorter than declared was accepted"
    assert peak < SLACK, f"declared {declared} bytes, sent {sent}: the replica allocated {peak} bytes"
    assert not (dst / "f").exists(), "the cycle was not rolled back"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(declared=st.integers(1, 1 << 40), cap=st.integers(1, 1 << 28), extent=st.integers(0, 64 << 10))
def test_sparse_size_is_capped(work_dir: Path, declared: int, cap: int, extent: int):
    """A sparse file's holes cost size / 512 bytes of digests: a declared size above the cap is
    refused before anything is written; within it, the allocation stays below cap / 512."""
    extent = min(extent, declared)
    err, peak, dst = _apply(work_dir / "x", declared, os.urandom(extent), [[0, extent]] if extent else [],
                            ReplicaOptions(max_file_size=cap))
    if declared > cap:
        assert isinstance(err, ManifestError) and "more than the replica accepts" in str(err)
        assert os.listdir(dst) == [".discrep"], "a refused cycle touched DEST"
    else:
        assert err is None
        assert os.stat(dst / "f").st_size == declared
        assert (dst / "f").open("rb").read(extent) == (work_dir / "x/export/.discrep/data/0").read_bytes()
    assert peak < SLACK + 2 * min(declared, cap) // 512, f"declared {declared}, cap {cap}: allocated {peak}"


def test_exact_size_still_fetched(work_dir: Path):
    """Not only refusals: a file of several fetch windows, sent in full, arrives byte-identical."""
    from discrep.replica import files
    data = os.urandom(3 * (1 << 20) + 123)
    old = files.FETCH_WINDOW
    files.FETCH_WINDOW = 1 << 20          # several windows, the last one partial
    try:
        err, _peak, dst = _apply(work_dir / "x", len(data), data, None, ReplicaOptions())
    finally:
        files.FETCH_WINDOW = old
    assert err is None
    assert (dst / "f").read_bytes() == data


@pytest.mark.parametrize("what", ["pack", "segment"])
def test_worker_reads_are_bounded(work_dir: Path, what: str):
    """The second applying process reads a pack or segment file only up to its cap: a 1 GiB
    (sparse) file in the streamed cycle's directory is refused having read the cap, not the file."""
    cdir = work_dir / "cycle"
    cdir.mkdir()
    dst = work_dir / "dst"
    dst.mkdir()
    name = (layout.PACK_FILE % 0 if what == "pack" else layout.SEGMENT_FILE % 1).decode()
    with open(cdir / name, "wb") as f:
        f.truncate(1 << 30)
    ap = SegmentApplier(os.fsencode(dst), os.fsencode(cdir), numeric_ids=True)
    cap = (MAX_PACK_BYTES if what == "pack" else MAX_SEGMENT_BYTES) + FRAME_SLACK
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match="larger than"):
            if what == "pack":
                ap.want_packs(0, 1)
                ap.packs[0].result()
            else:
                ap.segment(1, 0, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ap.pool.shutdown()
        os.close(ap.root_fd)
    assert ap.bytes_read <= cap + 1
    assert peak < 2 * cap + SLACK, f"reading a 1 GiB {what} allocated {peak} bytes"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.booleans(), min_size=1, max_size=12), tail=st.integers(0, 4095))
def test_digests_taken_as_data_arrives_equal_a_reread(work_dir: Path, blocks, tail: int):
    """The signature built from the data as it arrived (holes and a short tail block included)
    equals the one read back from the written file: the streamed digests lose nothing."""
    import blockdiff
    from discrep.replica.fetch import LazySig
    bs = blockdiff.FINE_SIZE
    size = len(blocks) * bs + tail
    sig = LazySig(size)
    path = work_dir / "f"
    with open(path, "w+b") as f:
        f.truncate(size)
        for i, data_block in enumerate(blocks + [bool(tail)]):
            n = min(bs, size - i * bs)
            if data_block and n > 0:
                data = os.urandom(n)
                sig.reserve(i * bs + n)
                sig.on_data(i * bs, data)
                os.pwrite(f.fileno(), data, i * bs)
        f.flush()
        assert sig.get().to_bytes() == blockdiff.sign_fd(f.fileno(), size).to_bytes()

"""The snapshot map's format and granule arithmetic, against models (Hypothesis).

What a snapshot protects and has copied is decided by this arithmetic: a
granule left out of a copy is a snapshot read returning new data, so each
function is checked against the plain set of granules it must mean.
"""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtydiff import errors
from dirtydiff.bitmapfile import set_bit_range
from dirtydiff.disk import FileBackend
from dirtydiff.snapshotfile import (
    HEADER_SIZE,
    Scope,
    SnapFlag,
    SnapHeader,
    SnapshotFile,
    array_length,
    bytes_in,
    clear_bit_range,
    count_bits,
    granule_bytes,
    granules_inside,
    granules_touched,
    map_size,
    pending_runs,
)
from dirtydiff.snapshotinfo import SnapshotInfo
from dirtydiff.snapshots import SnapshotRequest, SnapshotSet, SnapshotView
from dirtydiff.state import StateDir
from dirtydiff.store import BitmapStore

granularities = st.sampled_from([4096, 8192, 65536])


@st.composite
def geometry(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """A granularity, a disk size (often not a multiple of it), and a range
    that may run past the disk's end."""
    granularity = draw(granularities)
    size = draw(st.integers(1, 40 * granularity))
    offset = draw(st.integers(0, size + granularity))
    length = draw(st.integers(0, 3 * size))
    return granularity, size, offset, length


@given(geometry())
def test_granules_touched_are_exactly_those_holding_a_byte_of_the_range(
    case: tuple[int, int, int, int],
) -> None:
    granularity, size, offset, length = case
    touched = granules_touched(offset, length, granularity, size)
    end = min(offset + length, size)
    expected = (
        set(range(offset // granularity, (end - 1) // granularity + 1)) if offset < end else set()
    )
    assert set(touched) == expected
    for g in touched:  # each holds a byte of the range, and of the disk
        start, n = granule_bytes(g, g + 1, granularity, size)
        assert n > 0 and start < end and start + n > offset


@given(geometry())
def test_granules_inside_are_wholly_covered_and_none_is_missed(
    case: tuple[int, int, int, int],
) -> None:
    granularity, size, offset, length = case
    inside = set(granules_inside(offset, length, granularity, size))
    end = min(offset + length, size)
    for g in granules_touched(offset, length, granularity, size):
        start, n = granule_bytes(g, g + 1, granularity, size)
        whole = offset <= start and start + n <= end
        assert (g in inside) == whole, (g, start, n)
    assert inside <= set(granules_touched(offset, length, granularity, size))


@given(granularities, st.integers(1, 10**7), st.integers(0, 200), st.integers(0, 200))
def test_granule_bytes_clip_at_the_disk_end(granularity: int, size: int, a: int, b: int) -> None:
    first, stop = min(a, b), max(a, b)
    offset, length = granule_bytes(first, stop, granularity, size)
    assert offset == first * granularity
    assert length == max(0, min(stop * granularity, size) - offset)


bit_sets = st.sets(st.integers(0, 255), max_size=120)


def bits_of(found: set[int]) -> bytearray:
    bits = bytearray(32)
    for i in found:
        bits[i >> 3] |= 1 << (i & 7)
    return bits


@given(bit_sets, st.integers(0, 256), st.integers(0, 256))
def test_clear_and_set_ranges_and_counts_match_a_set(found: set[int], a: int, b: int) -> None:
    start, stop = min(a, b), max(a, b)
    bits = bits_of(found)
    assert count_bits(bits, start, stop) == len({i for i in found if start <= i < stop})
    cleared = bytearray(bits)
    clear_bit_range(cleared, start, stop)
    assert cleared == bits_of({i for i in found if not start <= i < stop})
    set_bit_range(bits, start, stop)
    assert bits == bits_of(found | set(range(start, stop)))


@given(bit_sets, bit_sets, st.integers(0, 256), st.integers(0, 256))
def test_pending_runs_are_the_protected_granules_not_copied(
    protected: set[int], copied: set[int], a: int, b: int
) -> None:
    start, stop = min(a, b), max(a, b)
    runs = pending_runs(bits_of(protected), bits_of(copied), start, stop)
    covered = [g for first, end in runs for g in range(first, end)]
    assert covered == sorted(g for g in protected - copied if start <= g < stop)
    # Maximal runs: two never touch.
    assert all(x[1] < y[0] for x, y in itertools.pairwise(runs))


@given(
    granularities, st.integers(1, 256 * 4096), bit_sets, st.integers(0, 256), st.integers(0, 256)
)
def test_bytes_in_is_the_clipped_size_of_the_set_granules(
    granularity: int, size: int, found: set[int], a: int, b: int
) -> None:
    granules = -(-size // granularity)
    found = {g for g in found if g < granules}  # bits past the disk are never set
    start, stop = min(a, b), max(a, b)
    expected = sum(
        granule_bytes(g, g + 1, granularity, size)[1] for g in found if start <= g < stop
    )
    assert bytes_in(bits_of(found), start, stop, granularity, size) == expected


def header(**changes: object) -> SnapHeader:
    fields: dict[str, object] = {
        "flags": SnapFlag(0), "granularity": 65536, "scope": Scope.DIRTY,
        "disk_size": 10**9 + 7, "created_ns": 123, "limit": 64 << 20,
        "boot_id": bytes(range(16)), "state_id": bytes(16), "store_dev": 5,
        "store_ino": 77, "store": "/var/lib/x/snapshots/c0.store", "reason": "",
    }  # fmt: skip
    fields.update(changes)
    return SnapHeader(**fields)  # type: ignore[arg-type]


@given(st.text(max_size=1500), st.sampled_from(list(Scope)), st.booleans())
def test_a_header_round_trips(reason: str, scope: Scope, broken: bool) -> None:
    flags = SnapFlag.BROKEN if broken else SnapFlag(0)
    made = header(reason=reason, scope=scope, flags=flags)
    found = SnapHeader.unpack(made.pack_all(), "test")
    assert found.reason == reason.encode()[:1000].decode(errors="ignore")
    found.reason = made.reason
    assert found == made


@given(st.integers(0, 99), st.integers(1, 255))
def test_a_damaged_header_is_corrupt_never_believed(at: int, flip: int) -> None:
    raw = bytearray(header().pack_all())
    raw[at] ^= flip
    with pytest.raises(errors.Corrupt):
        SnapHeader.unpack(bytes(raw), "test")


def test_a_map_file_has_its_size_and_refuses_another(tmp_path: Path) -> None:
    made = header(disk_size=5 * 65536 + 1, scope=Scope.ALL)
    path = tmp_path / ".c0.snap.new"
    file = SnapshotFile.create(path, made, protect_all=True)
    try:
        assert os.path.getsize(path) == map_size(made.disk_size, 65536)
        assert array_length(made.disk_size, 65536) == 4096
        assert count_bits(file.protected, 0, 8 * 4096) == 6  # every granule, none past the end
        assert count_bits(file.copied, 0, 8 * 4096) == 0
        # Allocated whole: a bit set later never needs a block.
        assert os.stat(path).st_blocks * 512 >= map_size(made.disk_size, 65536)
        file.header.flags |= SnapFlag.BROKEN
        file.header.reason = "store write failed: No space left on device"
        file.write_reason()
    finally:
        file.close()
    again = SnapshotFile(path, writable=False)
    assert again.header.reason == "store write failed: No space left on device"
    assert again.header.flags & SnapFlag.BROKEN
    again.close()
    with path.open("r+b") as f:
        f.truncate(HEADER_SIZE + 4096)
    with pytest.raises(errors.Corrupt):
        SnapshotFile(path, writable=False)


def test_a_snapshot_info_comes_back_from_a_reply_only_with_its_shape() -> None:
    info = SnapshotInfo("c0", "broken", "store limit of 64 MiB reached", "all", 1, 65536,
                        1 << 30, 0, 0, 0, 64 << 20, "/s/c0.store", "@snapshot:c0")  # fmt: skip
    assert SnapshotInfo.from_dict(info.as_dict()) == info
    assert SnapshotInfo.from_dict({**info.as_dict(), "later": 1}) == info  # a newer tracker's
    for broken in (
        {k: v for k, v in info.as_dict().items() if k != "store"},
        {**info.as_dict(), "extra": 1, "limit": "64M"},
        {**info.as_dict(), "copied_bytes": True},
        ["c0"],
    ):
        with pytest.raises(errors.ProtocolError):
            SnapshotInfo.from_dict(broken)


# -- the copy and the view, in process, against a model ---------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "read", "trim"]),
        st.integers(0, 5 * (1 << 20)),  # offset, past the disk's end sometimes
        st.integers(1, 3 * (1 << 20)),  # length
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([4096, 65536, 2 << 20]), st.sampled_from(["all", "dirty"]), ops,
       st.integers(0, 2**32))  # fmt: skip
def test_the_view_reads_the_instant_or_fails_whatever_the_writes_and_trims(
    tmp_path_factory: pytest.TempPathFactory,
    granularity: int,
    scope: str,
    steps: list[tuple[str, int, int]],
    seed: int,
) -> None:
    rng = random.Random(seed)  # the data: drawn from a seed, not from Hypothesis
    tmp = tmp_path_factory.mktemp("view")
    size = 4 * (1 << 20) + 12345
    disk = tmp / "disk.raw"
    disk.write_bytes(rng.randbytes(size))
    instant = disk.read_bytes()
    state = tmp / "state"
    state.mkdir(mode=0o700)
    backend = FileBackend(str(disk))
    store = BitmapStore(StateDir(state), size, recording=True, granularity=granularity)
    snapshots = SnapshotSet(StateDir(state), size, "")
    try:
        frozen = store.bitmaps["@open"]
        dirty = {g for g in range(-(-size // granularity)) if rng.random() < 0.5}
        for g in dirty:
            frozen.mark(g * granularity, 1)
        snap = snapshots.start(
            snapshots.prepare("c", SnapshotRequest(Scope.of(scope)), granularity), frozen
        )
        protected = set(range(-(-size // granularity))) if scope == "all" else set(dirty)
        conn = backend.connect()
        view = SnapshotView(snapshots, snap, conn)
        for kind, offset, asked in steps:
            length = min(asked, size - offset) if offset < size else 0
            if length <= 0:
                continue
            if kind in ("write", "zero"):
                snapshots.before_change(conn, offset, length)
                if kind == "write":
                    conn.pwrite(rng.randbytes(length), offset, False)
                else:
                    conn.zero(length, offset, False, False, False)
            elif kind == "trim":
                view.trim(length, offset)
                protected -= set(granules_inside(offset, length, granularity, size))
            else:
                touched = set(granules_touched(offset, length, granularity, size))
                buf = bytearray(length)
                if touched <= protected:
                    view.pread(buf, offset)
                    assert buf == instant[offset : offset + length]
                else:
                    with pytest.raises(OSError):
                        view.pread(buf, offset)
        info = snap.info()
        assert info.protected_bytes == sum(
            granule_bytes(g, g + 1, granularity, size)[1] for g in protected
        )
        assert info.copied_bytes <= info.protected_bytes
    finally:
        snapshots.close()
        store.close()
        backend.close()

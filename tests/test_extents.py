"""Property tests for bit runs, byte extents, marking and merging.

Every property is checked against a naive bit-by-bit reference, so a fast path
(regex scans over whole bytes, slice assignment, big-int OR) that drops a bit
fails here rather than in a backup.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtydiff import errors
from dirtydiff.bitmapfile import BitmapFile, Flag, bits_length, granule_count, set_bit_range
from dirtydiff.extents import (
    Extent,
    bitmap_extents,
    extent_arrays,
    extents,
    granules_of,
    nbdinfo_json,
    nbdinfo_text,
    runs,
)

PROPERTY = settings(max_examples=150, deadline=None)
# Examples that create bitmap files (each one an fsync or two).
FILE_PROPERTY = settings(max_examples=40, deadline=None)


# -- reference helpers ----------------------------------------------------------


def pack(states: Sequence[bool], nbytes: int) -> bytearray:
    """Bits LSB first in each byte, as the bitmap format stores them."""
    bits = bytearray(nbytes)
    for i, dirty in enumerate(states):
        if dirty:
            bits[i >> 3] |= 1 << (i & 7)
    return bits


def unpack(bits: bytes | bytearray, count: int) -> list[bool]:
    return [bool((bits[i >> 3] >> (i & 7)) & 1) for i in range(count)]


def naive_runs(states: Sequence[bool], start: int, stop: int) -> list[tuple[int, int, bool]]:
    found: list[tuple[int, int, bool]] = []
    for i in range(start, stop):
        if found and found[-1][2] == states[i]:
            first, count, dirty = found[-1]
            found[-1] = (first, count + 1, dirty)
        else:
            found.append((i, 1, states[i]))
    return found


# -- strategies -------------------------------------------------------------------


@st.composite
def granule_states(draw: st.DrawFn, max_granules: int = 300) -> list[bool]:
    """Granule states with long runs too, so whole-byte fast paths are exercised."""
    if draw(st.booleans()):
        return draw(st.lists(st.booleans(), max_size=max_granules))
    states: list[bool] = []
    for dirty, count in draw(st.lists(st.tuples(st.booleans(), st.integers(1, 70)), max_size=12)):
        states += [dirty] * count
    return states[:max_granules]


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[bytearray, int, int, list[bool]]:
    """(bits, granularity, disk_size, granule states) with a partial last granule.

    Bits past the disk's end are sometimes garbage: the format says they are 0,
    and extent logic must not read them either way.
    """
    granularity = 1 << draw(st.integers(0, 16))
    states = draw(granule_states())
    n = len(states)
    disk_size = 0 if n == 0 else draw(st.integers((n - 1) * granularity + 1, n * granularity))
    assert granule_count(disk_size, granularity) == n
    nbytes = bits_length(disk_size, granularity)
    tail = draw(st.booleans())
    full = states + [tail and draw(st.booleans()) for _ in range(n, nbytes * 8)]
    return pack(full, nbytes), granularity, disk_size, states


@contextmanager
def bitmap_dir() -> Iterator[Path]:
    # Hypothesis runs many examples per test: a fresh directory each, not tmp_path.
    with tempfile.TemporaryDirectory(prefix="dirtydiff-test-") as name:
        yield Path(name)


def new_bitmap(
    directory: Path, name: str, disk_size: int, granularity: int, states: Sequence[bool] = ()
) -> BitmapFile:
    bitmap = BitmapFile.create(
        directory / f"{name}.bitmap", granularity=granularity, disk_size=disk_size, flags=Flag(0)
    )
    bitmap.bits[:] = bytes(pack(states, len(bitmap.bits)))
    return bitmap


# -- runs and set_bit_range ------------------------------------------------------------


@PROPERTY
@given(st.binary(min_size=1, max_size=40), st.data())
def test_runs_agree_with_naive_reference(raw: bytes, data: st.DataObject) -> None:
    # Bytes of 0x00 / 0xff are likelier to come up in real bitmaps than in
    # random binary; mix some in so the whole-byte scan finds long runs.
    bits = bytes(b if b % 3 else (0xFF if b & 1 else 0) for b in raw)
    nbits = len(bits) * 8
    start = data.draw(st.integers(0, nbits))
    stop = data.draw(st.integers(start, nbits))
    states = unpack(bits, nbits)
    expected = naive_runs(states, start, stop)
    for view in (bits, memoryview(bits), bytearray(bits)):
        # Bounded: a runs() that stops making progress fails, not hangs.
        assert list(itertools.islice(runs(view, start, stop), stop - start + 1)) == expected


@PROPERTY
@given(st.binary(min_size=1, max_size=40), st.data())
def test_set_bit_range_agrees_with_naive_reference(raw: bytes, data: st.DataObject) -> None:
    nbits = len(raw) * 8
    start = data.draw(st.integers(0, nbits), label="start")
    stop = data.draw(st.integers(start, nbits), label="stop")  # empty ranges too
    expected = unpack(raw, nbits)
    for i in range(start, stop):
        expected[i] = True
    bits = bytearray(raw)
    set_bit_range(bits, start, stop)
    assert unpack(bits, nbits) == expected


# -- extents ------------------------------------------------------------------------


@PROPERTY
@given(bitmaps())
def test_bitmap_extents_bitmap_round_trip(bitmap: tuple[bytearray, int, int, list[bool]]) -> None:
    bits, granularity, disk_size, states = bitmap
    rebuilt: list[bool | None] = [None] * len(states)
    for e in extents(bits, granularity, disk_size):
        for g in granules_of(e.offset, e.length, granularity):
            assert rebuilt[g] in (None, e.dirty), f"granule {g} in two extents of other states"
            rebuilt[g] = e.dirty
    assert rebuilt == states


@PROPERTY
@given(bitmaps(), st.data())
def test_extents_cover_exactly_the_requested_range(
    bitmap: tuple[bytearray, int, int, list[bool]], data: st.DataObject
) -> None:
    bits, granularity, disk_size, states = bitmap
    slack = 2 * granularity
    offset = data.draw(st.integers(0, disk_size + slack), label="offset")
    length = data.draw(st.none() | st.integers(0, disk_size + slack), label="length")
    end = disk_size if length is None else min(offset + length, disk_size)

    found = extents(bits, granularity, disk_size, offset, length)

    if offset >= end:
        assert found == []
        return
    assert found[0].offset == offset  # clipped mid-granule, as qemu-nbd does
    assert found[-1].offset + found[-1].length == end
    for e in found:
        assert e.length > 0
        # Every granule an extent touches has the extent's state.
        assert all(states[g] == e.dirty for g in granules_of(e.offset, e.length, granularity))
    for before, after in itertools.pairwise(found):
        assert before.offset + before.length == after.offset, "gap or overlap"
        assert before.dirty != after.dirty, "neighbours share a state"


@PROPERTY
@given(bitmaps(), st.data())
def test_max_extents_returns_a_prefix_of_at_least_one_extent(
    bitmap: tuple[bytearray, int, int, list[bool]], data: st.DataObject
) -> None:
    bits, granularity, disk_size, _ = bitmap
    offset = data.draw(st.integers(0, disk_size))
    limit = data.draw(st.integers(1, 5))
    full = extents(bits, granularity, disk_size, offset)
    short = extents(bits, granularity, disk_size, offset, max_extents=limit)
    assert short == full[:limit]
    assert (len(short) >= 1) == (offset < disk_size)


def test_first_and_last_extent_clipped_mid_granule() -> None:
    g = 65536
    bits = pack([False, True, True, False], 8)
    disk_size = 3 * g + 100  # the last granule is partial
    assert extents(bits, g, disk_size, 1000, 10) == [Extent(1000, 10, False)]
    assert extents(bits, g, disk_size, g - 5, 10) == [
        Extent(g - 5, 5, False),
        Extent(g, 5, True),
    ]
    assert extents(bits, g, disk_size, g + 7, 2 * g) == [
        Extent(g + 7, 2 * g - 7, True),
        Extent(3 * g, 7, False),
    ]
    # Clipped to the disk's end, not to the granule's.
    assert extents(bits, g, disk_size, 0) == [
        Extent(0, g, False),
        Extent(g, 2 * g, True),
        Extent(3 * g, 100, False),
    ]
    assert extents(bits, g, disk_size, disk_size) == []
    assert extents(bits, g, disk_size, 5, 0) == []


# -- marking a file --------------------------------------------------------------------


@FILE_PROPERTY
@given(st.data())
def test_mark_sets_exactly_the_granules_touched(data: st.DataObject) -> None:
    granularity = data.draw(st.sampled_from([4096, 8192, 65536]), label="granularity")
    n = data.draw(st.integers(0, 200), label="granules")
    disk_size = 0 if n == 0 else data.draw(st.integers((n - 1) * granularity + 1, n * granularity))
    requests = st.tuples(
        st.integers(0, disk_size + 3 * granularity), st.integers(0, 40 * granularity)
    )
    marks = data.draw(st.lists(requests, min_size=1, max_size=8), label="marks")
    expected = [False] * n
    with bitmap_dir() as directory, new_bitmap(directory, "b", disk_size, granularity) as bitmap:
        for offset, length in marks:
            bitmap.mark(offset, length)
            for g in granules_of(offset, length, granularity):
                if g < n:
                    expected[g] = True
            # Nothing else: not a neighbour, not a bit past the disk's end.
            padding = len(bitmap.bits) * 8 - n
            assert unpack(bitmap.bits[:], n + padding) == expected + [False] * padding
        assert bitmap.dirty_granules() == sum(expected)


def test_mark_edges() -> None:
    g = 4096
    with bitmap_dir() as directory, new_bitmap(directory, "b", 10 * g + 1, g) as bitmap:
        bitmap.mark(g - 1, 2)  # straddles two granules by one byte each
        bitmap.mark(5 * g, 0)  # empty: marks nothing
        bitmap.mark(10 * g, 1)  # the one byte of the partial last granule
        bitmap.mark(11 * g, g)  # wholly past the end: nothing
        assert unpack(bitmap.bits[:], 64) == [i in (0, 1, 10) for i in range(64)]


# -- merge -------------------------------------------------------------------------------


@st.composite
def same_geometry(draw: st.DrawFn, count: int) -> tuple[int, int, list[list[bool]]]:
    granularity = draw(st.sampled_from([4096, 65536]))
    n = draw(st.integers(1, 200))
    disk_size = draw(st.integers((n - 1) * granularity + 1, n * granularity))
    states = st.lists(st.booleans(), min_size=n, max_size=n) | st.builds(
        lambda runs: ([d for d, c in runs for _ in range(c)] + [False] * n)[:n],
        st.lists(st.tuples(st.booleans(), st.integers(1, 64)), max_size=8),
    )
    return granularity, disk_size, [draw(states) for _ in range(count)]


@FILE_PROPERTY
@given(same_geometry(3))
def test_merge_is_or_commutative_associative_and_keeps_every_bit(
    geometry: tuple[int, int, list[list[bool]]],
) -> None:
    granularity, disk_size, (a, b, c) = geometry
    n = len(a)

    def merged(directory: Path, name: str, *operands: list[bool]) -> list[bool]:
        with new_bitmap(directory, name, disk_size, granularity, operands[0]) as into:
            for i, states in enumerate(operands[1:]):
                with new_bitmap(directory, f"{name}-src{i}", disk_size, granularity, states) as src:
                    into.merge_from(src)
                    assert unpack(src.bits[:], n) == states, "merge changed its source"
            return unpack(into.bits[:], len(into.bits) * 8)

    with bitmap_dir() as directory:
        ab = merged(directory, "ab", a, b)
        assert ab == merged(directory, "ba", b, a)
        assert ab[:n] == [x or y for x, y in zip(a, b, strict=True)]
        assert not any(ab[n:]), "bits past the disk's end"
        ab_c = merged(directory, "ab_c", ab[:n], c)
        a_bc = merged(directory, "a_bc", a, merged(directory, "bc", b, c)[:n])
        assert ab_c == a_bc
        for states in (a, b, c):
            assert all(ab_c[i] for i in range(n) if states[i]), "merge dropped a bit"
        assert merged(directory, "aa", a, a)[:n] == a


def test_merge_refuses_other_geometry_and_changes_nothing() -> None:
    with bitmap_dir() as directory:
        into = new_bitmap(directory, "into", 1 << 20, 4096, [True, False, True])
        coarse = new_bitmap(directory, "coarse", 1 << 20, 65536, [True] * 16)
        larger = new_bitmap(directory, "larger", 2 << 20, 4096, [True] * 512)
        with into, coarse, larger:
            for other in (coarse, larger):
                with pytest.raises(errors.BadRequest) as failed:
                    into.merge_from(other)
                assert failed.value.code == "geometry-mismatch"
            assert unpack(into.bits[:], 256) == [True, False, True] + [False] * 253


# -- formatting ---------------------------------------------------------------------


@PROPERTY
@given(bitmaps(), st.data())
def test_nbdinfo_json_parses_to_the_extents(
    bitmap: tuple[bytearray, int, int, list[bool]], data: st.DataObject
) -> None:
    bits, granularity, disk_size, _ = bitmap
    offset = data.draw(st.integers(0, disk_size))
    found = extents(bits, granularity, disk_size, offset)
    parsed = json.loads(nbdinfo_json(found))
    assert isinstance(parsed, list)
    assert [set(entry) for entry in parsed] == [
        {"offset", "length", "type", "description"} for _ in found
    ]
    assert parsed == [
        {
            "offset": e.offset,
            "length": e.length,
            "type": 1 if e.dirty else 0,
            "description": "dirty" if e.dirty else "clean",
        }
        for e in found
    ]
    assert len(nbdinfo_text(found).splitlines()) == len(found)


def test_nbdinfo_json_shape() -> None:
    assert nbdinfo_json([]) == "[\n]\n"
    assert json.loads(nbdinfo_json([])) == []
    assert nbdinfo_json([Extent(0, 65536, True), Extent(65536, 4096, False)]) == (
        "[\n"
        '{ "offset": 0, "length": 65536, "type": 1, "description": "dirty"},\n'
        '{ "offset": 65536, "length": 4096, "type": 0, "description": "clean"}\n'
        "]\n"
    )


def test_bitmap_extents_reads_the_mapped_file() -> None:
    g = 65536
    with bitmap_dir() as directory, new_bitmap(directory, "b", 5 * g, g) as bitmap:
        bitmap.mark(g + 1, g)  # granules 1 and 2
        assert bitmap_extents(bitmap) == [
            Extent(0, g, False),
            Extent(g, 2 * g, True),
            Extent(3 * g, 2 * g, False),
        ]
        assert bitmap_extents(bitmap, 2 * g + 5, 10 * g) == [
            Extent(2 * g + 5, g - 5, True),
            Extent(3 * g, 2 * g, False),
        ]


@PROPERTY
@given(bitmaps(), st.data())
def test_extent_arrays_agree_with_extents(
    bitmap: tuple[bytearray, int, int, list[bool]], data: st.DataObject
) -> None:
    """The export's numpy path gives exactly the reference answer."""
    bits, granularity, disk_size, _ = bitmap
    offset = data.draw(st.integers(0, max(0, disk_size + granularity)))
    length = data.draw(st.integers(1, disk_size + 2 * granularity + 1))
    cap = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    expected = extents(bits, granularity, disk_size, offset, length, max_extents=cap)
    lengths, dirty = extent_arrays(bits, granularity, disk_size, offset, length, cap)
    assert list(zip(lengths.tolist(), dirty.tolist(), strict=True)) == [
        (e.length, int(e.dirty)) for e in expected
    ]

"""The manifest format: what is written is what is parsed, and anything else
is refused (flipped bytes, truncation, trailing bytes, another disk)."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtydiff import errors
from dirtydiff.manifest import (
    CHECKSUM,
    HEADER,
    ManifestWriter,
    check_matches,
    granule_digests,
    open_manifest,
    parse,
    partial_path,
)

G = 4096


@st.composite
def disks(draw: st.DrawFn) -> bytes:
    """A disk of a few granules, odd sizes included, each granule zero, a
    repeated pattern or random bytes."""
    granules = draw(st.integers(0, 12))
    tail = draw(st.sampled_from([0, 1, 511, G - 1]))
    parts = []
    for _ in range(granules):
        kind = draw(st.sampled_from(["zero", "pattern", "random"]))
        if kind == "zero":
            parts.append(bytes(G))
        elif kind == "pattern":
            parts.append(bytes([draw(st.integers(1, 255))]) * G)
        else:
            parts.append(draw(st.binary(min_size=G, max_size=G)))
    parts.append(draw(st.binary(min_size=tail, max_size=tail)))
    return b"".join(parts)


def write(tmp: Path, data: bytes, name: str = "m.ddm", source: str = "nbd://backup/x") -> Path:
    target = tmp / name
    writer = ManifestWriter.create(target, len(data), G, source)
    flags, digests = granule_digests(data, G, writer.header.digest)
    writer.record(0, flags, digests)
    writer.commit()
    return target


settings_tmp = settings(
    # Each example writes a file; a loaded machine makes that slow, never wrong.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    max_examples=40,
    deadline=None,
)


@settings_tmp
@given(data=disks())
def test_round_trip(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    with open_manifest(path) as (manifest, checksum):
        assert manifest.size == len(data) and manifest.granularity == G
        assert manifest.header.source == "nbd://backup/x"
        assert checksum == blake3.blake3(path.read_bytes()[:-CHECKSUM]).digest()
        for g in range(manifest.granules):
            granule = data[g * G : (g + 1) * G]
            zero = granule.count(0) == len(granule)
            assert manifest.is_zero(g) == zero
            expected = bytes(16) if zero else blake3.blake3(granule).digest(16)
            assert manifest.digest_at(g) == expected
    assert not partial_path(path).exists()


@settings_tmp
@given(data=disks(), where=st.integers(0, 1 << 30), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused(tmp_path: Path, data: bytes, where: int, bit: int) -> None:
    raw = bytearray(write(tmp_path, data).read_bytes())
    raw[where % len(raw)] ^= 1 << bit
    with pytest.raises(errors.Corrupt):
        parse(bytes(raw))


@settings_tmp
@given(data=disks(), cut=st.integers(1, 1 << 30))
def test_truncated_or_extended_is_refused(tmp_path: Path, data: bytes, cut: int) -> None:
    raw = write(tmp_path, data).read_bytes()
    with pytest.raises(errors.Corrupt):
        parse(raw[: len(raw) - 1 - cut % len(raw)])
    with pytest.raises(errors.Corrupt, match="trailing"):
        parse(raw + b"\0")


def test_a_valid_checksum_over_a_bad_layout_is_still_refused(tmp_path: Path) -> None:
    """A manifest made by hand with a correct checksum: flags that do not
    match the digests, a flag past the last granule, another algorithm."""
    data = bytes(G) + b"x" * G + b"y"
    raw = bytearray(write(tmp_path, data).read_bytes())
    flags_at = HEADER.size + len(b"nbd://backup/x")

    def resealed(edit: bytearray) -> bytes:
        body = bytes(edit[:-CHECKSUM])
        return body + blake3.blake3(body).digest()

    # Flags that do not match the digests' count: one digest too many, or too few.
    more = bytearray(raw)
    more[flags_at] |= 1 << 1  # granule 1 (data) said to be zero
    with pytest.raises(errors.Corrupt, match="trailing"):
        parse(resealed(more))
    fewer = bytearray(raw)
    fewer[flags_at] &= ~1  # granule 0 (zero) said to hold data
    with pytest.raises(errors.Corrupt, match="truncated"):
        parse(resealed(fewer))
    past = bytearray(raw)
    past[flags_at] |= 1 << 5  # three granules; bit 5 is past them
    with pytest.raises(errors.Corrupt, match="past the last granule"):
        parse(resealed(past))
    other = bytearray(raw)
    other[41:47] = b"sha256"
    with pytest.raises(errors.Corrupt, match="algorithm"):
        parse(resealed(other))


def test_files_refused_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound, match="No such file"), open_manifest(tmp_path / "n.ddm"):
        pass
    empty = tmp_path / "empty.ddm"
    empty.write_bytes(b"")
    with pytest.raises(errors.Corrupt, match="empty"), open_manifest(empty):
        pass
    junk = tmp_path / "junk.ddm"
    junk.write_bytes(os.urandom(5000))
    with (
        pytest.raises(errors.Corrupt, match=r"junk\.ddm: not a valid manifest"),
        open_manifest(junk),
    ):
        pass


def test_another_disk_or_a_coarser_manifest_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, b"z" * (3 * G))
    with open_manifest(path) as (manifest, _):
        check_matches(manifest.header, 3 * G, G, "m")
        check_matches(manifest.header, 3 * G, 4 * G, "m")  # a bitmap granule of 4 digests
        with pytest.raises(errors.Conflict, match="another disk"):
            check_matches(manifest.header, 3 * G + 1, G, "m")
        with pytest.raises(errors.Conflict, match="as fine or finer"):
            check_matches(manifest.header, 3 * G, G // 2, "m")


def test_a_writer_killed_leaves_no_manifest_and_reopens_its_partial(tmp_path: Path) -> None:
    data = b"a" * G + bytes(G) + b"b" * 10
    target = tmp_path / "m.ddm"
    writer = ManifestWriter.create(target, len(data), G, "src")
    flags, digests = granule_digests(data[:G], G)
    writer.record(0, flags, digests)
    writer.close()  # as if killed: only the partial file exists
    assert not target.exists() and partial_path(target).exists()
    again = ManifestWriter.create(target, len(data), G, "src", reopen=True)
    assert again.reopened
    flags, digests = granule_digests(data, G)
    again.record_zero(1, 2)
    again.record(2, flags[2:], digests[2 * 16 :])
    again.commit()
    with open_manifest(target) as (manifest, _):
        assert [manifest.is_zero(g) for g in range(3)] == [False, True, False]
        assert manifest.digest_at(0) == blake3.blake3(b"a" * G).digest(16)
    # Another source: the partial is not taken for this one.
    other = ManifestWriter.create(tmp_path / "n.ddm", len(data), G, "src")
    other.close()
    assert not ManifestWriter.create(
        tmp_path / "n.ddm", len(data), G, "elsewhere", reopen=True
    ).reopened


@settings(deadline=None)
@given(start=st.integers(0, 100), length=st.integers(0, 100), size=st.integers(1, 200))
def test_record_zero_sets_exactly_its_flags(start: int, length: int, size: int) -> None:
    import tempfile  # noqa: PLC0415

    start, end = min(start, size), min(start + length, size)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "m.ddm"
        writer = ManifestWriter.create(target, size * G, G, "s")
        writer.record_zero(start, end)
        # Everything else as data, so that the layout check passes.
        for g in range(size):
            if not start <= g < end:
                writer.record(g, [False], b"\1" * 16)
        writer.commit()
        with open_manifest(target) as (manifest, _):
            assert {g for g in range(size) if manifest.is_zero(g)} == set(range(start, end))

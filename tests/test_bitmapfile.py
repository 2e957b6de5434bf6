"""The bitmap file format: header, validation, and what makes a bitmap consistent.

Corrupt files are built by writing the documented header layout with this
module's own struct, not the library's, so a change to the format that the
design note does not describe fails here.
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtydiff import errors
from dirtydiff.bitmapfile import (
    BOOT_ID_ENV,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_GRANULARITY,
    MIN_GRANULARITY,
    BitmapFile,
    Flag,
    Header,
    Reason,
    bits_length,
    check_granularity,
    current_boot_id,
    inconsistency,
)

# The design note's table: magic, version, flags, granularity, reason, disk
# size, generation, created, boot id; then a CRC-32 of those 64 bytes.
LAYOUT = struct.Struct("!8sIIIIQQQ16s")
BOOT_A = "8a5bd0c4-6a8e-4f3c-9d1e-0f6f2b7e1a01"
BOOT_B = "1c0ffee0-0000-4000-8000-00000000000b"

G = 65536
DISK = 10 * G + 512


@pytest.fixture(autouse=True)
def boot_a(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)


def raw_header(
    *,
    magic: bytes = b"DDBITMAP",
    version: int = 1,
    flags: int = 0,
    granularity: int = G,
    reason: int = 0,
    disk_size: int = DISK,
    generation: int = 0,
    created: int = 0,
    boot: bytes = bytes(16),
    crc: int | None = None,
) -> bytes:
    body = LAYOUT.pack(
        magic, version, flags, granularity, reason, disk_size, generation, created, boot
    )
    return body + struct.pack("!I", zlib.crc32(body) if crc is None else crc)


def make_file(path: Path) -> Path:
    BitmapFile.create(path, granularity=G, disk_size=DISK, flags=Flag.ENABLED).close()
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- header -------------------------------------------------------------------------


headers = st.builds(
    Header,
    flags=st.integers(0, int(KNOWN_FLAGS)).map(Flag),
    granularity=st.integers(12, 26).map(lambda k: 1 << k),
    disk_size=st.integers(0, 2**64 - 1),
    generation=st.integers(0, 2**64 - 1),
    created_ns=st.integers(0, 2**64 - 1),
    boot_id=st.binary(min_size=16, max_size=16),
    reason=st.sampled_from(Reason),
)


@settings(max_examples=200, deadline=None)
@given(headers)
def test_header_round_trip(header: Header) -> None:
    raw = header.pack()
    assert len(raw) == 68
    assert Header.unpack(raw, "x") == header
    assert Header.unpack(raw.ljust(HEADER_SIZE, b"\0"), "x") == header


def test_header_layout_is_the_documented_one() -> None:
    boot = uuid.UUID(BOOT_A).bytes
    header = Header(Flag.ENABLED | Flag.IN_USE, 4096, 12345, 7, 99, boot, Reason.DISK_RESIZED)
    assert header.pack() == raw_header(
        flags=3, granularity=4096, reason=2, disk_size=12345, generation=7, created=99, boot=boot
    )


def test_create_writes_a_clean_file_of_the_right_size(tmp_path: Path) -> None:
    path = tmp_path / "b.bitmap"
    with BitmapFile.create(
        path, granularity=G, disk_size=DISK, flags=Flag.ENABLED, generation=3
    ) as b:
        assert b.header.flags == Flag.ENABLED
        assert b.header.generation == 3
        assert b.granules == 11
        assert b.dirty_granules() == 0
        assert b.consistent
    assert path.stat().st_size == HEADER_SIZE + bits_length(DISK, G) == HEADER_SIZE + 8
    assert [p.name for p in tmp_path.iterdir()] == ["b.bitmap"]  # no temporary left
    with pytest.raises(errors.Conflict) as failed:
        BitmapFile.create(path, granularity=G, disk_size=DISK, flags=Flag(0))
    assert failed.value.code == "name-in-use"
    assert [p.name for p in tmp_path.iterdir()] == ["b.bitmap"]


def test_full_filesystem_is_a_clear_error_leaving_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "b.bitmap"
    with pytest.raises(errors.StorageError) as failed:
        BitmapFile.create(path, granularity=G, disk_size=DISK, flags=Flag.ENABLED)
    assert failed.value.code == "state-dir-full"
    assert str(path) in failed.value.message
    assert list(tmp_path.iterdir()) == []


def test_bits_survive_reopening(tmp_path: Path) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=True) as b:
        b.mark(3 * G + 1, G)
    with BitmapFile(path, writable=False) as b:
        assert b.dirty_granules() == 2
        assert b.bits[0] == 0b11000


def test_opening_a_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound) as failed:
        BitmapFile(tmp_path / "nope.bitmap", writable=False)
    assert failed.value.code == "unknown-bitmap"


# -- corrupt files -------------------------------------------------------------------


def overwrite_header(raw: bytes) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with path.open("r+b") as f:
            f.write(raw)

    return damage


def flip_byte(offset: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with path.open("r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x10]))

    return damage


def resize(size: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        os.truncate(path, size)

    return damage


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "bad magic": (overwrite_header(raw_header(magic=b"QEMUBMAP")), "bad magic"),
    "bad version": (overwrite_header(raw_header(version=2)), "format version 2"),
    "version 0": (overwrite_header(raw_header(version=0)), "format version 0"),
    "bad crc": (overwrite_header(raw_header(crc=0x12345678)), "checksum"),
    "bit flip in disk size": (flip_byte(30), "checksum"),
    "bit flip in crc": (flip_byte(65), "checksum"),
    "unknown flags": (overwrite_header(raw_header(flags=0x9)), "unknown flags"),
    "granularity not a power of two": (
        overwrite_header(raw_header(granularity=G + 4096)),
        "granularity",
    ),
    "granularity too small": (overwrite_header(raw_header(granularity=2048)), "granularity"),
    "granularity too large": (
        overwrite_header(raw_header(granularity=128 << 20)),
        "granularity",
    ),
    "unknown reason": (overwrite_header(raw_header(reason=99)), "bad header field"),
    "empty": (resize(0), "truncated"),
    "truncated header": (resize(40), "truncated"),
    "header only": (resize(HEADER_SIZE), "header says"),
    "bits cut short": (resize(HEADER_SIZE + 4), "header says"),
    "bits too long": (resize(HEADER_SIZE + 4096), "header says"),
    "disk size of another disk": (
        overwrite_header(raw_header(disk_size=1 << 30)),
        "header says",
    ),
}


@pytest.mark.parametrize("writable", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_file_raises_corrupt_naming_the_file(
    tmp_path: Path, case: str, writable: bool
) -> None:
    damage, words = CORRUPTIONS[case]
    path = make_file(tmp_path / "b0.bitmap")
    damage(path)
    fds = open_fds()
    with pytest.raises(errors.Corrupt) as failed:
        BitmapFile(path, writable=writable)
    assert failed.value.code == "corrupt"
    assert str(path) in str(failed.value)
    assert words in str(failed.value)
    assert open_fds() == fds, "a refused file stays open"


def test_unpack_of_short_bytes_is_corrupt() -> None:
    raw = raw_header()
    for size in (0, 1, 67):
        with pytest.raises(errors.Corrupt, match="where: truncated"):
            Header.unpack(raw[:size], "where")


# -- granularity ----------------------------------------------------------------------


@pytest.mark.parametrize("shift", range(64))
def test_check_granularity_powers_of_two(shift: int) -> None:
    granularity = 1 << shift
    if 4096 <= granularity <= 64 * 1024 * 1024:
        check_granularity(granularity)
    else:
        with pytest.raises(errors.BadRequest) as failed:
            check_granularity(granularity)
        assert failed.value.code == "bad-granularity"


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**40), 2**40) | st.integers(4000, 70000))
def test_check_granularity_accepts_exactly_powers_of_two_4k_to_64m(granularity: int) -> None:
    valid = MIN_GRANULARITY <= granularity <= MAX_GRANULARITY and bin(granularity).count("1") == 1
    if valid:
        check_granularity(granularity)
    else:
        with pytest.raises(errors.BadRequest):
            check_granularity(granularity)


def test_create_refuses_a_bad_granularity(tmp_path: Path) -> None:
    with pytest.raises(errors.BadRequest):
        BitmapFile.create(tmp_path / "b.bitmap", granularity=1000, disk_size=DISK, flags=Flag(0))
    assert list(tmp_path.iterdir()) == []


# -- consistency ------------------------------------------------------------------------


def test_current_boot_id_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert current_boot_id() == uuid.UUID(BOOT_A).bytes
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_B)
    assert current_boot_id() == uuid.UUID(BOOT_B).bytes


def test_in_use_from_another_boot_is_a_host_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=True) as b:
        b.begin_recording()
        b.mark(0, 1)
        assert b.header.flags & Flag.IN_USE
        assert b.header.boot_id == uuid.UUID(BOOT_A).bytes
        assert inconsistency(b.header) is Reason.NONE
        assert b.consistent
        assert inconsistency(b.header, uuid.UUID(BOOT_B).bytes) is Reason.HOST_CRASH
        # The recorder dies without end_recording; the host reboots.
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_B)
    with BitmapFile(path, writable=False) as b:
        assert b.header.flags & Flag.IN_USE
        assert inconsistency(b.header) is Reason.HOST_CRASH
        assert not b.consistent
        assert inconsistency(b.header, uuid.UUID(BOOT_A).bytes) is Reason.NONE


def test_recorder_killed_on_a_host_that_stays_up_is_consistent(tmp_path: Path) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=True) as b:
        b.begin_recording()
        b.mark(G, 1)
    with BitmapFile(path, writable=False) as b:  # same boot
        assert b.header.flags & Flag.IN_USE
        assert b.consistent
        assert b.dirty_granules() == 1


def test_end_recording_clears_in_use_durably(tmp_path: Path) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=True) as b:
        b.begin_recording()
        b.mark(2 * G, 1)
        b.end_recording()
        assert not b.header.flags & Flag.IN_USE
        assert b.header.flags & Flag.ENABLED
    with BitmapFile(path, writable=False) as b:
        assert not b.header.flags & Flag.IN_USE
        assert b.header.flags & Flag.ENABLED
        assert b.dirty_granules() == 1


def test_clean_bitmap_from_another_boot_is_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=True) as b:
        b.begin_recording()
        b.end_recording()
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_B)
    with BitmapFile(path, writable=False) as b:
        assert b.consistent


@pytest.mark.parametrize("reason", [Reason.HOST_CRASH, Reason.DISK_RESIZED])
def test_inconsistent_is_sticky(tmp_path: Path, reason: Reason) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=True) as b:
        b.mark_inconsistent(reason)
        assert inconsistency(b.header) is reason
        # Recording again in this boot, and stopping cleanly, changes nothing.
        b.begin_recording()
        b.end_recording()
        assert inconsistency(b.header) is reason
    with BitmapFile(path, writable=True) as b:
        assert b.header.flags & Flag.INCONSISTENT
        assert inconsistency(b.header) is reason
        assert inconsistency(b.header, uuid.UUID(BOOT_B).bytes) is reason
        assert not b.consistent


def test_inconsistent_without_a_reason_still_counts_as_a_crash() -> None:
    header = Header(Flag.INCONSISTENT, G, DISK)
    assert inconsistency(header) is Reason.HOST_CRASH


def test_reload_header_sees_another_writer(tmp_path: Path) -> None:
    path = make_file(tmp_path / "b.bitmap")
    with BitmapFile(path, writable=False) as reader, BitmapFile(path, writable=True) as writer:
        writer.mark_inconsistent(Reason.DISK_RESIZED)
        assert reader.consistent
        assert reader.reload_header().reason is Reason.DISK_RESIZED
        assert not reader.consistent

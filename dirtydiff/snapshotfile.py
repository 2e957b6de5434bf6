"""The on-disk snapshot: its map file's format, and the granule arithmetic.

Design note
-----------
A point-in-time snapshot of the disk (issue "copy-before-write") is two files:

- ``STATE/snapshots/NAME.snap``, the **map**: a 4 KiB header, then two bit
  arrays, each page aligned so that it is memory-mapped on its own:
  *protected* (bit set: the snapshot still serves this granule) and *copied*
  (bit set: the store holds this granule's data as it was at the instant).
  The map is fully allocated when made, so a bit or a header written later
  never needs a new block (a full state filesystem cannot fail it).
- the **store**, ``STATE/snapshots/NAME.store`` or ``DIR/ID.NAME.store``
  (``--snapshot-dir``): a sparse file of the disk's size, in which a copied
  granule sits at its own offset. Only copied granules hold blocks.

Header, format version 1, every integer big-endian::

    offset size field
    0      8    magic b"DDSNAPSH"
    8      4    format version (1)
    12     4    flags: BROKEN 0x1  sticky: the snapshot no longer serves reads
    16     4    granularity in bytes (that of the checkpoint's bitmap)
    20     4    scope: 0 all (every granule protected), 1 dirty (the bits of
                the checkpoint's bitmap at the instant)
    24     8    size of the disk, in bytes
    32     8    created, ns since the epoch: the instant
    40     8    store limit in bytes, 0 for none
    48     16   boot id of the boot the instant was taken in
    64     16   the state directory's id (disk.json), raw
    80     8    the store file's device
    88     8    the store file's inode
    96     4    CRC-32 of bytes 0..95
    1024   4    length L of the store's path (at most 2048), 4 CRC-32, L bytes
    3072   4    length R of why it broke (at most 1000), 4 CRC-32, R bytes
    ..     ..   zero up to 4096

Bit ``i`` of either array covers bytes ``[i*G, (i+1)*G)``, least significant
bit first; each array is ``bits_length`` bytes padded to a page.

What makes a read exact: a granule read while protected returns the store's
bytes if copied, else the disk's, and the tracker copies a protected granule
(store pwrite, then the copied bit) before it lets a write change it. The
proof and the crash cases are in docs/architecture.md, "Point-in-time
snapshots".

Everything here but ``SnapshotFile`` is arithmetic without I/O, so that
tests drive it with Hypothesis (tests/test_snapshotfile.py).
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import errors
from dirtydiff.bitmapfile import bits_length, check_granularity, granule_count, set_bit_range
from dirtydiff.statefiles import create_temporary, open_file

MAGIC = b"DDSNAPSH"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
PAGE = 4096
SNAPSHOT_SUFFIX = ".snap"
STORE_SUFFIX = ".store"
MAX_STORE_PATH = 2048
MAX_REASON = 1000

# magic, version, flags, granularity, scope, disk size, created, limit, boot,
# state id, store device, store inode
_HEADER = struct.Struct("!8sIIIIQQQ16s16sQQ")
_CRC = struct.Struct("!I")
_AREA = struct.Struct("!II")  # length, CRC-32 of what follows
_STORE_AT = 1024
_REASON_AT = 3072


class SnapFlag(enum.IntFlag):
    BROKEN = 0x1
    """Sticky: the snapshot stopped protecting; its reads fail."""


class Scope(enum.IntEnum):
    ALL = 0
    """Every granule of the disk is protected (a full backup reads them all)."""
    DIRTY = 1
    """Only the granules dirty in the checkpoint's bitmap (an incremental)."""

    @property
    def word(self) -> str:
        return "all" if self is Scope.ALL else "dirty"

    @classmethod
    def of(cls, word: str) -> Scope:
        return {"all": cls.ALL, "dirty": cls.DIRTY}[word]


@dataclass
class SnapHeader:
    flags: SnapFlag
    granularity: int
    scope: Scope
    disk_size: int
    created_ns: int
    limit: int  # 0: none
    boot_id: bytes
    state_id: bytes
    store_dev: int
    store_ino: int
    store: str  # the store file's path
    reason: str = ""  # why it broke, "" while it serves

    def pack(self) -> bytes:
        """The fixed fields (which change only when it breaks)."""
        body = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            int(self.flags),
            self.granularity,
            int(self.scope),
            self.disk_size,
            self.created_ns,
            self.limit,
            self.boot_id,
            self.state_id,
            self.store_dev,
            self.store_ino,
        )
        return body + _CRC.pack(zlib.crc32(body))

    def pack_all(self) -> bytes:
        area = bytearray(HEADER_SIZE)
        fixed = self.pack()
        area[: len(fixed)] = fixed
        store = _pack_area(self.store.encode())
        area[_STORE_AT : _STORE_AT + len(store)] = store
        reason = pack_reason(self.reason)
        area[_REASON_AT : _REASON_AT + len(reason)] = reason
        return bytes(area)

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> SnapHeader:
        """Parse and validate a whole header; raise Corrupt naming ``where``."""
        if len(raw) < HEADER_SIZE:
            raise errors.Corrupt(f"{where}: truncated snapshot header ({len(raw)} bytes)")
        body = raw[: _HEADER.size]
        (crc,) = _CRC.unpack_from(raw, _HEADER.size)
        (magic, version, flags, gran, scope, size, created, limit, boot, state_id, dev, ino) = (
            _HEADER.unpack(body)
        )
        if magic != MAGIC:
            raise errors.Corrupt(f"{where}: not a dirtydiff snapshot (bad magic)")
        if version != FORMAT_VERSION:
            raise errors.Corrupt(f"{where}: unsupported snapshot format version {version}")
        if zlib.crc32(body) != crc:
            raise errors.Corrupt(f"{where}: snapshot header checksum mismatch")
        if flags & ~int(SnapFlag.BROKEN):
            raise errors.Corrupt(f"{where}: unknown snapshot flags {flags:#x}")
        try:
            check_granularity(gran)
            found_scope = Scope(scope)
        except (errors.BadRequest, ValueError) as e:
            raise errors.Corrupt(f"{where}: bad snapshot header field ({e})") from None
        store = _unpack_area(raw, _STORE_AT, MAX_STORE_PATH, f"{where}: store path")
        reason = _unpack_area(raw, _REASON_AT, MAX_REASON, f"{where}: reason")
        if not store:
            raise errors.Corrupt(f"{where}: no store path")
        return cls(
            SnapFlag(flags), gran, found_scope, size, created, limit, boot, state_id, dev, ino,
            store, reason,
        )  # fmt: skip


def _pack_area(raw: bytes) -> bytes:
    return _AREA.pack(len(raw), zlib.crc32(raw)) + raw


def pack_reason(reason: str) -> bytes:
    """The reason's area, at most MAX_REASON bytes of UTF-8 (cut on a
    character boundary)."""
    raw = reason.encode()[:MAX_REASON].decode(errors="ignore").encode()
    return _pack_area(raw)


def _unpack_area(raw: bytes, at: int, limit: int, what: str) -> str:
    length, crc = _AREA.unpack_from(raw, at)
    body = raw[at + _AREA.size : at + _AREA.size + length]
    if length > limit or len(body) != length or zlib.crc32(body) != crc:
        raise errors.Corrupt(f"{what} checksum mismatch")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise errors.Corrupt(f"{what} is not UTF-8") from None


# -- granule arithmetic (no I/O) ---------------------------------------------
#
#   disk:      |----G----|----G----|----G----|--tail-|      (size not a multiple of G)
#   request:        [=================)
#   touched:   |    0    |    1    |    2    |               granules_touched: 0..3
#   inside:              |    1    |                        granules_inside:  1..2
#
# A request that reaches the disk's end covers the short last granule whole.


def array_length(disk_size: int, granularity: int) -> int:
    """Bytes one bit array takes in the map file: page aligned, so each maps alone."""
    return -(-bits_length(disk_size, granularity) // PAGE) * PAGE


def map_size(disk_size: int, granularity: int) -> int:
    return HEADER_SIZE + 2 * array_length(disk_size, granularity)


def granules_touched(offset: int, length: int, granularity: int, disk_size: int) -> range:
    """The granules that ``[offset, offset+length)`` touches, clipped at the disk's end."""
    end = min(offset + length, disk_size)
    if length <= 0 or offset >= end:
        return range(0)
    return range(offset // granularity, (end - 1) // granularity + 1)


def granules_inside(offset: int, length: int, granularity: int, disk_size: int) -> range:
    """The granules wholly inside ``[offset, offset+length)``; the short last
    granule counts as whole when the range reaches the disk's end."""
    end = min(offset + length, disk_size)
    if length <= 0 or offset >= end:
        return range(0)
    first = -(-offset // granularity)
    stop = granule_count(disk_size, granularity) if end == disk_size else end // granularity
    return range(first, max(first, stop))


def granule_bytes(first: int, stop: int, granularity: int, disk_size: int) -> tuple[int, int]:
    """Offset and length of granules ``[first, stop)``, clipped at the disk's end."""
    offset = first * granularity
    return offset, max(0, min(stop * granularity, disk_size) - offset)


def bit(bits: mmap.mmap | bytearray | bytes, i: int) -> int:
    return (bits[i >> 3] >> (i & 7)) & 1


def clear_bit_range(bits: mmap.mmap | bytearray, start: int, stop: int) -> None:
    """Clear bits ``[start, stop)`` (LSB first in each byte)."""
    if start >= stop:
        return
    first_byte, last_byte = start >> 3, (stop - 1) >> 3
    head = (0xFF << (start & 7)) & 0xFF
    tail = 0xFF >> (7 - ((stop - 1) & 7))
    if first_byte == last_byte:
        bits[first_byte] &= ~(head & tail) & 0xFF
        return
    bits[first_byte] &= ~head & 0xFF
    if last_byte > first_byte + 1:
        bits[first_byte + 1 : last_byte] = bytes(last_byte - first_byte - 1)
    bits[last_byte] &= ~tail & 0xFF


def count_bits(bits: mmap.mmap | bytearray | bytes, start: int, stop: int) -> int:
    """Set bits in ``[start, stop)``."""
    if start >= stop:
        return 0
    value = int.from_bytes(bits[start >> 3 : ((stop - 1) >> 3) + 1], "little") >> (start & 7)
    return (value & ((1 << (stop - start)) - 1)).bit_count()


def pending_runs(
    protected: mmap.mmap | bytearray, copied: mmap.mmap | bytearray, start: int, stop: int
) -> list[tuple[int, int]]:
    """Runs ``(first, stop)`` of granules in ``[start, stop)`` protected and
    not copied: what a change there must copy first."""
    found: list[tuple[int, int]] = []
    i = start
    while i < stop:
        if not i & 7 and i + 8 <= stop and not protected[i >> 3] & ~copied[i >> 3]:
            i += 8  # a whole byte with nothing to copy
            continue
        if bit(protected, i) and not bit(copied, i):
            if found and found[-1][1] == i:
                found[-1] = (found[-1][0], i + 1)
            else:
                found.append((i, i + 1))
        i += 1
    return found


def bytes_in(
    bits: mmap.mmap | bytearray | bytes, start: int, stop: int, granularity: int, disk_size: int
) -> int:
    """Bytes of the disk that the set bits of granules ``[start, stop)``
    cover, the short last granule clipped at the disk's end."""
    granules = granule_count(disk_size, granularity)
    stop = min(stop, granules)
    total = count_bits(bits, start, stop) * granularity
    if start < stop == granules and bit(bits, granules - 1):
        total -= granules * granularity - disk_size
    return total


# -- the map file ------------------------------------------------------------


class SnapshotFile:
    """One map file, open and memory-mapped (writable: the tracker)."""

    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        try:
            self._fd = open_file(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise errors.NotFound("no-such-snapshot", f"no snapshot file {path}") from None
        try:
            self.header = SnapHeader.unpack(os.pread(self._fd, HEADER_SIZE, 0), str(path))
            size, gran = self.header.disk_size, self.header.granularity
            self.granules = granule_count(size, gran)
            actual = os.fstat(self._fd).st_size
            if actual != map_size(size, gran):
                raise errors.Corrupt(
                    f"{path}: file is {actual} bytes, its header says {map_size(size, gran)}"
                )
            length = array_length(size, gran)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.protected = mmap.mmap(self._fd, length, mmap.MAP_SHARED, prot, offset=HEADER_SIZE)
            self.copied = mmap.mmap(
                self._fd, length, mmap.MAP_SHARED, prot, offset=HEADER_SIZE + length
            )
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    def create(cls, path: Path, header: SnapHeader, protect_all: bool) -> SnapshotFile:
        """A new map file, durably, under ``path`` (a temporary name: the
        caller renames it into place at the instant). Every block is
        reserved now: a bit stored into a hole on a full filesystem would be
        a SIGBUS in the middle of a VM's write."""
        size, gran = header.disk_size, header.granularity
        fd = create_temporary(path)
        try:
            os.pwrite(fd, header.pack_all(), 0)
            os.posix_fallocate(fd, 0, map_size(size, gran))
            if protect_all:
                granules = granule_count(size, gran)
                ones = bytearray(array_length(size, gran))
                set_bit_range(ones, 0, granules)
                os.pwrite(fd, ones, HEADER_SIZE)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls(path, writable=True)

    def write_reason(self) -> None:
        """Record the header's flags and reason in place, durably: the
        reason's area first, then the fixed fields that say BROKEN."""
        os.pwrite(self._fd, pack_reason(self.header.reason), _REASON_AT)
        os.pwrite(self._fd, self.header.pack(), 0)
        os.fsync(self._fd)

    def flush(self) -> None:
        self.protected.flush()
        self.copied.flush()
        os.fsync(self._fd)

    def close(self, *, unmap: bool = True) -> None:
        """``unmap=False``: keep the maps until the last reference goes (a
        writer on the hot path may still test a bit of a snapshot being
        released; a closed mmap would fail its write)."""
        if self._fd < 0:
            return
        if unmap:
            self.protected.close()
            self.copied.close()
        os.close(self._fd)
        self._fd = -1

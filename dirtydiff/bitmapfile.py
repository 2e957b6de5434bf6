"""The on-disk dirty bitmap: format, validation and the memory-mapped bit array.

Design note
-----------
One file per bitmap, ``STATE/bitmaps/NAME.bitmap``. A 4 KiB header, then the
bit array, page aligned so that it can be memory-mapped on its own.

Header, format version 1, every integer big-endian::

    offset size field
    0      8    magic b"DDBITMAP"
    8      4    format version (1)
    12     4    flags: ENABLED 0x1   the tracker records into it when it runs
                       IN_USE  0x2   a recorder has it mapped for writing; set
                                     and made durable *before* the first write
                                     it covers is accepted, cleared only after
                                     the bits were made durable (clean close)
                       INCONSISTENT 0x4  sticky: bits may be missing
    16     4    granularity in bytes (power of two, 4 KiB .. 64 MiB)
    20     4    why it is inconsistent (Reason), 0 when it is not
    24     8    size of the disk it describes, in bytes
    32     8    generation: which checkpoint interval it records (0 if none)
    40     8    created, ns since the epoch: when the file took the meaning
                it has (made, or rebuilt); see "Incarnations" below
    48     16   boot id of the last boot that set IN_USE
    64     4    CRC-32 of bytes 0..63
    68     ..   zero up to 1024
    1024   4    length L of the backup reference, 0 if none (at most 2048)
    1028   4    CRC-32 of the L bytes that follow
    1032   L    backup reference, UTF-8: the backup (an NBD URI) this bitmap
                counts changes from, so that ``dirtydiff rebuild`` can scan
                against it. Written when the file is made and never changed:
                a checkpoint gives it to the next interval's file before the
                renames, so the reference moves with the bits, atomically.
    ..     ..   zero up to 4096

Bit array at 4096: bit ``i`` covers bytes ``[i*G, (i+1)*G)`` of the disk, least
significant bit first in each byte (QEMU's serialisation order); its length is
``ceil(granules / 8)`` rounded up to 8 bytes; bits past the disk's end are 0.

What the states mean. A bit at 1 means "may have changed"; a 0 means "has not
changed" only if the bitmap is consistent. A bitmap is consistent unless
INCONSISTENT is set, or IN_USE is set by a boot other than the current one: the
host went down while a recorder held dirty pages that may never have reached
the disk. A recorder killed while the host stays up loses nothing (the page
cache keeps its stores), so IN_USE from the current boot is fine.

Incarnations. A reader (the export) binds to one file, by its inode and its
created time, and must never see it change meaning under it. So every
operation that could turn a bit of a consistent bitmap from 1 to 0, or change
what it counts from, either puts a new file under the name (clear, checkpoint,
remove, add) or first marks the file inconsistent with a new created time
(rebuild). Hence: one incarnation (inode, created) is consistent during at
most one stretch of time, and during it its bits only go from 0 to 1. A reader
that finds its incarnation still in place and consistent *after* it read the
bits knows that what it read was complete when it read it.

Trust. Every open is O_NOFOLLOW (``statefiles``): a symlink planted under a
bitmap's name, or a temporary's, is refused or removed, never written through.

Locking. One process records into a file at a time (the tracker, which holds
the state directory's lock); within it, ``mark`` runs under the tracker's lock.
Readers in other processes are safe: while recording, bits only go 0 -> 1.
"""

from __future__ import annotations

import enum
import errno
import functools
import mmap
import os
import struct
import time
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import errors
from dirtydiff.statefiles import create_temporary, open_file

MAGIC = b"DDBITMAP"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
MIN_GRANULARITY = 4096
MAX_GRANULARITY = 64 * 1024 * 1024
DEFAULT_GRANULARITY = 65536

# magic, version, flags, granularity, reason, disk size, generation, created, boot id
_HEADER = struct.Struct("!8sIIIIQQQ16s")
_CRC = struct.Struct("!I")
# length, CRC-32 of the reference
_BACKUP_AT = 1024
_BACKUP = struct.Struct("!II")
MAX_BACKUP_REFERENCE = 2048

# Tests simulate a host crash by pretending to be another boot.
BOOT_ID_ENV = "DIRTYDIFF_BOOT_ID"


class Flag(enum.IntFlag):
    ENABLED = 0x1
    """The tracker records into this bitmap whenever it runs."""
    IN_USE = 0x2
    """A recorder holds it mapped for writing (since boot ``boot_id``)."""
    INCONSISTENT = 0x4
    """Sticky: some change may be missing; only a rebuild by scan clears it."""


KNOWN_FLAGS = Flag.ENABLED | Flag.IN_USE | Flag.INCONSISTENT


class Reason(enum.IntEnum):
    """Why a bitmap is inconsistent; shown to users."""

    NONE = 0
    HOST_CRASH = 1
    """The host went down while the bitmap was recording."""
    DISK_RESIZED = 2
    """The disk changed size while recorded."""
    SCAN_IN_PROGRESS = 3
    """A diff scan is filling it and has not finished."""
    SCAN_ABORTED = 4
    """A rebuild of it was aborted before it finished."""
    IMPORT_IN_PROGRESS = 5
    """``bitmap import`` is filling it and has not finished."""
    CHECKPOINT_FAILED = 6
    """A checkpoint failed half way, and the interval it started may miss changes."""
    NOT_RECORDING = 7
    """It was found not recording although it must (the open interval)."""
    DISK_REPLACED = 8
    """A tracker started on a disk not proven to be the one it described."""

    def describe(self) -> str:
        return {
            Reason.NONE: "consistent",
            Reason.HOST_CRASH: "the host went down while it was recording",
            Reason.DISK_RESIZED: "the disk changed size",
            Reason.SCAN_IN_PROGRESS: "a diff scan is filling it and has not finished",
            Reason.SCAN_ABORTED: "a rebuild of it was aborted before it finished",
            Reason.IMPORT_IN_PROGRESS: "an import is filling it and has not finished",
            Reason.CHECKPOINT_FAILED: "a checkpoint failed half way",
            Reason.NOT_RECORDING: "it was found not recording",
            Reason.DISK_REPLACED: "the tracker serves a disk not proven to be the one it described",
        }[self]


def current_boot_id() -> bytes:
    # Asked on every export request (is the bitmap still consistent?): the
    # file read and the parse are cached; the variable is looked up each
    # time, so tests may change it.
    text = os.environ.get(BOOT_ID_ENV)
    return _boot_id(text) if text is not None else _kernel_boot_id()


@functools.cache
def _kernel_boot_id() -> bytes:
    return _boot_id(Path("/proc/sys/kernel/random/boot_id").read_text().strip())


@functools.lru_cache(maxsize=16)
def _boot_id(text: str) -> bytes:
    # The kernel's form, 8-4-4-4-12 hex digits. Not uuid.UUID(text): importing
    # uuid imports platform and ctypes, ~8 ms of every command's start.
    raw = bytes.fromhex(text.replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a boot id: {text!r}")
    return raw


def check_granularity(granularity: int) -> None:
    if (
        granularity < MIN_GRANULARITY
        or granularity > MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise errors.BadRequest(
            "bad-granularity",
            f"granularity {granularity} is not a power of two between "
            f"{MIN_GRANULARITY} and {MAX_GRANULARITY}",
        )


def granule_count(disk_size: int, granularity: int) -> int:
    return (disk_size + granularity - 1) // granularity


def bits_length(disk_size: int, granularity: int) -> int:
    """Bytes of bit array for a disk: whole 64-bit words, at least one."""
    nbytes = (granule_count(disk_size, granularity) + 7) // 8
    return max(8, (nbytes + 7) // 8 * 8)


@dataclass
class Header:
    flags: Flag
    granularity: int
    disk_size: int
    generation: int = 0
    created_ns: int = 0
    boot_id: bytes = bytes(16)
    reason: Reason = Reason.NONE
    backup: str = ""  # the backup reference; see the format above

    def pack(self) -> bytes:
        """The fixed fields, which change; the backup reference is written
        once, by ``pack_backup``."""
        body = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            int(self.flags),
            self.granularity,
            int(self.reason),
            self.disk_size,
            self.generation,
            self.created_ns,
            self.boot_id,
        )
        return body + _CRC.pack(zlib.crc32(body))

    def pack_backup(self) -> bytes:
        """The backup reference's area, to be written at ``_BACKUP_AT``."""
        raw = self.backup.encode()
        return _BACKUP.pack(len(raw), zlib.crc32(raw)) + raw

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> Header:
        """Parse and validate a header; raise Corrupt naming ``where``."""
        size = _HEADER.size + _CRC.size
        if len(raw) < size:
            raise errors.Corrupt(f"{where}: truncated header ({len(raw)} bytes)")
        body = raw[: _HEADER.size]
        (crc,) = _CRC.unpack_from(raw, _HEADER.size)
        magic, version, flags, gran, reason, disk_size, gen, created, boot = _HEADER.unpack(body)
        if magic != MAGIC:
            raise errors.Corrupt(f"{where}: not a dirtydiff bitmap (bad magic)")
        if version != FORMAT_VERSION:
            raise errors.Corrupt(f"{where}: unsupported format version {version}")
        if zlib.crc32(body) != crc:
            raise errors.Corrupt(f"{where}: header checksum mismatch")
        if flags & ~int(KNOWN_FLAGS):
            raise errors.Corrupt(f"{where}: unknown flags {flags:#x}")
        try:
            check_granularity(gran)
            why = Reason(reason)
        except (errors.BadRequest, ValueError) as e:
            raise errors.Corrupt(f"{where}: bad header field ({e})") from None
        return cls(Flag(flags), gran, disk_size, gen, created, boot, why, _backup(raw, where))


def check_backup_reference(backup: str) -> None:
    if len(backup.encode()) > MAX_BACKUP_REFERENCE or "\0" in backup:
        raise errors.BadRequest(
            "bad-backup", f"a backup reference is at most {MAX_BACKUP_REFERENCE} bytes, no NUL"
        )


def _backup(raw: bytes, where: str) -> str:
    """The backup reference of a whole header; "" for a header read short."""
    if len(raw) < _BACKUP_AT + _BACKUP.size:
        return ""
    length, crc = _BACKUP.unpack_from(raw, _BACKUP_AT)
    start = _BACKUP_AT + _BACKUP.size
    body = raw[start : start + length]
    if length > MAX_BACKUP_REFERENCE or len(body) != length or zlib.crc32(body) != crc:
        raise errors.Corrupt(f"{where}: backup reference checksum mismatch")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise errors.Corrupt(f"{where}: backup reference is not UTF-8") from None


class BitmapFile:
    """One bitmap file, open and memory-mapped.

    ``writable=False`` maps it read-only (a reader in another process).
    """

    def __init__(self, path: Path, *, writable: bool) -> None:
        self.path = path
        self.writable = writable
        try:
            self._fd = open_file(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise errors.NotFound("unknown-bitmap", f"no bitmap file {path}") from None
        try:
            self.header = Header.unpack(os.pread(self._fd, HEADER_SIZE, 0), str(path))
            self.granularity = self.header.granularity
            self.shift = self.granularity.bit_length() - 1
            self.granules = granule_count(self.header.disk_size, self.granularity)
            length = bits_length(self.header.disk_size, self.granularity)
            st = os.fstat(self._fd)
            self.inode = st.st_ino  # which file this is, whatever name it has now
            actual = st.st_size
            if actual != HEADER_SIZE + length:
                raise errors.Corrupt(
                    f"{path}: file is {actual} bytes, header says {HEADER_SIZE + length}"
                )
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self.bits = mmap.mmap(self._fd, length, mmap.MAP_SHARED, prot, offset=HEADER_SIZE)
        except BaseException:
            os.close(self._fd)
            raise
        # A reader may drop a file without close() (the export lets every
        # connection that still reads a replaced file finish with it): the
        # descriptor goes with the object. While it is open, the inode cannot
        # be reused, so an inode number names this file and no other.
        self._closer = weakref.finalize(self, os.close, self._fd)

    # -- creation --------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        granularity: int,
        disk_size: int,
        flags: Flag,
        generation: int = 0,
        backup: str = "",
        reason: Reason = Reason.NONE,
        replace: bool = False,
    ) -> BitmapFile:
        """Create a new, all-clean bitmap file durably, then open it writable.

        Written under a temporary name and renamed, so that a crash never
        leaves a half-made file under a bitmap's name. A ``reason`` makes it
        inconsistent from its first byte (a scan or an import will fill it):
        no moment exists at which it is under its name, empty and consistent.
        ``replace``: the name may be taken, and the new file takes it over
        in one rename (``clear``).
        """
        check_granularity(granularity)
        check_backup_reference(backup)
        if reason is not Reason.NONE:
            flags |= Flag.INCONSISTENT
        header = Header(
            reason=reason,
            flags=flags,
            granularity=granularity,
            disk_size=disk_size,
            generation=generation,
            created_ns=time.time_ns(),
            boot_id=current_boot_id() if flags & Flag.IN_USE else bytes(16),
            backup=backup,
        )
        tmp = path.with_name(f".{path.name}.new")
        try:
            # O_EXCL after removing what had the name: a planted symlink is
            # never written through, and a leftover never held a bit.
            fd = create_temporary(tmp)
            try:
                area = header.pack().ljust(_BACKUP_AT, b"\0") + header.pack_backup()
                os.pwrite(fd, area.ljust(HEADER_SIZE, b"\0"), 0)
                # Reserve every block now: a store into a hole of a mapped file
                # on a full filesystem is a SIGBUS in the middle of a VM's
                # write. Better a clear ENOSPC here, when the bitmap is made.
                os.posix_fallocate(fd, 0, HEADER_SIZE + bits_length(disk_size, granularity))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise errors.StorageError(
                "state-dir-full" if e.errno == errno.ENOSPC else "state-dir-error",
                f"cannot create bitmap {path}: {e.strerror}",
            ) from None
        if os.path.lexists(path) and not replace:
            tmp.unlink()
            raise errors.Conflict("name-in-use", f"bitmap file {path} already exists")
        os.rename(tmp, path)
        fsync_dir(path.parent)
        return cls(path, writable=True)

    # -- header ----------------------------------------------------------

    def write_header(self, *, durable: bool = True) -> None:
        """Write the in-memory header to the file (one 68-byte pwrite)."""
        os.pwrite(self._fd, self.header.pack(), 0)
        if durable:
            os.fsync(self._fd)

    def set_backup(self, backup: str) -> None:
        """Record another backup reference (a rebuild against the backup its
        caller names). Its area has a checksum of its own: a write torn by a
        crash reads as a corrupt bitmap, never as one counting from a mix."""
        check_backup_reference(backup)
        self.header.backup = backup
        os.pwrite(self._fd, self.header.pack_backup(), _BACKUP_AT)
        os.fsync(self._fd)

    def reload_header(self) -> Header:
        self.header = Header.unpack(os.pread(self._fd, HEADER_SIZE, 0), str(self.path))
        return self.header

    def begin_recording(self) -> None:
        """Set IN_USE for this boot, durably, before any write it covers."""
        self.header.flags |= Flag.IN_USE
        self.header.boot_id = current_boot_id()
        self.write_header()

    def end_recording(self) -> None:
        """Make the bits durable, then clear IN_USE (in that order)."""
        self.bits.flush()
        os.fsync(self._fd)
        self.header.flags &= ~Flag.IN_USE
        self.write_header()

    def mark_inconsistent(self, reason: Reason) -> None:
        self.header.flags |= Flag.INCONSISTENT
        self.header.reason = reason
        self.write_header()

    @property
    def consistent(self) -> bool:
        return inconsistency(self.header) is Reason.NONE

    # -- bits ------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Set the bit of every granule that ``[offset, offset+length)`` touches.

        This is the tracker's hot path: one branch for the common case of a
        request inside one granule, slice assignment for whole bytes.
        """
        if length <= 0:
            return
        first = offset >> self.shift
        last = (offset + length - 1) >> self.shift
        if last >= self.granules:
            last = self.granules - 1
            if first > last:
                return
        bits = self.bits
        if first == last:
            i = first >> 3
            bit = 1 << (first & 7)
            byte = bits[i]
            if not byte & bit:
                bits[i] = byte | bit
            return
        set_bit_range(bits, first, last + 1)

    def clear(self) -> None:
        self.bits[:] = bytes(len(self.bits))

    def merge_from(self, other: BitmapFile) -> None:
        """OR ``other`` into this bitmap (same geometry)."""
        if (other.granularity, other.header.disk_size) != (
            self.granularity,
            self.header.disk_size,
        ):
            raise errors.BadRequest(
                "geometry-mismatch",
                f"cannot merge {other.path.name} (granularity {other.granularity}, disk "
                f"{other.header.disk_size}) into {self.path.name} (granularity "
                f"{self.granularity}, disk {self.header.disk_size})",
            )
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits[:] = merged.to_bytes(len(self.bits), "little")

    def dirty_granules(self) -> int:
        return int.from_bytes(self.bits, "little").bit_count()

    def close(self) -> None:
        if self._fd < 0:
            return
        self.bits.close()
        self._closer()
        self._fd = -1

    def __enter__(self) -> BitmapFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_bit_range(bits: mmap.mmap | bytearray, start: int, stop: int) -> None:
    """Set bits ``[start, stop)`` (LSB first in each byte)."""
    if start >= stop:
        # An empty range: the head/tail masks below assume at least one bit.
        return
    first_byte, last_byte = start >> 3, (stop - 1) >> 3
    head = (0xFF << (start & 7)) & 0xFF
    tail = 0xFF >> (7 - ((stop - 1) & 7))
    if first_byte == last_byte:
        bits[first_byte] |= head & tail
        return
    bits[first_byte] |= head
    if last_byte > first_byte + 1:
        bits[first_byte + 1 : last_byte] = b"\xff" * (last_byte - first_byte - 1)
    bits[last_byte] |= tail


def inconsistency(header: Header, boot_id: bytes | None = None) -> Reason:
    """Why a bitmap with this header may be missing bits (NONE if it is not)."""
    if header.flags & Flag.INCONSISTENT:
        return header.reason if header.reason is not Reason.NONE else Reason.HOST_CRASH
    this_boot = boot_id if boot_id is not None else current_boot_id()
    if header.flags & Flag.IN_USE and header.boot_id != this_boot:
        return Reason.HOST_CRASH
    return Reason.NONE


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

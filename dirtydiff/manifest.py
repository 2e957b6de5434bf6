"""The digest manifest of a backup: one digest per granule, to scan against.

Design note
-----------
A manifest stands in for a backup in a one-sided scan: the scan reads the
disk only, hashes each granule and marks the granules whose digest is not
the manifest's. It is made once, where the backup is (``dirtydiff digest``),
or by a two-sided scan as it reads the backup (``--write-manifest``).

Layout, format version 1, every integer big-endian::

    offset size field
    0      8    magic b"DDMANIFS"
    8      4    format version (1)
    12     4    header length H: 64 + L, the offset of the zero flags
    16     8    size of the disk it describes, in bytes
    24     8    granularity G in bytes (power of two, 4 KiB .. 64 MiB)
    32     8    created, ns since the epoch
    40     1    digest length D in bytes (16 .. 32)
    41     15   hash algorithm, ASCII, NUL padded: "blake3"
    56     4    length L of the source (at most 4096)
    60     4    zero
    64     L    source, UTF-8: the backup (URI or file) the digests are of
    H      F    zero flags: bit i set means granule i reads as zeroes; least
                significant bit first in each byte, F = ceil(N / 8) with
                N = ceil(size / G); bits past the last granule are 0
    H+F    M*D  digests of the M granules not flagged zero, in granule order:
                BLAKE3 of the granule's bytes (the last one maybe shorter),
                its first D bytes. A zero granule has none, so that a huge
                empty disk makes a small manifest: its size follows the data.
    end-32 32   BLAKE3 of every byte before it

What a digest means. Two granules with the same digest are taken to be equal.
A collision (different bytes, same digest) would hide a change: for a D-byte
digest the chance is 2**-(8*D) per changed granule (2**-128 at D = 16).

Trust. A manifest is an outside input. ``parse`` refuses anything that is not
exactly this layout: a wrong magic, version, algorithm or length, a checksum
that does not match, a flag past the last granule. Whether it describes
*this* disk (size, granularity) is the scan's to check (``check_matches``).

``parse`` does no I/O: it reads a buffer (bytes, or a file's mmap).
``ManifestWriter`` fills ``TARGET.partial`` through a shared mapping, in any
order, with a slot for every granule's digest (a sparse file); ``commit``
writes the manifest itself, without the zero granules' slots, to a temporary
file and renames it into place only when complete and durable, so a manifest
under its name is always whole.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import blake3

from dirtydiff import errors
from dirtydiff.bitmapfile import check_granularity

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"DDMANIFS"
VERSION = 1
ALGORITHM = "blake3"
DEFAULT_DIGEST = 16  # 128 bits: the collision bound in the design note
MIN_DIGEST, MAX_DIGEST = 16, 32
CHECKSUM = 32
MAX_SOURCE = 4096
COMPACT_STEP = 1 << 20  # granules a commit copies at a time
# C: magic, version, header length, size, granularity, created, digest length,
# algorithm, source length, reserved
# What a manifest is parsed from: bytes, or a file's mapping.
Buffer: TypeAlias = bytes | bytearray | memoryview | mmap.mmap
HEADER = struct.Struct(">8sIIQQQB15sII")
assert HEADER.size == 64


def granule_count(size: int, granularity: int) -> int:
    return -(-size // granularity)


def digest_of(data: Buffer, digest: int = DEFAULT_DIGEST) -> bytes:
    """One granule's digest, as the manifest holds it."""
    return blake3.blake3(data).digest(digest)


def granule_digests(
    data: bytes | bytearray,
    granularity: int,
    digest: int = DEFAULT_DIGEST,
    start: int = 0,
    end: int | None = None,
) -> tuple[list[bool], bytes]:
    """Each granule of ``data[start:end]`` (``start`` on a granule, the last
    one maybe shorter): whether it reads as zeroes, and the digests joined,
    D zero bytes for a zero granule."""
    end = len(data) if end is None else end
    view = memoryview(data)
    zero = memoryview(bytes(granularity))
    nothing = bytes(digest)
    flags: list[bool] = []
    parts: list[bytes] = []
    for o in range(start, end, granularity):
        n = min(granularity, end - o)
        # startswith is a memcmp in place: comparing memoryview slices is a
        # hundred times slower.
        if data.startswith(zero[:n], o):
            flags.append(True)
            parts.append(nothing)
        else:
            flags.append(False)
            parts.append(blake3.blake3(view[o : o + n]).digest(digest))
    return flags, b"".join(parts)


@dataclass(frozen=True)
class ManifestHeader:
    size: int
    granularity: int
    created_ns: int
    digest: int
    algorithm: str
    source: str

    @property
    def granules(self) -> int:
        return granule_count(self.size, self.granularity)

    @property
    def length(self) -> int:
        """The header's length: where the zero flags start."""
        return HEADER.size + len(self.source.encode())

    @property
    def flags_length(self) -> int:
        return -(-self.granules // 8)

    def file_length(self, data_granules: int) -> int:
        """The manifest's length when ``data_granules`` granules are not zero."""
        return self.length + self.flags_length + data_granules * self.digest + CHECKSUM

    @property
    def slots_length(self) -> int:
        """The writer's partial file: a digest slot for every granule."""
        return self.length + self.flags_length + self.granules * self.digest

    def pack(self) -> bytes:
        source = self.source.encode()
        return (
            HEADER.pack(
                MAGIC,
                VERSION,
                HEADER.size + len(source),
                self.size,
                self.granularity,
                self.created_ns,
                self.digest,
                self.algorithm.encode(),
                len(source),
                0,
            )
            + source
        )


def _corrupt(why: str) -> errors.Corrupt:
    return errors.Corrupt("manifest-corrupt", f"not a valid manifest: {why}")


def parse_header(buf: Buffer) -> ManifestHeader:
    """The header of a manifest in ``buf``; Corrupt if it is not one."""
    view = memoryview(buf).cast("B")
    if len(view) < HEADER.size:
        raise _corrupt(f"{len(view)} bytes, shorter than its header")
    magic, version, length, size, granularity, created, digest, algorithm, n, reserved = (
        HEADER.unpack_from(view)
    )
    if magic != MAGIC:
        raise _corrupt("wrong magic (not a dirtydiff manifest)")
    if version != VERSION:
        raise _corrupt(f"format version {version}, this dirtydiff reads {VERSION}")
    name = algorithm.rstrip(b"\0")
    if name != ALGORITHM.encode():
        raise _corrupt(f"hash algorithm {name[:15]!r}, this dirtydiff knows {ALGORITHM}")
    if not MIN_DIGEST <= digest <= MAX_DIGEST:
        raise _corrupt(f"digest length {digest}, not {MIN_DIGEST} to {MAX_DIGEST}")
    if n > MAX_SOURCE or length != HEADER.size + n or reserved:
        raise _corrupt("bad header length")
    try:
        check_granularity(granularity)
    except errors.BadRequest as e:
        raise _corrupt(e.message) from None
    if len(view) < length:
        raise _corrupt("truncated in its header")
    try:
        source = bytes(view[HEADER.size : length]).decode()
    except UnicodeDecodeError:
        raise _corrupt("its source is not UTF-8") from None
    return ManifestHeader(size, granularity, created, digest, ALGORITHM, source)


# Granules per entry of a manifest's rank table.
RANK_BLOCK = 4096
# numpy is imported by the paths that need arrays only (a changed chunk, a
# window of mixed holes, a commit): the common ones, and a two-sided scan,
# pay none of its start-up.


class Manifest:
    """A parsed manifest: its header, the zero flags and the digests of the
    other granules (views into the buffer it was parsed from)."""

    def __init__(self, header: ManifestHeader, flags: memoryview, digests: memoryview) -> None:
        self.header = header
        self.flags = flags
        self.digests = digests
        self.size = header.size
        self.granularity = header.granularity
        self.digest = header.digest
        # ranks[i]: data granules before granule i * RANK_BLOCK (where the
        # digests of a range start), so that a lookup unpacks one block only.
        per_block = RANK_BLOCK // 8
        self._ranks = [0]
        zeros = 0
        for block, at in enumerate(range(0, len(flags), per_block), 1):
            zeros += _popcount(flags[at : at + per_block])
            self._ranks.append(block * RANK_BLOCK - zeros)

    @property
    def granules(self) -> int:
        return self.header.granules

    def zero_flags(self, first: int, count: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Whether each of granules [first, first + count) is flagged zero."""
        import numpy as np  # noqa: PLC0415

        count = max(0, min(count, self.granules - first))
        packed = np.frombuffer(
            self.flags, np.uint8, -(-(first + count) // 8) - first // 8, first // 8
        )
        bits = np.unpackbits(packed, bitorder="little")
        return bits[first % 8 : first % 8 + count].astype(bool)

    def zero_bits(self, first: int, count: int) -> int:
        """The zero flags of granules [first, first + count) as an integer,
        granule ``first`` its least significant bit."""
        count = max(0, min(count, self.granules - first))
        if count == 0:
            return 0
        packed = self.flags[first // 8 : -(-(first + count) // 8)]
        return (int.from_bytes(packed, "little") >> first % 8) & ((1 << count) - 1)

    def zero_count(self, first: int, count: int) -> int:
        """How many of granules [first, first + count) are flagged zero."""
        return self.zero_bits(first, count).bit_count()

    def rank(self, granule: int) -> int:
        """How many granules before ``granule`` have a digest."""
        block = granule // RANK_BLOCK
        start = block * RANK_BLOCK
        return self._ranks[block] + (granule - start) - self.zero_count(start, granule - start)

    def digest_rows(
        self, first: int, count: int
    ) -> tuple[np.ndarray[Any, np.dtype[np.bool_]], np.ndarray[Any, np.dtype[np.uint8]]]:
        """Granules [first, first + count): their zero flags, and one row of
        D bytes each, the digest (zeroes for a zero granule)."""
        import numpy as np  # noqa: PLC0415

        zero = self.zero_flags(first, count)
        d = self.digest
        rows = np.zeros((len(zero), d), np.uint8)
        at = self.rank(first)
        n = int((~zero).sum())
        rows[~zero] = np.frombuffer(self.digests, np.uint8, n * d, at * d).reshape(n, d)
        return zero, rows

    def is_zero(self, granule: int) -> bool:
        return bool(self.flags[granule >> 3] >> (granule & 7) & 1)

    def digest_at(self, granule: int) -> bytes:
        """A granule's digest; D zero bytes for a zero granule."""
        found: bytes = self.digest_rows(granule, 1)[1][0].tobytes()
        return found


def _popcount(flags: Buffer) -> int:
    """How many granules packed ``flags`` flag zero."""
    return int.from_bytes(flags, "little").bit_count()


def parse(buf: Buffer) -> tuple[Manifest, bytes]:
    """The manifest in ``buf`` and its checksum; Corrupt unless it is whole
    and exactly the layout of the design note."""
    view = memoryview(buf).cast("B")
    header = parse_header(view)
    start = header.length
    if len(view) < start + header.flags_length + CHECKSUM:
        raise _corrupt(f"{len(view)} bytes: truncated in its zero flags")
    flags = view[start : start + header.flags_length]
    tail = header.granules % 8
    if tail and flags[-1] >> tail:
        raise _corrupt("a zero flag past the last granule")
    data = header.granules - _popcount(flags)
    expected = header.file_length(data)
    if len(view) != expected:
        raise _corrupt(
            f"{len(view)} bytes where its header and flags make {expected}: "
            + ("truncated" if len(view) < expected else "trailing bytes")
        )
    checksum = bytes(view[-CHECKSUM:])
    if blake3.blake3(view[:-CHECKSUM], max_threads=blake3.blake3.AUTO).digest() != checksum:
        raise _corrupt("its checksum does not match its contents")
    digests = view[start + header.flags_length : -CHECKSUM]
    return Manifest(header, flags, digests), checksum


def check_matches(manifest: ManifestHeader, size: int, granularity: int, what: str) -> None:
    """Refuse a manifest made for another disk, or too coarse for a bitmap
    of ``granularity`` (a bitmap's granule must be whole manifest granules)."""
    if manifest.size != size:
        raise errors.Conflict(
            "manifest-size",
            f"the manifest {what} describes {manifest.size} bytes but the disk has {size} "
            "bytes: a manifest of another disk, or the disk was resized",
        )
    if granularity % manifest.granularity:
        raise errors.Conflict(
            "manifest-granularity",
            f"the manifest {what} has granules of {manifest.granularity} bytes: a bitmap of "
            f"{granularity}-byte granules needs a manifest as fine or finer (a divisor)",
        )


@contextlib.contextmanager
def open_manifest(path: str | os.PathLike[str]) -> Iterator[tuple[Manifest, bytes]]:
    """The manifest at ``path``, mapped, and its checksum; a one-line error if
    it cannot be read or is not whole."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.NotFound("manifest-unreadable", f"the manifest {path}: {e.strerror}") from None
    try:
        length = os.fstat(fd).st_size
        if length == 0:
            raise _corrupt(f"{path} is empty")
        mapped = mmap.mmap(fd, length, prot=mmap.PROT_READ)
        try:
            found = parse(mapped)
        except errors.Corrupt as e:
            raise errors.Corrupt(e.code, f"{path}: {e.message}") from None
        try:
            yield found
        finally:
            # Views into the mapping may outlive this (an error's traceback
            # holds them): the mapping then goes with the last of them.
            del found
            with contextlib.suppress(BufferError):
                mapped.close()
    finally:
        os.close(fd)


class ManifestWriter:
    """Fill a manifest granule by granule, in any order, then ``commit``.

    The digests go to ``TARGET.partial`` through a shared mapping (the page
    cache keeps them across a kill of this process); ``commit`` writes the
    checksum, makes the file durable and renames it over TARGET. ``reopen``
    goes on with a partial file of the same header (a resumed scan)."""

    def __init__(self, target: str | os.PathLike[str], header: ManifestHeader, fd: int) -> None:
        self.target = Path(target)
        self.partial = partial_path(self.target)
        self.header = header
        self.reopened = False  # went on with a partial file (``create(reopen=True)``)
        self._fd = fd
        self._map = mmap.mmap(fd, header.slots_length)
        self._flags_at = header.length
        self._digests_at = header.length + header.flags_length

    @classmethod
    def create(
        cls,
        target: str | os.PathLike[str],
        size: int,
        granularity: int,
        source: str,
        *,
        digest: int = DEFAULT_DIGEST,
        reopen: bool = False,
    ) -> ManifestWriter:
        check_granularity(granularity)
        if len(source.encode()) > MAX_SOURCE:
            source = source.encode()[:MAX_SOURCE].decode(errors="ignore")
        header = ManifestHeader(size, granularity, time.time_ns(), digest, ALGORITHM, source)
        partial = partial_path(Path(target))
        if reopen:
            fd = _open_partial(partial, header)
            if fd is not None:
                writer = cls(target, _read_partial_header(fd), fd)
                writer.reopened = True
                return writer
        try:
            fd = os.open(
                partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
            )
            os.ftruncate(fd, header.slots_length)  # sparse: zero granules cost nothing
            os.pwrite(fd, header.pack(), 0)
        except OSError as e:
            raise errors.StorageError(
                "manifest-write", f"the manifest {partial}: {e.strerror}"
            ) from None
        return cls(target, header, fd)

    def record(self, first: int, flags: list[bool], digests: bytes) -> None:
        """The flags and digests of granules ``first``, ``first + 1``, ..."""
        d = self.header.digest
        at = self._digests_at + first * d
        self._map[at : at + len(digests)] = digests
        for i, zero in enumerate(flags):
            self._set_flag(first + i, zero)

    def record_zero(self, start: int, end: int) -> None:
        """Granules [start, end) read as zeroes (their slots are left as
        they are: ``commit`` leaves out the slots of zero granules)."""
        g = start
        while g < end and g & 7:
            self._set_flag(g, True)
            g += 1
        whole = (end - g) // 8
        if whole:
            at = self._flags_at + g // 8
            self._map[at : at + whole] = b"\xff" * whole
            g += whole * 8
        while g < end:
            self._set_flag(g, True)
            g += 1

    def _set_flag(self, granule: int, zero: bool) -> None:
        at = self._flags_at + (granule >> 3)
        bit = 1 << (granule & 7)
        byte = self._map[at]
        self._map[at] = (byte | bit) if zero else (byte & ~bit)

    def commit(self) -> bytes:
        """Write the manifest (the digests of the granules not flagged zero,
        then the checksum) beside the target, fsync it, rename it into
        place, and forget the partial file; the checksum."""
        temporary = self.target.with_name(self.target.name + ".tmp")
        hasher = blake3.blake3()
        try:
            fd = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )  # fmt: skip
            try:
                head = bytes(self._map[: self._digests_at])
                _write_all(fd, head)
                hasher.update(head)
                for rows in self._data_digests():
                    _write_all(fd, rows)
                    hasher.update(rows)
                checksum = hasher.digest()
                _write_all(fd, checksum)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, self.target)
            directory = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as e:
            temporary.unlink(missing_ok=True)
            raise errors.StorageError(
                "manifest-write", f"the manifest {self.target}: {e.strerror}"
            ) from None
        self.discard()
        return checksum

    def _data_digests(self) -> Iterator[bytes]:
        """The slots of the granules not flagged zero, in order, a part at a time."""
        import numpy as np  # noqa: PLC0415

        header = self.header
        d, n = header.digest, header.granules
        view = memoryview(self._map)
        flags = np.frombuffer(view, np.uint8, header.flags_length, self._flags_at)
        slots = np.frombuffer(view, np.uint8, n * d, self._digests_at).reshape(n, d)
        try:
            for first in range(0, n, COMPACT_STEP):
                count = min(COMPACT_STEP, n - first)
                packed = flags[first // 8 : -(-(first + count) // 8)]
                bits = np.unpackbits(packed, bitorder="little")[:count]
                data = np.flatnonzero(bits == 0) + first
                if data.size:
                    yield slots[data].tobytes()
        finally:
            del flags, slots  # no export of the mapping may outlive this
            view.release()

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        self.partial.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _read_partial_header(fd: int) -> ManifestHeader:
    head = os.pread(fd, HEADER.size + MAX_SOURCE, 0)
    return parse_header(head)


def _open_partial(partial: Path, wanted: ManifestHeader) -> int | None:
    """The partial file of a manifest being written, if it is of the same
    disk, granularity, digest and source (else it is made again)."""
    try:
        fd = os.open(partial, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        found = _read_partial_header(fd)
        same = (found.size, found.granularity, found.digest, found.source) == (
            wanted.size, wanted.granularity, wanted.digest, wanted.source,
        )  # fmt: skip
        if same and os.fstat(fd).st_size == found.slots_length:
            return fd
    except errors.Corrupt:
        pass
    os.close(fd)
    return None

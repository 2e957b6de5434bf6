"""What an export serves, and its block-status contexts.

``Export`` is one export name: a disk, and the bitmaps of a state directory
it offers (its bitmap policy: consistent ones only, of the disk's size,
filtered by ``--bitmap``). A client that selects ``qemu:dirty-bitmap:NAME``
binds the file that holds NAME at that moment (its inode and created time,
``BitmapStatus``) and is served from that file only; ``base:allocation``
asks the disk (``AllocationStatus``).

A snapshot's export (``snapshot``: the checkpoint's name) offers only its
own frozen bitmap, and calls the whole disk data (``AllDataStatus``): the
tracker's snapshot view has no allocation to ask, and "data" where unsure is
allowed, never "zero" where the snapshot had data.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dirtydiff import errors
from dirtydiff import nbdproto as proto
from dirtydiff.bitmapfile import BitmapFile, Reason, inconsistency
from dirtydiff.disk import Backend, FileBackend, NbdBackend, file_extents
from dirtydiff.disk import Connection as DiskConnection
from dirtydiff.extents import extent_arrays
from dirtydiff.extents import extents as bitmap_extents
from dirtydiff.nbdproto import Errno, RequestError
from dirtydiff.state import StateDir
from sidecar.export.aioupstream import AioSnapshotPool
from sidecar.export.upstream import UpstreamPool

log = logging.getLogger(__name__)


@dataclass
class Export:
    """What one export name serves: a disk and the bitmaps of a state dir."""

    name: str
    backend: Backend
    state: StateDir | None = None
    bitmap_filter: frozenset[str] | None = None  # --bitmap: only these
    description: str = ""
    sendfile_path: Path | None = None  # a local file: reads use sendfile(2)
    # A snapshot's export: the checkpoint NAME it serves the disk as at
    # (read and trimmed through the tracker's @snapshot:NAME), and the check
    # each new tracker connection must pass (see sidecar.export.aioupstream).
    snapshot: str | None = None
    verify: Callable[[], None] | None = field(default=None, repr=False)
    _open_bitmaps: weakref.WeakValueDictionary[str, BitmapFile] = field(
        default_factory=weakref.WeakValueDictionary
    )
    # An NBD disk's connections, shared by every client (upstream.py);
    # a local file's one descriptor needs none.
    upstream: UpstreamPool | None = field(init=False, default=None)
    # A snapshot's: its connections to the tracker's @snapshot:NAME.
    snapshot_pool: AioSnapshotPool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.snapshot is not None:
            self.bitmap_filter = frozenset({self.snapshot})  # its own bitmap, no other
            assert isinstance(self.backend, NbdBackend)  # the tracker's @snapshot:NAME
            self.snapshot_pool = AioSnapshotPool(self.backend.uri, self.verify)
        elif not isinstance(self.backend, FileBackend):
            self.upstream = UpstreamPool(self.backend)

    @property
    def size(self) -> int:
        return self.backend.size

    def bitmap_names(self) -> list[str]:
        """Bitmaps this export offers: consistent ones, filtered, sorted."""
        if self.state is None:
            return []
        names = []
        for name in self.state.user_names():
            if self.bitmap_filter is not None and name not in self.bitmap_filter:
                continue
            try:
                header = self.state.read_header(name)
            except Exception as e:  # a corrupt or vanished file: not offered
                log.warning("bitmap %s not exported: %s", name, e)
                continue
            if header.disk_size != self.size:
                log.warning("bitmap %s not exported: it describes another disk size", name)
                continue
            why = inconsistency(header)
            if why is not Reason.NONE:
                log.warning("bitmap %s not exported: inconsistent (%s)", name, why.describe())
                continue
            names.append(name)
        return sorted(names)

    def contexts(self) -> list[str]:
        return [proto.BASE_ALLOCATION] + [
            proto.DIRTY_BITMAP_PREFIX + n for n in self.bitmap_names()
        ]

    def bitmap(self, name: str) -> tuple[int, BitmapFile]:
        """The file now named ``name`` (its inode, and it mapped read-only),
        shared by the connections that chose it; opened anew when the name
        holds another file. A file no connection holds any more is closed
        and unmapped (a removed bitmap's space is freed)."""
        assert self.state is not None
        path = self.state.bitmap_path(name)
        cached = self._open_bitmaps.get(name)
        if cached is not None and cached.inode == os.stat(path).st_ino:
            return cached.inode, cached
        bitmap = BitmapFile(path, writable=False)
        self._open_bitmaps[name] = bitmap
        return bitmap.inode, bitmap


class Status(Protocol):
    """Block status of one selected context on one connection."""

    # Whether descriptors() may block on I/O (then it runs in a thread); the
    # bitmap's is memory-only and quick, and a thread hop would cost more.
    blocking: bool

    def descriptors(self, count: int, offset: int, one: bool) -> bytes:
        """The BLOCK_STATUS descriptors (32-bit length, 32-bit flags,
        big-endian) covering exactly [offset, offset+count); with ``one``
        (REQ_ONE), the first only."""
        ...


@dataclass
class Context:
    """A meta context selected by SET_META_CONTEXT: qemu-nbd's id, its name,
    and for a bitmap the file it bound then."""

    id: int
    name: str
    bitmap: BitmapStatus | None = None  # None: base:allocation
    all_data: bool = False  # base:allocation of a snapshot: all data

    def status(self, disk: DiskConnection, file_fd: int, size: int) -> Status:
        """Its block status once the connection has its disk (``file_fd``:
        the disk's fd when it is a local file, else -1)."""
        if self.bitmap is not None:
            return self.bitmap
        if self.all_data:
            return AllDataStatus()
        return AllocationStatus(disk, file_fd, size)


def select(export: Export, number: int, name: str) -> Context:
    """The context ``name`` of ``export``, with id ``number``; a bitmap's
    file is bound now (OSError or DirtydiffError if it just went)."""
    if name == proto.BASE_ALLOCATION:
        return Context(number, name, all_data=export.snapshot is not None)
    return Context(number, name, BitmapStatus(export, name[len(proto.DIRTY_BITMAP_PREFIX) :]))


# The most extents a local file's allocation answer finds inline (see
# AllocationStatus): a few hundred microseconds of lseeks at the most.
INLINE_EXTENTS = 1024


class AllocationStatus:
    """base:allocation block status: the disk's extents, clipped to the request."""

    def __init__(self, disk: DiskConnection, file_fd: int, size: int) -> None:
        self._disk = disk
        self._fd = file_fd
        self._size = size
        # An upstream's answer is a round trip, for which a thread waits. A
        # local file's is SEEK_DATA/SEEK_HOLE, answered from the file
        # system's extent tree: asked inline, as qemu's file-posix driver
        # asks in its coroutine, since a thread hop costs more than the
        # lseeks. So that a fragmented file holds the event loop no longer
        # than a few lseeks, an inline answer stops after INLINE_EXTENTS and
        # covers less than asked, as the NBD spec lets a server do.
        self.blocking = file_fd < 0

    def descriptors(self, count: int, offset: int, one: bool) -> bytes:
        if self.blocking:
            found = self._disk.extents(count, offset)
        else:
            found = file_extents(self._fd, self._size, count, offset, limit=INLINE_EXTENTS)
            if len(found) == INLINE_EXTENTS:
                last_offset, last_length, _ = found[-1]
                count = min(count, last_offset + last_length - offset)
        clipped = proto.clip_extents(found, offset, count, one=one)
        return b"".join(proto.EXTENT.pack(length, flags) for length, flags in clipped)


class AllDataStatus:
    """base:allocation of a snapshot: one data extent over the request."""

    blocking = False

    def descriptors(self, count: int, offset: int, one: bool) -> bytes:
        return proto.EXTENT.pack(count, 0)


def _pack(lengths: Any, flags: Any) -> bytes:
    """Descriptors for many extents at once, packed by numpy."""
    out = np.empty((len(lengths), 2), dtype=">u4")
    out[:, 0] = lengths
    out[:, 1] = flags
    return out.tobytes()


class BitmapStatus:
    """qemu:dirty-bitmap:NAME block status on one connection.

    Clients walk the disk one request after another, each sent once the
    previous reply is in (nbdinfo --map, virtnbdbackup, ovirt-imageio), so
    the time of every answer adds up; and numpy's time goes mostly by call,
    not by byte, more so in the server between other work than in a loop.
    So a request that continues a walk is answered by one extent_arrays
    call over it and the next AHEAD - 1 requests of the same length::

        walk:     [request n][n + 1    ][n + 2    ] ... [n + AHEAD - 1]
        computed: [one extent_arrays call over all of them             ]
        kept:                [answer   ][answer   ] ... [answer       ]

    Each answer kept keeps the bitmap bytes it was computed from, and is
    used only for exactly its request and only while those bytes are
    unchanged: then it is the answer computing it at that moment would give.
    """

    blocking = False
    AHEAD = 8
    # Bitmap bytes one computation may cover: numpy's temporaries stay
    # small, and so do the answers kept: at most 8 * WINDOW extents, 3 MiB of
    # descriptors per connection and bitmap (its replies in flight may hold
    # up to 16 MiB).
    WINDOW = 48 * 1024

    def __init__(self, export: Export, name: str) -> None:
        self._export = export
        self._name = name
        self._bind(*export.bitmap(name))

    def _bind(self, inode: int, bitmap: BitmapFile) -> None:
        self._inode = inode
        self._bitmap = bitmap
        self._created = bitmap.header.created_ns
        self._bits: Any = bitmap.bits
        self._granularity = bitmap.granularity
        self._size = bitmap.header.disk_size
        self._end = 0  # where the last answer ended: a walk goes on from there
        # (offset, count) -> (first bitmap byte, those bitmap bytes, descriptors, covered)
        self._ahead: dict[tuple[int, int], tuple[int, bytes, bytes, int]] = {}

    def _check(self) -> None:
        """The bitmap this connection chose is still the one under its name,
        consistent; else the request fails with EIO.

        The connection never moves on to another file: the file a name
        holds after a checkpoint (``@open``), a clear, or a remove and add
        is another bitmap, and finishing a walk in it would miss what the
        first half found dirty. A rebuild after a crash gives the file
        another created time: another bitmap too. Asked before and after
        each answer is made (see "Incarnations" in dirtydiff.bitmapfile):
        an answer is sent only if its bitmap was consistent throughout. A
        stat and a 4 KiB pread are little next to a request, which covers
        up to 4 GiB.
        """
        name = self._name
        assert self._export.state is not None
        try:
            inode = os.stat(self._export.state.bitmap_path(name)).st_ino
            header = self._bitmap.reload_header()
        except (OSError, errors.DirtydiffError) as e:
            raise RequestError(Errno.EIO, f"bitmap {name!r} is gone: {e}") from None
        if inode != self._inode or header.created_ns != self._created:
            raise RequestError(
                Errno.EIO,
                f"bitmap {name!r} is not the one this connection chose any more "
                "(checkpoint, clear, rebuild, or remove and add); connect again",
            )
        if header.disk_size != self._size:
            raise RequestError(Errno.EIO, f"bitmap {name!r} now describes another disk size")
        why = inconsistency(header)
        if why is not Reason.NONE:
            raise RequestError(Errno.EIO, f"bitmap {name!r} is inconsistent: {why.describe()}")

    def _window(self, offset: int, count: int) -> tuple[int, int]:
        """The bitmap bytes extent_arrays reads for [offset, offset+count)."""
        g = self._granularity
        end = min(self._size, offset + count)
        return (offset // g) >> 3, ((end + g - 1) // g + 7) >> 3

    def descriptors(self, count: int, offset: int, one: bool) -> bytes:
        self._check()
        answer = self._answer(count, offset, one)
        self._check()
        return answer

    def _answer(self, count: int, offset: int, one: bool) -> bytes:
        g, size = self._granularity, self._size
        if one:  # qemu-img map asks one extent at a time: no need to scan far
            first = bitmap_extents(self._bits, g, size, offset, count, max_extents=1)
            return proto.EXTENT.pack(first[0].length, int(first[0].dirty))
        ready = self._ahead.pop((offset, count), None)
        if ready is not None:
            byte0, known, answer, covered = ready
            if bytes(self._bits[byte0 : byte0 + len(known)]) == known:
                self._end = offset + covered
                return answer
        walking = offset == self._end
        self._ahead.clear()
        requests = min(self.AHEAD, self.WINDOW // max(1, count // g >> 3)) if walking else 1
        if requests <= 1:
            lengths, kinds = extent_arrays(self._bits, g, size, offset, count, proto.MAX_EXTENTS)
            capped = len(lengths) == proto.MAX_EXTENTS
            self._end = offset + (int(lengths.sum()) if capped else count)
            return _pack(lengths, kinds)  # STATE_DIRTY is bit 0: the bit itself
        return self._walk(offset, count, requests)

    def _walk(self, offset: int, count: int, requests: int) -> bytes:
        """Answer [offset, offset+count) and keep the answers for the next
        requests of the walk, all from one extent_arrays call."""
        g, size = self._granularity, self._size
        length = min(count * requests, size - offset)
        byte0, byte1 = self._window(offset, length)
        known = bytes(self._bits[byte0:byte1])  # the answers are made from this copy
        shift = byte0 * 8 * g  # extents do not change when whole bytes are cut off
        lengths, kinds = extent_arrays(known, g, size - shift, offset - shift, length)
        packed = _pack(lengths, kinds)  # STATE_DIRTY is bit 0: the bit itself
        bounds = np.empty(len(lengths) + 1, np.int64)  # extent i is [bounds[i], bounds[i+1])
        bounds[0] = offset
        np.cumsum(lengths, out=bounds[1:])
        bounds[1:] += offset
        starts = list(range(offset, offset + length, count))
        stops = [min(start + count, size) for start in starts]
        firsts = np.searchsorted(bounds, starts, "right").tolist()
        lasts = np.searchsorted(bounds, stops, "left").tolist()
        kind0 = int(kinds[0])
        answer = b""
        for start, stop, after_first, last_or_end in zip(starts, stops, firsts, lasts, strict=True):
            first = after_first - 1  # extents first .. last - 1 meet [start, stop)
            last = min(last_or_end, first + proto.MAX_EXTENTS)
            end = min(int(bounds[last]), stop)  # short of stop only when capped
            kind = kind0 ^ (first & 1)  # states alternate, extent after extent
            if last - first == 1:
                descriptors = proto.EXTENT.pack(end - start, kind)
            else:
                descriptors = b"".join((
                    proto.EXTENT.pack(int(bounds[first + 1]) - start, kind),
                    packed[8 * (first + 1) : 8 * (last - 1)],
                    proto.EXTENT.pack(end - int(bounds[last - 1]), kind0 ^ ((last - 1) & 1)),
                ))  # fmt: skip
            if start == offset:
                answer = descriptors
                self._end = end
            else:
                low, high = self._window(start, stop - start)
                self._ahead[start, stop - start] = (
                    low, known[low - byte0 : high - byte0], descriptors, end - start
                )  # fmt: skip
            if end < stop:
                break  # capped: the walk goes on from end, not from stop
        return answer

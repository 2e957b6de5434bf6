"""The diff scan: which granules of the disk differ from a backup.

Both sides are read with libnbd (the disk may also be a local file;
``sidecar.scan.sides`` opens them), in chunks of 512 KiB, at least one in
flight per connection, from one thread that polls every connection of both
sides. ``base:allocation`` on both sides, asked of both at once for a window
of the disk at a time, spares reads: a chunk that reads as zeroes on both
sides is equal without a read, one that is zero on one side is read on the
other only and tested for zeroes, and within a chunk only the data ranges are
read (the zero ones are filled in here). Only a chunk that differs is
compared granule by granule.

The windows follow the map, not the disk's size::

    disk:    [data|---- hole ----------------------------------|data|-- hole --]
    windows: [256M][256M][512M][ 1G ][  2G  ][ 4G - chunk ][...][256M][512M]...

A window whose map came back cheap (few zero ranges on each side: all hole,
or all data) makes the next one twice as long, up to the longest block
status; a fragmented one makes the next one short again, so the map held in
memory stays small and the reads never wait long for it.

The scan reports differing granules through ``on_marks`` (in batches) and
saves its position through ``on_position`` only after the marks before that
position were handed over, so a resumed scan never skips a difference. It
knows nothing of bitmaps, trackers or state directories: ``sidecar.scan.job``
wires it to those.

Where the time goes: the bytes cost a socket copy on each end and a memcmp,
which nothing here can avoid; what this module controls is the cost per
request and per wakeup, on both ends, and how cold the buffers are. So reads
are retired by completion callbacks inside ``aio_notify_read``, the sockets
stay registered in one poll object, reads are at most ``MAX_REQUEST`` long
whatever the chunk size, and few are in flight (docs/performance.md has the
measurements behind each choice).
"""

from __future__ import annotations

import collections
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import nbd

from dirtydiff import errors
from sidecar.nbdclient import Cancelled
from sidecar.scan.pending import HASH_AHEAD, Handed, Hashed
from sidecar.scan.sides import (
    MAX_CONNECTIONS,
    MAX_REQUEST,
    MAX_STATUS,
    FileSide,
    MapRequest,
    NbdSide,
    Side,
    ZeroMap,
    open_side,
)

__all__ = [  # the sides are opened through this module too, as before they had one
    "MAX_CONNECTIONS",
    "MAX_REQUEST",
    "FileSide",
    "NbdSide",
    "Progress",
    "Scan",
    "Side",
    "ZeroMap",
    "differing_granules",
    "file_mtime",
    "open_side",
]

KiB = 1 << 10
MiB = 1 << 20
# The unit compared and saved as position, and the bytes per side in flight:
# DEFAULT_CHUNK x DEFAULT_IN_FLIGHT, or a chunk per connection if more. Little,
# so that what the servers send us is still in the CPU's cache when we
# compare it; 1-2 MiB per side in flight still covers a LAN's latency, and a
# distant backup wants a larger in_flight.
DEFAULT_CHUNK = 512 * KiB
DEFAULT_IN_FLIGHT = 2  # and at least one per connection of a side
# base:allocation is asked for this much of the disk at a time, as the scan
# gets there: memory stays bounded on a huge fragmented disk, and the first
# reads do not wait for the map of the whole disk.
ZERO_WINDOW = 256 * MiB
# A window described in at most this many zero ranges per side was cheap to
# map (all hole, or all data): the next one is twice as long, up to what one
# block status can ask. So a huge sparse disk costs a round trip per 4 GiB,
# not per 256 MiB, and a fragmented one keeps its windows short.
CHEAP_WINDOW = 16
# The most bytes of chunk buffers a chunk per connection may hold in flight
# per side (job.MAX_BUFFERED bounds what --in-flight may ask).
MAX_BUFFERED = 256 * MiB
MARK_BATCH = 4096  # ranges per hand-over
POSITION_EVERY = 1.0  # seconds between saved positions
POLL_TIMEOUT_MS = 1000  # wake up this often anyway, to notice a cancel
# Reads of data between zero ranges start and end on this grid (or the
# server's minimum block size if larger): qcow2's cluster size, and the bound
# on how many distinct pieces a chunk buffer is read in (see Scan._pieces).
READ_GRID = 64 * KiB


@dataclass
class Progress:
    total: int
    position: int = 0  # everything before it is compared and handed over
    compared: int = 0
    read_disk: int = 0  # bytes asked of that side (data ranges only)
    read_backup: int = 0
    differing_granules: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def ratio(self) -> float:
        return 1.0 if self.total == 0 else min(1.0, self.position / self.total)

    @property
    def rate(self) -> float:
        """Bytes compared per second."""
        return self.compared / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.position) / rate if rate > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "total": self.total,
            "position": self.position,
            "compared": self.compared,
            "read_disk": self.read_disk,
            "read_backup": self.read_backup,
            "differing_granules": self.differing_granules,
            "elapsed": self.elapsed,
            "rate": self.rate,
            "eta": self.eta,
            "ratio": self.ratio,
        }


class DigestSide(Side, Protocol):
    """The backup known by its digests alone (a manifest), never read: a chunk
    of the disk (None: zeroes) is compared with it now, or on its thread."""

    def differing(self, start: int, length: int, data: bytearray | None) -> list[int]: ...
    def differing_later(
        self, start: int, length: int, data: bytearray, done: Callable[[Hashed], None]
    ) -> None: ...


class _Chunk:
    """A range compared as one; its buffers are None where that side is zero."""

    __slots__ = ("backup", "compared", "disk", "length", "start", "waiting")

    def __init__(self, start: int, length: int) -> None:
        self.start = start
        self.length = length
        self.disk: bytearray | None = None
        self.backup: bytearray | None = None
        self.waiting = 0  # reads not yet completed
        self.compared = False


class Scan:
    def __init__(
        self,
        disk: NbdSide | FileSide,
        backup: NbdSide | FileSide | DigestSide,
        granularity: int,
        *,
        start: int = 0,
        chunk: int = DEFAULT_CHUNK,
        in_flight: int = DEFAULT_IN_FLIGHT,
        max_rate: float | None = None,
        on_marks: Callable[[list[tuple[int, int]]], None],
        on_position: Callable[[Progress], None] = lambda p: None,
        cancel: threading.Event | None = None,
        on_backup: Callable[[int, int, bytearray | None], None] | None = None,
    ) -> None:
        if disk.size != backup.size:
            raise errors.Conflict(
                "backup-size",
                f"the backup has {backup.size} bytes but the disk has {disk.size} bytes: "
                "a backup of another disk, or the disk was resized",
            )
        self.disk, self.backup = disk, backup
        # One-sided: the backup is a manifest, compared by digest, never read.
        self._digests = None if isinstance(backup, NbdSide | FileSide) else backup
        # Two-sided, told each backup chunk read (--write-manifest).
        self.on_backup = on_backup
        self.size = disk.size
        self.granularity = granularity
        self.chunk = max(granularity, chunk // granularity * granularity)
        self._nbd = [s for s in (disk, backup) if isinstance(s, NbdSide)]
        # At least a chunk per connection, or a connection idles; not more by
        # default: more bytes in flight than that fell out of the CPU's cache
        # before they were compared, and cost more than they overlapped.
        width = max((len(s.connections) for s in self._nbd), default=1)
        self.in_flight = max(1, in_flight, min(width, MAX_BUFFERED // self.chunk))
        self.max_rate = max_rate
        self.on_marks = on_marks
        self.on_position = on_position
        self.cancel = cancel or threading.Event()
        self.progress = Progress(total=self.size, position=start)
        self._next = start - start % self.chunk
        # Chunks in the order they were submitted, until the position passes
        # them; only those not yet compared count against ``in_flight`` and
        # hold buffers.
        self._queue: collections.deque[_Chunk] = collections.deque()
        self._active = 0
        self._ready: list[_Chunk] = []  # read on both sides, not compared yet
        self._marks: list[tuple[int, int]] = []
        # Read buffers, reused: fresh chunk-sized allocations cost page faults.
        self._free: list[bytearray] = []
        # The nbd.Buffer of each piece of each chunk buffer, made once: libnbd
        # 1.14's Python aio_pread never releases the Buffer it is given, so a
        # Buffer per read leaked (and pinned its memory) on every request of
        # a long-lived sidecar. Pieces start and end on READ_GRID, which
        # bounds how many there are.
        self._pieces: dict[int, dict[tuple[int, int], Any]] = {}
        self._connections = [c for s in self._nbd for c in s.connections]
        self._by_fd = {c.fd: c for c in self._connections}
        self._poller = select.poll()
        # One-sided: chunks are hashed on the manifest side's thread meanwhile.
        self._handed = None if self._digests is None else Handed[_Chunk](self._poller)
        self.in_flight += 0 if self._digests is None else HASH_AHEAD
        self._zero_chunk = bytes(self.chunk)
        self._zeroes = memoryview(self._zero_chunk)  # slices without copies
        # The zero ranges of the window being scanned, a whole number of
        # chunks; it grows while the map is cheap (CHEAP_WINDOW) up to the
        # longest block status both sides accept.
        self._first_window = max(1, ZERO_WINDOW // self.chunk) * self.chunk
        longest = min([MAX_STATUS, *(s.max_status for s in self._nbd)])
        self._longest_window = max(self._first_window, longest // self.chunk * self.chunk)
        self._window = self._first_window
        self._disk_zero = self._backup_zero = ZeroMap([])

    # -- the loop ------------------------------------------------------------

    def run(self) -> Progress:
        last_saved = time.monotonic()
        while self._next < self.size or self._queue:
            if self.cancel.is_set():
                self._save()
                raise Cancelled("scan cancelled")
            while self._next < self.size and self._active < self.in_flight:
                self._throttle()
                self._submit()
            if not self._ready:
                self._wait()
            if self._ready:
                ready, self._ready = self._ready, []
                ready.sort(key=lambda c: c.start)  # marks mostly in order: fewer ranges
                for chunk in ready:
                    self._compare(chunk)
            for chunk, differs in self._handed.collect() if self._handed else ():
                self._finish(chunk, differs)
            self._advance()
            if time.monotonic() - last_saved > POSITION_EVERY:
                self._save()
                last_saved = time.monotonic()
        self._save()
        self.progress.finished = time.monotonic()
        return self.progress

    def _throttle(self) -> None:
        if not self.max_rate:
            return
        p = self.progress
        ahead = (p.read_disk + p.read_backup) / self.max_rate - p.elapsed
        if ahead > 0:
            self.cancel.wait(min(ahead, 1.0))

    def _submit(self) -> None:
        start = self._next
        end = min(start + self.chunk, self.size)
        if start >= self._disk_zero.end:  # the next window; chunks never straddle two
            self._map_window(start)
        disk_zero, backup_zero = self._disk_zero, self._backup_zero
        zero_both = min(disk_zero.zero_until(start), backup_zero.zero_until(start))
        if zero_both >= end:
            # Zero on both sides: equal without a read. Take the whole run of
            # such chunks as one, so a large empty disk costs no loop per chunk.
            if zero_both < self.size:
                end = max(end, zero_both - zero_both % self.chunk)
            else:
                end = self.size
            chunk = _Chunk(start, end - start)
            self._next = end
            self._queue.append(chunk)
            self._active += 1
            self._ready.append(chunk)
            return
        self._next = end
        chunk = _Chunk(start, end - start)
        self._queue.append(chunk)
        self._active += 1
        if not disk_zero.covers(start, end):
            chunk.disk = self._buffer(chunk.length)
            self.progress.read_disk += self._read(self.disk, chunk, chunk.disk, disk_zero)
        if not backup_zero.covers(start, end) and self._digests is None:
            chunk.backup = self._buffer(chunk.length)
            self.progress.read_backup += self._read(self.backup, chunk, chunk.backup, backup_zero)
        if chunk.waiting == 0:  # nothing asynchronous: local file, zeroes
            self._ready.append(chunk)

    def _map_window(self, start: int) -> None:
        """Ask both sides which ranges of the window at ``start`` are zero,
        and size the next window from what that cost."""
        window_end = min(start + self._window, self.size)
        # Over NBD both sides are asked at once, and answer while the reads
        # in flight go on: a window costs one round trip, not one per side.
        asked = {side: MapRequest(start, window_end) for side in self._nbd}
        while not all(request.done for request in asked.values()):
            if self.cancel.is_set():  # a server that never answers holds no cancel
                self._save()
                raise Cancelled("scan cancelled")
            for side, request in asked.items():
                if not request.done and not request.pending:
                    side.ask_map(request)
            self._wait()
        zero = {
            side: asked[side].zero_map() if side in asked else side.zero_map(start, window_end)
            for side in (self.disk, self.backup)
        }
        self._disk_zero, self._backup_zero = zero[self.disk], zero[self.backup]
        if max(self._disk_zero.pieces, self._backup_zero.pieces) <= CHEAP_WINDOW:
            self._window = min(2 * self._window, self._longest_window)
        else:
            self._window = self._first_window

    def _read(
        self, side: NbdSide | FileSide | DigestSide, chunk: _Chunk, buf: bytearray, zero: ZeroMap
    ) -> int:
        """Fill ``buf`` with the chunk's bytes on one side; how many are read."""
        if isinstance(side, FileSide):
            side.read(chunk.start, buf)
            return chunk.length
        assert isinstance(side, NbdSide)

        def done() -> None:
            chunk.waiting -= 1
            if chunk.waiting == 0:
                self._ready.append(chunk)

        # Only the data: the server need not look for holes nor send them,
        # and the zero parts are filled here (the buffer is reused, so it
        # holds older bytes).
        view = memoryview(buf)
        step = side.max_request
        # Chunk buffers are reused, and so are their pieces' nbd.Buffers; a
        # one-off buffer (the disk's last, short chunk) is read on align only.
        reused = len(buf) == self.chunk
        align = max(side.align, READ_GRID) if reused else side.align
        pieces = self._pieces.setdefault(id(buf), {}) if reused else {}
        filled = read = 0  # buf[:filled] is read or zeroed
        for data_start, data_end in zero.data(chunk.start, chunk.start + chunk.length):
            a = max(filled, data_start - data_start % align - chunk.start)
            b = min(chunk.length, data_end + (-data_end) % align - chunk.start)
            if b <= a:
                continue
            if a > filled:
                view[filled:a] = self._zeroes[: a - filled]
            for o in range(a, b, step):
                end = min(o + step, b)
                piece = pieces.get((o, end))
                if piece is None:
                    piece = nbd.Buffer.from_buffer(view[o:end])
                    if reused:
                        pieces[(o, end)] = piece
                chunk.waiting += 1
                side.submit(chunk.start + o, piece, done)
            filled = b
            read += b - a
        if filled < chunk.length:
            view[filled:] = self._zeroes[: chunk.length - filled]
        return read

    def _wait(self) -> None:
        """Block until some read progressed, and let libnbd act on it."""
        for connection in self._connections:  # a read may also complete inside zero_map
            if connection.failed is not None:
                raise connection.side.lost(connection.failed)
        busy = [c for c in self._connections if c.in_flight]
        if not busy and not (self._handed and self._handed.count):
            return
        for connection in busy:
            connection.arm(self._poller)
        for fd, events in self._poller.poll(POLL_TIMEOUT_MS):
            if self._handed is not None and fd == self._handed.fd:
                self._handed.woken()
            else:
                self._by_fd[fd].notify(events)

    def _buffer(self, length: int) -> bytearray:
        if length == self.chunk and self._free:
            return self._free.pop()
        return bytearray(length)

    def _release(self, *bufs: bytearray | None) -> None:
        for buf in bufs:
            if buf is not None and len(buf) == self.chunk:
                self._free.append(buf)

    def _compare(self, chunk: _Chunk) -> None:
        a, b = chunk.disk, chunk.backup
        if self.on_backup is not None:
            self.on_backup(chunk.start, chunk.length, b)
        if self._handed is not None and self._digests is not None and a is not None:
            self._digests.differing_later(
                chunk.start, chunk.length, a, self._handed.callback(chunk)
            )
            return
        differs: list[int]
        if self._digests is not None:  # zeroes on the disk: by the manifest's flags
            differs = self._digests.differing(chunk.start, chunk.length, a)
        elif a is None and b is None:  # zero on both sides: equal, never read
            differs = []
        elif a is None or b is None:  # zero on one side: the other must be zero
            data = b if a is None else a
            assert data is not None
            zero = self._zero_chunk if len(data) == self.chunk else bytes(len(data))
            differs = [] if data == zero else differing_granules(data, zero, self.granularity)
        else:
            differs = [] if a == b else differing_granules(a, b, self.granularity)
        self._finish(chunk, differs)

    def _finish(self, chunk: _Chunk, differs: list[int]) -> None:
        """Hand a compared chunk's differing granules (offsets in it) over."""
        self._release(chunk.disk, chunk.backup)
        chunk.disk = chunk.backup = None
        g = self.granularity
        for o in differs:
            offset = chunk.start + o
            length = min(g, self.size - offset)
            if self._marks and self._marks[-1][0] + self._marks[-1][1] == offset:
                self._marks[-1] = (self._marks[-1][0], self._marks[-1][1] + length)
            else:
                self._marks.append((offset, length))
        self.progress.differing_granules += len(differs)
        self.progress.compared += chunk.length
        chunk.compared = True
        self._active -= 1

    def _advance(self) -> None:
        """Move the position over the compared chunks at the head of the queue."""
        queue = self._queue
        position = self.progress.position
        while queue and queue[0].compared:
            head = queue.popleft()
            position = max(position, head.start + head.length)
        self.progress.position = position
        if len(self._marks) >= MARK_BATCH:
            self._flush()

    def _flush(self) -> None:
        # Marks may run ahead of the position (out-of-order completions); that
        # only over-reports when a resumed scan marks them again.
        if self._marks:
            self.on_marks(self._marks)
            self._marks = []

    def _save(self) -> None:
        self._flush()
        self.on_position(self.progress)


def differing_granules(a: bytes | bytearray, b: bytes | bytearray, granularity: int) -> list[int]:
    """Offsets of the granules (of ``granularity`` bytes, the last one maybe
    shorter) where ``a`` and ``b``, of equal length, differ."""
    # a.startswith(view, o) is a memcmp of a[o:] with view, in place:
    # slicing both sides copied every granule, which a disk changed all over
    # pays on every chunk.
    other = memoryview(b)
    g = granularity
    return [o for o in range(0, len(a), g) if not a.startswith(other[o : o + g], o)]


def file_mtime(path: str) -> int | None:
    """A local disk's modification time, to notice writes made without a tracker."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise

"""The diff scan: which granules of the disk differ from a backup.

Both sides are read with libnbd (the disk may also be a local file), in large
chunks with several requests in flight per side, from one thread that polls
both handles. ``base:allocation`` on both sides spares reads: a chunk that
reads as zeroes on both sides is equal without a read, and one that is zero
on one side is read on the other only and tested for zeroes. Only a chunk
that differs is compared granule by granule.

The scan reports differing granules through ``on_marks`` (in batches, in
order) and saves its position through ``on_position`` only after the marks
before that position were handed over, so a resumed scan never skips a
difference. It knows nothing of bitmaps, trackers or state directories:
``sidecar.scanjob`` wires it to those.
"""

from __future__ import annotations

import bisect
import contextlib
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
from nbd_plugins.backends import EXTENT_ZERO, FileBackend

MiB = 1 << 20
DEFAULT_CHUNK = 1 * MiB  # perf-notes: request count dominates; ~1 MiB requests
DEFAULT_IN_FLIGHT = 8  # chunks in flight (each side reads its half)
MARK_BATCH = 4096  # ranges per hand-over
POSITION_EVERY = 1.0  # seconds between saved positions


class Cancelled(Exception):
    """The scan was asked to stop; marks and position up to here are saved."""


@dataclass
class Progress:
    total: int
    position: int = 0  # everything before it is compared and handed over
    compared: int = 0
    read_disk: int = 0
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


class ZeroMap:
    """The ranges that read as zeroes on one side, merged, for bisecting."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end


class Side(Protocol):
    name: str
    size: int

    def zero_map(self) -> ZeroMap: ...
    def close(self) -> None: ...


class NbdSide:
    """One side read over NBD with libnbd's asynchronous API."""

    def __init__(self, name: str, uri: str) -> None:
        self.name = name
        self.uri = uri
        h = nbd.NBD()
        h.add_meta_context("base:allocation")
        try:
            h.connect_uri(uri)
        except nbd.Error as e:
            raise errors.Unavailable(
                f"{name}-unreachable", f"cannot connect to the {name} {uri}: {e.string}"
            ) from None
        h.set_pread_initialize(False)  # we only read what the server wrote
        self.h = h
        self.size: int = h.get_size()
        self.pending: dict[int, tuple[int, bytearray]] = {}  # cookie -> (chunk start, buffer)

    def zero_map(self) -> ZeroMap:
        if not self.h.can_meta_context("base:allocation"):
            return ZeroMap([])
        zeros: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            found: list[tuple[int, int]] = []

            def collect(
                ctx: str,
                start: int,
                entries: list[int],
                err: Any,
                found: list[tuple[int, int]] = found,
            ) -> int:
                if ctx == "base:allocation":
                    found.extend(zip(entries[::2], entries[1::2], strict=True))
                return 0

            self._call(self.h.block_status, min(1 << 31, self.size - offset), offset, collect)
            if not found:
                break
            for length, flags in found:
                if flags & EXTENT_ZERO:
                    zeros.append((offset, offset + length))
                offset += length
        return ZeroMap(zeros)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except nbd.Error as e:
            raise errors.Unavailable(
                f"{self.name}-lost", f"the {self.name} {self.uri}: {e.string}"
            ) from None

    def submit(self, start: int, offset: int, buf: bytearray) -> None:
        # from_buffer shares the bytearray: libnbd reads straight into it, and
        # the comparison then runs on plain bytearrays (memcmp speed).
        cookie = self._call(self.h.aio_pread, nbd.Buffer.from_buffer(buf), offset)
        self.pending[cookie] = (start, buf)

    def completed(self) -> list[tuple[int, bytearray]]:
        """Retire finished reads: [(chunk start, buffer)]; raises on a failed read."""
        done: list[tuple[int, bytearray]] = []
        while self.pending:  # libnbd raises EINVAL when nothing is in flight
            cookie = self._call(self.h.aio_peek_command_completed)
            if cookie <= 0:
                return done
            self._call(self.h.aio_command_completed, cookie)
            done.append(self.pending.pop(cookie))
        return done

    def close(self) -> None:
        with contextlib.suppress(nbd.Error):  # the server may be gone already
            self.h.shutdown()


class FileSide:
    """The disk as a local file or block device, read synchronously."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        try:
            self.backend = FileBackend(path, readonly=True)
        except OSError as e:
            raise errors.Unavailable(
                f"{name}-unreachable", f"the {name} {path}: {e.strerror}"
            ) from None
        self.conn = self.backend.connect()
        self.size = self.backend.size
        self.path = path

    def zero_map(self) -> ZeroMap:
        return ZeroMap(
            [(o, o + n) for o, n, t in self.conn.extents(self.size, 0) if t & EXTENT_ZERO]
        )

    def read(self, offset: int, buf: bytearray) -> bytearray:
        self.conn.pread(buf, offset)
        return buf

    def close(self) -> None:
        self.backend.close()


def open_side(name: str, where: str) -> NbdSide | FileSide:
    if "://" in where:
        return NbdSide(name, where)
    return FileSide(name, where)


@dataclass
class _Chunk:
    start: int
    length: int
    disk_zero: bool
    backup_zero: bool
    disk: bytearray | None = None  # once read
    backup: bytearray | None = None

    def ready(self) -> bool:
        return (self.disk_zero or self.disk is not None) and (
            self.backup_zero or self.backup is not None
        )


class Scan:
    def __init__(
        self,
        disk: NbdSide | FileSide,
        backup: NbdSide | FileSide,
        granularity: int,
        *,
        start: int = 0,
        chunk: int = DEFAULT_CHUNK,
        in_flight: int = DEFAULT_IN_FLIGHT,
        max_rate: float | None = None,
        on_marks: Callable[[list[tuple[int, int]]], None],
        on_position: Callable[[Progress], None] = lambda p: None,
        cancel: threading.Event | None = None,
    ) -> None:
        if disk.size != backup.size:
            raise errors.Conflict(
                "backup-size",
                f"the backup has {backup.size} bytes but the disk has {disk.size} bytes: "
                "a backup of another disk, or the disk was resized",
            )
        self.disk, self.backup = disk, backup
        self.size = disk.size
        self.granularity = granularity
        self.chunk = max(granularity, chunk // granularity * granularity)
        self.in_flight = max(1, in_flight)
        self.max_rate = max_rate
        self.on_marks = on_marks
        self.on_position = on_position
        self.cancel = cancel or threading.Event()
        self.progress = Progress(total=self.size, position=start)
        self._next = start - start % self.chunk
        self._chunks: dict[int, _Chunk] = {}
        self._done: set[int] = set()
        self._marks: list[tuple[int, int]] = []
        # Read buffers, reused: fresh 1 MiB allocations cost page faults.
        self._free: list[bytearray] = []
        self._poller = select.poll()
        self._zero_chunk = bytes(self.chunk)
        self._zero_granule = bytes(granularity)

    # -- the loop ------------------------------------------------------------

    def run(self) -> Progress:
        disk_zero, backup_zero = self.disk.zero_map(), self.backup.zero_map()
        last_saved = time.monotonic()
        while self._next < self.size or self._chunks:
            if self.cancel.is_set():
                self._save()
                raise Cancelled("scan cancelled")
            while self._next < self.size and len(self._chunks) < self.in_flight:
                self._throttle()
                self._submit(self._next, disk_zero, backup_zero)
                self._next += self.chunk
            self._wait()
            for start in sorted(s for s, c in self._chunks.items() if c.ready()):
                self._compare(self._chunks.pop(start))
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

    def _submit(self, start: int, disk_zero: ZeroMap, backup_zero: ZeroMap) -> None:
        length = min(self.chunk, self.size - start)
        end = start + length
        chunk = _Chunk(start, length, disk_zero.covers(start, end), backup_zero.covers(start, end))
        self._chunks[start] = chunk
        for side, zero in ((self.disk, chunk.disk_zero), (self.backup, chunk.backup_zero)):
            if zero:
                continue
            buf = self._buffer(length)
            if isinstance(side, FileSide):
                side.read(start, buf)
                if side is self.disk:
                    chunk.disk = buf
                else:
                    chunk.backup = buf
            else:
                side.submit(start, start, buf)
            if side is self.disk:
                self.progress.read_disk += length
            else:
                self.progress.read_backup += length

    def _wait(self) -> None:
        sides = [s for s in (self.disk, self.backup) if isinstance(s, NbdSide)]
        if not any(s.pending for s in sides):
            return
        poller = self._poller  # registering a registered fd again modifies it
        by_fd = {}
        for side in sides:
            fd = side._call(side.h.aio_get_fd)  # raises if the server went away
            direction = side._call(side.h.aio_get_direction) if side.pending else 0
            events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | (
                select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0
            )
            poller.register(fd, events)
            by_fd[fd] = side
        for fd, events in poller.poll(1000):
            side = by_fd[fd]
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                side._call(side.h.aio_notify_read)
            if events & select.POLLOUT:
                side._call(side.h.aio_notify_write)
        for side in sides:
            if side.h.aio_is_dead():
                raise errors.Unavailable(
                    f"{side.name}-lost", f"the {side.name} {side.uri} went away"
                )
            for start, buf in side.completed():
                chunk = self._chunks[start]
                if side is self.disk:
                    chunk.disk = buf
                else:
                    chunk.backup = buf

    def _buffer(self, length: int) -> bytearray:
        if length == self.chunk and self._free:
            return self._free.pop()
        return bytearray(length)

    def _release(self, *bufs: bytearray | None) -> None:
        for buf in bufs:
            if buf is not None and len(buf) == self.chunk:
                self._free.append(buf)

    def _compare(self, chunk: _Chunk) -> None:
        g = self.granularity
        a, b = chunk.disk, chunk.backup
        if a is None and b is None:  # zero on both sides: equal, never read
            differs: list[int] = []
        elif a is None or b is None:  # zero on one side: the other must be zero
            data = b if a is None else a
            assert data is not None
            zero = self._zero_chunk if len(data) == self.chunk else bytes(len(data))
            differs = [] if data == zero else self._differing(data, zero)
        else:
            differs = [] if a == b else self._differing(a, b)
        self._release(a, b)
        for o in differs:
            offset = chunk.start + o
            length = min(g, self.size - offset)
            if self._marks and self._marks[-1][0] + self._marks[-1][1] == offset:
                self._marks[-1] = (self._marks[-1][0], self._marks[-1][1] + length)
            else:
                self._marks.append((offset, length))
        self.progress.differing_granules += len(differs)
        self.progress.compared += chunk.length
        self._done.add(chunk.start)

    def _differing(self, a: bytes | bytearray, b: bytes | bytearray) -> list[int]:
        """Offsets of the granules where a and b differ (called only when they do)."""
        g = self.granularity
        return [o for o in range(0, len(a), g) if a[o : o + g] != b[o : o + g]]

    def _advance(self) -> None:
        """Move the position over the contiguous prefix of compared chunks."""
        position = self.progress.position - self.progress.position % self.chunk
        while position in self._done:
            self._done.discard(position)
            position += self.chunk
        if position > self.progress.position:
            self.progress.position = min(position, self.size)
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


def file_mtime(path: str) -> int | None:
    """A local disk's modification time, to notice writes made without a tracker."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise

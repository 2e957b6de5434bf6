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
        self.pending: dict[int, tuple[int, Any]] = {}  # cookie -> (chunk start, buffer)

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

    def submit(self, start: int, offset: int, length: int) -> None:
        buf = nbd.Buffer(length)
        cookie = self._call(self.h.aio_pread, buf, offset)
        self.pending[cookie] = (start, buf)

    def completed(self) -> list[tuple[int, Any]]:
        """Retire finished reads: [(chunk start, buffer)]; raises on a failed read."""
        done: list[tuple[int, Any]] = []
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

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
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
    disk: Any = None  # bytearray or nbd.Buffer once read
    backup: Any = None

    def ready(self) -> bool:
        return (self.disk_zero or self.disk is not None) and (
            self.backup_zero or self.backup is not None
        )


def _is_zero(buf: Any, offset: int = 0, size: int = -1) -> bool:
    if isinstance(buf, bytearray):
        view = (
            buf if size < 0 and offset == 0 else buf[offset : offset + size if size >= 0 else None]
        )
        return not any(view) if len(view) < 64 else view.count(0) == len(view)
    return bool(buf.is_zero(offset, size))


def _as_bytes(buf: Any) -> bytearray:
    return buf if isinstance(buf, bytearray) else buf.to_bytearray()


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
        self._marks_until = start  # marks before this offset are collected

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
            if isinstance(side, FileSide):
                data = side.read(start, length)
                if side is self.disk:
                    chunk.disk = data
                else:
                    chunk.backup = data
            else:
                side.submit(start, start, length)
            if side is self.disk:
                self.progress.read_disk += length
            else:
                self.progress.read_backup += length

    def _wait(self) -> None:
        sides = [s for s in (self.disk, self.backup) if isinstance(s, NbdSide) and s.pending]
        if not sides:
            return
        poller = select.poll()
        by_fd = {}
        for side in sides:
            fd = side._call(side.h.aio_get_fd)  # raises if the server went away
            direction = side._call(side.h.aio_get_direction)
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

    def _compare(self, chunk: _Chunk) -> None:
        g = self.granularity
        if chunk.disk_zero and chunk.backup_zero:
            differs: list[int] = []
        elif chunk.disk_zero or chunk.backup_zero:
            data = chunk.backup if chunk.disk_zero else chunk.disk
            differs = (
                []
                if _is_zero(data)
                else [
                    o
                    for o in range(0, chunk.length, g)
                    if not _is_zero(data, o, min(g, chunk.length - o))
                ]
            )
        else:
            a, b = _as_bytes(chunk.disk), _as_bytes(chunk.backup)
            differs = (
                []
                if a == b
                else [o for o in range(0, chunk.length, g) if a[o : o + g] != b[o : o + g]]
            )
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

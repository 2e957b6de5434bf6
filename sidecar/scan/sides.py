"""The two sides of a diff scan: how each is opened, read and mapped.

A side is the disk or the backup. Over NBD it is read with libnbd's
asynchronous API on one connection, or on several where the server
advertises multi-conn (its connections then see the same data, so a read may
go to any of them): each connection has its own requests in flight, and the
scan's loop polls them all from one thread. A local file or block device is
read synchronously.

``zero_map`` describes which ranges of a window read as zeroes. It knows
nothing of windows' sizes: the scan chooses them (sidecar.scan.engine).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import nbd

from dirtydiff import errors
from dirtydiff.disk import EXTENT_ZERO, FileBackend, is_nbd_uri, open_backend
from dirtydiff.state import DiskSeen, file_identity, tracker_id
from sidecar.nbdclient import connect_all

log = logging.getLogger(__name__)

KiB = 1 << 10
# The longest read sent: qemu-nbd allocates a read's buffer per request, and
# until glibc's mmap threshold has grown past that size each buffer is fresh,
# faulted-in pages. 512 KiB stays below that cliff; smaller requests cost
# more Python per byte.
MAX_REQUEST = 512 * KiB
# Connections per side where the server advertises multi-conn: nbdcopy's
# default, and what ``qemu-nbd -e 4`` (the bench's servers) accepts.
MAX_CONNECTIONS = 4
# The connections past the first are a speed-up, not a need: a server that
# advertises multi-conn but accepts no more clients (qemu-nbd -e N, N taken)
# leaves them in its listen queue, and the scan goes on without them. They
# get a few times what the first handshake took (at least a floor, at most a
# ceiling): the wait for one that never comes is start-up cost.
EXTRA_CONNECT_FACTOR = 4
EXTRA_CONNECT_TIMEOUT = (0.25, 2.0)
# The longest block status asked: its length is 32-bit on the wire.
MAX_STATUS = (1 << 32) - 1


class ZeroMap:
    """The ranges that read as zeroes on one side, merged, for bisecting.

    It describes [``start``, ``end``) only (a window of the disk); beyond it,
    nothing is known to be zero."""

    def __init__(self, ranges: list[tuple[int, int]], start: int = 0, end: int = 0) -> None:
        self.start, self.end = start, end
        self.starts: list[int] = []
        self.ends: list[int] = []
        for s, e in sorted(ranges):
            if self.ends and s <= self.ends[-1]:
                self.ends[-1] = max(self.ends[-1], e)
            else:
                self.starts.append(s)
                self.ends.append(e)

    def zero_until(self, start: int) -> int:
        """The end of the zero range holding ``start``, or ``start`` if it is data."""
        i = bisect.bisect_right(self.starts, start) - 1
        return self.ends[i] if i >= 0 and self.ends[i] > start else start

    def covers(self, start: int, end: int) -> bool:
        return self.zero_until(start) >= end

    def data(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges of [start, end) that are not known to be zero."""
        found = []
        i = bisect.bisect_right(self.starts, start) - 1
        position = start
        if i >= 0 and self.ends[i] > start:
            position = self.ends[i]
        i += 1
        while position < end:
            if i < len(self.starts) and self.starts[i] < end:
                if self.starts[i] > position:
                    found.append((position, self.starts[i]))
                position = max(position, self.ends[i])
                i += 1
            else:
                found.append((position, end))
                break
        return found

    @property
    def pieces(self) -> int:
        """How many zero ranges it holds: what describing its window cost."""
        return len(self.starts)


class Side(Protocol):
    name: str
    size: int

    def zero_map(self, start: int, end: int) -> ZeroMap: ...
    def close(self) -> None: ...


class MapRequest:
    """The zero ranges of [start, end) of one NBD side, asked without
    waiting (``NbdSide.ask_map``): the scan asks both sides at once and polls
    for the answers with its reads. A server may describe less than asked;
    ``NbdSide.ask_map`` then asks again from where it stopped."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.offset = start  # described up to here
        self.zeros: list[tuple[int, int]] = []
        self.pending = False  # a block status is on the wire

    @property
    def done(self) -> bool:
        return not self.pending and self.offset >= self.end

    def answered(self, found: list[tuple[int, int]]) -> None:
        """One reply's (length, flags) extents, from ``offset`` on."""
        if not found:  # described nothing: the rest is not known to be zero
            self.offset = self.end
        for length, flags in found:
            if self.offset >= self.end:  # described past the window: not ours
                break
            if flags & EXTENT_ZERO:
                self.zeros.append((self.offset, min(self.offset + length, self.end)))
            self.offset += length
        self.pending = False

    def zero_map(self) -> ZeroMap:
        return ZeroMap(self.zeros, self.start, self.end)


class NbdConnection:
    """One libnbd handle of a side, with its own reads in flight.

    The scan loop owns the polling: it registers ``fd`` once, calls ``arm``
    before each poll (the events only change when libnbd's direction does),
    and ``notify`` with what poll reported. Completed reads run the ``done``
    callback given to ``submit`` from inside ``notify``.
    """

    def __init__(self, side: NbdSide, h: Any) -> None:
        self.side = side
        self.h = h
        h.set_pread_initialize(False)  # we only read what the server wrote
        self.fd: int = side._call(h.aio_get_fd)
        self.events = 0  # what ``fd`` is registered for
        self.in_flight = 0
        self.failed: str | None = None  # why a read failed, reported by the loop

    def submit(self, offset: int, buf: Any, done: Callable[[], None]) -> None:
        def completed(err: Any) -> int:
            # Runs inside aio_notify_read, which cannot carry an exception out:
            # a failure is noted and raised by the loop right after.
            self.in_flight -= 1
            if err.value:
                self.failed = f"a read at offset {offset} failed: {os.strerror(err.value)}"
            else:
                done()
            return 1  # retire the command: no aio_command_completed per read

        self.side._call(self.h.aio_pread, buf, offset, completed)
        self.in_flight += 1

    def arm(self, poller: select.poll) -> None:
        """Register ``fd`` for what libnbd waits for, if that changed."""
        direction = self.h.aio_get_direction()
        events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | (
            select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0
        )
        if events != self.events:
            poller.register(self.fd, events)  # registering again modifies
            self.events = events

    def notify(self, events: int) -> None:
        """Let libnbd act on what poll reported; raises if the side is gone."""
        side = self.side
        if events & select.POLLNVAL:
            raise side.lost("its connection was closed")
        if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
            side._call(self.h.aio_notify_read)
        if events & select.POLLOUT:
            side._call(self.h.aio_notify_write)
        if self.failed is not None:
            raise side.lost(self.failed)
        if self.h.aio_is_dead():
            raise side.lost("went away")


class NbdSide:
    """One side read over NBD: one connection, or up to ``connections`` where
    the server advertises multi-conn."""

    def __init__(
        self,
        name: str,
        uri: str,
        cancel: threading.Event | None = None,
        *,
        connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.name = name
        self.uri = uri
        # full_info: the description, where a dirtydiff tracker names its state.
        started = time.monotonic()
        [h] = self._connect([uri], cancel, full_info=True)
        handshake = time.monotonic() - started
        if isinstance(h, errors.Unavailable):
            raise errors.Unavailable(f"{name}-unreachable", h.message)
        self.size: int = h.get_size()
        try:
            description: str | None = h.get_export_description()
        except nbd.Error:  # the server sent none
            description = None
        self.seen = DiskSeen(uri, self.size, tracker=tracker_id(description))
        self.connections = [NbdConnection(self, h)]
        self.multi_conn = bool(self._call(h.can_multi_conn))
        if self.multi_conn and connections > 1:
            floor, ceiling = EXTRA_CONNECT_TIMEOUT
            wait = min(ceiling, max(floor, EXTRA_CONNECT_FACTOR * handshake))
            self._add_connections(connections - 1, cancel, wait)
        maximum = self._call(h.get_block_size, nbd.SIZE_MAXIMUM)  # 0: not advertised
        self.max_request = min(MAX_REQUEST, maximum) if maximum > 0 else MAX_REQUEST
        # Reads of data between zero ranges start and end on this (libnbd's
        # strict mode refuses unaligned requests when the server sets one).
        self.align = max(1, self._call(h.get_block_size, nbd.SIZE_MINIMUM))
        self.max_status = MAX_STATUS // self.align * self.align
        self._has_map = bool(h.can_meta_context("base:allocation"))

    def _connect(self, uris: list[str], cancel: threading.Event | None, **kwargs: Any) -> list[Any]:
        return connect_all(
            uris, ("base:allocation",), cancel=cancel, what=[f"the {self.name}"] * len(uris),
            **kwargs,
        )  # fmt: skip

    def _add_connections(self, n: int, cancel: threading.Event | None, timeout: float) -> None:
        for h in self._connect([self.uri] * n, cancel, timeout=timeout):
            if isinstance(h, errors.Unavailable):
                # The scan is as correct on fewer connections, only slower.
                log.info("%s: one connection fewer: %s", self.name, h.message)
            elif h.get_size() != self.size:  # another export behind the same address
                raise self.lost("changed size between two connections")
            else:
                self.connections.append(NbdConnection(self, h))

    @property
    def h(self) -> Any:
        """The first connection's handle, for a synchronous request made
        while no scan runs on this side (a sample read, say)."""
        return self.connections[0].h

    @property
    def in_flight(self) -> int:
        return sum(c.in_flight for c in self.connections)

    @property
    def failed(self) -> str | None:
        return next((c.failed for c in self.connections if c.failed is not None), None)

    def zero_map(self, start: int, end: int) -> ZeroMap:
        """The zero ranges of [start, end), asked on the least busy
        connection. Safe with reads in flight: libnbd completes that
        connection's reads (and runs their callbacks) while it waits."""
        if not self._has_map:
            return ZeroMap([], start, end)
        h = min(self.connections, key=lambda c: c.in_flight).h
        zeros: list[tuple[int, int]] = []
        offset = start
        while offset < end:
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

            self._call(h.block_status, min(self.max_status, end - offset), offset, collect)
            if not found:
                break
            for length, flags in found:
                if flags & EXTENT_ZERO:
                    zeros.append((offset, min(offset + length, end)))
                offset += length
        return ZeroMap(zeros, start, end)

    def ask_map(self, request: MapRequest) -> None:
        """Send the next block status of ``request`` (not done, not
        pending) on the least busy connection; the answer comes in while the
        scan polls, like a read's (it counts as one in flight)."""
        if not self._has_map:
            request.answered([])
            return
        connection = min(self.connections, key=lambda c: c.in_flight)
        found: list[tuple[int, int]] = []

        def collect(ctx: str, start: int, entries: list[int], err: Any) -> int:
            if ctx == "base:allocation":
                found.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        def completed(err: Any) -> int:
            connection.in_flight -= 1
            if err.value:
                connection.failed = (
                    f"block status at offset {request.offset} failed: {os.strerror(err.value)}"
                )
            else:
                request.answered(found)
            return 1

        length = min(self.max_status, request.end - request.offset)
        self._call(connection.h.aio_block_status, length, request.offset, collect, completed)
        connection.in_flight += 1
        request.pending = True

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except nbd.Error as e:
            raise self.lost(e.string) from None

    def lost(self, why: str) -> errors.Unavailable:
        return errors.Unavailable(f"{self.name}-lost", f"the {self.name} {self.uri}: {why}")

    def submit(self, offset: int, buf: Any, done: Callable[[], None]) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``, an
        ``nbd.Buffer`` sharing a chunk buffer's memory (not copied: the
        comparison then runs on plain bytearrays at memcmp speed), on the
        connection with the fewest reads in flight; ``done()`` runs inside
        that connection's ``notify`` once they are there."""
        connection = min(self.connections, key=lambda c: c.in_flight)
        connection.submit(offset, buf, done)

    def close(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(nbd.Error):  # the server may be gone already
                connection.h.shutdown()


class FileSide:
    """The disk as a local file or block device, read synchronously."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        try:
            # The scheme table decides: a path opens, another scheme is refused.
            backend = open_backend(path, readonly=True)
        except OSError as e:
            raise errors.Unavailable(
                f"{name}-unreachable", f"the {name} {path}: {e.strerror}"
            ) from None
        assert isinstance(backend, FileBackend)  # open_side gives NBD URIs to NbdSide
        self.backend = backend
        self.conn = self.backend.connect()
        self.size = self.backend.size
        self.path = path
        self.seen = DiskSeen(path, self.size, file=file_identity(self.backend.fd))

    def zero_map(self, start: int, end: int) -> ZeroMap:
        extents = self.conn.extents(end - start, start)
        return ZeroMap([(o, o + n) for o, n, t in extents if t & EXTENT_ZERO], start, end)

    def read(self, offset: int, buf: bytearray) -> bytearray:
        self.conn.pread(buf, offset)
        return buf

    def close(self) -> None:
        self.backend.close()


def open_side(
    name: str,
    where: str,
    cancel: threading.Event | None = None,
    *,
    connections: int = MAX_CONNECTIONS,
) -> NbdSide | FileSide:
    if is_nbd_uri(where):
        return NbdSide(name, where, cancel, connections=connections)
    return FileSide(name, where)

"""A snapshot export's connections to the tracker, driven by the event loop.

A snapshot is always read through the tracker's ``@snapshot:NAME`` (never
from the disk file: the tracker alone settles a read racing a write). Read
the way the live export reads an NBD disk, one synchronous libnbd call per
request in a worker thread, each request cost the sidecar about two
CPU-seconds per GiB, most of it threads handing requests and the GIL to each
other. Here libnbd's asynchronous calls run in the event loop's thread: a
request is sent at once (pipelined with the others in flight), its reply is
read when the socket is readable, straight into the buffer the reply to the
client sends (``nbd.Buffer.from_buffer``, libnbd's zeroing off), and no
thread is involved.

A few connections (``SNAPSHOT_CONNECTIONS``) serve every client of one
snapshot, each request going to the one with the fewest in flight; they
open with the first client and close with the last. Opening one connects
(in a worker thread: the handshake waits) and then asks ``verify``: the
tracker must still serve the very snapshot the export was opened on. A
connection found dead (the tracker restarted) is dropped and the request
tried once more on a new one: reads and trims of a snapshot are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import nbd

from dirtydiff.disk import Extent

log = logging.getLogger(__name__)

SNAPSHOT_CONNECTIONS = 2
# Read buffers a snapshot's export keeps for its next reads once their replies
# are sent, at most this many bytes. A fresh 256 KiB bytearray per read cost
# more than the read: glibc gives the heap's top back as buffers are freed and
# the kernel zeroes new pages for the next ones (clear_page was half the
# sidecar's CPU time in `python -m bench snapshot-read`).
KEPT_BUFFERS = 16 * 1024 * 1024


class AioConnection:
    """One libnbd handle, its socket watched by the event loop."""

    def __init__(self, handle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.handle = handle
        self.loop = loop
        self.fd: int = handle.aio_get_fd()
        self.in_flight = 0
        self._writing = False
        self._closed = False
        self._pending: set[asyncio.Future[None]] = set()
        loop.add_reader(self.fd, self._readable)

    def alive(self) -> bool:
        return not self._closed and not (self.handle.aio_is_dead() or self.handle.aio_is_closed())

    def _step(self) -> None:
        """Watch for writability while libnbd has more to send."""
        if self._closed:
            return
        wants_write = bool(self.handle.aio_get_direction() & nbd.AIO_DIRECTION_WRITE)
        if wants_write and not self._writing:
            self.loop.add_writer(self.fd, self._writable)
        elif not wants_write and self._writing:
            self.loop.remove_writer(self.fd)
        self._writing = wants_write

    def _readable(self) -> None:
        self._notify(self.handle.aio_notify_read)

    def _writable(self) -> None:
        self._notify(self.handle.aio_notify_write)

    def _notify(self, notify: Callable[[], object]) -> None:
        try:
            notify()
        except nbd.Error as e:
            log.info("snapshot upstream: %s", e.string)
        if self.alive():
            self._step()
            return
        # Dead (the tracker went away): libnbd answers none of its commands
        # any more, so each fails here, and is tried again elsewhere.
        self._unwatch()
        self._fail_pending()

    def _fail_pending(self) -> None:
        for done in list(self._pending):
            if not done.done():
                done.set_exception(OSError(errno.ENOTCONN, "the tracker's connection closed"))

    async def _command(self, issue: Callable[[Callable[[Any], int]], object]) -> None:
        """Issue one command (``issue(completion)``) and wait for its reply."""
        done: asyncio.Future[None] = self.loop.create_future()

        def completed(error: Any) -> int:
            if not done.done():
                if error.value:
                    done.set_exception(OSError(error.value, os.strerror(error.value)))
                else:
                    done.set_result(None)
            return 1  # retired: nothing asks for it again

        try:
            issue(completed)
        except nbd.Error as e:
            raise OSError(e.errnum or errno.EIO, e.string) from None
        self.in_flight += 1
        self._pending.add(done)
        try:
            self._step()
            if not self.alive():
                self._unwatch()
                self._fail_pending()
            await done
        finally:
            self._pending.discard(done)
            self.in_flight -= 1

    async def pread(self, buf: bytearray, offset: int) -> None:
        shared = nbd.Buffer.from_buffer(buf)
        await self._command(lambda done: self.handle.aio_pread(shared, offset, done))

    async def trim(self, count: int, offset: int, fua: bool) -> None:
        flags = nbd.CMD_FLAG_FUA if fua else 0
        await self._command(lambda done: self.handle.aio_trim(count, offset, done, flags))

    def _unwatch(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.fd)
            if self._writing:
                self.loop.remove_writer(self.fd)

    async def close(self) -> None:
        """Stop watching it, then say goodbye (in a thread: it waits)."""
        self._unwatch()
        self._fail_pending()
        with contextlib.suppress(Exception):  # the tracker may be gone already
            await asyncio.to_thread(self.handle.shutdown)


class AioSnapshotPool:
    """The connections of one snapshot export to ``uri`` (the tracker's
    ``@snapshot:NAME``), shared by its clients request by request."""

    def __init__(
        self,
        uri: str,
        verify: Callable[[], None] | None = None,
        size: int = SNAPSHOT_CONNECTIONS,
    ) -> None:
        self.uri = uri
        self.size = size
        self._verify = verify
        self._open: list[AioConnection] = []
        self._leases = 0
        self._opening: asyncio.Lock | None = None  # made in the loop that uses it
        self._kept: dict[int, list[bytearray]] = {}  # free read buffers, by length
        self._kept_bytes = 0

    def open_connections(self) -> int:
        return len(self._open)

    def _connect(self) -> Any:
        """A connected handle (in a worker thread), its view verified."""
        h = nbd.NBD()
        h.set_pread_initialize(False)  # the buffer is filled whole, or the read fails
        try:
            h.connect_uri(self.uri)
        except nbd.Error as e:
            raise OSError(
                e.errnum or errno.EIO, f"cannot connect to {self.uri}: {e.string}"
            ) from None
        try:
            if self._verify is not None:
                # After connecting: what it checks is then true of this
                # connection's view, or was replaced before it.
                self._verify()
        except BaseException:
            with contextlib.suppress(Exception):
                h.shutdown()
            raise
        return h

    async def _connection(self) -> AioConnection:
        """The least busy open connection, or a new one while all are busy
        and fewer than ``size`` are open."""
        self._open = [c for c in self._open if c.alive()]
        idlest = min(self._open, key=lambda c: c.in_flight, default=None)
        if idlest is not None and (not idlest.in_flight or len(self._open) >= self.size):
            return idlest
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            self._open = [c for c in self._open if c.alive()]
            if len(self._open) < self.size:
                handle = await asyncio.to_thread(self._connect)
                self._open.append(AioConnection(handle, asyncio.get_running_loop()))
        return min(self._open, key=lambda c: c.in_flight)

    async def _call(self, request: Callable[[AioConnection], Any]) -> None:
        for attempt in range(2):
            connection = await self._connection()
            try:
                await request(connection)
                return
            except OSError:
                if connection.alive() or attempt:
                    raise
                log.info("snapshot upstream %s closed: trying on a new connection", self.uri)

    async def pread(self, buf: bytearray, offset: int) -> None:
        await self._call(lambda c: c.pread(buf, offset))

    def buffer(self, length: int) -> bytearray:
        """A read buffer of ``length`` bytes: one kept, or a new one. Its
        contents are stale until a read fills it whole."""
        kept = self._kept.get(length)
        if kept:
            self._kept_bytes -= length
            return kept.pop()
        return bytearray(length)

    def recycle(self, buffers: list[bytearray]) -> None:
        """Keep ``buffers`` (their replies are with the kernel) for later reads."""
        for buf in buffers:
            if self._kept_bytes + len(buf) > KEPT_BUFFERS:
                return
            self._kept.setdefault(len(buf), []).append(buf)
            self._kept_bytes += len(buf)

    async def trim(self, count: int, offset: int, fua: bool) -> None:
        await self._call(lambda c: c.trim(count, offset, fua))

    async def attach(self) -> SnapshotLease:
        """A new client: connected (or OSError) before its first request."""
        await self._connection()
        self._leases += 1
        return SnapshotLease(self, asyncio.get_running_loop())

    async def detach(self) -> None:
        """A client left; the last one closes the connections."""
        self._leases -= 1
        if self._leases:
            return
        self._kept, self._kept_bytes = {}, 0  # no client, no buffers held
        idle, self._open = self._open, []
        for connection in idle:
            await connection.close()


class SnapshotLease:
    """One client's use of an ``AioSnapshotPool``: asynchronous reads and
    trims (``aread``, ``atrim``). It also has the shape of a disk
    connection (``dirtydiff.disk.Connection``) for the code that holds one;
    nothing calls its synchronous requests, which refuse."""

    def __init__(self, pool: AioSnapshotPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._closed = False

    async def aread(self, buf: bytearray, offset: int) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the export's connection to the tracker is closed")
        await self._pool.pread(buf, offset)

    def buffer(self, length: int) -> bytearray:
        return self._pool.buffer(length)

    def recycle(self, buffers: list[bytearray]) -> None:
        self._pool.recycle(buffers)

    async def atrim(self, count: int, offset: int, fua: bool) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the export's connection to the tracker is closed")
        await self._pool.trim(count, offset, fua)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.detach()

    # -- dirtydiff.disk.Connection, for the code that holds a disk ---------

    def _sync(self) -> OSError:
        return OSError(errno.ENOTSUP, "a snapshot export's requests are asynchronous")

    def pread(self, buf: Any, offset: int) -> None:
        raise self._sync()

    def pwrite(self, buf: Any, offset: int, fua: bool) -> None:
        raise OSError(errno.EROFS, "a snapshot takes no writes")

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        raise OSError(errno.EROFS, "a snapshot takes no writes")

    def trim(self, count: int, offset: int, fua: bool) -> None:
        raise self._sync()

    def flush(self) -> None:
        raise self._sync()

    def cache(self, count: int, offset: int) -> None:
        raise self._sync()

    def extents(self, count: int, offset: int) -> list[Extent]:
        raise self._sync()

    def alive(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """From any thread: the client is gone."""
        if not self._closed:
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.aclose()))

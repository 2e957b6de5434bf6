"""The transmission phase's sender: whole replies, queued as the caller's
buffers and file regions, written to the socket in queue order by
writev(2) and sendfile(2). Replies are queued as they are ready, in any
order of their requests; the bytes of one never interleave with another's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable


class Region:
    """Bytes of the disk file still to send. sendfile(2) hands the page-cache
    pages to the socket: no read buffer, no copy through Python, which is
    what makes a Python server keep up with qemu-nbd's pread + sendmsg."""

    __slots__ = ("count", "fd", "offset")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd = fd
        self.offset = offset
        self.count = count


# What a reply is queued as: bytes, file regions, and marks (callables run once
# everything queued before them has gone to the kernel).
Part = bytes | bytearray | memoryview | Region | Callable[[], None]
_BUFFERS = (bytes, bytearray, memoryview)  # a tuple: isinstance is cheapest with one
_IOV_MAX = 1024  # buffers per writev(2) (Linux's UIO_MAXIOV)


class Sender:
    """The transmission phase's replies, written to the socket in queue order.

    asyncio's transport (3.11) copies whatever the socket does not take at
    once into a bytearray and memmoves it after every partial send; a 256 KiB
    read reply never fits a unix socket's buffer, so every byte was copied
    twice more in Python. Here the queue holds the caller's buffers and file
    regions as they are, and flushes with writev(2)/sendfile(2) as soon as
    something is queued, then whenever the socket is writable again.
    """

    def __init__(self, sock_fd: int, on_error: Callable[[OSError], None]) -> None:
        self._loop = asyncio.get_running_loop()
        # Our own fd for the socket: the loop may watch it for writing while
        # the transport (which refuses add_writer on its fd) keeps reading.
        self._fd = os.dup(sock_fd)
        self._queue: deque[Part] = deque()
        self._watching = False
        self._on_error = on_error
        self._progress = 0.0  # when the socket last took a byte, or the queue filled

    def stalled(self, now: float) -> float:
        """Seconds the socket has taken nothing of what is queued; 0 if
        nothing is."""
        return now - self._progress if self._queue else 0.0

    def push(self, parts: Iterable[Part], done: Callable[[], None] | None = None) -> None:
        """Queue one whole reply; ``done`` runs once it is all sent (or can
        never be: the connection broke)."""
        if self._fd < 0:
            if done is not None:
                done()
            return
        if not self._queue:
            self._progress = time.monotonic()
        self._queue.extend(parts)
        if done is not None:
            self._queue.append(done)
        if not self._watching:
            self._flush()

    def flushed(self) -> asyncio.Future[None]:
        """Resolved once everything queued so far is sent."""
        future: asyncio.Future[None] = self._loop.create_future()
        self.push((), functools.partial(resolve, future))
        return future

    def _flush(self) -> None:
        queue = self._queue
        try:
            while queue:
                head = queue[0]
                if isinstance(head, Region):
                    sent = os.sendfile(self._fd, head.fd, head.offset, head.count)
                    if sent == 0:  # the file shrank under us; the header is out already
                        raise OSError(errno.EIO, "the disk ended before the data did")
                    self._progress = time.monotonic()
                    head.offset += sent
                    head.count -= sent
                    if not head.count:
                        queue.popleft()
                elif isinstance(head, _BUFFERS):
                    buffers: list[bytes | bytearray | memoryview] = []
                    for part in queue:
                        if isinstance(part, Region) or len(buffers) == _IOV_MAX:
                            break
                        if isinstance(part, _BUFFERS):
                            buffers.append(part)
                    self._consume(os.writev(self._fd, buffers))
                    self._progress = time.monotonic()
                else:
                    queue.popleft()
                    head()
        except BlockingIOError:
            if not self._watching:
                self._loop.add_writer(self._fd, self._flush)
                self._watching = True
            return
        except OSError as e:
            self._fail(e)
            return
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False

    def _consume(self, sent: int) -> None:
        """Drop the first ``sent`` bytes of queued buffers, running the marks
        they pass."""
        queue = self._queue
        while queue:
            head = queue[0]
            if isinstance(head, Region):
                return
            if isinstance(head, _BUFFERS):
                size = len(head)
                if size > sent:
                    if sent:
                        queue[0] = memoryview(head)[sent:]
                    return
                sent -= size
                queue.popleft()
            else:
                queue.popleft()
                head()

    def _fail(self, error: OSError) -> None:
        self.close()
        self._on_error(error)

    def close(self) -> None:
        """Stop sending; run the marks of whatever was still queued."""
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        queue, self._queue = self._queue, deque()
        for part in queue:
            if not isinstance(part, (*_BUFFERS, Region)):
                part()


def resolve(future: asyncio.Future[None]) -> None:
    """A mark that wakes whoever waits for a reply to be sent."""
    if not future.done():
        future.set_result(None)


# Bytes of the disk file read for one write to a TLS transport: large
# writes keep Python's per-write work (and the TLS records' count per call)
# small against the encryption itself.
TLS_PIECE = 1 << 20
# Buffers smaller than this are gathered with what follows (a reply's header
# with its data) into one write, so that they share TLS records.
_TLS_SMALL = 16 * 1024
# What the TLS transport may hold, encrypted or not, before it asks us to
# stop: a few pieces, so that the socket always has the next one ready.
TLS_WRITE_HIGH = 4 * TLS_PIECE


class TlsSender:
    """The replies of a TLS connection, written through its transport in
    queue order: the same queue of parts as ``Sender``, but sendfile(2) and
    writev(2) cannot reach a TLS stream, so a file region is read (pread)
    and handed to the transport, which encrypts at once. A mark runs when
    what is before it is with the transport; the transport's flow control
    (``writable``) stops the queue when it holds TLS_WRITE_HIGH, so a client
    that reads nothing keeps its read buffers queued here, where the stall
    watchdog sees them."""

    def __init__(self, transport: asyncio.WriteTransport, on_error: Callable[[OSError], None]):
        self._transport = transport
        transport.set_write_buffer_limits(high=TLS_WRITE_HIGH)
        self._queue: deque[Part] = deque()
        self._on_error = on_error
        self._paused = False
        self._flushing = False
        self._closed = False
        self._progress = 0.0

    def stalled(self, now: float) -> float:
        return now - self._progress if self._queue else 0.0

    def push(self, parts: Iterable[Part], done: Callable[[], None] | None = None) -> None:
        if self._closed:
            if done is not None:
                done()
            return
        if not self._queue:
            self._progress = time.monotonic()
        self._queue.extend(parts)
        if done is not None:
            self._queue.append(done)
        self._flush()

    def flushed(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.push((), functools.partial(resolve, future))
        return future

    def writable(self, flowing: bool) -> None:
        """The transport's flow control: it holds too much, or room again."""
        self._paused = not flowing
        if flowing:
            self._progress = time.monotonic()
            self._flush()

    def _flush(self) -> None:
        if self._flushing:  # a write's flow control called back into us
            return
        self._flushing = True
        try:
            self._write_queued()
        except OSError as e:
            self.close()
            self._on_error(e)
        finally:
            self._flushing = False

    def _write_queued(self) -> None:
        queue, write = self._queue, self._transport.write
        batch = bytearray()  # small buffers, and what follows them
        while queue and not self._paused and not self._closed:
            head = queue.popleft()
            if isinstance(head, Region):
                piece = min(head.count, TLS_PIECE)
                start = len(batch)
                data = bytearray(start + piece)
                data[:start] = batch
                got = os.preadv(head.fd, [memoryview(data)[start:]], head.offset)
                if got == 0:  # the file shrank under us; the header is out already
                    raise OSError(errno.EIO, "the disk ended before the data did")
                head.offset += got
                head.count -= got
                if head.count:
                    queue.appendleft(head)
                batch = bytearray()
                write(data if got == piece else memoryview(data)[: start + got])
            elif isinstance(head, _BUFFERS):
                if len(head) < _TLS_SMALL:
                    batch += head
                    continue
                if batch:
                    write(batch)
                    batch = bytearray()
                write(head)
            else:
                if batch:
                    write(batch)
                    batch = bytearray()
                head()
            self._progress = time.monotonic()
        if batch:
            write(batch)

    def close(self) -> None:
        """Stop sending; run the marks of whatever was still queued."""
        self._closed = True
        queue, self._queue = self._queue, deque()
        for part in queue:
            if not isinstance(part, (*_BUFFERS, Region)):
                part()

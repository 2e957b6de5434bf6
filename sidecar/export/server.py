"""The sidecar's NBD server: the disk read-only, with base:allocation and
qemu:dirty-bitmap:NAME block status, as ``qemu-nbd -B NAME`` serves it.

One ``Connection`` per client: the fixed-newstyle handshake, then the
transmission phase. There a request that needs no waiting (a read of a local
file, a bitmap's block status, errors) is answered at once in the event loop;
one that may block (reads and allocation through libnbd, SEEK_DATA over a
large range) runs as its own task. Every reply is queued whole on a
``_Sender`` that writes straight to the socket, file data by sendfile(2);
replies may come out of order, chunks never interleave.
``../shared/nbd-interop.md`` lists what real clients require; qemu-nbd 7.2 is
the reference for every doubtful case.

Two kinds of failure: ``ProtocolError`` (or the client vanishing) ends that
connection only; ``RequestError`` fails one request with an errno. Nothing a
client sends makes the server allocate more than ``MAX_REQUEST`` bytes for one
request or ``MAX_OPTION`` for one option.

``NbdServer`` owns the limits on the clients together (how many, how long a
handshake may take: see its docstring); ``sidecar.listener`` accepts them,
and ``sidecar.export.upstream`` shares a few connections to an NBD disk among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dirtydiff import errors
from dirtydiff import nbdproto as proto
from dirtydiff.bitmapfile import BitmapFile, Reason, inconsistency
from dirtydiff.disk import Backend, FileBackend
from dirtydiff.disk import Connection as DiskConnection
from dirtydiff.extents import extent_arrays
from dirtydiff.extents import extents as bitmap_extents
from dirtydiff.nbdproto import Cmd, CmdFlag, Errno, Opt, Rep, RequestError
from dirtydiff.state import StateDir
from sidecar import memory
from sidecar.export.upstream import UpstreamPool
from sidecar.limits import HANDSHAKE_LIMIT, MAX_CONNECTIONS
from sidecar.listener import Listener, Throttle, tcp_sockets, unix_socket

log = logging.getLogger(__name__)

# Receive buffer of a connection in the transmission phase: thousands of
# request headers.
_INPUT = 64 * 1024
# Requests in flight per connection (accepted, reply not yet handed to the
# kernel): enough to keep a disk busy, and the bound on what one client can
# make the server queue when it stops reading replies.
MAX_IN_FLIGHT = 16
# Read buffers of all connections together: a client-given length never makes
# the server hold more than this (each read is at most MAX_REQUEST).
READ_BUDGET = 256 * 1024 * 1024
# ... and of one connection: a buffer is held until its reply is with the
# kernel, so a client that stops reading its replies keeps what it holds; it
# may not hold the whole budget and stall every other client's reads.
CONNECTION_READ_BUDGET = 2 * proto.MAX_REQUEST
# But four such clients held it all. A connection holding read buffers whose
# socket has taken no byte of its replies for REPLY_STALL seconds while
# another client waits for the budget is closed, its buffers freed; and one
# that has taken none for REPLY_DEADLINE seconds, whoever waits.
REPLY_STALL = 2.0
REPLY_DEADLINE = 60.0
# Once the budget is idle after this much was given back, the free pages go
# back to the system (sidecar.memory says why that takes doing).
TRIM_AFTER = 32 * 1024 * 1024
BLOCK_SIZES = (1, 4096, proto.MAX_REQUEST)
# How often the server looks for connections past their handshake limit, or
# whose replies stalled.
WATCH_INTERVAL = 0.2
# Seconds a client in transmission must have been idle (nothing in flight)
# before the connection limit may close it for a new client.
IDLE_EVICTABLE = 1.0


@dataclass
class Export:
    """What one export name serves: a disk and the bitmaps of a state dir."""

    name: str
    backend: Backend
    state: StateDir | None = None
    bitmap_filter: frozenset[str] | None = None  # --bitmap: only these
    description: str = ""
    sendfile_path: Path | None = None  # a local file: reads use sendfile(2)
    _open_bitmaps: weakref.WeakValueDictionary[str, BitmapFile] = field(
        default_factory=weakref.WeakValueDictionary
    )
    # An NBD disk's connections, shared by every client (sidecar.export.upstream);
    # a local file's one descriptor needs none.
    upstream: UpstreamPool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, FileBackend):
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


# Request counters are keyed by the spec's command names, lower case.
_COMMAND_NAMES = {int(c): c.name.lower() for c in Cmd}


@dataclass
class ServerStats:
    """What the export counts for /metrics: plain integers, bumped in the
    event loop (one thread), read at scrape time."""

    connections_total: int = 0
    requests: dict[str, int] = field(default_factory=dict)  # by command
    errors: dict[str, int] = field(default_factory=dict)  # by errno name, or "protocol"

    def request(self, kind: int) -> None:
        name = _COMMAND_NAMES.get(kind, "unknown")
        self.requests[name] = self.requests.get(name, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass
class Context:
    """A meta context selected by SET_META_CONTEXT."""

    id: int
    name: str
    # (count, offset, req_one) -> the BLOCK_STATUS descriptors (32-bit length,
    # 32-bit flags, big-endian) covering exactly [offset, offset+count)
    descriptors: Callable[[int, int, bool], bytes]
    # Whether descriptors() may block on I/O (then it runs in a thread); the
    # bitmap's is memory-only and quick, and a thread hop would cost more.
    blocking: bool = True


def _pack(lengths: Any, flags: Any) -> bytes:
    """Descriptors for many extents at once, packed by numpy."""
    out = np.empty((len(lengths), 2), dtype=">u4")
    out[:, 0] = lengths
    out[:, 1] = flags
    return out.tobytes()


class _BitmapStatus:
    """qemu:dirty-bitmap:NAME block status on one connection.

    Clients walk the disk one request after another, each sent once the
    previous reply is in (nbdinfo --map, virtnbdbackup, ovirt-imageio), so
    the time of every answer adds up; and numpy's time goes mostly by call,
    not by byte (in the server, between other work, an 8 KiB bitmap window
    cost ~100 us, several times what it costs in a loop). So a request that
    continues a walk is answered by one extent_arrays call over it and the
    next AHEAD - 1 requests of the same length. Each answer kept keeps the
    bitmap bytes it was computed from, and is used only for exactly its
    request and only while those bytes are unchanged: then it is the answer
    computing it at that moment would give.
    """

    AHEAD = 8
    # Bitmap bytes one computation may cover: numpy's temporaries stay small
    # (a 128 KiB window cost ~1.5 ms a computation in the server), and so do
    # the answers kept: at most 8 * WINDOW extents, 3 MiB of descriptors per
    # connection and bitmap (its replies in flight may hold up to 16 MiB).
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
        stat and a 4 KiB pread cost a few microseconds; a request covers up
        to 4 GiB.
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


def _merge(
    found: Iterable[tuple[int, int, int]], offset: int, count: int, one: bool
) -> list[tuple[int, int]]:
    """(offset, length, flags) -> (length, flags) covering exactly the request,
    neighbours merged; a range the source did not describe counts as data."""
    end = offset + count
    merged: list[list[int]] = []

    def add(length: int, flags: int) -> None:
        if merged and merged[-1][1] == flags:
            merged[-1][0] += length
        else:
            merged.append([length, flags])

    pos = offset
    for start, length, flags in found:
        stop = min(start + length, end)
        if stop <= pos:
            continue
        if start > pos:
            add(start - pos, 0)
        add(stop - max(start, pos), flags)
        pos = stop
        if pos >= end:
            break
    if pos < end:
        add(end - pos, 0)
    if one:
        merged = merged[:1]
    return [(length, flags) for length, flags in merged]


class _Region:
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
Part = bytes | bytearray | memoryview | _Region | Callable[[], None]
_BUFFERS = (bytes, bytearray, memoryview)  # a tuple: isinstance is cheapest with one
_IOV_MAX = 1024  # buffers per writev(2) (Linux's UIO_MAXIOV)


class _Sender:
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
        self.push((), functools.partial(_resolve, future))
        return future

    def _flush(self) -> None:
        queue = self._queue
        try:
            while queue:
                head = queue[0]
                if isinstance(head, _Region):
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
                        if isinstance(part, _Region) or len(buffers) == _IOV_MAX:
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
            if isinstance(head, _Region):
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
            if not isinstance(part, (*_BUFFERS, _Region)):
                part()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# A BLOCK_STATUS chunk's header: the structured reply header, the context id.
_STATUS_HEADER = struct.Struct(proto.STRUCTURED_REPLY.format + proto.BLOCK_STATUS_ID.format[1:])
# Plain ints for the hot paths: operators on IntFlag members build new members.
_REQ_ONE = int(CmdFlag.REQ_ONE)
_DF = int(CmdFlag.DF)
# Flags each command accepts; anything else is EINVAL, as in qemu-nbd. FUA is
# on every command: the export advertises SEND_FUA, and the spec then says a
# server MUST accept it everywhere (it means nothing on a read-only export).
# DF only once structured replies are negotiated: it is about their chunks.
_FUA = int(CmdFlag.FUA)
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: _FUA,
    Cmd.FLUSH: _FUA,
    Cmd.CACHE: _FUA,
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
    Cmd.TRIM: _FUA,
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
}


def _data_header(cookie: int, offset: int, size: int, done: bool) -> bytes:
    """An OFFSET_DATA chunk up to its data."""
    flags = proto.REPLY_FLAG_DONE if done else 0
    return proto.STRUCTURED_REPLY.pack(
        proto.STRUCTURED_REPLY_MAGIC, flags, proto.ReplyType.OFFSET_DATA, cookie, 8 + size
    ) + proto.OFFSET.pack(offset)


class Connection:
    # Set by attach(), once the accepted socket has its transport.
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.started = time.monotonic()  # the handshake limit counts from here
        self.active = self.started  # when it last sent a byte or had a reply sent
        self._attached = False
        self._aborted = False
        self.structured = False
        self.no_zeroes = False
        self.fixed = False
        self.export: Export | None = None
        self.contexts: list[Context] = []
        self.contexts_export: str | None = None
        self.disk: DiskConnection | None = None
        self._file_fd = -1  # the disk's fd when it is a local file: reads use sendfile
        self._wlock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sender: _Sender | None = None  # set when transmission starts
        self._pending = 0  # requests accepted whose replies are not all sent
        # The transmission phase's request parser (see _transmission): bytes
        # received are _input[_head:_tail].
        self._input = bytearray()
        self._head = self._tail = 0
        self._skip = 0  # payload bytes of a refused write still to discard
        self._skipping: proto.Request | None = None  # ...and that write
        self._paused = False  # MAX_IN_FLIGHT reached: the transport stopped reading
        self._resuming = False
        self._ended: asyncio.Future[None] | None = None
        self._status_blocks = False  # whether block status needs a task (and a thread)

    # -- I/O helpers ---------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def _drain_bytes(self, n: int) -> None:
        """Read and discard n bytes without holding them."""
        while n > 0:
            chunk = await self.reader.read(min(n, 1 << 20))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(chunk)

    async def _send(self, *chunks: bytes | bytearray) -> None:
        """Send chunks whole; return once they are with the kernel."""
        if self._sender is not None:
            sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._sender.push(chunks, functools.partial(_resolve, sent))
            await sent
            return
        async with self._wlock:
            for chunk in chunks:
                self.writer.write(chunk)
            await self.writer.drain()

    async def _send_reply(self, chunks: list[bytes | bytearray]) -> None:
        """``_send`` for a reply holding read buffers, letting go of them as
        they are queued (``chunks`` is emptied). If the connection ends
        first, the request's frames stay in its CancelledError's traceback,
        in a cycle that only the cyclic collector breaks, and an idle server
        may not run it for long: its buffers, up to 32 MiB each, must not be
        there. (Seen: 8 MB that stayed after clients that never read.)"""
        assert self._sender is not None
        sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sender.push(chunks, functools.partial(_resolve, sent))
        chunks.clear()
        await sent

    def _reply_now(self, *parts: Part) -> None:
        """Queue the whole reply of a request answered without a task; its
        slot frees once the reply is sent."""
        assert self._sender is not None
        self._sender.push(parts, self._release)

    def _release(self) -> None:
        self._pending -= 1
        if not self._pending:
            self.active = time.monotonic()
        if self._paused and not self._resuming:
            # Not from here: a reply's mark runs inside the sender's flush,
            # and parsing queues more replies on that sender.
            self._resuming = True
            asyncio.get_running_loop().call_soon(self._resume)

    def _transport(self) -> asyncio.Transport:
        transport = self.writer.transport
        assert isinstance(transport, asyncio.Transport)  # a socket's: it reads too
        return transport

    def _broken(self, error: OSError) -> None:
        """Writing failed (the client went away): end the connection."""
        log.info("client %s: send failed: %s", self._peer(), error)
        self.writer.transport.abort()

    # -- lifecycle ---------------------------------------------------------

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._attached = True

    def abort(self) -> None:
        """End the connection now (the server's decision: a limit); run()
        then finishes as when the client goes away."""
        self._aborted = True
        if self._attached:
            self.writer.transport.abort()

    async def run(self) -> None:
        try:
            if self._aborted:  # ended before it had its transport
                self.writer.transport.abort()
                return
            if await self._handshake():
                await self._transmission()
        except (asyncio.IncompleteReadError, ConnectionError, proto.ProtocolError) as e:
            if isinstance(e, proto.ProtocolError):
                self.server.stats.error("protocol")
            log.info("client %s: connection ended: %s", self._peer(), e or type(e).__name__)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self._wait_for_tasks()
            if self._sender is not None:
                self._sender.close()
            # The bitmaps it chose go now, not when the collector finds this
            # connection's cycles: a removed bitmap's file is then closed and
            # unmapped (its space freed) as its last connection ends.
            self.contexts = []
            if self._file_fd >= 0:
                self.disk = None  # the file backend's shared fd stays open
            if self.disk is not None:
                await asyncio.to_thread(self.disk.close)
            with contextlib.suppress(Exception):
                self.writer.close()
                await self.writer.wait_closed()

    def _peer(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return str(peer) if peer else "unix"

    # -- handshake -----------------------------------------------------------

    async def _handshake(self) -> bool:
        """Negotiate; True when the transmission phase should start."""
        flags = proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
        await self._send(proto.SERVER_GREETING.pack(proto.NBDMAGIC, proto.IHAVEOPT, flags))
        (client_flags,) = proto.CLIENT_FLAGS.unpack(await self._read(4))
        if client_flags & ~proto.KNOWN_CLIENT_FLAGS:
            raise proto.ProtocolError(f"unknown client flags {client_flags:#x}")
        self.fixed = bool(client_flags & proto.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(client_flags & proto.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = proto.OPTION_HEADER.unpack(await self._read(16))
            if magic != proto.IHAVEOPT:
                raise proto.ProtocolError(f"bad option magic {magic:#x}")
            if option == Opt.EXPORT_NAME:
                return await self._opt_export_name(length)
            if not self.fixed:
                raise proto.ProtocolError("option other than EXPORT_NAME without fixed newstyle")
            if length > proto.MAX_OPTION:
                await self._drain_bytes(length)
                await self._reply(option, Rep.ERR_TOO_BIG, b"option payload too large")
                continue
            payload = await self._read(length)
            if option == Opt.ABORT:
                with contextlib.suppress(ConnectionError):
                    await self._reply(option, Rep.ACK)
                return False
            handler = self._options.get(option)
            if handler is None:
                await self._reply(option, Rep.ERR_UNSUP, b"option not supported")
                continue
            try:
                if await handler(self, option, payload):
                    return True
            except RequestError as e:
                await self._reply(option, Rep.ERR_INVALID, e.message.encode())

    async def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        await self._send(proto.option_reply(option, reply, payload))

    def _find_export(self, name: str) -> Export | None:
        return self.server.exports.get(name)

    def _transmission_flags(self) -> int:
        flags = (
            proto.TransmissionFlag.HAS_FLAGS
            | proto.TransmissionFlag.READ_ONLY
            | proto.TransmissionFlag.SEND_FLUSH
            | proto.TransmissionFlag.SEND_FUA
            | proto.TransmissionFlag.SEND_CACHE
            | proto.TransmissionFlag.CAN_MULTI_CONN  # read-only: trivially safe
        )
        if self.structured:
            flags |= proto.TransmissionFlag.SEND_DF
        return int(flags)

    async def _opt_export_name(self, length: int) -> bool:
        if length > proto.MAX_STRING:
            raise proto.ProtocolError("export name too long")
        name = (await self._read(length)).decode(errors="replace")
        export = self._find_export(name)
        if export is None:
            raise proto.ProtocolError(f"unknown export {name!r}")  # spec: must disconnect
        reply = proto.EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags())
        if not self.no_zeroes:
            reply += bytes(proto.EXPORT_NAME_PADDING)
        await self._send(reply)
        await self._enter(export)
        return True

    async def _opt_list(self, option: int, payload: bytes) -> bool:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"LIST takes no payload")
            return False
        for export in self.server.exports.values():
            name = export.name.encode()
            await self._reply(
                option,
                Rep.SERVER,
                struct.pack("!I", len(name)) + name + export.description.encode(),
            )
        await self._reply(option, Rep.ACK)
        return False

    async def _opt_starttls(self, option: int, payload: bytes) -> bool:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"STARTTLS takes no payload")
        else:
            await self._reply(option, Rep.ERR_POLICY, b"TLS not configured")
        return False

    async def _opt_structured_reply(self, option: int, payload: bytes) -> bool:
        if payload:
            await self._reply(option, Rep.ERR_INVALID, b"STRUCTURED_REPLY takes no payload")
        elif self.structured:
            await self._reply(option, Rep.ERR_INVALID, b"structured replies already negotiated")
        else:
            self.structured = True
            await self._reply(option, Rep.ACK)
        return False

    async def _opt_info_go(self, option: int, payload: bytes) -> bool:
        name, requests = proto.parse_info_request(payload)
        export = self._find_export(name)
        if export is None:
            await self._reply(option, Rep.ERR_UNKNOWN, f"export {name!r} not present".encode())
            return False
        info = proto.INFO_EXPORT.pack(proto.Info.EXPORT, export.size, self._transmission_flags())
        await self._reply(option, Rep.INFO, info)
        if proto.Info.NAME in requests:
            await self._reply(
                option, Rep.INFO, struct.pack("!H", proto.Info.NAME) + export.name.encode()
            )
        if proto.Info.DESCRIPTION in requests and export.description:
            await self._reply(
                option,
                Rep.INFO,
                struct.pack("!H", proto.Info.DESCRIPTION) + export.description.encode(),
            )
        await self._reply(
            option, Rep.INFO, proto.INFO_BLOCK_SIZE.pack(proto.Info.BLOCK_SIZE, *BLOCK_SIZES)
        )
        await self._reply(option, Rep.ACK)
        if option == Opt.GO:
            await self._enter(export)
            return True
        return False

    async def _opt_meta_context(self, option: int, payload: bytes) -> bool:
        if option == Opt.SET_META_CONTEXT and not self.structured:
            await self._reply(option, Rep.ERR_INVALID, b"structured replies not negotiated")
            return False
        name, queries = proto.parse_string_list(payload)
        export = self._find_export(name)
        if export is None:
            await self._reply(option, Rep.ERR_UNKNOWN, f"export {name!r} not present".encode())
            return False
        # A few small state-dir reads, done inline like export.bitmap() below:
        # a thread hop (a new thread, on a fresh server) cost more.
        available = export.contexts()
        if option == Opt.LIST_META_CONTEXT:
            chosen = [c for c in available if not queries or any(_matches(q, c) for q in queries)]
            for context in chosen:
                await self._reply(option, Rep.META_CONTEXT, struct.pack("!I", 0) + context.encode())
        else:
            wanted = set(queries)
            self.contexts = []
            self.contexts_export = export.name
            for index, context in enumerate(available):
                if context not in wanted:
                    continue
                # qemu-nbd's ids: 0 for base:allocation, 2 + i for bitmap i.
                number = 0 if index == 0 else index + 1
                try:
                    self.contexts.append(self._context(export, number, context))
                except (OSError, errors.DirtydiffError) as e:
                    log.info("context %s not selected: %s", context, e)  # removed just now
                    continue
                await self._reply(
                    option, Rep.META_CONTEXT, struct.pack("!I", number) + context.encode()
                )
        await self._reply(option, Rep.ACK)
        return False

    _options: ClassVar[dict[int, Callable[[Connection, int, bytes], Any]]] = {
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }

    def _context(self, export: Export, number: int, name: str) -> Context:
        if name == proto.BASE_ALLOCATION:

            def allocation(count: int, offset: int, one: bool) -> bytes:
                assert self.disk is not None
                found = _merge(self.disk.extents(count, offset), offset, count, one)
                return b"".join(proto.EXTENT.pack(length, flags) for length, flags in found)

            return Context(number, name, allocation)
        status = _BitmapStatus(export, name[len(proto.DIRTY_BITMAP_PREFIX) :])
        return Context(number, name, status.descriptors, blocking=False)

    async def _enter(self, export: Export) -> None:
        self.server.negotiated(self)
        self.export = export
        if self.contexts_export != export.name:
            self.contexts = []  # the selection belongs to the export named in it
        backend = export.backend
        if export.upstream is None:
            assert isinstance(backend, FileBackend)
            # Its connection is the backend's shared fd: nothing to wait for,
            # and a thread hop costs more than the whole call.
            self.disk = backend.connect()
            self._file_fd = backend.fd
        else:
            self.disk = await asyncio.to_thread(export.upstream.lease)

    # -- transmission --------------------------------------------------------

    async def _transmission(self) -> None:
        """Requests are parsed as bytes arrive, in the transport's callback,
        from a buffer it receives into: a StreamReader costs a future, a
        task wake-up and a second loop iteration per request, and asyncio's
        plain protocols a fresh 256 KiB bytes object per receive. Clients
        like nbdinfo --map wait for each reply before the next request, so
        this is their latency. This coroutine only waits for the end."""
        transport = self._transport()
        if transport.get_write_buffer_size():
            # Replies now bypass the transport: whatever it still holds of the
            # handshake must go first.
            transport.set_write_buffer_limits(high=0)
            await self.writer.drain()
        self._sender = _Sender(transport.get_extra_info("socket").fileno(), self._broken)
        # The selection is final once the handshake is over.
        self._status_blocks = any(context.blocking for context in self.contexts)
        self._ended = asyncio.get_running_loop().create_future()
        stream = transport.get_protocol()
        assert isinstance(stream, _Protocol)
        # What the client sent after its last option is still in the reader;
        # EOF makes it hand all of that over without waiting.
        self.reader.feed_eof()
        leftover = await self.reader.read()
        self._input = bytearray(max(_INPUT, 2 * len(leftover)))
        self._input[: len(leftover)] = leftover
        self._tail = len(leftover)
        transport.set_protocol(_Intake(self, stream))
        self._parse()
        if stream.done:  # the stream ended before the switch
            self._lost(stream.error)
        try:
            await self._ended
        except proto.ProtocolError:
            await self._sender.flushed()  # qemu-nbd's last words (bad magic) first
            raise
        # NBD_CMD_DISC: finish what is in flight, send nothing more, close.
        await self._wait_for_tasks()
        await self._sender.flushed()

    async def _wait_for_tasks(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _end(self, error: BaseException | None) -> None:
        if self._ended is not None and not self._ended.done():
            self._transport().pause_reading()  # nothing more is read
            if error is None:
                self._ended.set_result(None)
            else:
                self._ended.set_exception(error)

    def _lost(self, error: Exception | None) -> None:
        """The client's side of the stream ended (EOF or the connection
        broke): as a StreamReader's readexactly would have reported it."""
        if error is None:
            partial = bytes(self._input[self._head : self._tail])
            error = asyncio.IncompleteReadError(partial, proto.REQUEST.size)
        self._end(error)

    def _get_buffer(self) -> memoryview:
        """Where the transport receives to: after what is not parsed yet.
        Reading pauses whenever parsing stops short of the end (requests in
        flight at the limit, or the end of the connection), so room is only
        ever short of a request header here."""
        data = self._input
        if len(data) - self._tail < _INPUT // 2:
            size = self._tail - self._head
            data[:size] = data[self._head : self._tail]
            self._head, self._tail = 0, size
        return memoryview(data)[self._tail :]

    def _buffer_updated(self, size: int) -> None:
        self._tail += size
        self.active = time.monotonic()
        self._parse()

    def stalled(self, now: float) -> float:
        """Seconds its socket has taken nothing of the replies queued."""
        return self._sender.stalled(now) if self._sender is not None else 0.0

    def idle(self, now: float) -> float:
        """Seconds since it was last active, in transmission with nothing in
        flight; 0 otherwise."""
        if self._sender is None or self._pending:
            return 0.0
        return now - self.active

    def _resume(self) -> None:
        self._resuming = False
        assert self._ended is not None
        if self._paused and self._pending < MAX_IN_FLIGHT and not self._ended.done():
            self._paused = False
            self._parse()
            if not self._paused and not self._ended.done():
                self._transport().resume_reading()

    def _parse(self) -> None:
        """Act on every whole request received, until MAX_IN_FLIGHT are
        pending (then the transport stops reading: what a client may make
        the server hold stays bounded)."""
        assert self._ended is not None
        data, pos, tail = self._input, self._head, self._tail
        try:
            while not self._ended.done():
                if self._skipping is not None:
                    taken = min(self._skip, tail - pos)
                    pos += taken
                    self._skip -= taken
                    if self._skip:
                        break
                    # EINVAL, not EPERM: what qemu-nbd 7.2 answers on a read-only export.
                    self._reply_now(
                        self._error(self._skipping, Errno.EINVAL, "export is read-only")
                    )
                    self._skipping = None
                if tail - pos < proto.REQUEST.size:
                    break
                if self._pending >= MAX_IN_FLIGHT:
                    if not self._paused:
                        self._paused = True
                        self._transport().pause_reading()
                    break
                fields = proto.REQUEST.unpack_from(data, pos)
                pos += proto.REQUEST.size
                self._request(*fields)
        except Exception as e:  # ends this connection only: run() reports it
            self._end(e)
        finally:
            self._head = pos

    def _request(
        self, magic: int, flags: int, kind: int, cookie: int, offset: int, length: int
    ) -> None:
        if magic != proto.REQUEST_MAGIC:
            # As qemu-nbd: fail the garbled request by its cookie, then hang up.
            self._pending += 1
            self._reply_now(
                self._error(proto.Request(0, 0, cookie, 0, 0), Errno.EINVAL, "bad request magic")
            )
            self._end(proto.ProtocolError(f"bad request magic {magic:#x}"))
            return
        request = proto.Request(flags, kind, cookie, offset, length)
        self.server.stats.request(kind)
        if request.type == Cmd.DISC:
            self._end(None)
            return
        self._pending += 1
        if request.type == Cmd.WRITE:
            # Read-only: consume the payload (bounded) and fail the write.
            if request.length > proto.MAX_REQUEST:
                raise proto.ProtocolError(f"write of {request.length} bytes is over the limit")
            self._skip, self._skipping = request.length, request
            return
        try:
            rest = self._dispatch(request)
        except RequestError as e:
            self._reply_now(self._error(request, e.errno, e.message))
            return
        except OSError as e:
            self._reply_now(self._io_error(request, e))
            return
        if rest is not None:  # it may block: a task of its own
            task = asyncio.create_task(self._finish(request, rest))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, rest))

    def _done(self, rest: Coroutine[Any, Any, object], task: asyncio.Task[None]) -> None:
        # A task cancelled before its first step (the connection ended in
        # the same read) never started ``rest``: close it, or it is reported
        # as never awaited. Closing one that ran is a no-op.
        rest.close()
        self._tasks.discard(task)
        self._release()

    def _error(self, request: proto.Request, errno: Errno, message: str) -> bytes:
        self.server.stats.error(errno.name)
        if self.structured:
            return proto.error_chunk(request.cookie, errno, message)
        return proto.simple_reply(request.cookie, errno)

    def _io_error(self, request: proto.Request, e: OSError) -> bytes:
        log.warning("request %s failed: %s", request, e)
        return self._error(request, Errno.EIO, f"I/O error: {e.strerror or e}")

    async def _fail(self, request: proto.Request, errno: Errno, message: str) -> None:
        await self._send(self._error(request, errno, message))

    async def _finish(
        self, request: proto.Request, rest: Coroutine[Any, Any, list[bytes | bytearray]]
    ) -> None:
        """The part of a request that may block, then its reply."""
        try:
            chunks = await rest
        except RequestError as e:
            await self._fail(request, e.errno, e.message)
        except OSError as e:
            await self._send(self._io_error(request, e))
        else:
            if chunks:
                await self._send(*chunks)

    def _check_range(self, request: proto.Request) -> None:
        assert self.export is not None
        size = self.export.size
        if request.offset > size or request.length > size - request.offset:
            raise RequestError(Errno.EINVAL, "request past the end of the export")

    def _dispatch(
        self, request: proto.Request
    ) -> Coroutine[Any, Any, list[bytes | bytearray]] | None:
        """Answer a request now if nothing in it can block; else return the
        coroutine that makes the reply's chunks."""
        kind, flags = request.type, request.flags
        allowed = _ALLOWED_FLAGS.get(kind)
        if allowed is None:
            raise RequestError(Errno.EINVAL, f"unsupported command {kind}")
        if kind == Cmd.READ and self.structured:
            allowed |= _DF
        if flags & ~allowed:
            raise RequestError(Errno.EINVAL, f"unsupported flags {flags:#x}")
        if kind == Cmd.READ:
            if request.length > proto.MAX_REQUEST:
                raise RequestError(
                    Errno.EINVAL, f"read of {request.length} bytes is over the limit"
                )
            self._check_range(request)
            if self._file_fd < 0:
                return self._read_buffered(request)
            self._read_file(request)
        elif kind == Cmd.BLOCK_STATUS:
            self._check_block_status(request)
            if self._status_blocks:
                return self._block_status(request)
            one = bool(flags & _REQ_ONE)
            self._reply_now(*self._status_chunks(request, [
                context.descriptors(request.length, request.offset, one)
                for context in self.contexts
            ]))  # fmt: skip
        elif kind in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            # Not advertised on a read-only export: qemu-nbd answers EINVAL too.
            raise RequestError(Errno.EINVAL, "export is read-only")
        else:
            if kind == Cmd.CACHE:
                self._check_range(request)
            # Success of a command without data (FLUSH, CACHE): a simple reply
            # even once structured replies are negotiated (the spec allows it;
            # qemu does it).
            self._reply_now(proto.simple_reply(request.cookie))
        return None

    def _read_file(self, request: proto.Request) -> None:
        """Answer a READ of the local disk file, data by sendfile. With
        structured replies and no DF flag, zero ranges go out as OFFSET_HOLE
        chunks and data as OFFSET_DATA, one chunk per allocation extent, as
        qemu-nbd does; otherwise one data chunk."""
        assert self.disk is not None
        fd, cookie, offset, length = self._file_fd, request.cookie, request.offset, request.length
        if not self.structured:
            if length:
                self._reply_now(proto.simple_reply(cookie), _Region(fd, offset, length))
            else:
                self._reply_now(proto.simple_reply(cookie))
        elif length == 0:
            self._reply_now(proto.structured_chunk(cookie, proto.ReplyType.NONE, b"", done=True))
        elif request.flags & _DF:
            self._reply_now(_data_header(cookie, offset, length, True), _Region(fd, offset, length))
        else:
            pieces = _merge(self.disk.extents(length, offset), offset, length, False)
            parts: list[Part] = []
            last = len(pieces) - 1
            for i, (size, flags) in enumerate(pieces):
                if flags & proto.STATE_ZERO:
                    hole = proto.OFFSET_HOLE.pack(offset, size)
                    parts.append(
                        proto.structured_chunk(
                            cookie, proto.ReplyType.OFFSET_HOLE, hole, done=i == last
                        )
                    )
                else:
                    parts += (
                        _data_header(cookie, offset, size, i == last),
                        _Region(fd, offset, size),
                    )
                offset += size
            self._reply_now(*parts)

    async def _read_buffered(self, request: proto.Request) -> list[bytes | bytearray]:
        """A READ through the backend (libnbd), into a buffer that counts
        against the read budget until the reply is sent."""
        assert self.disk is not None
        async with self.server.read_budget.hold(self, request.length) as held:
            if not self.structured:
                chunks: list[bytes | bytearray] = [
                    proto.simple_reply(request.cookie), bytearray(request.length)
                ]  # fmt: skip
                if request.length:
                    await asyncio.to_thread(self.disk.pread, chunks[1], request.offset)
            elif request.length == 0:
                chunks = [
                    proto.structured_chunk(request.cookie, proto.ReplyType.NONE, b"", done=True)
                ]
            else:
                chunks = await asyncio.to_thread(
                    _read_chunks, self.disk, request.cookie, request.offset, request.length,
                    sparse=not request.flags & CmdFlag.DF,
                )  # fmt: skip
                # Until it is sent, the reply holds only its data: a hole's
                # chunk is a few bytes, whatever length it covers.
                await held.keep(sum(len(c) for c in chunks if isinstance(c, bytearray)))
            await self._send_reply(chunks)
        return []

    def _check_block_status(self, request: proto.Request) -> None:
        if not self.structured or not self.contexts:
            raise RequestError(Errno.EINVAL, "no meta context negotiated")
        if request.length == 0:
            raise RequestError(Errno.EINVAL, "block status of zero bytes")
        self._check_range(request)

    async def _block_status(self, request: proto.Request) -> list[bytes | bytearray]:
        one = bool(request.flags & _REQ_ONE)
        found = []
        for context in self.contexts:
            if context.blocking:
                found.append(
                    await asyncio.to_thread(
                        context.descriptors, request.length, request.offset, one
                    )
                )
            else:
                found.append(context.descriptors(request.length, request.offset, one))
        return self._status_chunks(request, found)

    def _status_chunks(self, request: proto.Request, found: list[bytes]) -> list[bytes | bytearray]:
        """One BLOCK_STATUS chunk per selected context, DONE on the last;
        each chunk as its header and its descriptors, which writev sends
        without another copy."""
        chunks: list[bytes | bytearray] = []
        last = len(self.contexts) - 1
        for i, (context, descriptors) in enumerate(zip(self.contexts, found, strict=True)):
            flags = proto.REPLY_FLAG_DONE if i == last else 0
            chunks += (
                _STATUS_HEADER.pack(
                    proto.STRUCTURED_REPLY_MAGIC, flags, proto.ReplyType.BLOCK_STATUS,
                    request.cookie, 4 + len(descriptors), context.id,
                ),
                descriptors,
            )  # fmt: skip
        return chunks


def _read_chunks(
    disk: DiskConnection, cookie: int, offset: int, length: int, *, sparse: bool
) -> list[bytes | bytearray]:
    """The chunks of a structured READ reply, made in one worker-thread call:
    with ``sparse``, zero ranges as OFFSET_HOLE and data as OFFSET_DATA, one
    chunk per allocation extent, as qemu-nbd does; else one data chunk."""
    pieces = (
        _merge(disk.extents(length, offset), offset, length, False) if sparse else [(length, 0)]
    )
    chunks: list[bytes | bytearray] = []
    for i, (size, flags) in enumerate(pieces):
        done = i == len(pieces) - 1
        if flags & proto.STATE_ZERO:
            hole = proto.OFFSET_HOLE.pack(offset, size)
            chunks.append(
                proto.structured_chunk(cookie, proto.ReplyType.OFFSET_HOLE, hole, done=done)
            )
        else:
            buf = bytearray(size)
            disk.pread(buf, offset)
            flag = proto.REPLY_FLAG_DONE if done else 0
            header = proto.STRUCTURED_REPLY.pack(
                proto.STRUCTURED_REPLY_MAGIC, flag, proto.ReplyType.OFFSET_DATA, cookie, 8 + size
            )
            chunks += [header + proto.OFFSET.pack(offset), buf]
        offset += size
    return chunks


def _matches(query: str, context: str) -> bool:
    """LIST_META_CONTEXT query semantics of qemu-nbd."""
    if query == context:
        return True
    if query == "base:":
        return context.startswith("base:")
    if query == "qemu:":
        return context.startswith("qemu:")
    if query == proto.DIRTY_BITMAP_PREFIX:
        return context.startswith(proto.DIRTY_BITMAP_PREFIX)
    return False


class ByteBudget:
    """Bytes of read buffers the server may hold at once: ``limit`` across
    clients, ``per_holder`` for each (a connection). A hold counts what was
    asked for while the buffers are made, then what they keep (``keep``)."""

    def __init__(self, limit: int, per_holder: int) -> None:
        self.limit = limit
        self.per_holder = per_holder
        self.used = 0
        self.returned = 0  # bytes given back since the server last trimmed
        self.held: dict[object, int] = {}
        self._waiting: dict[object, tuple[object, int]] = {}  # token -> (holder, bytes)
        self._changed = asyncio.Condition()

    def _fits(self, holder: object, n: int) -> bool:
        return self.used + n <= self.limit and self.held.get(holder, 0) + n <= self.per_holder

    def starved(self) -> bool:
        """Whether a hold waits that its holder's own share would allow: it
        waits for what the other holders have."""
        return any(
            self.used + n > self.limit and self.held.get(holder, 0) + n <= self.per_holder
            for holder, n in self._waiting.values()
        )

    def hold(self, holder: object, n: int) -> Hold:
        """``async with budget.hold(connection, n) as held:`` n bytes."""
        return Hold(self, holder, n)

    async def _take(self, holder: object, n: int) -> None:
        async with self._changed:
            if not self._fits(holder, n):
                token = object()
                self._waiting[token] = (holder, n)
                try:
                    await self._changed.wait_for(lambda: self._fits(holder, n))
                finally:
                    del self._waiting[token]
            self.used += n
            self.held[holder] = self.held.get(holder, 0) + n

    async def _give_back(self, holder: object, n: int) -> None:
        if not n:
            return  # a hole's reply kept nothing
        async with self._changed:
            self.used -= n
            self.returned += n
            left = self.held.pop(holder) - n
            if left:
                self.held[holder] = left
            self._changed.notify_all()


class Hold:
    """Bytes one read holds of a ByteBudget while in ``async with``."""

    def __init__(self, budget: ByteBudget, holder: object, n: int) -> None:
        self._budget = budget
        self._holder = holder
        self.n = n

    async def __aenter__(self) -> Hold:
        await self._budget._take(self._holder, self.n)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._budget._give_back(self._holder, self.n)

    async def keep(self, n: int) -> None:
        """Hold only ``n`` bytes from now on (at most what is held)."""
        if n < self.n:
            # Cancelled while it waits for the lock, it gave nothing back
            # and still holds all: __aexit__ gives that.
            await self._budget._give_back(self._holder, self.n - n)
            self.n = n


class _Protocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol (the handshake's), remembering whether the
    stream ended: after EOF the transport reads no more, so the protocol
    that takes over for the transmission phase would never hear of it."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.done = False
        self.error: Exception | None = None

    def eof_received(self) -> bool | None:
        self.done = True
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.error = self.error or exc
        super().connection_lost(exc)


class _Intake(asyncio.BufferedProtocol):
    """The transmission phase's protocol: the transport receives straight
    into the connection's request buffer. The stream protocol still hears
    how the connection ends (its writer waits on that to close)."""

    def __init__(self, connection: Connection, stream: _Protocol) -> None:
        self._connection = connection
        self._stream = stream

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._connection._get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._connection._buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        self._connection._lost(None)
        return self._stream.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection._lost(exc)
        self._stream.connection_lost(exc)

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()


class NbdServer:
    """The export's listeners and connections, and the limits on them.

    - At most ``max_connections`` at once. When that many are open, one is
      closed to make room: the one that has been negotiating longest (a
      client still in its handshake has nothing in flight: what a flood of
      idle connections is made of), else the one idle longest, if for
      ``IDLE_EVICTABLE`` at least; else the new one is closed. So clients
      that connect and then wait cannot keep everyone else out.
    - A client that has not sent NBD_OPT_GO or EXPORT_NAME within
      ``handshake_limit`` seconds is closed.
    - A client that holds read buffers and reads nothing of its replies is
      closed after REPLY_STALL seconds if others wait for the read budget,
      else after REPLY_DEADLINE.
    - What the clients make it do or hold is logged at a bounded rate.
    """

    def __init__(
        self,
        exports: Iterable[Export],
        read_budget: int = READ_BUDGET,
        *,
        max_connections: int = MAX_CONNECTIONS,
        handshake_limit: float = HANDSHAKE_LIMIT,
    ) -> None:
        self.exports = {e.name: e for e in exports}
        self.read_budget = ByteBudget(read_budget, min(read_budget, CONNECTION_READ_BUDGET))
        self.max_connections = max_connections
        self.handshake_limit = handshake_limit
        self.connections: set[Connection] = set()
        self.stats = ServerStats()
        self._negotiating: dict[Connection, None] = {}  # in their handshake, oldest first
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None
        self._refusals = Throttle()
        self._evictions = Throttle()
        self._timeouts = Throttle()
        self._stalls = Throttle()
        self._trim: asyncio.Task[None] | None = None
        self._was_empty = True  # the read budget, at the watchdog's last look

    # -- connections -------------------------------------------------------

    def _accepted(self, sock: socket.socket) -> None:
        if len(self.connections) >= self.max_connections and not self._make_room():
            sock.close()
            self.stats.error("refused")
            self._refusals.warn(
                "export: connection refused: %d clients, the limit (--max-connections)",
                len(self.connections),
            )
            return
        connection = Connection(self)
        self.connections.add(connection)
        self._negotiating[connection] = None
        task = asyncio.create_task(self._serve(connection, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _make_room(self) -> bool:
        """Close the connection negotiating longest, or else the one idle
        longest; False if none may go."""
        for oldest in self._negotiating:
            self._end(oldest, "evicted")
            self._evictions.warn(
                "export: %d clients, the limit (--max-connections): closed the one "
                "negotiating longest to make room",
                self.max_connections,
            )
            return True
        now = time.monotonic()
        idlest = max(self.connections, key=lambda c: c.idle(now), default=None)
        if idlest is None or idlest.idle(now) < IDLE_EVICTABLE:
            return False
        self._evictions.warn(
            "export: %d clients, the limit (--max-connections): closed the one idle "
            "longest (%.0f s) to make room",
            self.max_connections, idlest.idle(now),
        )  # fmt: skip
        self._end(idlest, "evicted")
        return True

    def _end(self, connection: Connection, kind: str) -> None:
        """End ``connection`` now; it no longer counts against the limit."""
        self._negotiating.pop(connection, None)
        self.connections.discard(connection)
        self.stats.error(kind)
        connection.abort()

    def negotiated(self, connection: Connection) -> None:
        """``connection`` finished its handshake: no deadline, no eviction."""
        self._negotiating.pop(connection, None)

    async def _serve(self, connection: Connection, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            reader = asyncio.StreamReader()
            protocol = _Protocol(reader)
            try:
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
            except BaseException:
                sock.close()
                raise
            connection.attach(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
            self.stats.connections_total += 1
            await connection.run()
        except Exception:
            log.exception("connection failed")  # one client's bug never stops the server
        finally:
            self._negotiating.pop(connection, None)
            self.connections.discard(connection)

    async def _watching(self) -> None:
        """Close the connections past their handshake limit, oldest first,
        and those whose replies stalled (REPLY_STALL, REPLY_DEADLINE)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            while self._negotiating:
                oldest = next(iter(self._negotiating))
                if now - oldest.started < self.handshake_limit:
                    break
                self._end(oldest, "handshake-timeout")
                self._timeouts.warn(
                    "export: closed a client that had not finished its handshake in %g s",
                    self.handshake_limit,
                )
            budget = self.read_budget
            if not budget.held:
                # Empty since the last look too: the connections that held
                # it have let go of their queues as well (they give the
                # budget back first).
                if budget.returned >= TRIM_AFTER and self._was_empty and self._trim is None:
                    budget.returned = 0
                    self._trim = asyncio.create_task(asyncio.to_thread(memory.release))
                    self._trim.add_done_callback(self._trimmed)
                self._was_empty = True
                continue
            self._was_empty = False
            patience = REPLY_STALL if budget.starved() else REPLY_DEADLINE
            for holder, held in list(budget.held.items()):
                assert isinstance(holder, Connection)
                stalled = holder.stalled(now)
                # (One ended already lets go of its buffers as its tasks end.)
                if stalled >= patience and holder in self.connections:
                    self._end(holder, "stalled")
                    self._stalls.warn(
                        "export: closed a client that had read nothing of its replies for "
                        "%.0f s, holding %d MiB of read buffers",
                        stalled, held >> 20,
                    )  # fmt: skip

    # -- listeners -----------------------------------------------------------

    def _trimmed(self, task: asyncio.Task[None]) -> None:
        self._trim = None

    def _listen(self, sock: socket.socket) -> None:
        self._listeners.append(Listener(sock, self._accepted, "export"))
        if self._watch is None:
            self._watch = asyncio.create_task(self._watching())

    async def listen_unix(self, path: Path) -> None:
        self._listen(unix_socket(path))

    async def listen_tcp(self, host: str, port: int) -> int:
        sockets = tcp_sockets(host, port)
        for sock in sockets:
            self._listen(sock)
        bound: int = sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

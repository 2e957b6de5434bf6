"""One client of the export, from accept to close: its handshake, then its
transmission phase, and what it holds meanwhile (its connection to the
disk, the bitmaps it chose, read buffers of the budget)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from dirtydiff import nbdproto as proto
from dirtydiff.disk import Connection as DiskConnection
from dirtydiff.disk import FileBackend
from sidecar.export.aioupstream import SnapshotLease
from sidecar.export.budget import ByteBudget
from sidecar.export.catalog import ExportCatalog
from sidecar.export.contexts import Export
from sidecar.export.handshake import Handshake
from sidecar.export.stats import ServerStats
from sidecar.export.tls import TlsCreds, TlsRefused
from sidecar.export.transmission import StreamProtocol, Transmission, peer

log = logging.getLogger(__name__)


class Connection:
    """One client: ``run()`` negotiates, then serves requests until the
    client disconnects or the server ends it (``abort``)."""

    # Set by attach(), once the accepted socket has its transport.
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def __init__(
        self,
        exports: ExportCatalog,
        stats: ServerStats,
        read_budget: ByteBudget,
        negotiated: Callable[[Connection], None],
        tls: TlsCreds | None = None,
    ) -> None:
        self._exports = exports
        self._tls = tls  # this listener's: the client must STARTTLS first
        self._stats = stats
        self._read_budget = read_budget
        self._negotiated = negotiated
        self.started = time.monotonic()  # the handshake limit counts from here
        self._attached = False
        self._aborted = False
        self._handshake: Handshake | None = None
        self._transmission: Transmission | None = None
        self.disk: DiskConnection | None = None
        self._file_fd = -1  # the disk's fd when it is a local file: reads use sendfile

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

    def stalled(self, now: float) -> float:
        """Seconds its socket has taken nothing of the replies queued."""
        return self._transmission.stalled(now) if self._transmission is not None else 0.0

    def idle(self, now: float) -> float:
        """Seconds since it was last active, in transmission with nothing in
        flight; 0 otherwise."""
        return self._transmission.idle(now) if self._transmission is not None else 0.0

    async def run(self) -> None:
        try:
            if self._aborted:  # ended before it had its transport
                self.writer.transport.abort()
                return
            self._handshake = Handshake(
                self.reader, self.writer, self._exports, self._tls, self._upgraded
            )
            session = await self._handshake.negotiate()
            if session is not None:
                disk = await self._enter(session.export)
                self._transmission = Transmission(
                    self, self.reader, self.writer, session, disk, self._file_fd,
                    self._stats, self._read_budget, active=self.started,
                )  # fmt: skip
                await self._transmission.run()
        except (asyncio.IncompleteReadError, ConnectionError, proto.ProtocolError) as e:
            if isinstance(e, proto.ProtocolError):
                self._stats.error("protocol")
            elif isinstance(e, TlsRefused):
                self._stats.error("tls")
            log.info("client %s: connection ended: %s", peer(self.writer), e or type(e).__name__)
        finally:
            if self._transmission is not None:
                await self._transmission.stop()
            # The bitmaps it chose go now (see Transmission.stop).
            if self._handshake is not None:
                self._handshake.contexts.clear()  # its session's too
            if self._file_fd >= 0:
                self.disk = None  # the file backend's shared fd stays open
            if isinstance(self.disk, SnapshotLease):
                await self.disk.aclose()
            elif self.disk is not None:
                await asyncio.to_thread(self.disk.close)
            with contextlib.suppress(Exception):
                self.writer.close()
                await self.writer.wait_closed()

    def _upgraded(self, writer: asyncio.StreamWriter) -> None:
        """STARTTLS is done: the stream is the TLS transport's from now on
        (an abort ends the TLS transport, and with it the socket)."""
        self.writer = writer
        stream = writer.transport.get_protocol()
        assert isinstance(stream, StreamProtocol)
        stream.over_tls = True

    async def _enter(self, export: Export) -> DiskConnection:
        """The handshake is over: no deadline, no eviction; connect to the disk."""
        self._negotiated(self)
        backend = export.backend
        if export.snapshot_pool is not None:
            self.disk = await export.snapshot_pool.attach()
        elif export.upstream is None:
            assert isinstance(backend, FileBackend)
            # Its connection is the backend's shared fd: nothing to wait for,
            # and a thread hop costs more than the whole call.
            self.disk = backend.connect()
            self._file_fd = backend.fd
        else:
            self.disk = await asyncio.to_thread(export.upstream.lease)
        return self.disk

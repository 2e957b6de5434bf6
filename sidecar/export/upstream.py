"""The export's connections to its disk when the disk is an NBD export
(normally the tracker, the VM's disk): a small pool that every client of
the export shares.

With one upstream connection per export client, the export's clients chose
how many connections the tracker serves: 600 clients that completed
NBD_OPT_GO made 338 tracker connections, each with its thread in nbdkit,
until the sidecar ran out of descriptors. Here at most ``UPSTREAM_CONNECTIONS``
are open, whatever the number of clients. libnbd handles are thread-safe and
a synchronous call holds its handle while it runs, so that many export
requests at most wait on the tracker at once (the default executor that runs
them has about as many threads).

Without multi-conn, ``NbdBackend.connect`` hands every caller the one
upstream connection it shares (a write completed through the tracker is then
seen by every later read): the pool then holds that one, and nothing else.

A connection found broken (the tracker restarted) leaves the pool: the next
client gets a new one, and a client that was using it moves to a new one and
tries its request once more (reads, block status and cache are idempotent).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from dirtydiff.disk import Backend, Extent
from dirtydiff.disk import Connection as DiskConnection

UPSTREAM_CONNECTIONS = 4

T = TypeVar("T")


class _Upstream:
    """One upstream connection and how many leases use it."""

    __slots__ = ("connection", "users")

    def __init__(self, connection: DiskConnection) -> None:
        self.connection = connection
        self.users = 0


class UpstreamPool:
    """At most ``size`` connections to ``backend``, leased to export clients."""

    def __init__(self, backend: Backend, size: int = UPSTREAM_CONNECTIONS) -> None:
        self.backend = backend
        self.size = size if backend.can_multi_conn else 1
        self._lock = threading.Lock()
        self._open: list[_Upstream] = []  # usable ones, each with a user at least

    def lease(self) -> DiskConnection:
        """A connection for one export client (it may connect: call it in a
        thread). Fewer than ``size`` open: a new one; else the least used."""
        return _Lease(self, self._take())

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def _take(self) -> _Upstream:
        with self._lock:
            self._open = [u for u in self._open if u.connection.alive()]
            if len(self._open) < self.size:
                upstream = _Upstream(self.backend.connect())
                self._open.append(upstream)
            else:
                upstream = min(self._open, key=lambda u: u.users)
            upstream.users += 1
            return upstream

    def _give_back(self, upstream: _Upstream) -> None:
        with self._lock:
            upstream.users -= 1
            if upstream.users:
                return
            if upstream in self._open:
                self._open.remove(upstream)
        # Nobody uses it: closed, as one client's connection was when it
        # left (an idle export holds no tracker connection). Outside the
        # lock: saying goodbye may wait on the upstream.
        upstream.connection.close()

    def _drop(self, broken: _Upstream) -> None:
        """A lease found ``broken`` unusable: no new lease gets it, and it
        closes when its last lease lets go."""
        with self._lock:
            if broken in self._open:
                self._open.remove(broken)
        self._give_back(broken)


class _Lease:
    """An export client's use of a pooled connection (the Connection
    protocol of dirtydiff.disk). Its requests may run in several
    threads at once. The export is read-only: writes are never sent, and
    refused if they were."""

    def __init__(self, pool: UpstreamPool, upstream: _Upstream) -> None:
        self._pool = pool
        self._upstream: _Upstream | None = upstream
        self._closed = False
        self._swap = threading.Lock()  # one thread replaces a broken connection

    def _call(self, request: Callable[[DiskConnection], T]) -> T:
        upstream = self._upstream
        if upstream is not None:
            try:
                return request(upstream.connection)
            except OSError:
                if upstream.connection.alive():
                    raise  # the request failed, not the connection
        with self._swap:
            if self._upstream is upstream and upstream is not None:
                self._upstream = None
                self._pool._drop(upstream)
            if self._upstream is None:
                if self._closed:
                    raise OSError(errno.EBADF, "the export's connection to its disk is closed")
                # May fail (the tracker is not back yet): the next request tries again.
                self._upstream = self._pool._take()
            upstream = self._upstream
        return request(upstream.connection)

    def pread(self, buf: Any, offset: int) -> None:
        self._call(lambda c: c.pread(buf, offset))

    def extents(self, count: int, offset: int) -> list[Extent]:
        return self._call(lambda c: c.extents(count, offset))

    def cache(self, count: int, offset: int) -> None:
        self._call(lambda c: c.cache(count, offset))

    def flush(self) -> None:
        self._call(lambda c: c.flush())

    def pwrite(self, buf: Any, offset: int, fua: bool) -> None:
        raise OSError(errno.EROFS, "the export is read-only")

    def zero(self, count: int, offset: int, may_trim: bool, fast: bool, fua: bool) -> None:
        raise OSError(errno.EROFS, "the export is read-only")

    def trim(self, count: int, offset: int, fua: bool) -> None:
        raise OSError(errno.EROFS, "the export is read-only")

    def alive(self) -> bool:
        upstream = self._upstream
        return upstream is not None and upstream.connection.alive()

    def close(self) -> None:
        with self._swap:
            self._closed = True
            upstream, self._upstream = self._upstream, None
        if upstream is not None:
            self._pool._give_back(upstream)

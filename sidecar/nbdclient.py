"""Reading from other NBD servers with libnbd (Debian's python3-libnbd)."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator
from typing import Any

import nbd

from dirtydiff import errors

# libnbd's block status length is 32-bit; ask for 2 GiB at a time.
STATUS_CHUNK = 1 << 31

# A server that accepts but never finishes the handshake (one serving a
# single client at a time, busy with another) must not hold a scan forever.
CONNECT_TIMEOUT = 30.0
_CONNECT_POLL = 0.2  # seconds between looks at a cancel while connecting


class Cancelled(Exception):
    """The work was asked to stop (a scan saves its marks and position first)."""


def connect(
    uri: str,
    contexts: tuple[str, ...] = (),
    *,
    full_info: bool = False,
    timeout: float = CONNECT_TIMEOUT,
    cancel: threading.Event | None = None,
    what: str = "",
) -> Any:
    """A libnbd handle connected to ``uri``, or Unavailable once ``timeout``
    passes (Cancelled once ``cancel`` is set). The handshake runs on libnbd's
    asynchronous API, so that neither a silent server nor a cancel waits on
    a blocking call. ``what`` names the server in errors ("the backup")."""
    name = what or uri
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.set_full_info(full_info)
    end = time.monotonic() + timeout
    try:
        h.aio_connect_uri(uri)
        fd = h.aio_get_fd()
        poller = select.poll()
        while h.aio_is_connecting():
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"connecting to {name} cancelled")
            left = end - time.monotonic()
            if left <= 0:
                raise errors.Unavailable(
                    "handshake-timeout",
                    f"{name} ({uri}) did not finish the NBD handshake in {timeout:.0f} s "
                    "(a server of one client at a time, busy with another?)",
                )
            direction = h.aio_get_direction()
            events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | (
                select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0
            )
            poller.register(fd, events)
            for _, happened in poller.poll(1000 * min(left, _CONNECT_POLL)):
                if happened & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                if happened & select.POLLOUT:
                    h.aio_notify_write()
        if not h.aio_is_ready():
            raise errors.Unavailable("unreachable", f"cannot connect to {name} {uri}")
    except nbd.Error as e:
        raise errors.Unavailable(
            "unreachable", f"cannot connect to {name} {uri}: {e.string}"
        ) from None
    return h


def context_extents(uri: str, context: str) -> tuple[int, Iterator[tuple[int, int, int]]]:
    """The export's size and every (offset, length, flags) of one meta context."""
    h = connect(uri, (context,))
    if not h.can_meta_context(context):
        h.shutdown()
        raise errors.NotFound("unknown-context", f"{uri} does not offer the context {context!r}")
    size: int = h.get_size()

    def walk() -> Iterator[tuple[int, int, int]]:
        offset = 0
        try:
            while offset < size:
                found: list[tuple[int, int]] = []

                def collect(
                    name: str,
                    start: int,
                    entries: list[int],
                    err: Any,
                    found: list[tuple[int, int]] = found,
                ) -> int:
                    if name == context:
                        found.extend(zip(entries[::2], entries[1::2], strict=True))
                    return 0

                h.block_status(min(STATUS_CHUNK, size - offset), offset, collect)
                if not found:
                    raise errors.ProtocolError(
                        "empty-reply", f"{uri} answered no extent at {offset}"
                    )
                for described, flags in found:
                    length = min(described, size - offset)
                    if length <= 0:
                        break
                    yield offset, length, flags
                    offset += length
        except nbd.Error as e:
            raise errors.Unavailable("read-failed", f"{uri}: {e.string}") from None
        finally:
            h.shutdown()

    return size, walk()

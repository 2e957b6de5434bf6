"""Reading from other NBD servers with libnbd (Debian's python3-libnbd)."""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Iterator, Sequence
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
    [h] = connect_all(
        [uri], contexts, full_info=full_info, timeout=timeout, cancel=cancel, what=[what]
    )
    if isinstance(h, errors.Unavailable):
        raise h
    return h


def connect_all(
    uris: Sequence[str],
    contexts: tuple[str, ...] = (),
    *,
    full_info: bool = False,
    timeout: float = CONNECT_TIMEOUT,
    cancel: threading.Event | None = None,
    what: Sequence[str] = (),
) -> list[Any]:
    """One handle per URI, their handshakes run at once (a handshake is a few
    round trips that the server answers while the others wait): each is a
    connected handle, or the Unavailable that says why it is not (the caller
    decides whether that is fatal). Cancelled once ``cancel`` is set. A
    handle is closed when nothing refers to it any more (libnbd's Python
    bindings have no close), so none outlives an error here."""
    names = [(what[i] if i < len(what) and what[i] else uri) for i, uri in enumerate(uris)]
    found: list[Any] = []
    pending: dict[int, int] = {}  # fd -> index of a handle still connecting
    for i, uri in enumerate(uris):
        h = nbd.NBD()
        for context in contexts:
            h.add_meta_context(context)
        h.set_full_info(full_info)
        try:
            h.aio_connect_uri(uri)
            pending[h.aio_get_fd()] = i
            found.append(h)
        except nbd.Error as e:
            found.append(_unreachable(names[i], uri, e.string))
    end = time.monotonic() + timeout
    poller = select.poll()
    while pending:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"connecting to {names[next(iter(pending.values()))]} cancelled")
        left = end - time.monotonic()
        if left <= 0:
            for i in pending.values():  # the dropped handle closes its socket
                found[i] = errors.Unavailable(
                    "handshake-timeout",
                    f"{names[i]} ({uris[i]}) did not finish the NBD handshake in "
                    f"{timeout:.0f} s (a server of one client at a time, busy with another?)",
                )
            break
        for fd, i in pending.items():
            direction = found[i].aio_get_direction()
            events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | (
                select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0
            )
            poller.register(fd, events)  # registering again modifies
        for fd, happened in poller.poll(1000 * min(left, _CONNECT_POLL)):
            i = pending[fd]
            why = _progress(found[i], happened)
            if why is None:
                continue  # still connecting
            if why:
                found[i] = _unreachable(names[i], uris[i], why)
            poller.unregister(fd)
            del pending[fd]
    return found


def _progress(h: Any, happened: int) -> str | None:
    """Let a connecting handle act on what poll reported: None while it is
    still connecting, "" once connected, else why it failed."""
    try:
        if happened & (select.POLLIN | select.POLLHUP | select.POLLERR):
            h.aio_notify_read()
        if happened & select.POLLOUT:
            h.aio_notify_write()
        if h.aio_is_connecting():
            return None
        return "" if h.aio_is_ready() else "the handshake failed"
    except nbd.Error as e:
        return str(e.string)


def _unreachable(name: str, uri: str, why: str) -> errors.Unavailable:
    return errors.Unavailable("unreachable", f"cannot connect to {name} {uri}: {why}")


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

"""Reading from other NBD servers with libnbd (Debian's python3-libnbd)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import nbd

from dirtydiff import errors

# libnbd's block status length is 32-bit; ask for 2 GiB at a time.
STATUS_CHUNK = 1 << 31

# The NBD URIs a control request may name (libnbd's nbd_connect_uri; vsock
# is left out: nothing of ours listens there). libnbd refuses a URI that
# names a local file (tls-psk-file) unless told otherwise, which we never do.
NBD_SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")


def is_nbd_uri(where: str) -> bool:
    """Whether ``where`` is an NBD URI of one of NBD_SCHEMES."""
    scheme, sep, _ = where.partition("://")
    return bool(sep) and scheme in NBD_SCHEMES


def connect(uri: str, contexts: tuple[str, ...] = ()) -> Any:
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        raise errors.Unavailable("unreachable", f"cannot connect to {uri}: {e.string}") from None
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

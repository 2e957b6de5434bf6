"""The control protocol's client: one request over a unix socket, and
whether anything listens on one."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from dirtydiff import errors
from dirtydiff.control.handlers import seconds
from dirtydiff.control.wire import encode, read_message, request, result_of

CALL_TIMEOUT = 120.0


def listening(path: Path) -> bool:
    """A server listens on the unix socket ``path``. Asked by connecting, not
    by taking the state lock (a tracker starting at that moment needs it).
    One we may not reach (permissions) counts: the call itself then fails
    with a clear error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except PermissionError:
            return True
        except OSError:
            return False


def call(socket_path: Path, op: str, **args: object) -> Any:
    """Send one request; return its result or raise the error it carries."""
    # Wait long enough for any drain it asks for; a timeout that is not
    # seconds is the server's bad-request to answer, not a socket timeout.
    try:
        drain = seconds(args) if "timeout" in args else 0.0
    except errors.BadRequest:
        drain = 0.0
    return call_within(socket_path, CALL_TIMEOUT + drain, op, **args)


def call_within(socket_path: Path, wait: float, op: str, **args: object) -> Any:
    """``call``, waiting at most ``wait`` seconds for the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(wait)
        try:
            sock.connect(str(socket_path))
            sock.sendall(encode(request(op, **args)))
            reply = read_message(sock)
        except PermissionError as e:
            raise errors.PermissionDenied(
                "permission-denied",
                f"control socket {socket_path}: {e.strerror}; it is for its owner "
                "(and the group given to dirtydiff serve --control-group)",
            ) from None
        except (ConnectionError, FileNotFoundError, TimeoutError) as e:
            raise errors.Unavailable(
                "unavailable", f"control socket {socket_path}: {e.strerror or e}"
            ) from None
    if reply is None:
        raise errors.Unavailable("unavailable", f"{socket_path} closed without a reply")
    return result_of(reply)

"""The control protocol: msgpack messages over a unix stream socket.

Framing: each message is a 4-byte big-endian length, then that many bytes of
one msgpack map. Messages over MAX_MESSAGE bytes end the connection (the
length is checked before anything is allocated).

Request::  {"version": 1, "op": "bitmap.add", "args": {"name": "b0", ...}}
Reply::    {"version": 1, "ok": true, "result": ...}
           {"version": 1, "ok": false, "error": {"code": "...", "message": "..."}}

A malformed message (bad length, not msgpack, not a map, wrong version, unknown
op, wrong argument types) gets an error reply; framing errors also end the
connection, because the stream cannot be resynchronised.

``dispatch`` runs one request against a BitmapStore and is the same code
whether the request came over the tracker's socket or from the CLI working on
the state directory directly.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path
from typing import Any

import msgpack

from dirtydiff import errors
from dirtydiff.state import DiskSeen, StateDir
from dirtydiff.store import DRAIN_TIMEOUT, BitmapStore

API_VERSION = 1
MAX_MESSAGE = 1 << 20
_LENGTH = struct.Struct("!I")
CALL_TIMEOUT = 120.0

Message = dict[str, Any]


def encode(message: Message) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_MESSAGE:
        raise errors.BadRequest("too-large", f"message of {len(payload)} bytes is over the limit")
    return _LENGTH.pack(len(payload)) + payload


def encode_reply(reply: Message) -> bytes:
    """``encode`` for a server's reply: one too large to send (a result that
    grew past the limit) becomes an error reply, so the client gets an answer
    and the connection stays in step."""
    try:
        return encode(reply)
    except errors.BadRequest as e:
        return encode(reply_error(errors.DirtydiffError("reply-too-large", e.message)))


def frame_length(prefix: bytes) -> int:
    """Parse the length prefix; a length past the limit is a protocol error."""
    length: int = _LENGTH.unpack(prefix)[0]
    if length > MAX_MESSAGE:
        raise errors.ProtocolError(
            "too-large", f"message of {length} bytes is over the {MAX_MESSAGE}-byte limit"
        )
    return length


def decode(payload: bytes) -> Message:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as e:
        raise errors.ProtocolError("malformed", f"not a msgpack message: {e}") from None
    if not isinstance(message, dict):
        raise errors.ProtocolError("malformed", "a message must be a msgpack map")
    return message


def _recv_exactly(sock: socket.socket, length: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < length:
        chunk = sock.recv(length - len(chunks))
        if not chunk:
            if not chunks:
                return None
            raise errors.ProtocolError("truncated", "connection closed inside a message")
        chunks += chunk
    return bytes(chunks)


def read_message(sock: socket.socket) -> Message | None:
    """Read one message; None at a clean end of stream."""
    prefix = _recv_exactly(sock, _LENGTH.size)
    if prefix is None:
        return None
    payload = _recv_exactly(sock, frame_length(prefix))
    if payload is None:
        raise errors.ProtocolError("truncated", "connection closed inside a message")
    return decode(payload)


def reply_ok(result: object) -> Message:
    return {"version": API_VERSION, "ok": True, "result": result}


MAX_ERROR_MESSAGE = 2048  # characters: an error may quote the request it refuses


def reply_error(error: errors.DirtydiffError) -> Message:
    message = error.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 16] + f"... ({len(message)} chars)"
    return {
        "version": API_VERSION,
        "ok": False,
        # "kind" is the class of error (bad-request, not-found, ...), "code"
        # the precise reason scripts match on (unknown-bitmap, name-in-use, ...).
        "error": {"kind": type(error).code, "code": error.code, "message": message},
    }


# -- requests ---------------------------------------------------------------

_Handler = Callable[[BitmapStore, dict[str, Any]], object]


def arg(args: dict[str, Any], name: str, kind: type, default: object = ...) -> Any:
    if name not in args:
        if default is ...:
            raise errors.BadRequest("bad-request", f"missing argument {name!r}")
        return default
    value = args[name]
    # bool is an int in Python; never accept one for the other.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise errors.BadRequest("bad-request", f"argument {name!r} must be {kind.__name__}")
    return value


MAX_TIMEOUT = 3600.0  # seconds a request may ask a drain to wait


def _seconds(args: dict[str, Any]) -> float:
    value = arg(args, "timeout", object, DRAIN_TIMEOUT)
    # A comparison with NaN is false: NaN fails ``0 < value``.
    if not _is_number(value) or not 0 < value <= MAX_TIMEOUT:
        raise errors.BadRequest(
            "bad-request", f"argument 'timeout' must be seconds, 0 < t <= {MAX_TIMEOUT:.0f}"
        )
    return float(value)


def _names(args: dict[str, Any]) -> list[str]:
    sources = arg(args, "sources", list)
    if not sources or not all(isinstance(s, str) for s in sources):
        raise errors.BadRequest(
            "bad-request", "argument 'sources' must be a non-empty list of names"
        )
    return list(sources)


def _ranges(args: dict[str, Any]) -> list[tuple[int, int]]:
    ranges = arg(args, "ranges", list)
    found = []
    for item in ranges:
        # Signed: an offset or length out of the disk is the store's
        # bad-range, which says which range.
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not all(_is_int64(v, signed=True) for v in item)
        ):
            raise errors.BadRequest(
                "bad-request", "'ranges' must be a list of [offset, length] of 64-bit integers"
            )
        found.append((item[0], item[1]))
    return found


# -- numbers ----------------------------------------------------------------
#
# Every numeric argument of the protocol, by name: each means the same in
# every op that takes it, so ``check_numbers`` checks it by name where a
# request is parsed, on both sockets, before the request is routed (the
# sidecar forwards most requests to the tracker) or run. An infinity, a NaN,
# a bool (an int in Python) or a 2**64 is then a bad-request, never a value
# that reaches arithmetic (``call`` adds a drain timeout to its socket
# timeout) or a C conversion. What is in range beyond this is the op's own
# check, with a code of its own that names it (bad-granularity, bad-chunk,
# bad-in-flight, bad-range), and still of the kind bad-request.

INT64_MAX = 2**63 - 1  # nothing the protocol counts (bytes, ns, chunks) goes past it


def _is_number(value: object) -> bool:
    """An int (not a bool) or a finite float, within 64-bit integers' range
    (a rate of 1e300 bytes/s means nothing a rate of 2**63 does not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and -INT64_MAX - 1 <= value <= INT64_MAX


def _is_int64(value: object, *, signed: bool = False) -> bool:
    """An int (not a bool) that fits 64 bits: signed, or from 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (-INT64_MAX - 1 if signed else 0) <= value <= INT64_MAX


def _count(args: dict[str, Any], name: str) -> None:
    if not _is_int64(args[name]):
        raise errors.BadRequest(
            "bad-request", f"argument {name!r} must be an integer from 0 to 2**63-1"
        )


def _rate(args: dict[str, Any], name: str) -> None:
    value = args[name]
    if value is not None and not (_is_number(value) and value > 0):  # None: no limit
        raise errors.BadRequest(
            "bad-rate", f"argument {name!r} must be a positive number of bytes per second"
        )


NUMBERS: dict[str, Callable[[dict[str, Any], str], object]] = {
    "timeout": lambda args, name: _seconds(args),
    "granularity": _count,
    "chunk": _count,
    "in_flight": _count,
    "created_ns": _count,
    "max_rate": _rate,
    "ranges": lambda args, name: _ranges(args),
}


def check_numbers(args: dict[str, Any]) -> None:
    """Refuse, as bad-request, any numeric argument that is not a finite
    number of its kind (see NUMBERS)."""
    for name, check in NUMBERS.items():
        if name in args:
            check(args, name)


def _disk(args: dict[str, Any]) -> DiskSeen:
    """scan.begin's ``disk``: what the scan found when it opened the disk
    (``disk_seen`` makes it)."""
    seen = arg(args, "disk", dict)
    try:
        where, size = seen["where"], seen["size"]
        file, tracker = seen.get("file"), seen.get("tracker")
        ok = (
            isinstance(where, str)
            and type(size) is int
            and (tracker is None or isinstance(tracker, str))
            and (
                file is None
                or (
                    isinstance(file, list)
                    and len(file) == 3
                    and isinstance(file[0], str)
                    and all(type(v) is int for v in file[1:])
                )
            )
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise errors.BadRequest(
            "bad-request", "argument 'disk' must be {where: str, size: int, file, tracker}"
        )
    return DiskSeen(where, size, None if file is None else tuple(file), tracker)


def disk_seen(seen: DiskSeen) -> dict[str, object]:
    """A DiskSeen as scan.begin's ``disk`` argument."""
    return {
        "where": seen.where,
        "size": seen.size,
        "file": None if seen.file is None else list(seen.file),
        "tracker": seen.tracker,
    }


def _status(store: BitmapStore, args: dict[str, Any]) -> object:
    return {
        "disk_size": store.disk_size,
        "recording": store.recording,
        "inflight": store.inflight(),
        "bitmaps": [b.as_dict() for b in store.list()],
    }


HANDLERS: dict[str, _Handler] = {
    "ping": lambda store, args: {"api": API_VERSION},
    "status": _status,
    "bitmap.list": lambda store, args: [b.as_dict() for b in store.list()],
    "bitmap.info": lambda store, args: store.info(arg(args, "name", str)).as_dict(),
    "bitmap.add": lambda store, args: store.add(
        arg(args, "name", str),
        arg(args, "granularity", int, 65536),
        enabled=arg(args, "enabled", bool, True),
        backup=arg(args, "backup", str, ""),
        importing=arg(args, "importing", bool, False),
    ).as_dict(),
    "bitmap.remove": lambda store, args: store.remove(
        arg(args, "name", str), arg(args, "created_ns", int, None)
    ),
    "bitmap.clear": lambda store, args: store.clear(
        arg(args, "name", str), arg(args, "backup", str, "")
    ).as_dict(),
    "bitmap.enable": lambda store, args: store.enable(arg(args, "name", str)).as_dict(),
    "bitmap.disable": lambda store, args: store.disable(
        arg(args, "name", str), _seconds(args)
    ).as_dict(),
    "bitmap.mark": lambda store, args: store.mark_ranges(
        arg(args, "name", str), _ranges(args)
    ).as_dict(),
    "scan.begin": lambda store, args: store.scan_begin(
        arg(args, "name", str),
        arg(args, "granularity", int, 65536),
        disk=_disk(args),
        restart=arg(args, "restart", bool, False),
        backup=arg(args, "backup", str, ""),
        rebuild=arg(args, "rebuild", bool, False),
    ),
    "scan.complete": lambda store, args: store.scan_complete(
        arg(args, "name", str), arg(args, "created_ns", int)
    ).as_dict(),
    "import.complete": lambda store, args: store.import_complete(
        arg(args, "name", str), arg(args, "created_ns", int)
    ).as_dict(),
    "scan.abort": lambda store, args: store.scan_abort(arg(args, "name", str)),
    "bitmap.merge": lambda store, args: store.merge(
        arg(args, "target", str), _names(args)
    ).as_dict(),
    "checkpoint": lambda store, args: asdict(
        store.checkpoint(arg(args, "name", str), _seconds(args), arg(args, "backup", str, ""))
    ),
}


def parse_request(
    message: Message, known: Collection[str] = HANDLERS.keys()
) -> tuple[str, dict[str, Any]]:
    version = message.get("version")
    # True == 1 and 1.0 == 1 in Python: only the integer is the version.
    if type(version) is not int or version != API_VERSION:
        raise errors.BadRequest(
            "bad-version",
            f"control API version {version!r} is not supported (this is {API_VERSION})",
        )
    op = message.get("op")
    if not isinstance(op, str) or op not in known:
        raise errors.BadRequest("unknown-op", f"unknown operation {op!r}")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise errors.BadRequest("bad-request", "'args' must be a map")
    check_numbers(args)
    return op, args


# A request some process serves besides the store's (the tracker's stats).
Extra = Callable[[dict[str, Any]], object]


def dispatch(
    store: BitmapStore, message: Message, extra: dict[str, Extra] | None = None
) -> Message:
    """Run one request; every DirtydiffError becomes an error reply."""
    extra = extra or {}
    try:
        op, args = parse_request(message, HANDLERS.keys() | extra.keys())
        if op in extra:
            return reply_ok(extra[op](args))
        return reply_ok(HANDLERS[op](store, args))
    except errors.DirtydiffError as e:
        return reply_error(e)


def run(state: StateDir, op: str, **args: object) -> Any:
    """Run one store request where it can run: through the tracker's socket
    while a tracker holds the state lock, else on the files under the lock
    (which keeps a tracker from starting meanwhile). The same ``dispatch``
    either way."""
    lock = state.try_lock()
    if lock is None:
        try:
            return call(state.socket_path, op, **args)
        except errors.Unavailable:
            if listening(state.socket_path):
                raise
            # Locked, and no tracker answers: an offline scan or another
            # command holds the lock (or a tracker is starting right now).
            raise errors.Unavailable(
                "state-busy",
                f"state directory {state.path} is locked by another process "
                "(an offline scan, or a tracker starting); try again once it is done",
            ) from None
    try:
        size = state.disk_size()
        if size is None:
            raise errors.NotFound(
                "never-tracked",
                f"state directory {state.path} has never been tracked; run `dirtydiff track` "
                "on the disk once to create it",
            )
        store = BitmapStore(state, size, recording=False)
        try:
            return result_of(dispatch(store, request(op, **args)))
        finally:
            store.close()
    finally:
        lock.release()


# -- client ---------------------------------------------------------------


def request(op: str, **args: object) -> Message:
    return {"version": API_VERSION, "op": op, "args": args}


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
        drain = _seconds(args) if "timeout" in args else 0.0
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


def result_of(reply: Message) -> Any:
    if reply.get("ok") is True:
        return reply.get("result")
    error = reply.get("error") or {}
    code = str(error.get("code", "error"))
    cls = errors.ERROR_CLASSES.get(str(error.get("kind")), errors.DirtydiffError)
    raise cls(code, str(error.get("message", "request failed")))

"""The control requests: their arguments, checked, and the store operation
each one runs.

``dispatch`` runs one request against a BitmapStore and is the same code
whether the request came over the tracker's socket or from a command working
on the state directory directly (``dirtydiff.owner``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import asdict
from typing import Any

from dirtydiff import errors
from dirtydiff.control.wire import API_VERSION, Message, reply_error, reply_ok
from dirtydiff.snapshots import Scope, SnapshotRequest, read_snapshots, release_files
from dirtydiff.state import DiskSeen
from dirtydiff.store import DRAIN_TIMEOUT, BitmapStore

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


def seconds(args: dict[str, Any]) -> float:
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
    "timeout": lambda args, name: seconds(args),
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


def _snapshot(args: dict[str, Any]) -> SnapshotRequest | None:
    """checkpoint's ``snapshot``: ``{scope: "all"|"dirty", dir: str|None,
    limit: int|None}``, every key optional."""
    found = arg(args, "snapshot", object, None)
    if found is None:
        return None
    if not isinstance(found, dict) or not set(found) <= {"scope", "dir", "limit"}:
        raise errors.BadRequest(
            "bad-snapshot", "argument 'snapshot' must be a map of scope, dir and limit"
        )
    scope, where, limit = found.get("scope", "all"), found.get("dir"), found.get("limit")
    if scope not in ("all", "dirty"):
        raise errors.BadRequest("bad-snapshot", f"snapshot scope {scope!r} is not 'all' or 'dirty'")
    if where is not None and (not isinstance(where, str) or not where.startswith("/")):
        raise errors.BadRequest("bad-snapshot", f"snapshot dir {where!r} is not an absolute path")
    if limit is not None and not (_is_int64(limit) and limit > 0):
        raise errors.BadRequest(
            "bad-snapshot", f"snapshot limit {limit!r} is not a positive number of bytes"
        )
    return SnapshotRequest(Scope.of(scope), where, limit)


def _checkpoint(store: BitmapStore, args: dict[str, Any]) -> object:
    name = arg(args, "name", str)
    snapshot = _snapshot(args)
    reply: dict[str, object] = asdict(
        store.checkpoint(name, seconds(args), arg(args, "backup", str, ""), snapshot=snapshot)
    )
    if snapshot is not None and store.snapshots is not None:
        reply["snapshot"] = store.snapshots.get(name).info().as_dict()
    return reply


def _snapshots(store: BitmapStore) -> list[dict[str, object]]:
    """The tracker's own answer, or what the files say (no tracker runs)."""
    found = store.snapshots.list() if store.snapshots is not None else read_snapshots(store.state)
    return [s.as_dict() for s in found]


def _release(store: BitmapStore, args: dict[str, Any]) -> object:
    name = arg(args, "name", str)
    if store.snapshots is not None:
        return store.snapshots.release(name).as_dict()
    return release_files(store.state, name).as_dict()


def _status(store: BitmapStore, args: dict[str, Any]) -> object:
    return {
        "disk_size": store.disk_size,
        "recording": store.recording,
        "inflight": store.inflight(),
        "bitmaps": [b.as_dict() for b in store.list()],
        "snapshots": _snapshots(store),
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
        arg(args, "name", str), seconds(args)
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
    "checkpoint": _checkpoint,
    "snapshot.list": lambda store, args: {"snapshots": _snapshots(store)},
    "snapshot.release": _release,
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

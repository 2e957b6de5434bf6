"""dirtydiff's write tracker, an nbdkit Python plugin.

    nbdkit python nbd_plugins/tracker.py file=DISK state=DIR
    nbdkit python nbd_plugins/tracker.py uri=nbd+unix:///?socket=S state=DIR

Serves DISK (a raw file or block device) or any NBD export, and marks every
write, write-zeroes and trim in the recording bitmaps of the state directory
before forwarding it. ``dirtydiff track`` runs this with the right environment.
Only nbdkit callbacks live here; the logic is in nbd_plugins.tracking.
"""

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

# nbdkit embeds /usr/bin/python3, which knows nothing of the project's venv:
# make the package next to this file importable however nbdkit was started.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nbdkit

from dirtydiff.disk import Extent
from dirtydiff.errors import DirtydiffError
from nbd_plugins import threadstate
from nbd_plugins.tracking import STATS, Handle, Tracker, TrackerConfig, configure_logging

API_VERSION = 2

_config = TrackerConfig()
# Set by get_ready(); nbdkit calls no other callback that uses it before.
_tracker: Tracker

P = ParamSpec("P")
R = TypeVar("R")


def thread_model() -> int:
    # SERIALIZE_REQUESTS: one request at a time per connection, connections in
    # parallel. Not PARALLEL: with it nbdkit 1.32 runs worker threads per
    # connection and aborts the whole server (raw_send_socket: Assertion
    # `sock >= 0') when a client dies with replies pending -- a killed backup
    # client would take the VM's disk down (tests/test_tracker_faults.py,
    # ..._vanishing_with_requests_in_flight). The serialised models run one
    # thread per connection (nbdkit -v: "processing requests serially"); this
    # one keeps connections parallel for multi-conn clients. The GIL
    # serialises our Python anyway; bench/tracker_fio.py measures the cost.
    # The store's lock keeps marking and checkpoint switches safe across
    # connections.
    return int(nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


def _refuse_to_start(error: DirtydiffError) -> None:
    # nbdkit would print a Python traceback for an exception; a start-up error
    # is the user's to fix, so say it in one line and exit before serving.
    # Nothing needs cleaning: Tracker() released all it took.
    sys.stderr.write(f"dirtydiff-tracker: error: {error.message}\n")
    sys.stderr.flush()
    os._exit(1)


def config(key: str, value: str) -> None:
    try:
        _config.set(key, value)
    except DirtydiffError as e:
        _refuse_to_start(e)


def config_complete() -> None:
    configure_logging()
    try:
        _config.check()
    except DirtydiffError as e:
        _refuse_to_start(e)


def get_ready() -> None:
    # Before nbdkit binds its socket or forks: every start-up error (bad state
    # dir, corrupt bitmap, disk of another size) reaches the terminal.
    global _tracker  # noqa: PLW0603 -- the plugin's one state object, made once
    try:
        _tracker = Tracker(_config)
    except DirtydiffError as e:
        _refuse_to_start(e)
    except OSError as e:  # e.g. a full or read-only state filesystem
        _refuse_to_start(DirtydiffError(f"{e.filename or 'state directory'}: {e.strerror or e}"))


def after_fork() -> None:
    _tracker.after_fork()  # threads do not survive nbdkit's fork


def cleanup() -> None:
    if "_tracker" in globals():
        _tracker.close()


def _errno(callback: Callable[P, R]) -> Callable[P, R]:
    """Count the request, and report an OSError's errno to the client (EIO
    if it has none)."""
    kind = callback.__name__
    requests, failures = STATS.requests, STATS.errors

    @functools.wraps(callback)  # nbdkit finds callbacks by their names
    def reporting(*args: P.args, **kwargs: P.kwargs) -> R:
        requests[kind] = requests.get(kind, 0) + 1
        try:
            return callback(*args, **kwargs)
        except OSError as e:
            failures[kind] = failures.get(kind, 0) + 1
            nbdkit.set_error(e.errno or errno.EIO)
            raise

    return reporting


def list_exports(readonly: bool, is_tls: bool) -> list[tuple[str, str]]:
    # "" is the live disk; "@snapshot:NAME" each snapshot (dirtydiff.snapshots).
    return _tracker.exports()


def default_export(readonly: bool, is_tls: bool) -> str:
    return ""


def open(readonly: bool) -> Handle:
    # An unknown export name fails here, before any request.
    return _tracker.open_export(nbdkit.export_name())


def close(h: Handle) -> None:
    h.close()


def export_description(h: Handle) -> str:
    # Names the state directory: a scan or an export reading the disk
    # through this tracker proves by it which disk it reads.
    return _tracker.describe_export(h)


def get_size(h: Handle) -> int:
    return _tracker.size


def can_write(h: Handle) -> bool:
    return _tracker.capabilities_of(h).write


def can_flush(h: Handle) -> bool:
    return _tracker.capabilities_of(h).flush


def can_trim(h: Handle) -> bool:
    return _tracker.capabilities_of(h).trim


def can_zero(h: Handle) -> bool:
    return _tracker.capabilities_of(h).zero


def can_fast_zero(h: Handle) -> bool:
    return _tracker.capabilities_of(h).fast_zero


def can_fua(h: Handle) -> int:
    native = _tracker.capabilities_of(h).fua_native
    return int(nbdkit.FUA_NATIVE if native else nbdkit.FUA_EMULATE)


def can_multi_conn(h: Handle) -> bool:
    return _tracker.capabilities_of(h).multi_conn


def can_cache(h: Handle) -> int:
    return int(nbdkit.CACHE_NATIVE if _tracker.capabilities_of(h).cache else nbdkit.CACHE_NONE)


def can_extents(h: Handle) -> bool:
    return _tracker.capabilities_of(h).extents


def block_size(h: Handle) -> tuple[int, int, int]:
    # Byte-granular requests reach us as they are: no read-modify-write in
    # nbdkit, so a 1-byte write marks exactly its granule.
    return (1, 4096, 32 * 1024 * 1024)


# The I/O callbacks start with threadstate.keep(): see nbd_plugins/threadstate.py,
# about a third of the CPU per request.


@_errno
def pread(h: Handle, buf: Any, offset: int, flags: int) -> None:
    threadstate.keep()
    h.pread(buf, offset)


@_errno
def pwrite(h: Handle, buf: Any, offset: int, flags: int) -> None:
    threadstate.keep()
    _tracker.write(h, buf, offset, bool(flags & nbdkit.FLAG_FUA))


@_errno
def zero(h: Handle, count: int, offset: int, flags: int) -> None:
    threadstate.keep()
    may_trim = bool(flags & nbdkit.FLAG_MAY_TRIM)
    fast = bool(flags & nbdkit.FLAG_FAST_ZERO)
    _tracker.zero(h, count, offset, may_trim, fast, bool(flags & nbdkit.FLAG_FUA))


@_errno
def trim(h: Handle, count: int, offset: int, flags: int) -> None:
    threadstate.keep()
    _tracker.trim(h, count, offset, bool(flags & nbdkit.FLAG_FUA))


@_errno
def flush(h: Handle, flags: int) -> None:
    h.flush()


@_errno
def cache(h: Handle, count: int, offset: int, flags: int) -> None:
    h.cache(count, offset)


@_errno
def extents(h: Handle, count: int, offset: int, flags: int) -> list[Extent]:
    return h.extents(count, offset)

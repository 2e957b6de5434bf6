"""dirtydiff's write tracker, an nbdkit Python plugin.

    nbdkit python nbd_plugins/tracker.py file=DISK state=DIR
    nbdkit python nbd_plugins/tracker.py uri=nbd+unix:///?socket=S state=DIR

Serves DISK (a raw file or block device) or any NBD export, and marks every
write, write-zeroes and trim in the recording bitmaps of the state directory
before forwarding it. ``dirtydiff track`` runs this with the right environment.
Only nbdkit callbacks live here; the logic is in nbd_plugins.tracking.
"""

import errno
import os
import sys

# nbdkit embeds /usr/bin/python3, which knows nothing of the project's venv:
# make the package next to this file importable however nbdkit was started.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import nbdkit

from dirtydiff.errors import DirtydiffError
from nbd_plugins.tracking import Tracker, TrackerConfig, configure_logging

API_VERSION = 2

_config = TrackerConfig()
_tracker: Tracker | None = None


def thread_model() -> int:
    # SERIALIZE_REQUESTS: one request at a time per connection, connections in
    # parallel. Not PARALLEL, nor SERIALIZE_ALL_REQUESTS: with those nbdkit
    # 1.32 runs worker threads per connection and aborts the whole server
    # (raw_send_socket: Assertion `sock >= 0') when a client dies with replies
    # pending -- a killed backup client would take the VM's disk down
    # (tests/test_tracker_faults.py, ..._vanishing_with_requests_in_flight).
    # The GIL serialises our Python anyway; perf-notes measured per-connection
    # serialisation at 0.80-0.86 of nbdkit's file plugin, and multi-conn
    # clients still get parallel connections. The store's lock keeps marking
    # and checkpoint switches safe across connections.
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


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
    global _tracker
    try:
        _tracker = Tracker(_config)
    except DirtydiffError as e:
        _refuse_to_start(e)
    except OSError as e:  # e.g. a full or read-only state filesystem
        _refuse_to_start(DirtydiffError(f"{e.filename or 'state directory'}: {e.strerror or e}"))


def after_fork() -> None:
    assert _tracker is not None
    _tracker.after_fork()  # threads do not survive nbdkit's fork


def cleanup() -> None:
    if _tracker is not None:
        _tracker.close()


def open(readonly):
    assert _tracker is not None
    return _tracker.connect()


def close(h):
    h.close()


def get_size(h):
    return _tracker.size


def can_write(h):
    return not _tracker.backend.readonly


def can_flush(h):
    return getattr(_tracker.backend, "can_flush", True)


def can_trim(h):
    return _tracker.backend.can_trim


def can_zero(h):
    return getattr(_tracker.backend, "can_zero", True)


def can_fast_zero(h):
    return _tracker.backend.can_fast_zero


def can_fua(h):
    return nbdkit.FUA_NATIVE if _tracker.backend.can_fua_native else nbdkit.FUA_EMULATE


def can_multi_conn(h):
    return _tracker.backend.can_multi_conn


def can_cache(h):
    return nbdkit.CACHE_NATIVE if _tracker.backend.can_cache else nbdkit.CACHE_NONE


def can_extents(h):
    return getattr(_tracker.backend, "can_extents", True)


def block_size(h):
    # Byte-granular requests reach us as they are: no read-modify-write in
    # nbdkit, so a 1-byte write marks exactly its granule.
    return (1, 4096, 32 * 1024 * 1024)


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def pwrite(h, buf, offset, flags):
    try:
        _tracker.write(h, buf, offset, bool(flags & nbdkit.FLAG_FUA))
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def zero(h, count, offset, flags):
    try:
        _tracker.zero(
            h,
            count,
            offset,
            bool(flags & nbdkit.FLAG_MAY_TRIM),
            bool(flags & nbdkit.FLAG_FAST_ZERO),
            bool(flags & nbdkit.FLAG_FUA),
        )
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def trim(h, count, offset, flags):
    try:
        _tracker.trim(h, count, offset, bool(flags & nbdkit.FLAG_FUA))
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def flush(h, flags):
    try:
        h.flush()
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def cache(h, count, offset, flags):
    try:
        h.cache(count, offset)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise


def extents(h, count, offset, flags):
    try:
        return h.extents(count, offset)
    except OSError as e:
        nbdkit.set_error(e.errno or errno.EIO)
        raise

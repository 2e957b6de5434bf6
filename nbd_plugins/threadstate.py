"""Keep an nbdkit worker thread's Python thread state between callbacks.

Why: nbdkit's Python plugin wraps every callback in ``PyGILState_Ensure`` /
``PyGILState_Release``. nbdkit's worker threads are not Python threads, so
each Ensure creates a fresh thread state and each Release destroys it again;
in CPython 3.11 that includes mmap-ing and munmap-ing the thread's 16 KiB
frame stack, with a page fault and a TLB flush. Measured on the tracker that
churn is about a third of the server's CPU per 4 KiB request; it is most of
what "Python adds ~15-20 us per request" was.

How: the first callback in a worker thread calls ``PyGILState_Ensure`` once
more and never releases it. The nesting count then never drops to zero, so
the thread keeps its state, and later callbacks only take and drop the GIL.
Nothing else changes: the GIL is still released between callbacks by
nbdkit's own Release, and the plugin's code and locking are untouched.

Cost: a kept thread state outlives its thread (CPython cannot free the state
of a thread that exited holding it): about 5 KiB each, measured (30
connections of fio at QD16, 16 workers each: +2.4 MB RSS, +4 mappings).
Under SERIALIZE_REQUESTS nbdkit 1.32 serves each connection in one thread,
so a connection keeps one; under PARALLEL it would be ``--threads`` (16 by
default) per connection. ``MAX_KEPT`` bounds the total (about 20 MiB).
Threads past the bound run as before: slower, never wrong. A clean shutdown
is unaffected (Py_Finalize frees them).
"""

from __future__ import annotations

import ctypes
import threading

MAX_KEPT = 4096

_local = threading.local()
_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int
_ensure.argtypes = []


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True


_budget = _Budget(MAX_KEPT)


def keep() -> None:
    """Call at the start of a callback; cheap after the first call in a thread."""
    try:
        _local.kept  # noqa: B018  (an attribute read is the whole fast path)
    except AttributeError:
        _keep_slow()


def _keep_slow() -> None:
    if not _budget.take():
        # Past the bound: run as nbdkit would. The flag goes away with this
        # thread state at the end of the callback, so this runs again next time.
        _local.kept = False
        return
    _ensure()  # nesting count 1 -> 2: nbdkit's Release now leaves 1, not 0
    _local.kept = True


def kept() -> int:
    """How many thread states are kept so far (for tests and status)."""
    return _budget.used

"""Giving the export's read buffers back to the system once they are freed.

The buffers of reads through NBD (up to READ_BUDGET, 256 MiB) are made in
the worker threads of ``asyncio.to_thread``. With glibc's defaults each of
those threads allocates from an arena of its own, whose top grows with the
buffers and is kept when they are freed (glibc raises its trim threshold
with the size of what was freed), and ``malloc_trim(3)`` returns free pages
inside an arena but not another arena's top. Measured with
``python -m bench.hostile unread --read-size 8`` (five clients that never
read 8 MiB replies, closed by the export or by themselves): RSS 48 MB
before, 77 to 109 MB after, trimmed or not. With every thread on the main
arena and a trim once the read budget is idle: 44 MB before and after.

Both are glibc's (mallopt, malloc_trim); elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes

# mallopt(3): the most arenas threads may use.
_M_ARENA_MAX = -8

_LIBC = ctypes.CDLL(None)


def one_arena() -> None:
    """Make every thread allocate from the main arena. Call it before the
    threads start. The threads take its lock to get and free a buffer,
    beside a disk read that costs far more."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(_M_ARENA_MAX, 1)


def release() -> None:
    """Return the free pages of every arena to the system (it may take a
    few milliseconds: call it in a thread)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)

"""The VM: libnbd clients writing through the tracker, many requests in flight.

Each writer thread owns one connection and keeps up to ``depth`` requests in
flight (aio_pwrite, aio_zero, aio_trim at random offsets and sizes). When the
tracker dies under it, the connection's requests fail and the writer
reconnects as soon as the tracker answers again: a VM whose disk went away for
a moment goes on writing. ``hold`` stops the VM: every writer closes its
connection, as a VM that shuts down closes its disk, and waits for
``release`` to connect again; the tracker may then be stopped cleanly (nbdkit
does not exit on SIGTERM while a client stays connected) and the disk file
scanned offline. ``quiesce`` stops submitting and waits for every
request in flight to complete, so that the disk file is final before it is
compared.

What the writers wrote is not modelled: the check compares the backup plus the
dirty granules with the disk file as it ends up, whatever the interleaving of
requests from several connections made of it.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nbd

RECONNECT_DEADLINE = 60.0
QUIESCE_DEADLINE = 60.0
POLL_INTERVAL = 0.02  # between connection attempts while the tracker is down
# What every write carries: a slice of this one pool of random bytes, never a
# buffer of its own. libnbd 1.14's Python aio_pwrite never releases the Buffer
# it is given (nor what that Buffer refers to), so a buffer per write leaked
# every byte written: GiBs over a long run, until the host ran out of memory.
# A slice of a pool that lives for the whole process leaks only its wrapper.
POOL = 4 << 20  # more than the largest write (1 MiB)
_POOL = memoryview(bytearray(os.urandom(POOL)))


@dataclass
class WriterStats:
    """Shared by the writers of one pool; updated under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    completed: int = 0  # requests the server acknowledged
    bytes_written: int = 0
    reconnects: int = 0
    # Requests that failed on a live connection (the server answered an
    # error): a tracker must not fail a VM's write because of bitmaps.
    request_errors: Counter[str] = field(default_factory=Counter)
    holding: bool = False  # the VM is paused (WriterPool.hold)
    held: int = 0  # writers waiting, with nothing in flight, for the release
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


def hot_regions(rng: random.Random, size: int) -> list[tuple[int, int]]:
    """Where a VM's writes go most of the time (a journal, a database...).

    Locality keeps the bitmaps from turning dirty all over, which would make
    the check blind: a lost granule can only show among clean ones."""
    regions = []
    for _ in range(rng.randint(2, 5)):
        length = size // rng.choice([128, 64, 32, 16])
        regions.append((rng.randrange(size - length + 1), length))
    return regions


def _offset(rng: random.Random, size: int, hot: list[tuple[int, int]]) -> int:
    if rng.random() < 0.01:
        return rng.randrange(size)
    start, length = rng.choice(hot)
    return start + rng.randrange(length)


def _length(rng: random.Random, size: int, offset: int) -> int:
    # Mostly small requests (unaligned ones included, which dirty a granule
    # by a single byte), some granule-sized, a few large ones.
    shape = rng.random()
    if shape < 0.5:
        wanted = rng.randint(1, 4096)
    elif shape < 0.85:
        wanted = 4096 * rng.randint(1, 16)
    elif shape < 0.99:
        wanted = rng.choice([65536, 65536 * 2]) + rng.choice([0, 0, 1, 511])
    else:
        wanted = rng.randint(1, 1 << 20)
    return min(wanted, size - offset)


class Writer:
    def __init__(
        self,
        uri: str,
        size: int,
        seed: int,
        hot: list[tuple[int, int]],
        depth: int,
        pause: float,
        stats: WriterStats,
        stopping: threading.Event,
    ) -> None:
        self.uri = uri
        self.size = size
        self.rng = random.Random(seed)
        self.hot = hot
        self.depth = depth
        self.pause = pause
        self.stats = stats
        self.stopping = stopping
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"writer-{seed}", daemon=True)

    def _wait_while_held(self) -> bool:
        """Wait here, with no connection, while the pool holds the VM
        stopped; whether it did."""
        with self.stats.changed:
            if not self.stats.holding:
                return False
            self.stats.held += 1
            self.stats.changed.notify_all()
            try:
                while self.stats.holding and not self.stopping.is_set():
                    # Woken by release; the timeout notices quiesce.
                    self.stats.changed.wait(0.5)
            finally:
                self.stats.held -= 1
        return True

    def _connect(self) -> Any | None:
        """A connection to the tracker, waiting (with a deadline) while it is down."""
        end = time.monotonic() + RECONNECT_DEADLINE
        while not self.stopping.is_set():
            if self._wait_while_held():
                end = time.monotonic() + RECONNECT_DEADLINE  # the VM was stopped meanwhile
            h = nbd.NBD()
            try:
                h.connect_uri(self.uri)
                return h
            except nbd.Error:
                del h
            if time.monotonic() > end:
                raise TimeoutError(f"tracker {self.uri} did not come back in {RECONNECT_DEADLINE}s")
            self.stopping.wait(POLL_INTERVAL)  # polling for the tracker's return
        return None

    def _main(self) -> None:
        try:
            while not self.stopping.is_set():
                h = self._connect()
                if h is None:
                    return
                try:
                    if not self._run(h):
                        return
                except nbd.Error:
                    # The connection died (tracker killed): its requests may or
                    # may not have reached the disk; all were marked first.
                    with self.stats.lock:
                        self.stats.reconnects += 1
                finally:
                    del h  # closes the handle and frees what libnbd still holds
        except BaseException as e:
            self.failure = e

    def _submit(self, h: Any, can_trim: bool, can_fua: bool) -> tuple[int, Any, int]:
        rng = self.rng
        offset = _offset(rng, self.size, self.hot)
        length = _length(rng, self.size, offset)
        kind = rng.random()
        if kind < 0.7:
            # Random bytes from a random place of the pool: a lost write cannot
            # hide behind equal old content.
            at = rng.randrange(POOL - length + 1)
            buf = nbd.Buffer.from_buffer(_POOL[at : at + length])
            flags = nbd.CMD_FLAG_FUA if can_fua and rng.random() < 0.1 else 0
            return h.aio_pwrite(buf, offset, flags=flags), buf, length
        if kind < 0.9 or not can_trim:
            flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
            return h.aio_zero(length, offset, flags=flags), None, length
        return h.aio_trim(length, offset), None, length

    def _run(self, h: Any) -> bool:
        """Write until stopping (False) or held (True: connect again)."""
        can_trim, can_fua = bool(h.can_trim()), bool(h.can_fua())
        # cookie -> (buffer kept alive until the request completes, length)
        pending: dict[int, tuple[Any, int]] = {}
        while not self.stopping.is_set():
            if self.stats.holding:
                self._close(h)
                return True
            # A burst of requests in flight at once, then a pause: heavy
            # enough to keep the tracker busy, sparse enough that the bitmaps
            # do not end up all dirty.
            for _ in range(self.depth):
                cookie, buf, length = self._submit(h, can_trim, can_fua)
                pending[cookie] = (buf, length)
            while pending:
                h.poll(-1)
                self._retire(h, pending)
            self.stopping.wait(self.rng.expovariate(1 / self.pause))  # think time
        self._close(h)
        return False

    def _retire(self, h: Any, pending: dict[int, tuple[Any, int]]) -> None:
        # peek fails once nothing is in flight or left to retire: ask only
        # while something is pending.
        while pending and (cookie := h.aio_peek_command_completed()) > 0:
            _, length = pending.pop(cookie)
            try:
                h.aio_command_completed(cookie)
            except nbd.Error as e:
                if h.aio_is_dead() or h.aio_is_closed():
                    raise
                with self.stats.lock:
                    self.stats.request_errors[e.string] += 1
                continue
            with self.stats.changed:
                self.stats.completed += 1
                self.stats.bytes_written += length
                self.stats.changed.notify_all()

    @staticmethod
    def _close(h: Any) -> None:
        # The tracker may go away as we leave: nothing is in flight by then.
        with contextlib.suppress(nbd.Error):
            h.shutdown()


class WriterPool:
    """``count`` writers on the tracker at ``uri``."""

    def __init__(
        self, uri: str, size: int, rng: random.Random, count: int, depth: int, pause: float
    ) -> None:
        self.stats = WriterStats()
        self.stopping = threading.Event()
        hot = hot_regions(rng, size)
        self.writers = [
            Writer(uri, size, rng.randrange(1 << 32), hot, depth, pause, self.stats, self.stopping)
            for _ in range(count)
        ]

    def start(self) -> None:
        for w in self.writers:
            w.thread.start()

    def wait_completed(self, more: int, deadline: float = 60.0) -> None:
        """Wait until ``more`` further requests were acknowledged: the faults
        are spaced by work done, not by time, whatever the machine's load."""
        end = time.monotonic() + deadline
        with self.stats.changed:
            target = self.stats.completed + more
            while self.stats.completed < target:
                self._check()
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"writers made {self.stats.completed} of {target} requests in {deadline}s"
                    )
                self.stats.changed.wait(min(left, 0.5))

    def hold(self, deadline: float = QUIESCE_DEADLINE) -> None:
        """Stop the VM: return once every writer closed its connection (each
        closes it before its next burst, and waits before connecting)."""
        end = time.monotonic() + deadline
        with self.stats.changed:
            self.stats.holding = True
            while self.stats.held < sum(w.thread.is_alive() for w in self.writers):
                self._check()
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"writers still busy {deadline}s after hold")
                self.stats.changed.wait(min(left, 0.5))

    def release(self) -> None:
        with self.stats.changed:
            self.stats.holding = False
            self.stats.changed.notify_all()

    def _check(self) -> None:
        for w in self.writers:
            if w.failure is not None:
                raise RuntimeError(f"writer {w.thread.name} failed: {w.failure!r}")

    def quiesce(self) -> None:
        """Stop submitting; return once every request in flight completed."""
        self.stopping.set()
        for w in self.writers:
            if w.thread.ident is not None:
                w.thread.join(QUIESCE_DEADLINE)
                if w.thread.is_alive():
                    raise TimeoutError(f"{w.thread.name} still has requests in flight")
        self._check()

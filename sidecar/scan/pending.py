"""Work the scan's loop hands to another thread (a one-sided scan's hashing),
and the eventfd in the loop's poll set that wakes it when some came back:
the loop keeps reading while a chunk is hashed."""

from __future__ import annotations

import collections
import contextlib
import os
import select
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

# What another thread found in a chunk: the offsets of its differing
# granules, or the error it met.
Hashed = list[int] | BaseException
# Chunks read and waiting for their digests, beyond the scan's ``in_flight``.
HASH_AHEAD = 2

Item = TypeVar("Item")


class Handed(Generic[Item]):
    """Items handed over, and what came back for each."""

    def __init__(self, poller: select.poll) -> None:
        self._back: collections.deque[tuple[Item, Hashed]] = collections.deque()
        self.count = 0  # handed over, not collected yet
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.fd)
        poller.register(self.fd, select.POLLIN)

    def callback(self, item: Item) -> Callable[[Hashed], None]:
        """What the other thread calls with its answer for ``item``."""
        self.count += 1

        def done(found: Hashed) -> None:
            self._back.append((item, found))
            with contextlib.suppress(OSError):  # the scan ended meanwhile
                os.eventfd_write(self.fd, 1)

        return done

    def woken(self) -> None:
        """The poll saw ``fd``: take the wake-up (the answers wait in order)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def collect(self) -> Iterator[tuple[Item, list[int]]]:
        """The answers that came back; the first error is raised."""
        while self._back:
            item, found = self._back.popleft()
            self.count -= 1
            if isinstance(found, BaseException):
                raise found
            yield item, found

"""The read budget: bytes of read buffers the export holds at once, for all
its clients together and for each. A client-given length never makes the
server hold more; a client that stops reading its replies holds only its
share, and the server (``NbdServer``) closes it when others wait for it.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """Bytes of read buffers the server may hold at once: ``limit`` across
    clients, ``per_holder`` for each (a connection). A hold counts what was
    asked for while the buffers are made, then what they keep (``keep``)."""

    def __init__(self, limit: int, per_holder: int) -> None:
        self.limit = limit
        self.per_holder = per_holder
        self.used = 0
        self.returned = 0  # bytes given back since the server last trimmed
        self.held: dict[object, int] = {}
        self._waiting: dict[object, tuple[object, int]] = {}  # token -> (holder, bytes)
        self._changed = asyncio.Condition()

    def _fits(self, holder: object, n: int) -> bool:
        return self.used + n <= self.limit and self.held.get(holder, 0) + n <= self.per_holder

    def starved(self) -> bool:
        """Whether a hold waits that its holder's own share would allow: it
        waits for what the other holders have."""
        return any(
            self.used + n > self.limit and self.held.get(holder, 0) + n <= self.per_holder
            for holder, n in self._waiting.values()
        )

    def hold(self, holder: object, n: int) -> Hold:
        """``async with budget.hold(connection, n) as held:`` n bytes."""
        return Hold(self, holder, n)

    async def _take(self, holder: object, n: int) -> None:
        async with self._changed:
            if not self._fits(holder, n):
                token = object()
                self._waiting[token] = (holder, n)
                try:
                    await self._changed.wait_for(lambda: self._fits(holder, n))
                finally:
                    del self._waiting[token]
            self.used += n
            self.held[holder] = self.held.get(holder, 0) + n

    async def _give_back(self, holder: object, n: int) -> None:
        if not n:
            return  # a hole's reply kept nothing
        async with self._changed:
            self.used -= n
            self.returned += n
            left = self.held.pop(holder) - n
            if left:
                self.held[holder] = left
            self._changed.notify_all()


class Hold:
    """Bytes one read holds of a ByteBudget while in ``async with``."""

    def __init__(self, budget: ByteBudget, holder: object, n: int) -> None:
        self._budget = budget
        self._holder = holder
        self.n = n

    async def __aenter__(self) -> Hold:
        await self._budget._take(self._holder, self.n)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._budget._give_back(self._holder, self.n)

    async def keep(self, n: int) -> None:
        """Hold only ``n`` bytes from now on (at most what is held)."""
        if n < self.n:
            # Cancelled while it waits for the lock, it gave nothing back
            # and still holds all: __aexit__ gives that.
            await self._budget._give_back(self._holder, self.n - n)
            self.n = n

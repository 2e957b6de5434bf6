"""The export names a client may choose: the live export (and any other the
server was started with), and the snapshots, looked up when a client names or
lists them, so that a snapshot taken since the sidecar started is served
without a restart, and a released one is gone.

Looking a snapshot up reads the state directory and may connect to the
tracker: it runs in a worker thread, never in the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

from sidecar.export.contexts import Export


class SnapshotSource(Protocol):
    """Where the snapshot exports come from (``sidecar.export.snapshots``)."""

    def find(self, name: str) -> Export | None:
        """The export of snapshot ``name`` if it is served now (may block)."""
        ...

    def exports(self) -> list[Export]:
        """Every snapshot export served now (may block)."""
        ...


class ExportCatalog:
    """The server's fixed exports by name (changed in place by whoever owns
    the server: ``serve`` moves the live export to the tracker's URI), and
    the snapshots beside them. A fixed export's name wins over a snapshot's."""

    def __init__(self, fixed: dict[str, Export], snapshots: SnapshotSource | None = None) -> None:
        self.fixed = fixed
        self.snapshots = snapshots

    async def find(self, name: str) -> Export | None:
        export = self.fixed.get(name)
        if export is not None or self.snapshots is None:
            return export
        return await asyncio.to_thread(self.snapshots.find, name)

    async def listing(self) -> Iterable[Export]:
        found = list(self.fixed.values())
        if self.snapshots is None:
            return found
        snapshots = await asyncio.to_thread(self.snapshots.exports)
        return found + [e for e in snapshots if e.name not in self.fixed]

"""What the parts of the bitmap store share: generations, and the store's
own operations that its parts (``dirtydiff.checkpoints``, ``dirtydiff.scans``)
build on.

Generations. The set of recording bitmaps is an immutable ``Generation``; an
operation of the store that changes the set installs a new one under the
store's lock. A write is counted in the generation it marked, and an
operation that must *drain* (a checkpoint, a disable) waits until every write
counted in the old generation has completed: ``retired`` is set when the last
one ends.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from dirtydiff.bitmapfile import BitmapFile, Reason
from dirtydiff.snapshots import SnapshotSet
from dirtydiff.state import BitmapInfo, StateDir

DRAIN_TIMEOUT = 30.0  # seconds a checkpoint or a disable waits by default


@dataclass(eq=False)
class Generation:
    bitmaps: tuple[BitmapFile, ...]
    inflight: int = 0
    retired: threading.Event | None = None


class StoreParts(ABC):
    """What a part of BitmapStore takes of it: BitmapStore defines each of
    these (it cannot be made if one is missing)."""

    state: StateDir
    disk_size: int
    recording: bool
    bitmaps: dict[str, BitmapFile]
    _lock: threading.Lock
    _gen: Generation
    snapshots: SnapshotSet | None

    @abstractmethod
    def _hold_writes(self, timeout: float) -> bool:
        """Admit no new write, and wait until none is in flight."""

    @abstractmethod
    def _admit_writes(self) -> None:
        """Admit writes again after ``_hold_writes``."""

    @abstractmethod
    def _get(self, name: str) -> BitmapFile:
        """The bitmap ``name``, or NotFound."""

    @abstractmethod
    def _create(
        self,
        name: str,
        granularity: int,
        *,
        enabled: bool = True,
        backup: str = "",
        reason: Reason = Reason.NONE,
    ) -> None:
        """A new bitmap, durable before it joins the recording set."""

    @abstractmethod
    def _remove(self, name: str) -> None:
        """Remove bitmap ``name`` and its file."""

    @abstractmethod
    def _clear_bits(self, bitmap: BitmapFile) -> None:
        """Clear the bits (not the header) of a bitmap a scan fills, keeping
        the writes in flight. Caller holds _lock."""

    @abstractmethod
    def _switch(self) -> Generation:
        """Install a new generation; return the old one. Caller holds _lock."""

    @abstractmethod
    def _finish(self, bitmap: BitmapFile) -> None:
        """A bitmap left the recording set: make it durable and not IN_USE."""

    @abstractmethod
    def _describe(self, name: str) -> BitmapInfo:
        """What ``info`` answers."""

    @staticmethod
    @abstractmethod
    def _check_timeout(timeout: float) -> None:
        """Refuse a drain timeout out of range, before anything changes."""

    @staticmethod
    @abstractmethod
    def _drain(old: Generation, timeout: float) -> bool:
        """Wait until every write counted in ``old`` completed."""

    @staticmethod
    @abstractmethod
    def _same_bitmap(name: str, bitmap: BitmapFile, created_ns: int) -> None:
        """Refuse a bitmap made since ``created_ns``."""

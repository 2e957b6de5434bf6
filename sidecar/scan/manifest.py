"""The manifest side of a scan: the disk compared by digest, and manifests
recorded as a two-sided scan reads the backup.

``ManifestSide`` stands in for the backup in ``sidecar.scan.engine.Scan``:
its zero map is the manifest's zero flags (so a hole on the disk against a
flagged granule is equal without a read, and the disk's reads skip nothing
the backup has), and a chunk of the disk is compared granule by granule with
the manifest's digests. The bitmap's granule may hold several manifest
granules: it is marked if any of them differs.

Hashing runs on one worker thread of the side, in the C extension, which
lets go of the GIL: the scan's thread goes on reading meanwhile, so that on
two cores the hashing does not hold back the reads (docs/performance.md).
One hashing thread, not more: on two cores the disk's server needs the
other.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

from dirtydiff import errors
from dirtydiff.manifest import Manifest, ManifestWriter, granule_digests
from sidecar.scan.engine import ZeroMap
from sidecar.scan.pending import Hashed

PART = 1 << 20  # granules of a merged run of holes looked at a time
RECORD_AHEAD = 4  # chunks a --write-manifest scan may read ahead of their hashing


class ManifestSide:
    """A backup known by its manifest (see the module's docstring)."""

    def __init__(self, manifest: Manifest, granularity: int, where: str) -> None:
        # The job checked the manifest against the disk (check_matches).
        assert granularity % manifest.granularity == 0
        self.name = "manifest"
        self.where = where
        self.manifest = manifest
        self.size = manifest.size
        self.granularity = granularity  # the bitmap's
        self.per_granule = granularity // manifest.granularity
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compare")
        self._cursor = (0, 0)  # (granule, where its digest is): see _same

    def differing_later(
        self, start: int, length: int, data: bytearray, done: Callable[[Hashed], None]
    ) -> None:
        self._worker.submit(_answer, done, self.differing, start, length, data)

    def zero_map(self, start: int, end: int) -> ZeroMap:
        """The runs of flagged-zero granules within [start, end)."""
        m = self.manifest.granularity
        first, last = start // m, -(-end // m)
        zeros = self.manifest.zero_count(first, last - first)
        if zeros == min(last, self.manifest.granules) - first:  # all holes
            return ZeroMap([(start, end)], start, end)
        if zeros == 0:  # all data
            return ZeroMap([], start, end)
        import numpy as np  # noqa: PLC0415

        flags = self.manifest.zero_flags(first, last - first)
        if not flags.size:
            return ZeroMap([], start, end)
        edges = np.flatnonzero(np.diff(np.concatenate(([False], flags, [False])).astype(np.int8)))
        ranges = [
            (max(start, (first + int(a)) * m), min(end, (first + int(b)) * m))
            for a, b in zip(edges[::2], edges[1::2], strict=True)
        ]
        return ZeroMap(ranges, start, end)

    def differing(self, start: int, length: int, data: bytearray | None) -> list[int]:
        """Offsets (from ``start``, in bitmap granules) of the granules of
        [start, start + length) whose disk bytes ``data`` (None: zeroes) are
        not what the manifest holds."""
        m = self.manifest.granularity
        first, count = start // m, -(-length // m)
        if data is not None:
            found, digests = granule_digests(data, m, self.manifest.digest)
            if self._same(first, count, found, digests):
                return []
        elif self.manifest.zero_count(first, count) == min(count, self.manifest.granules - first):
            return []  # zeroes on the disk, all flagged zero
        import numpy as np  # noqa: PLC0415

        if data is None:  # zeroes on the disk: what the manifest does not flag differs
            # A part at a time: a merged run of holes may span a huge disk.
            parts = [
                np.flatnonzero(~self.manifest.zero_flags(g, min(PART, first + count - g)))
                + (g - first)
                for g in range(first, first + count, PART)
            ]
            bad = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        else:
            zero, rows = self.manifest.digest_rows(first, count)
            ours = np.frombuffer(digests, np.uint8).reshape(count, self.manifest.digest)
            bad = np.flatnonzero((np.array(found, bool) != zero) | (ours != rows).any(axis=1))
        if not bad.size:
            return []
        granules = np.unique(bad // self.per_granule)
        return [int(g) * self.granularity for g in granules]

    def _same(self, first: int, count: int, found: list[bool], digests: bytes) -> bool:
        """Whether granules [first, first + count) are what the disk holds
        (``found``: zero or not; ``digests``: a slot each), the common case
        (unchanged), answered by two memcmps, without numpy. The chunks come
        in order, so where their digests start follows from the last one's
        (``_cursor``)."""
        if first % 8 or count % 8:
            return False  # the last chunk, or granules not on flag bytes: the long way
        ours = bytes(sum(1 << j for j in range(8) if found[i + j]) for i in range(0, count, 8))
        if bytes(self.manifest.flags[first // 8 : (first + count) // 8]) != ours:
            return False
        data = count - sum(found)
        at = self._cursor[1] if self._cursor[0] == first else self.manifest.rank(first)
        self._cursor = (first + count, at + data)
        d = self.manifest.digest
        if data < count:  # the manifest holds no digest for a zero granule
            digests = b"".join(digests[i * d : (i + 1) * d] for i in range(count) if not found[i])
        return bytes(self.manifest.digests[at * d : (at + data) * d]) == digests

    def close(self) -> None:
        self._worker.shutdown(wait=True)


def _answer(
    done: Callable[[Hashed], None],
    differing: Callable[[int, int, bytearray | None], list[int]],
    start: int,
    length: int,
    data: bytearray,
) -> None:
    """Run ``differing`` and hand its answer, or its error, to ``done``."""
    found: Hashed
    try:
        found = differing(start, length, data)
    except Exception as e:
        found = e
    done(found)


class ManifestRecorder:
    """Records the backup's digests as a two-sided scan reads it
    (``scan --write-manifest``). ``on_backup``, the scan's hook, copies the
    chunk and hashes it on its own thread, so that the scan's reads go on
    meanwhile (at most ``RECORD_AHEAD`` chunks wait); ``record`` hashes
    here (``dirtydiff digest``, already off the scan's thread)."""

    def __init__(self, writer: ManifestWriter) -> None:
        self.writer = writer
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="record")
        self._room = threading.Semaphore(RECORD_AHEAD)
        self._failed: BaseException | None = None

    def on_backup(self, start: int, length: int, data: bytearray | None) -> None:
        self._raise()
        copy = None if data is None else bytearray(data)  # the scan reuses its buffer
        self._room.acquire()
        self._worker.submit(self._record_later, start, length, copy)

    def _record_later(self, start: int, length: int, data: bytearray | None) -> None:
        try:
            self.record(start, length, data)
        except BaseException as e:
            self._failed = e
        finally:
            self._room.release()

    def record(self, start: int, length: int, data: bytearray | None) -> None:
        g = self.writer.header.granularity
        if start % g or (length % g and start + length != self.writer.header.size):
            raise errors.BadRequest(
                "manifest-granularity", "the scan's chunks are not whole manifest granules"
            )
        first = start // g
        if data is None:
            self.writer.record_zero(first, first + -(-length // g))
            return
        flags, digests = granule_digests(data, g, self.writer.header.digest)
        self.writer.record(first, flags, digests)

    def caught_up(self) -> None:
        """Every chunk handed over is in the writer's file (before a
        position is saved: a resumed scan skips what is before it)."""
        for _ in range(RECORD_AHEAD):
            self._room.acquire()
        for _ in range(RECORD_AHEAD):
            self._room.release()
        self._raise()

    def _raise(self) -> None:
        if self._failed is not None:
            raise self._failed

    def close(self) -> None:
        self._worker.shutdown(wait=True)


class ManifestMaker:
    """The other side of ``dirtydiff digest``: the scan engine reads the
    backup as its disk, and this side records each chunk's digests instead
    of comparing them. Its zero map calls everything zero, so the engine
    reads only what the backup's own map calls data and hands the rest over
    as zeroes (``data`` None)."""

    def __init__(self, recorder: ManifestRecorder) -> None:
        self.name = "manifest"
        self.recorder = recorder
        self.size = recorder.writer.header.size
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="digest")

    def differing_later(
        self, start: int, length: int, data: bytearray, done: Callable[[Hashed], None]
    ) -> None:
        self._worker.submit(_answer, done, self.differing, start, length, data)

    def zero_map(self, start: int, end: int) -> ZeroMap:
        return ZeroMap([(start, end)], start, end)

    def differing(self, start: int, length: int, data: bytearray | None) -> list[int]:
        self.recorder.record(start, length, data)
        return []

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self.recorder.close()

"""The bitmap store: every bitmap of one state directory, owned by one process.

The tracker runs a store with ``recording=True`` for as long as it serves the
disk: every content-changing request calls ``begin_write`` (marks every
recording bitmap) before it reaches the disk, and ``end_write`` once the disk
answered. The CLI runs a store with ``recording=False`` to change bitmaps
while no tracker runs. Both go through the same operations.

Generations. The set of recording bitmaps is an immutable ``Generation``; an
operation that changes the set (add, enable, disable, remove, checkpoint)
installs a new one under the lock. A write is counted in the generation it
marked. ``checkpoint`` and ``disable`` then *drain*: they answer only when every
write counted in the old generation has completed, so a backup that reads the
frozen bitmap's granules afterwards reads their data. A bitmap that joins the
recording set also gets the ranges of the writes still in flight, because their
data may land after it began: over-reporting them is allowed, missing them is
not.

Locking. ``_lock`` guards the current generation, the in-flight table and
every bit of every writable bitmap. Marking is done under it, so a clear or a
merge never interleaves with a mark.

Two parts of the store live in modules of their own, as bases of
``BitmapStore``: checkpoints (``dirtydiff.checkpoints``) and the lifecycle
of a diff scan (``dirtydiff.scans``).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from dirtydiff import errors
from dirtydiff.bitmapfile import (
    DEFAULT_GRANULARITY,
    BitmapFile,
    Flag,
    Reason,
    check_backup_reference,
    check_granularity,
    fsync_dir,
    inconsistency,
)
from dirtydiff.checkpoints import CheckpointResult, Checkpoints
from dirtydiff.scans import ScanLifecycle
from dirtydiff.snapshotinfo import snapshot_exists
from dirtydiff.snapshots import SnapshotSet
from dirtydiff.state import (
    OPEN_CHECKPOINT,
    SCAN_WRITES_PREFIX,
    BitmapInfo,
    StateDir,
    check_name,
    describe,
)
from dirtydiff.storebase import DRAIN_TIMEOUT, Generation

# Named here too: the store is where its callers find them.
__all__ = ["DRAIN_TIMEOUT", "BitmapStore", "CheckpointResult", "Generation"]

log = logging.getLogger(__name__)

_CLEARING = ".clearing"  # ".NAME.bitmap.clearing": the clean file a clear puts under NAME
# Reasons for which a process is filling a bitmap: users may not change it.
_FILLING = (Reason.SCAN_IN_PROGRESS, Reason.IMPORT_IN_PROGRESS)


@dataclass
class _InFlight:
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_token: int = 0


class BitmapStore(Checkpoints, ScanLifecycle):
    def __init__(
        self,
        state: StateDir,
        disk_size: int,
        *,
        recording: bool,
        granularity: int = DEFAULT_GRANULARITY,
    ) -> None:
        """Open every bitmap. The caller holds the state lock.

        Raises Corrupt for a file that cannot be trusted and Conflict for a
        bitmap recorded for a disk of another size: refusing to start loses
        nothing, guessing might.
        """
        self.state = state
        self.disk_size = disk_size
        self.recording = recording
        self._lock = threading.Lock()
        self._inflight = _InFlight()
        # The instant of a checkpoint with a snapshot: while ``_held``, new
        # writes wait at begin_write (``_admit``) and the last one in flight
        # to end wakes the checkpoint (``_idle``).
        self._held = False
        self._admit = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        # The tracker's snapshots (``dirtydiff.snapshots``); None offline.
        self.snapshots: SnapshotSet | None = None
        self.bitmaps: dict[str, BitmapFile] = {}
        state.prepare()
        self._recover_checkpoint()
        try:
            for name in state.names():
                bitmap = state.open_bitmap(name, writable=True)
                self.bitmaps[name] = bitmap
                self._settle(name, bitmap)
                if bitmap.header.disk_size != disk_size:
                    raise errors.Conflict(
                        "disk-size-mismatch",
                        f"bitmap {name!r} ({bitmap.path}) describes a disk of "
                        f"{bitmap.header.disk_size} bytes but the disk has {disk_size} bytes; "
                        "if the disk was resized, remove the bitmap "
                        "(dirtydiff bitmap remove) and rebuild it with a scan",
                    )
            if OPEN_CHECKPOINT not in self.bitmaps:
                check_granularity(granularity)
                self.bitmaps[OPEN_CHECKPOINT] = BitmapFile.create(
                    state.bitmap_path(OPEN_CHECKPOINT),
                    granularity=granularity,
                    disk_size=disk_size,
                    flags=Flag.ENABLED,
                    generation=1,
                )
            self._settle_open()
            self._reap_scan_writes()
            if recording:
                self._cover_offline_scans()
            if recording:
                for name, bitmap in self.bitmaps.items():
                    if bitmap.header.flags & Flag.ENABLED:
                        self._start_recording(name, bitmap)
        except BaseException:
            self.close(clean=False)
            raise
        self._gen = Generation(self._enabled())

    # -- the hot path ----------------------------------------------------

    def begin_write(self, offset: int, length: int) -> tuple[Generation, int]:
        """Mark ``[offset, offset+length)`` in every recording bitmap.

        Must be called before the request is forwarded; ``end_write`` must
        follow whatever the outcome (bits are never unmarked).
        """
        with self._lock:
            if self._held:
                self._admit.wait_for(lambda: not self._held)
            gen = self._gen
            for bitmap in gen.bitmaps:
                bitmap.mark(offset, length)
            gen.inflight += 1
            inflight = self._inflight
            token = inflight.next_token
            inflight.next_token = token + 1
            inflight.ranges[token] = (offset, length)
        return gen, token

    def end_write(self, gen: Generation, token: int) -> None:
        with self._lock:
            ranges = self._inflight.ranges
            del ranges[token]
            gen.inflight -= 1
            if gen.retired is not None and gen.inflight == 0:
                gen.retired.set()
            if self._held and not ranges:
                self._idle.notify_all()

    def _hold_writes(self, timeout: float) -> bool:
        """Admit no new write and wait until none is in flight: the instant
        of a snapshot. False if writes were still in flight after
        ``timeout`` seconds (then they are admitted again, nothing changed).
        """
        with self._lock:
            self._held = True
            if self._idle.wait_for(lambda: not self._inflight.ranges, timeout):
                return True
            self._held = False
            self._admit.notify_all()
            return False

    def _admit_writes(self) -> None:
        with self._lock:
            self._held = False
            self._admit.notify_all()

    # -- generations -----------------------------------------------------

    def _enabled(self) -> tuple[BitmapFile, ...]:
        if not self.recording:
            return ()
        return tuple(b for b in self.bitmaps.values() if b.header.flags & Flag.ENABLED)

    def _switch(self) -> Generation:
        """Install a new generation from the ENABLED flags. Caller holds _lock."""
        old = self._gen
        new = Generation(self._enabled())
        joining = [b for b in new.bitmaps if b not in old.bitmaps]
        for offset, length in self._inflight.ranges.values():
            for bitmap in joining:
                bitmap.mark(offset, length)
        old.retired = threading.Event()
        if old.inflight == 0:
            old.retired.set()
        self._gen = new
        return old

    @staticmethod
    def _check_timeout(timeout: float) -> None:
        """Checked before anything changes: a bad timeout must not leave an
        operation half done after its switch."""
        if not 0 < timeout <= 3600:  # also false for NaN
            raise errors.BadRequest(
                "bad-request", f"drain timeout {timeout!r} is not 0 < t <= 3600 s"
            )

    @staticmethod
    def _drain(old: Generation, timeout: float) -> bool:
        assert old.retired is not None
        return old.retired.wait(timeout)

    @staticmethod
    def _settle(name: str, bitmap: BitmapFile) -> None:
        """Turn "IN_USE by another boot" into the sticky INCONSISTENT flag.

        Done on open, before anything may rewrite the header (a clean close
        clears IN_USE, which would erase the evidence of the crash).
        """
        why = inconsistency(bitmap.header)
        if why is not Reason.NONE and not bitmap.header.flags & Flag.INCONSISTENT:
            log.error("bitmap %s is inconsistent: %s", name, why.describe())
            bitmap.mark_inconsistent(why)

    def _settle_open(self) -> None:
        """``@open`` records always (but while a rebuild fills it): found
        disabled, it may have missed writes, and it records from now on."""
        bitmap = self.bitmaps[OPEN_CHECKPOINT]
        header = bitmap.header
        if header.flags & Flag.ENABLED or header.reason is Reason.SCAN_IN_PROGRESS:
            return
        log.error("bitmap %s was found not recording: it may miss changes", OPEN_CHECKPOINT)
        header.flags |= Flag.ENABLED
        if header.reason is Reason.NONE:
            header.reason = Reason.NOT_RECORDING
        bitmap.mark_inconsistent(header.reason)

    def disk_replaced(self) -> None:
        """The disk is not proven to be the one the bitmaps described (a
        tracker started on another file, or the same one moved elsewhere):
        every bitmap may miss what changed, and is marked so (a rebuild
        refills it). Before the first write."""
        for name, bitmap in self.bitmaps.items():
            if bitmap.consistent or bitmap.header.reason is Reason.NONE:
                log.error("bitmap %s is inconsistent: %s", name, Reason.DISK_REPLACED.describe())
                bitmap.mark_inconsistent(Reason.DISK_REPLACED)

    def _start_recording(self, name: str, bitmap: BitmapFile) -> None:
        self._settle(name, bitmap)
        bitmap.begin_recording()

    # -- operations (same for the tracker and for offline use) -------------

    def _get(self, name: str) -> BitmapFile:
        try:
            return self.bitmaps[name]
        except KeyError:
            raise errors.NotFound(
                "unknown-bitmap", f"no bitmap named {name!r} in {self.state.path}"
            ) from None

    def add(
        self,
        name: str,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        enabled: bool = True,
        backup: str = "",
        importing: bool = False,
    ) -> BitmapInfo:
        """A new, clean bitmap; ``backup``: the backup taken just before,
        which it counts changes from (``rebuild`` scans against it).
        ``importing``: ``bitmap import`` fills it, and it is inconsistent
        from its first byte until ``import_complete``."""
        check_name(name)
        check_granularity(granularity)
        if name in self.bitmaps:
            raise errors.Conflict("name-in-use", f"bitmap {name!r} already exists")
        reason = Reason.IMPORT_IN_PROGRESS if importing else Reason.NONE
        self._create(name, granularity, enabled=enabled, backup=backup, reason=reason)
        return self._describe(name)

    def _create(
        self,
        name: str,
        granularity: int,
        *,
        enabled: bool = True,
        backup: str = "",
        reason: Reason = Reason.NONE,
    ) -> None:
        flags = Flag.ENABLED if enabled else Flag(0)
        if enabled and self.recording:
            flags |= Flag.IN_USE
        # Created durably, IN_USE included, before it joins the recording set.
        bitmap = BitmapFile.create(
            self.state.bitmap_path(name),
            granularity=granularity,
            disk_size=self.disk_size,
            flags=flags,
            backup=backup,
            reason=reason,
        )
        with self._lock:
            self.bitmaps[name] = bitmap
            self._switch()

    def _changeable(self, name: str) -> BitmapFile:
        """A bitmap users may change: not a scan's scratch bitmap, and not one
        a scan is filling (clearing or enabling it would make a half-built
        bitmap look complete)."""
        bitmap = self._get(name)
        if name.startswith(SCAN_WRITES_PREFIX):
            raise errors.BadRequest(
                "reserved-name",
                f"{name} records the writes made during the scan of "
                f"{name[len(SCAN_WRITES_PREFIX) :]!r}; it is not for users to change",
            )
        if bitmap.header.reason is Reason.SCAN_IN_PROGRESS:
            raise errors.Conflict(
                "scan-in-progress",
                f"a diff scan is filling {name!r}; let it finish, or abort it "
                "(dirtydiff scan --abort)",
            )
        if bitmap.header.reason is Reason.IMPORT_IN_PROGRESS:
            raise errors.Conflict(
                "import-in-progress",
                f"an import is filling {name!r}; let it finish, or remove the bitmap",
            )
        return bitmap

    @staticmethod
    def _not_open(name: str, what: str) -> None:
        """``@open`` must record every change since the last checkpoint:
        stopping it or emptying it would make the next checkpoint claim less
        than what changed."""
        if name == OPEN_CHECKPOINT:
            raise errors.BadRequest(
                "reserved-name",
                f"{OPEN_CHECKPOINT} records the open checkpoint interval and cannot be {what}; "
                "a checkpoint starts a new interval",
            )

    def remove(self, name: str, created_ns: int | None = None) -> None:
        """Remove ``name`` (with ``created_ns``: only if it is still that
        bitmap; an import undoing its own bitmap must not remove another)."""
        self._not_open(name, "removed")
        snapshot_exists(self.state, name)
        if name.startswith(SCAN_WRITES_PREFIX):
            self._changeable(name)  # raises reserved-name
        if created_ns is not None:
            self._same_bitmap(name, self._get(name), created_ns)
        self._remove(name)
        if SCAN_WRITES_PREFIX + name in self.bitmaps:  # its unfinished scan goes too
            self._remove(SCAN_WRITES_PREFIX + name)

    def _remove(self, name: str) -> None:
        bitmap = self._get(name)
        with self._lock:
            del self.bitmaps[name]
            self._switch()
        os.unlink(bitmap.path)
        fsync_dir(bitmap.path.parent)
        bitmap.close()

    def clear(self, name: str, backup: str = "") -> BitmapInfo:
        """Empty ``name``: it counts changes from now (and, with ``backup``,
        from that backup, taken just now), no longer from what it counted
        from before.

        A new file takes the name in one rename, under the lock: a client
        that chose the old one finds it gone instead of seeing its bits
        vanish, and a crash leaves either the old bitmap or the new one.
        """
        self._not_open(name, "cleared")
        old = self._changeable(name)
        check_backup_reference(backup)
        flags = old.header.flags & Flag.ENABLED
        recording = old in self._gen.bitmaps
        if recording:
            flags |= Flag.IN_USE
        staging = old.path.with_name(f".{old.path.name}{_CLEARING}")
        staging.unlink(missing_ok=True)
        new = BitmapFile.create(
            staging,
            granularity=old.granularity,
            disk_size=self.disk_size,
            flags=flags,
            backup=backup,
        )
        try:
            with self._lock:
                os.rename(staging, old.path)
                new.path = old.path
                self.bitmaps[name] = new
                self._switch()  # new joins with the writes in flight; old leaves
        except OSError as e:
            new.close()
            staging.unlink(missing_ok=True)
            raise errors.StorageError(
                "state-dir-error", f"cannot clear {name!r}: {e.strerror}"
            ) from None
        old.close()
        fsync_dir(self.state.bitmaps_dir)
        return self._describe(name)

    def _clear_bits(self, bitmap: BitmapFile) -> None:
        """Clear the bits, not the header, of a bitmap that is not
        consistent (a scan fills it). Caller holds _lock."""
        bitmap.clear()
        # A write in flight may land after the clear: keep it marked.
        if bitmap in self._gen.bitmaps:
            for offset, length in self._inflight.ranges.values():
                bitmap.mark(offset, length)

    def enable(self, name: str) -> BitmapInfo:
        bitmap = self._changeable(name)
        if bitmap.header.flags & Flag.ENABLED:
            return self._describe(name)
        bitmap.header.flags |= Flag.ENABLED
        if self.recording:
            self._start_recording(name, bitmap)
        else:
            bitmap.write_header()
        with self._lock:
            self._switch()
        return self._describe(name)

    def disable(self, name: str, timeout: float = DRAIN_TIMEOUT) -> BitmapInfo:
        self._check_timeout(timeout)
        self._not_open(name, "disabled")
        bitmap = self._changeable(name)
        if not bitmap.header.flags & Flag.ENABLED:
            return self._describe(name)
        with self._lock:
            bitmap.header.flags &= ~Flag.ENABLED
            bitmap.write_header(durable=False)
            old = self._switch()
        self._drain(old, timeout)
        self._finish(bitmap)
        return self._describe(name)

    def mark_ranges(self, name: str, ranges: list[tuple[int, int]]) -> BitmapInfo:
        """Mark byte ranges dirty (``bitmap import`` brings another tool's bits)."""
        bitmap = self._get(name)
        for offset, length in ranges:
            if offset < 0 or length <= 0 or offset + length > self.disk_size:
                raise errors.BadRequest(
                    "bad-range",
                    f"range {offset}+{length} is outside the disk ({self.disk_size} bytes)",
                )
        with self._lock:
            for offset, length in ranges:
                bitmap.mark(offset, length)
            # A bitmap at rest must be durable, except one a scan is filling:
            # it is made durable when the scan completes, and a host crash
            # before that restarts the scan (its record names the boot).
            at_rest = not bitmap.header.flags & Flag.IN_USE
            if at_rest and bitmap.header.reason not in _FILLING:
                bitmap.bits.flush()
        return self._describe(name)

    def merge(self, target: str, sources: list[str]) -> BitmapInfo:
        into = self._changeable(target)
        found = [self._get(s) for s in sources]
        with self._lock:
            for source in found:
                into.merge_from(source)
            worst = next((inconsistency(s.header) for s in found if not s.consistent), None)
            if worst is not None:
                into.mark_inconsistent(worst)
            if not into.header.flags & Flag.IN_USE:
                into.bits.flush()
        return self._describe(target)

    @staticmethod
    def _same_bitmap(name: str, bitmap: BitmapFile, created_ns: int) -> None:
        """``name`` is still the bitmap made at ``created_ns``: a job that
        began filling it must not finish (or undo) one made since."""
        if bitmap.header.created_ns != created_ns:
            raise errors.Conflict(
                "other-bitmap",
                f"bitmap {name!r} is not the one this job began filling "
                "(it was removed and made again meanwhile)",
            )

    # -- imports -----------------------------------------------------------

    def import_complete(self, name: str, created_ns: int) -> BitmapInfo:
        """Every range of an import is marked in ``name`` (the bitmap
        ``add(importing=True)`` made, by its creation time): it is consistent
        from now on."""
        bitmap = self._get(name)
        if bitmap.header.reason is not Reason.IMPORT_IN_PROGRESS:
            raise errors.Conflict("not-importing", f"bitmap {name!r} is not being imported")
        self._same_bitmap(name, bitmap, created_ns)
        with self._lock:
            if not bitmap.header.flags & Flag.IN_USE:
                bitmap.bits.flush()  # the imported bits are durable before the header says so
            bitmap.header.flags &= ~Flag.INCONSISTENT
            bitmap.header.reason = Reason.NONE
            bitmap.write_header()
        return self._describe(name)

    def _finish(self, bitmap: BitmapFile) -> None:
        """A bitmap left the recording set: make it durable and not IN_USE."""
        if bitmap.header.flags & Flag.IN_USE:
            bitmap.end_recording()
        else:
            bitmap.write_header()

    # -- queries ---------------------------------------------------------

    def _describe(self, name: str) -> BitmapInfo:
        bitmap = self._get(name)
        return describe(name, bitmap, recording=bitmap in self._gen.bitmaps)

    def info(self, name: str) -> BitmapInfo:
        return self._describe(name)

    def list(self) -> list[BitmapInfo]:
        return [self._describe(n) for n in sorted(self.bitmaps)]

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight.ranges)

    # -- shutdown --------------------------------------------------------

    def close(self, *, clean: bool = True) -> None:
        """Stop recording: make every bitmap durable and clear IN_USE."""
        with self._lock:
            bitmaps = list(self.bitmaps.values())
            self.bitmaps.clear()
            if hasattr(self, "_gen"):
                self._gen = Generation(())
        for bitmap in bitmaps:
            try:
                if clean and bitmap.header.flags & Flag.IN_USE:
                    bitmap.end_recording()
            finally:
                bitmap.close()

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
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from dirtydiff.state import (
    OPEN_CHECKPOINT,
    SCAN_WRITES_PREFIX,
    BitmapInfo,
    DiskSeen,
    StateDir,
    check_name,
    describe,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 30.0
_STAGING = ".@open.staging"
_CLEARING = ".clearing"  # ".NAME.bitmap.clearing": the clean file a clear puts under NAME
# Reasons for which a process is filling a bitmap: users may not change it.
_FILLING = (Reason.SCAN_IN_PROGRESS, Reason.IMPORT_IN_PROGRESS)


def _begun(resume: bool, bitmap: BitmapFile) -> dict[str, Any]:
    """scan_begin's answer."""
    return {
        "resume": resume,
        "granularity": bitmap.granularity,
        "created_ns": bitmap.header.created_ns,
    }


@dataclass(eq=False)
class Generation:
    bitmaps: tuple[BitmapFile, ...]
    inflight: int = 0
    retired: threading.Event | None = None


@dataclass
class CheckpointResult:
    name: str
    generation: int
    drained: bool
    dirty_bytes: int


@dataclass
class _InFlight:
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_token: int = 0


class BitmapStore:
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
            del self._inflight.ranges[token]
            gen.inflight -= 1
            if gen.retired is not None and gen.inflight == 0:
                gen.retired.set()

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

    def _reap_scan_writes(self) -> None:
        """Remove every ``@scan:NAME`` no scan needs any more: NAME is gone,
        or no scan fills it (killed between a scan's end and its unlink)."""
        for name in [n for n in self.bitmaps if n.startswith(SCAN_WRITES_PREFIX)]:
            filled = self.bitmaps.get(name[len(SCAN_WRITES_PREFIX) :])
            if filled is None or filled.header.reason is not Reason.SCAN_IN_PROGRESS:
                log.info("removing %s: no scan fills its bitmap", name)
                bitmap = self.bitmaps.pop(name)
                os.unlink(bitmap.path)
                bitmap.close()
                fsync_dir(self.state.bitmaps_dir)

    def _cover_offline_scans(self) -> None:
        """Before the first write: every bitmap a scan fills gets a
        ``@scan:NAME`` recording, so an offline scan left unfinished (which
        had none: nothing wrote while it ran) misses none of this tracker's
        writes when it resumes."""
        for name, bitmap in list(self.bitmaps.items()):
            writes = SCAN_WRITES_PREFIX + name
            if bitmap.header.reason is Reason.SCAN_IN_PROGRESS and writes not in self.bitmaps:
                log.info("recording %s: a scan of %s is unfinished", writes, name)
                self.bitmaps[writes] = BitmapFile.create(
                    self.state.bitmap_path(writes),
                    granularity=bitmap.granularity,
                    disk_size=self.disk_size,
                    flags=Flag.ENABLED,
                )

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

    def checkpoint(
        self, name: str, timeout: float = DRAIN_TIMEOUT, backup: str = ""
    ) -> CheckpointResult:
        """Freeze the open interval's bitmap as ``name``; start the next one.

        ``backup`` names the backup the caller takes at this checkpoint: the
        next interval counts changes from it. ``name`` keeps the reference
        the interval it froze had.

        Crash safety: the next interval's file is made durably under a staging
        name first; then, under the lock (so no write marks either file
        meanwhile), the open file is renamed to ``name`` and the staging file
        to ``@open``. A crash between the two renames is finished at start-up
        by ``_recover_checkpoint``.
        """
        check_name(name)
        self._check_timeout(timeout)
        check_backup_reference(backup)
        if name in self.bitmaps:
            raise errors.Conflict("name-in-use", f"bitmap {name!r} already exists")
        frozen = self.bitmaps[OPEN_CHECKPOINT]
        if frozen.header.reason is Reason.SCAN_IN_PROGRESS:
            # Its scan's writes bitmap and record name @open: freezing it now
            # would turn half a rebuild into a checkpoint.
            raise errors.Conflict(
                "scan-in-progress",
                f"a rebuild of {OPEN_CHECKPOINT} is running; let it finish, or abort it",
            )
        staging = self.state.bitmaps_dir / _STAGING
        staging.unlink(missing_ok=True)
        flags = Flag.ENABLED | (Flag.IN_USE if self.recording else Flag(0))
        following = BitmapFile.create(
            staging,
            granularity=frozen.granularity,
            disk_size=self.disk_size,
            flags=flags,
            generation=frozen.header.generation + 1,
            backup=backup,
        )
        opened = self.state.bitmap_path(OPEN_CHECKPOINT)
        target = self.state.bitmap_path(name)
        with self._lock:
            self._switch_files(name, frozen, following, staging, opened, target)
            old = self._switch()
            durable = self._checkpoint_durable(name, frozen)
        started = time.monotonic()
        drained = self._drain(old, timeout)
        if not drained:
            log.warning(
                "checkpoint %s: writes still in flight after %.1fs; they are recorded "
                "in the next interval too",
                name,
                time.monotonic() - started,
            )
        if not durable:
            # Left IN_USE: should the renames not survive a host crash, every
            # file they touched is then reported inconsistent.
            raise errors.StorageError(
                "state-dir-error",
                f"checkpoint {name} was taken, but the state directory could not make it "
                "durable; if the host goes down before it recovers, its bitmaps are reported "
                "inconsistent",
            )
        self._finish(frozen)
        info = self._describe(name)
        return CheckpointResult(name, frozen.header.generation, drained, info.dirty_bytes)

    def _switch_files(
        self,
        name: str,
        frozen: BitmapFile,
        following: BitmapFile,
        staging: Path,
        opened: Path,
        target: Path,
    ) -> None:
        """The checkpoint's two renames, and the store following them. Caller
        holds _lock, so no write marks a file while names move.

        The store always describes what the names say: the tracker marks the
        file under ``@open``, which the export serves. If the second rename
        fails, the first is undone; if that fails too, the frozen file stays
        under ``name`` and keeps recording (an over-report), and the next
        start puts it back under ``@open`` (``_recover_checkpoint``).
        """
        try:
            os.rename(opened, target)
        except OSError as e:
            following.close()
            staging.unlink(missing_ok=True)
            raise self._checkpoint_failed(name, e) from None
        try:
            os.rename(staging, opened)
        except OSError as e:
            try:
                os.rename(target, opened)
            except OSError:
                frozen.path = target  # where it is; still @open to the store
                log.error("checkpoint %s failed half way: %s is still %s", name, target,
                          OPEN_CHECKPOINT)  # fmt: skip
            following.close()
            raise self._checkpoint_failed(name, e) from None
        frozen.path = target
        following.path = opened
        del self.bitmaps[OPEN_CHECKPOINT]
        self.bitmaps[name] = frozen
        self.bitmaps[OPEN_CHECKPOINT] = following
        frozen.header.flags &= ~Flag.ENABLED
        with contextlib.suppress(OSError):
            # Not durable yet (``_finish`` is): a header still ENABLED on disk
            # makes ``name`` record after a restart, an over-report.
            frozen.write_header(durable=False)

    def _checkpoint_durable(self, name: str, frozen: BitmapFile) -> bool:
        try:
            fsync_dir(self.state.bitmaps_dir)
            return True
        except OSError as e:
            log.error("checkpoint %s: %s: %s", name, self.state.bitmaps_dir, e.strerror)
            return False

    @staticmethod
    def _checkpoint_failed(name: str, e: OSError) -> errors.StorageError:
        return errors.StorageError(
            "state-dir-error",
            f"checkpoint {name} failed: {e.strerror}; {OPEN_CHECKPOINT} goes on recording",
        )

    # -- diff scans ------------------------------------------------------

    def scan_begin(
        self,
        name: str,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        disk: DiskSeen,
        restart: bool = False,
        backup: str = "",
        rebuild: bool = False,
    ) -> dict[str, Any]:
        """Prepare bitmap ``name`` for a diff scan, or find the one to resume.

        ``disk`` is what the scan found when it opened the disk: it must be
        proven to be this state's disk (``DiskRecord.check``) before anything
        is prepared, or the scan would fill a bitmap from another disk.

        ``name`` is created inconsistent (scan in progress) in the same
        rename that gives it its name, so it is never served as complete
        until ``scan_complete``. While recording, ``@scan:NAME`` starts
        recording every write first: a write the scan's reads may have missed
        lands there. Returns whether the scan resumes, and the bitmap's
        granularity and creation time (which tells a scan record the bitmap
        it was filling from one added later under the same name).

        A scan resumes only if every write since it began is in a consistent
        ``@scan:NAME``, or no tracker ran since (no ``@scan:NAME``, offline:
        a tracker that starts makes one for every unfinished scan before its
        first write). Otherwise, or when the caller asks to ``restart`` (its
        record is from another boot), it starts over.

        ``rebuild``: ``name`` exists and is inconsistent (a host crash); it is
        refilled the same way, against the backup it refers to, and keeps
        its name (``@open`` included: the checkpoint interval after a crash).
        """
        check_granularity(granularity)
        check_backup_reference(backup)
        self._check_disk(disk)
        writes_name = SCAN_WRITES_PREFIX + name
        existing = self.bitmaps.get(name)
        if not (rebuild and name == OPEN_CHECKPOINT):  # @open can be rebuilt
            check_name(name)
        if existing is not None:
            if existing.header.reason is not Reason.SCAN_IN_PROGRESS:
                if not rebuild:
                    raise errors.Conflict("name-in-use", f"bitmap {name!r} already exists")
                self._begin_rebuild(name, existing, backup)
                return _begun(False, existing)
            writes = self.bitmaps.get(writes_name)
            trusted = writes.consistent if writes is not None else not self.recording
            if trusted and not restart:
                return _begun(True, existing)
            # Writes during the interrupted scan may be lost: start afresh.
            # It is still marked as being scanned: at no moment does its
            # header call the cleared bits complete. The new @scan:NAME
            # records before this returns, so before the scan's first read.
            with self._lock:
                self._clear_bits(existing)
            if writes is not None:
                self._remove(writes_name)
            if self.recording:
                self._create(writes_name, existing.granularity)
            return _begun(False, existing)
        if rebuild:
            raise errors.NotFound("unknown-bitmap", f"no bitmap named {name!r} to rebuild")
        if self.recording:
            self._create(writes_name, granularity)
        bitmap = BitmapFile.create(
            self.state.bitmap_path(name),
            granularity=granularity,
            disk_size=self.disk_size,
            flags=Flag(0),
            backup=backup,
            reason=Reason.SCAN_IN_PROGRESS,
        )
        with self._lock:
            self.bitmaps[name] = bitmap
        return _begun(False, bitmap)

    def _check_disk(self, disk: DiskSeen) -> None:
        """The disk a scan reads is this state's: proven, not assumed."""
        record = self.state.disk()
        if record is None:  # an offline scan records the disk before it opens a store
            raise errors.NotFound(
                "never-tracked", f"state directory {self.state.path} names no disk"
            )
        if record.size != self.disk_size:
            raise errors.Conflict(
                "disk-size-mismatch",
                f"{self.state.disk_path} describes {record.size} bytes but the bitmaps "
                f"{self.disk_size}",
            )
        record.check(disk, tracker_runs=self.recording, state=self.state.path)

    def _begin_rebuild(self, name: str, bitmap: BitmapFile, backup: str) -> None:
        """Turn inconsistent ``name`` into a bitmap a scan is filling.

        It is compared with ``backup`` if given (the caller knows which backup
        the bitmap counts from: one added without ``--backup``, or a backup
        moved elsewhere), else with the one its header records; the header
        then records the one used, which is what the rebuilt bits count from.

        The order keeps every write covered: ``@scan:NAME`` joins the
        recording set first (with the writes in flight), then ``name`` leaves
        it and is marked as being scanned, and only then are its bits
        cleared.
        """
        if bitmap.consistent:
            raise errors.Conflict(
                "consistent",
                f"bitmap {name!r} is consistent: nothing to rebuild "
                "(a scan into a new bitmap compares against another backup)",
            )
        if not (backup or bitmap.header.backup):
            raise errors.Conflict(
                "no-backup",
                f"bitmap {name!r} does not know the backup it counts changes from "
                "(checkpoint --backup and bitmap add --backup record it); give --backup URI",
            )
        writes_name = SCAN_WRITES_PREFIX + name
        if writes_name in self.bitmaps:  # left by a crash at the end of a scan
            self._remove(writes_name)
        if self.recording:
            self._create(writes_name, bitmap.granularity)
        with self._lock:
            bitmap.header.flags &= ~(Flag.ENABLED | Flag.IN_USE)
            if backup and backup != bitmap.header.backup:
                bitmap.set_backup(backup)
            # Another incarnation (see bitmapfile): a client that chose the
            # bitmap before its crash never reads the rebuilt one as its own.
            bitmap.header.created_ns = time.time_ns()
            self._mark_scanning(bitmap)  # writes the header
            self._switch()
            self._clear_bits(bitmap)

    @staticmethod
    def _mark_scanning(bitmap: BitmapFile) -> None:
        bitmap.header.flags &= ~Flag.ENABLED
        bitmap.mark_inconsistent(Reason.SCAN_IN_PROGRESS)

    def scan_complete(self, name: str, created_ns: int) -> BitmapInfo:
        """The diff is in ``name``: add the writes made meanwhile, make it
        record from now on, and only then declare it consistent.

        ``created_ns`` is what ``scan_begin`` answered: the bitmap completed
        is the one this scan filled, not one removed and added again since.
        Under the lock, so no write falls between: ``name`` joins the
        recording set (with the writes in flight), ``@scan:NAME`` is merged
        in and leaves the set.
        """
        bitmap = self._get(name)
        if bitmap.header.reason is not Reason.SCAN_IN_PROGRESS:
            raise errors.Conflict("not-scanning", f"bitmap {name!r} is not being filled by a scan")
        self._same_bitmap(name, bitmap, created_ns)
        writes = self.bitmaps.get(SCAN_WRITES_PREFIX + name)
        if (writes is None and self.recording) or (writes is not None and not writes.consistent):
            raise errors.Conflict(
                "scan-writes-lost",
                f"the writes made during the scan of {name!r} may be incomplete; scan again",
            )
        bitmap.header.flags |= Flag.ENABLED
        if self.recording:
            bitmap.begin_recording()
        with self._lock:
            self._switch()
            if writes is not None:
                bitmap.merge_from(writes)
                del self.bitmaps[SCAN_WRITES_PREFIX + name]
                writes.header.flags &= ~Flag.ENABLED
                self._switch()
            bitmap.header.flags &= ~Flag.INCONSISTENT
            bitmap.header.reason = Reason.NONE
            if not self.recording:
                bitmap.bits.flush()
            bitmap.write_header()
        if writes is not None:
            os.unlink(writes.path)
            fsync_dir(writes.path.parent)
            writes.close()
        return self._describe(name)

    @staticmethod
    def _same_bitmap(name: str, bitmap: BitmapFile, created_ns: int) -> None:
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

    def scan_abort(self, name: str) -> None:
        """Forget a scan: remove ``name`` (only if a scan was filling it).

        ``@open`` stays, inconsistent: the checkpoint interval must go on
        recording (the next checkpoint starts a consistent one).
        """
        bitmap = self._get(name)
        if bitmap.header.reason is not Reason.SCAN_IN_PROGRESS:
            raise errors.Conflict("not-scanning", f"bitmap {name!r} is not being filled by a scan")
        if SCAN_WRITES_PREFIX + name in self.bitmaps:
            self._remove(SCAN_WRITES_PREFIX + name)
        if name != OPEN_CHECKPOINT:
            self._remove(name)
            return
        bitmap.header.reason = Reason.SCAN_ABORTED
        bitmap.header.flags |= Flag.ENABLED
        if self.recording:
            bitmap.begin_recording()
        else:
            bitmap.write_header()
        with self._lock:
            self._switch()

    def _finish(self, bitmap: BitmapFile) -> None:
        """A bitmap left the recording set: make it durable and not IN_USE."""
        if bitmap.header.flags & Flag.IN_USE:
            bitmap.end_recording()
        else:
            bitmap.write_header()

    def _recover_checkpoint(self) -> None:
        """Finish what a checkpoint that died between its renames left.

        Staging there and ``@open`` too: the renames never started; the
        staging file never held a bit. ``@open`` missing: the frozen file is
        under the checkpoint's name, still ENABLED (its header is rewritten
        only after both renames) and one generation behind the staging file.
        It goes back under ``@open``: the checkpoint did not happen, and
        every write the tracker marked in it since (a tracker that went on
        after a failed rename) is kept. A frozen file that cannot be found
        makes the staging file ``@open``, inconsistent.
        """
        staging = self.state.bitmaps_dir / _STAGING
        if not os.path.lexists(staging):
            return
        target = self.state.bitmap_path(OPEN_CHECKPOINT)
        if os.path.lexists(target):
            staging.unlink()
            fsync_dir(self.state.bitmaps_dir)
            return
        following = self.state.read_header_at(staging)
        frozen = None
        for name in self.state.names():
            try:
                header = self.state.read_header(name)
            except errors.DirtydiffError:
                continue  # refused later, when opened
            if not name.startswith(SCAN_WRITES_PREFIX) and (
                header.generation == following.generation - 1
            ):
                frozen = name, header
        if frozen is not None and frozen[1].flags & Flag.ENABLED:
            log.warning("checkpoint %s did not finish: it is %s again", frozen[0], OPEN_CHECKPOINT)
            os.rename(self.state.bitmap_path(frozen[0]), target)
            staging.unlink()
        else:
            os.rename(staging, target)
            if frozen is None:
                with BitmapFile(target, writable=True) as bitmap:
                    bitmap.mark_inconsistent(Reason.CHECKPOINT_FAILED)
            # else: frozen before its renames (as dirtydiff did before it
            # wrote the header after them) by a process that died holding
            # the lock: no write was marked since, and the checkpoint stands.
        fsync_dir(self.state.bitmaps_dir)

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

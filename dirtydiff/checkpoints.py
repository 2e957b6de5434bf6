"""Checkpoints: the open interval ``@open`` frozen under a name, and the next begun.

A checkpoint makes the next interval's file durably under a staging name,
then, under the store's lock (so no write marks either file meanwhile),
renames ``@open`` to the checkpoint's name and the staging file to
``@open``, and drains: it answers once every write marked in the frozen
bitmap alone has completed, so a backup that reads the frozen granules
afterwards reads their data. A process that died between the two renames
left what ``_recover_checkpoint`` finishes when the next store opens.

``Checkpoints`` is a part of ``BitmapStore``: the store's lock, its
generations and its files are the ones these operations change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import errors
from dirtydiff.bitmapfile import BitmapFile, Flag, Reason, check_backup_reference, fsync_dir
from dirtydiff.snapshots import Prepared, SnapshotRequest
from dirtydiff.state import (
    OPEN_CHECKPOINT,
    SCAN_WRITES_PREFIX,
    check_name,
)
from dirtydiff.storebase import DRAIN_TIMEOUT, StoreParts

log = logging.getLogger(__name__)

_STAGING = ".@open.staging"


@dataclass
class CheckpointResult:
    name: str
    generation: int
    drained: bool
    dirty_bytes: int


class Checkpoints(StoreParts):
    """Checkpoints of a BitmapStore (see the module's docstring)."""

    def checkpoint(
        self,
        name: str,
        timeout: float = DRAIN_TIMEOUT,
        backup: str = "",
        snapshot: SnapshotRequest | None = None,
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

        With ``snapshot``, bitmap ``name`` and snapshot ``name`` are one
        instant: the snapshot's files are made first, then new writes are
        held and the ones in flight drained (within ``timeout``; if they do
        not end, nothing changes and the error says so), then the renames
        and the snapshot's start, then writes are admitted again. A write in
        flight across the switch would otherwise reach the disk after the
        snapshot began, uncopied.
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
        prepared = None
        if snapshot is not None:
            if self.snapshots is None:
                raise errors.Unavailable(
                    "snapshot-needs-tracker",
                    f"checkpoint {name} with a snapshot needs the tracker running: only the "
                    "process that writes the disk can copy before it writes (dirtydiff track)",
                )
            prepared = self.snapshots.prepare(name, snapshot, frozen.granularity)
        staging = self.state.bitmaps_dir / _STAGING
        staging.unlink(missing_ok=True)
        flags = Flag.ENABLED | (Flag.IN_USE if self.recording else Flag(0))
        try:
            following = BitmapFile.create(
                staging,
                granularity=frozen.granularity,
                disk_size=self.disk_size,
                flags=flags,
                generation=frozen.header.generation + 1,
                backup=backup,
            )
        except BaseException:
            if prepared is not None:
                self._discard(prepared)
            raise
        opened = self.state.bitmap_path(OPEN_CHECKPOINT)
        target = self.state.bitmap_path(name)
        if prepared is not None and not self._hold_writes(timeout):
            following.close()
            staging.unlink(missing_ok=True)
            self._discard(prepared)
            raise errors.Unavailable(
                "drain-timeout",
                f"checkpoint {name} not taken: writes were still in flight after {timeout:g} s, "
                "so no instant could be frozen; nothing changed",
            )
        failed: OSError | None = None
        try:
            with self._lock:
                try:
                    self._switch_files(name, frozen, following, staging, opened, target)
                except BaseException:
                    if prepared is not None:
                        self._discard(prepared)
                    raise
                old = self._switch()
                durable = self._checkpoint_durable(name, frozen)
                if prepared is not None:
                    failed = self._start_snapshot(prepared, frozen)
        finally:
            if prepared is not None:
                self._admit_writes()
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
        if failed is not None:
            raise errors.StorageError(
                "snapshot-store",
                f"checkpoint {name} was taken, but its snapshot could not start: {failed.strerror}",
            )
        info = self._describe(name)
        return CheckpointResult(name, frozen.header.generation, drained, info.dirty_bytes)

    def _start_snapshot(self, prepared: Prepared, frozen: BitmapFile) -> OSError | None:
        """Start the snapshot at the instant; the error if it could not.
        Caller holds _lock with writes held."""
        assert self.snapshots is not None
        try:
            self.snapshots.start(prepared, frozen)
            return None
        except OSError as e:
            log.error("checkpoint %s: its snapshot could not start: %s", prepared.name, e.strerror)
            self._discard(prepared)
            return e

    def _discard(self, prepared: Prepared) -> None:
        assert self.snapshots is not None
        self.snapshots.discard(prepared)

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

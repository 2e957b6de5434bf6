"""The lifecycle of a diff scan in the store: begin (or resume), complete, abort.

While a scan fills bitmap NAME, NAME is inconsistent ("a diff scan is
filling it") and does not record; a tracker records the writes made
meanwhile in ``@scan:NAME``, which joins the recording set before the scan's
first read. ``scan_complete`` ORs ``@scan:NAME`` into NAME and makes NAME
record, under the store's lock, so no write falls between, and only then
declares it consistent. A rebuild is a scan into an inconsistent bitmap that
keeps its name. The scan's job (reading the disk and the backup, the
record of its position) is ``sidecar.scan.job``; this is what it asks of the
bitmaps, through ``scan.begin``, ``bitmap.mark``, ``scan.complete`` and
``scan.abort``.

``ScanLifecycle`` is a part of ``BitmapStore``: the store's lock, its
generations and its files are the ones these operations change.
"""

from __future__ import annotations

import logging
import os
import time
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
)
from dirtydiff.state import (
    OPEN_CHECKPOINT,
    SCAN_WRITES_PREFIX,
    BitmapInfo,
    DiskSeen,
    check_name,
)
from dirtydiff.storebase import StoreParts

log = logging.getLogger(__name__)


def rebuild_backup(name: str, *, consistent: bool, recorded: str, given: str | None) -> str:
    """The backup a rebuild of bitmap ``name`` compares with: ``given``, or
    the one it ``recorded``. Refused for a consistent bitmap (nothing to
    rebuild) and for one that knows no backup. The one check, asked by the
    store before it begins and by a job before it connects anywhere."""
    if consistent:
        raise errors.Conflict(
            "consistent",
            f"bitmap {name!r} is consistent: nothing to rebuild "
            "(a scan into a new bitmap compares against another backup)",
        )
    backup = given or recorded
    if not backup:
        raise errors.Conflict(
            "no-backup",
            f"bitmap {name!r} does not know the backup it counts changes from "
            "(checkpoint --backup and bitmap add --backup record it); give --backup URI",
        )
    return backup


def _begun(resume: bool, bitmap: BitmapFile) -> dict[str, Any]:
    """scan_begin's answer."""
    return {
        "resume": resume,
        "granularity": bitmap.granularity,
        "created_ns": bitmap.header.created_ns,
    }


class ScanLifecycle(StoreParts):
    """Scans of a BitmapStore (see the module's docstring)."""

    # -- at start --------------------------------------------------------

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
        rebuild_backup(
            name, consistent=bitmap.consistent, recorded=bitmap.header.backup, given=backup
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

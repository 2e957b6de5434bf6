"""A diff scan as a job on a state directory: begin, resume, complete.

Online (a tracker runs): the tracker starts recording the writes made during
the scan (``@scan:NAME``) *before* the first read, the differing granules go
to NAME through its control socket, and ``scan.complete`` ORs the writes into
NAME, makes NAME record from then on, and only then declares it consistent.

Offline (no tracker; the disk is not being written): the job takes the state
lock for its whole run, so no tracker starts meanwhile, and works on the files.
For a local disk file it also checks that the file was not modified during the
scan, which would mean writes nobody recorded.

Either way NAME stays inconsistent ("a diff scan is filling it") until the
end, and ``STATE/scans/NAME.json`` holds the backup and the position, so that
running the same scan again resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dirtydiff import control, errors, scans
from dirtydiff.bitmapfile import DEFAULT_GRANULARITY, check_granularity, current_boot_id
from dirtydiff.control import replies
from dirtydiff.disk import is_nbd_uri
from dirtydiff.owner import Actor, Route, StateOwner
from dirtydiff.state import OPEN_CHECKPOINT, BitmapInfo, StateDir, check_name
from dirtydiff.statefiles import open_file, read_file
from sidecar.scan.engine import (
    DEFAULT_CHUNK,
    DEFAULT_IN_FLIGHT,
    FileSide,
    NbdSide,
    Progress,
    Scan,
    file_mtime,
    open_side,
)
from sidecar.scan.estimate import Estimate, sample_changed

if TYPE_CHECKING:  # a manifest scan imports them: numpy and blake3 cost start-up
    from sidecar.scan.manifest import ManifestSide

log = logging.getLogger(__name__)

# The scan holds about 2 x chunk x in_flight bytes of buffers: options from a
# control request or a command line may not make that unbounded.
MAX_CHUNK = 64 << 20
MAX_IN_FLIGHT = 64
MAX_BUFFERED = 256 << 20  # chunk x in_flight, per side


@dataclass
class ScanOptions:
    disk: str
    backup: str
    name: str
    granularity: int = DEFAULT_GRANULARITY
    max_rate: float | None = None
    chunk: int = DEFAULT_CHUNK
    in_flight: int = DEFAULT_IN_FLIGHT
    # NAME exists, inconsistent: refill it against the backup it refers to.
    rebuild: bool = False
    # One-sided: compare the disk with this manifest of the backup, which is
    # not read (``backup`` is then only the reference the bitmap records, or
    # "" for the manifest's source).
    manifest: str = ""
    # Two-sided: record the backup's digests in this manifest as it is read.
    write_manifest: str = ""
    # Sample first, print the estimated changed fraction; with max_changed
    # (a percentage), stop before the full scan when it is surely above.
    estimate: bool = False
    max_changed: float | None = None
    estimate_seed: int | None = None

    def __post_init__(self) -> None:
        check_granularity(self.granularity)
        if self.manifest and self.write_manifest:
            raise errors.BadRequest(
                "usage", "--write-manifest records the backup a two-sided scan reads: "
                "not with --manifest"
            )  # fmt: skip
        if not self.manifest and not self.backup:
            raise errors.BadRequest("usage", "a scan needs a backup, or a manifest of it")
        if self.max_changed is not None and not 0 <= self.max_changed <= 100:
            raise errors.BadRequest("bad-max-changed", "--max-changed is a percentage, 0 to 100")
        if not 0 < self.chunk <= MAX_CHUNK:
            raise errors.BadRequest("bad-chunk", f"chunk size must be 1 to {MAX_CHUNK} bytes")
        if not 0 < self.in_flight <= MAX_IN_FLIGHT:
            raise errors.BadRequest(
                "bad-in-flight", f"chunks in flight must be 1 to {MAX_IN_FLIGHT}"
            )
        # The chunk the scan uses is at least a granule (sidecar.scan.engine.Scan).
        if max(self.chunk, self.granularity) * self.in_flight > MAX_BUFFERED:
            raise errors.BadRequest(
                "bad-in-flight",
                f"chunk size x chunks in flight is over {MAX_BUFFERED >> 20} MiB",
            )
        # NaN fails ``> 0``; an infinite rate would be no limit, which is None.
        if self.max_rate is not None and not 0 < self.max_rate < math.inf:
            raise errors.BadRequest("bad-rate", "the rate limit must be a positive finite number")


@dataclass(frozen=True)
class ScanResult:
    """What a finished scan tells: the bitmap it filled, consistent and
    recording, how it went, and where it began (0, or where it resumed)."""

    bitmap: BitmapInfo
    progress: Progress
    resumed_from: int
    estimate: Estimate | None = None  # the sample taken first (--estimate)

    def as_dict(self) -> dict[str, object]:
        """What ``dirtydiff scan --json`` prints."""
        found: dict[str, object] = {
            "bitmap": self.bitmap.as_dict(),
            "progress": self.progress.as_dict(),
            "resumed_from": self.resumed_from,
        }
        if self.estimate is not None:
            found["estimate"] = self.estimate.as_dict()
        return found


class ScanRecord:
    """STATE/scans/NAME.json: what a scan compares and how far it got.

    Opened O_NOFOLLOW, as every file of a state directory: a symlink planted
    under a record's name (or its lock's) is an error, never written through.
    """

    def __init__(self, state: StateDir, name: str) -> None:
        self.state = state
        self.dir = state.scans_dir
        self.path = self.dir / f"{name}.json"
        self._dir_checked = False

    def _check_dir(self) -> None:
        """STATE/scans exists and is safe to write in (checked once: a
        position is saved many times a second)."""
        if not self._dir_checked:
            self.state.prepare_scans()
            self._dir_checked = True

    def load(self) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(read_file(self.path))
            return record
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # torn by a crash: the scan starts over

    def save(self, record: dict[str, Any]) -> None:
        # Not fsynced: the record names its boot, and a record from another
        # boot restarts the scan (the marks it covers were not durable either).
        # Rewritten in place, not renamed over: ext4 flushes data on a rename
        # that replaces a file, which cost more than the scan's own reads. A
        # record torn by a crash reads as none, and the scan starts over.
        self._check_dir()
        text = json.dumps({**record, "boot": current_boot_id().hex()}).encode()
        fd = open_file(self.path, os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
        finally:
            os.close(fd)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def unfinished(cls, state: StateDir) -> list[tuple[str, dict[str, Any]]]:
        """Every scan record left in the state directory: (bitmap, record).
        One that cannot be read (a symlink where a record should be) is
        reported and left out; the others still count."""
        found = []
        for path in sorted(state.scans_dir.glob("*.json")):
            try:
                record = cls(state, path.stem).load()
            except errors.DirtydiffError as e:
                log.warning("scan record %s not read: %s", path, e.message)
                continue
            if record is not None:
                found.append((path.stem, record))
        return found

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """One scan per bitmap at a time."""
        self._check_dir()
        fd = open_file(self.dir / f"{self.path.stem}.lock", os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise errors.Conflict(
                    "scan-running", f"a scan of {self.path.stem!r} is already running"
                ) from None
            yield
        finally:
            os.close(fd)


def run_scan(
    state: StateDir,
    options: ScanOptions,
    *,
    on_progress: Callable[[Progress], None] = lambda p: None,
    cancel: threading.Event | None = None,
    need_tracker: bool = False,
    on_estimate: Callable[[Estimate], None] = lambda e: None,
) -> ScanResult:
    """Run the scan ``options`` describes on the tracker (online) or on the
    files, with the state lock held until it ends (offline); never through
    a sidecar, which runs this itself. ``need_tracker``: refuse to run
    offline."""
    if not (options.rebuild and options.name == OPEN_CHECKPOINT):  # @open can be rebuilt
        check_name(options.name)
    record = ScanRecord(state, options.name)
    with record.exclusive(), StateOwner(state, ask_sidecar=False).acting() as bitmaps:
        if bitmaps.route is Route.FILES and need_tracker:
            raise errors.Unavailable(
                "tracker-down",
                f"no tracker runs for {state.path}: a scan of {options.disk} needs it to "
                "record the writes made meanwhile",
            )
        return _run(state, options, record, bitmaps, on_progress, cancel, on_estimate)


def _run(
    state: StateDir,
    options: ScanOptions,
    record: ScanRecord,
    bitmaps: Actor,
    on_progress: Callable[[Progress], None],
    cancel: threading.Event | None,
    on_estimate: Callable[[Estimate], None],
) -> ScanResult:
    stack = contextlib.ExitStack()
    try:
        disk = open_side("disk", options.disk, cancel)
        stack.callback(disk.close)
        backup: NbdSide | FileSide | ManifestSide
        checksum = ""
        if options.manifest:
            from dirtydiff.manifest import check_matches, open_manifest  # noqa: PLC0415
            from sidecar.scan.manifest import ManifestSide  # noqa: PLC0415

            manifest, digest = stack.enter_context(open_manifest(options.manifest))
            check_matches(manifest.header, disk.size, options.granularity, options.manifest)
            checksum = digest.hex()
            backup = ManifestSide(manifest, options.granularity, options.manifest)
            reference = options.backup or manifest.header.source
        else:
            backup = open_side("backup", options.backup, cancel)
            reference = options.backup
        stack.callback(backup.close)
        return _scan(state, options, record, bitmaps, on_progress, cancel, on_estimate,
                     Sides(disk, backup, reference, checksum))  # fmt: skip
    finally:
        stack.close()


@dataclass
class Sides:
    """What a scan compares: the disk, and the backup or its manifest."""

    disk: NbdSide | FileSide
    backup: NbdSide | FileSide | ManifestSide
    reference: str  # the backup the bitmap counts from
    checksum: str  # the manifest's, hex; "" for a two-sided scan


def _scan(
    state: StateDir,
    options: ScanOptions,
    record: ScanRecord,
    bitmaps: Actor,
    on_progress: Callable[[Progress], None],
    cancel: threading.Event | None,
    on_estimate: Callable[[Estimate], None],
    sides: Sides,
) -> ScanResult:
    disk, backup = sides.disk, sides.backup
    offline = bitmaps.route is Route.FILES  # no tracker; we own the files
    if backup.size != disk.size:
        raise errors.Conflict(
            "backup-size",
            f"the backup {options.backup} has {backup.size} bytes but the disk has "
            f"{disk.size} bytes: a backup of another disk, or the disk was resized",
        )
    if (
        isinstance(backup, NbdSide | FileSide)
        and disk.seen.tracker is not None
        and disk.seen.tracker == backup.seen.tracker
    ):
        raise errors.Conflict("backup-is-disk", f"the backup {options.backup} is the disk itself")
    estimate = None
    if options.estimate or options.max_changed is not None:  # before anything is made
        estimate = sample_changed(
            disk, backup, options.granularity, seed=options.estimate_seed, cancel=cancel
        )
        on_estimate(estimate)
        estimate.refuse_above(options.max_changed)
    if offline:
        known = state.disk()
        if known is None:
            state.prepare()
            source = disk.backend.describe() if isinstance(disk, FileSide) else options.disk
            state.record_disk(disk.size, source, disk.seen.file)
        elif known.size != disk.size:
            raise errors.Conflict(
                "disk-size-mismatch",
                f"the disk has {disk.size} bytes but {state.path} describes {known.size} bytes",
            )
        bitmaps.open()
    previous = record.load()
    if previous is not None:
        current = find_bitmap(bitmaps.call, options.name)
        if record_is_over(previous, current):
            record.remove()
            if (
                current is not None
                and finished_meanwhile(current, previous)
                and previous["backup"] == sides.reference
            ):
                # Killed right after scan.complete: nothing is left to
                # compare, and the same command reports it done.
                finished = Progress(total=disk.size, position=disk.size, compared=disk.size)
                return ScanResult(current, finished, resumed_from=disk.size)
            previous = None  # a fresh scan, or scan.begin finds the name in use
    if previous is not None:
        _check_same_comparison(previous, options, sides)
    same_boot = previous is not None and previous.get("boot") == current_boot_id().hex()
    begun = replies.ScanBegun.from_wire(
        bitmaps.call(
            "scan.begin",
            name=options.name,
            granularity=options.granularity,
            disk=control.disk_seen(disk.seen),
            restart=previous is None or not same_boot,
            backup=sides.reference,
            rebuild=options.rebuild,
        )
    )
    if not isinstance(backup, NbdSide | FileSide) and begun.granularity != backup.granularity:
        raise errors.Conflict(
            "manifest-granularity",
            f"bitmap {options.name!r} has {begun.granularity}-byte granules, "
            f"not the {backup.granularity} the manifest was checked for",
        )
    start = int(previous["position"]) if previous is not None and begun.resume else 0
    writer = recorder = None
    if options.write_manifest:
        from dirtydiff.manifest import ManifestWriter  # noqa: PLC0415
        from sidecar.scan.manifest import ManifestRecorder  # noqa: PLC0415

        writer = ManifestWriter.create(
            options.write_manifest, disk.size, begun.granularity, sides.reference,
            reopen=start > 0,
        )  # fmt: skip
        if start > 0 and not writer.reopened:
            start = 0  # the digests before the position are gone: read it all again
        recorder = ManifestRecorder(writer)
    offline_file = offline and not is_nbd_uri(options.disk)
    mtime = file_mtime(options.disk) if offline_file else None
    base = {
        "backup": sides.reference,
        "disk": options.disk,
        "granularity": begun.granularity,
        "rebuild": options.rebuild,
        "created_ns": begun.created_ns,
        "manifest": options.manifest,
        "manifest_checksum": sides.checksum,
        "write_manifest": options.write_manifest,
    }
    record.save({**base, "position": start})

    def on_marks(ranges: list[tuple[int, int]]) -> None:
        bitmaps.call("bitmap.mark", name=options.name, ranges=[list(r) for r in ranges])

    def on_position(progress: Progress) -> None:
        if recorder is not None:  # the digests before the position are written
            recorder.caught_up()
        record.save({**base, "position": progress.position})
        on_progress(progress)

    try:
        scan = Scan(
            disk,
            backup,
            begun.granularity,
            start=start,
            chunk=options.chunk,
            in_flight=options.in_flight,
            max_rate=options.max_rate,
            on_marks=on_marks,
            on_position=on_position,
            cancel=cancel,
            on_backup=recorder.on_backup if recorder is not None else None,
        )
        on_progress(scan.progress)  # visible from the start, before the first save
        progress = scan.run()
        if mtime is not None and file_mtime(options.disk) != mtime:
            raise errors.Conflict(
                "disk-written",
                f"{options.disk} was modified during the scan and no tracker recorded the "
                f"writes; scan again with the tracker running (bitmap {options.name!r} stays "
                "inconsistent)",
            )
        if writer is not None and recorder is not None:
            recorder.caught_up()
            writer.commit()
    finally:
        if recorder is not None:
            recorder.close()
        if writer is not None:
            writer.close()  # a partial file stays for a resumed scan
    info = replies.bitmap_info(
        bitmaps.call("scan.complete", name=options.name, created_ns=begun.created_ns)
    )
    record.remove()
    return ScanResult(info, progress, resumed_from=start, estimate=estimate)


def _check_same_comparison(previous: dict[str, Any], options: ScanOptions, sides: Sides) -> None:
    """An unfinished scan goes on only against the same backup, or the same
    manifest, byte for byte."""
    if previous.get("manifest", "") != options.manifest:
        was = previous.get("manifest") or previous.get("backup")
        raise errors.Conflict(
            "scan-other-backup",
            f"an unfinished scan of {options.name!r} compares against {was}; finish it "
            "with the same --backup or --manifest, or abort it (dirtydiff scan --abort)",
        )
    if options.manifest and previous.get("manifest_checksum") != sides.checksum:
        raise errors.Conflict(
            "manifest-changed",
            f"the manifest {options.manifest} changed since the unfinished scan of "
            f"{options.name!r} began; abort it (dirtydiff scan --abort) and scan again",
        )
    if not options.manifest and previous.get("backup") != options.backup:
        raise errors.Conflict(
            "scan-other-backup",
            f"an unfinished scan of {options.name!r} compares against "
            f"{previous.get('backup')}; finish it with the same --backup, "
            "or abort it (dirtydiff scan --abort)",
        )


# What bitmap.info told: typed, or (from a test, or a tracker of before)
# the map it travels as.
Told = BitmapInfo | Mapping[str, Any]


def _told(info: Told, key: str) -> Any:
    return getattr(info, key) if isinstance(info, BitmapInfo) else info.get(key)


def fills(record: dict[str, Any], info: Told) -> bool:
    """Whether the scan ``record`` describes was filling the bitmap ``info``
    describes, and not one removed since and added again under its name."""
    # A tracker started before bitmaps told their creation time (it may run
    # on across an upgrade, under a running VM) tells none (0, or nothing),
    # and the records saved meanwhile name none: they match, as before.
    return (record.get("created_ns") or 0) == (_told(info, "created_ns") or 0)


def finished_meanwhile(info: Told, record: dict[str, Any]) -> bool:
    """Whether the bitmap ``info`` describes is what the scan ``record``
    describes left when it completed: that very bitmap, consistent, and
    counting from the record's backup."""
    return (
        fills(record, info)
        and bool(_told(info, "consistent"))
        and _told(info, "backup") == record["backup"]
    )


def record_is_over(record: dict[str, Any], info: Told | None) -> bool:
    """Whether the scan ``record`` describes has nothing left to go on with:
    its bitmap (``info``, None if there is none) is gone, or is another one
    added under its name since, or the scan completed and its record
    outlived it (killed right after scan.complete)."""
    return info is None or not fills(record, info) or finished_meanwhile(info, record)


def find_bitmap(call: Callable[..., Any], name: str) -> BitmapInfo | None:
    """bitmap.info through ``call`` (an Actor's, or StateOwner.request), or
    None if there is no such bitmap."""
    try:
        return replies.bitmap_info(call("bitmap.info", name=name))
    except errors.NotFound:
        return None


def rebuild_backup(info: BitmapInfo, backup: str | None) -> str:
    """The backup a rebuild of the bitmap ``info`` describes compares with,
    checked before any connection is made (the store checks it again when
    the rebuild begins: ``dirtydiff.scans.rebuild_backup``)."""
    return scans.rebuild_backup(
        info.name, consistent=info.consistent, recorded=info.backup, given=backup
    )


def abort_scan(state: StateDir, name: str) -> bool:
    """Forget the unfinished scan of ``name``: its record, and the bitmap it
    was filling, on the tracker or the files (a sidecar stops its job of
    ``name`` first, then runs this). Whether a bitmap was removed: a record
    left for a bitmap no scan is filling (its scan completed, or the bitmap
    was removed and added again) is forgotten, and the bitmap stays."""
    record = ScanRecord(state, name)
    never_tracked = f"no scan of {name!r} in {state.path}"
    with (
        record.exclusive(),
        StateOwner(state, ask_sidecar=False).acting(never_tracked=never_tracked) as bitmaps,
    ):
        bitmaps.open()
        removed = True
        try:
            bitmaps.call("scan.abort", name=name)
        except (errors.NotFound, errors.Conflict):
            # No scan is filling NAME: with no record either, there is
            # nothing to abort.
            if record.load() is None:
                raise
            removed = False
        record.remove()
        return removed

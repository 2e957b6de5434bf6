"""The sidecar's control API: ``STATE/sidecar.sock``, msgpack as everywhere
(``dirtydiff.control``: a length prefix, version 1, structured errors).

It is the one place a backup tool or the CLI needs to talk to while the
sidecar runs:

- bitmap lifecycle, checkpoints and snapshots (``bitmap.*``, ``checkpoint``,
  ``snapshot.list``, ``snapshot.release``, ``status``): run where they can
  run (``dirtydiff.owner``): by the tracker while it serves the VM, so they
  take effect between two writes with the drain semantics of its store, or
  on the files under the state lock when no tracker runs;
- diff scans as background jobs (``scan.start``, ``scan.status``,
  ``scan.list``, ``scan.cancel``, ``scan.abort``) and ``rebuild NAME``: a
  scan of an inconsistent bitmap against the backup it refers to.

The scan's internal steps (``scan.begin``, ``scan.complete``) are not offered:
a client driving them could make a half-built bitmap look complete.

What a scan here opens is the operator's choice, never a client's: the
sidecar may run as root, and even a trusted client (the owner, a member of
``--control-group``) must not make it open a path the operator did not name
on a command line (a ``disk=/etc/shadow`` would tell its size, and whether
it equals a backup). So a scan reads only the sidecar's own disk (``serve
--disk``) and a backup over NBD (``NBD_SCHEMES``; libnbd refuses URIs that
name local files); anything else is refused before anything is opened, and
``dirtydiff scan`` then runs that scan in the foreground, with the caller's
own rights.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from dirtydiff import control, errors
from dirtydiff.bitmapfile import Reason
from dirtydiff.disk import NBD_SCHEMES, is_nbd_uri
from dirtydiff.owner import StateOwner
from dirtydiff.state import StateDir, is_user_name
from sidecar.scan.job import (
    ScanOptions,
    ScanRecord,
    abort_scan,
    find_bitmap,
    rebuild_backup,
    record_is_over,
)
from sidecar.scan.jobs import ACTIVE, Job, ScanJobs

log = logging.getLogger(__name__)

# Store requests routed to the tracker (or the files).
ROUTED = frozenset({
    "ping", "status", "bitmap.list", "bitmap.info", "bitmap.add", "bitmap.remove",
    "bitmap.clear", "bitmap.enable", "bitmap.disable", "bitmap.mark", "bitmap.merge",
    "import.complete", "checkpoint",
})  # fmt: skip
# Snapshots live in the tracker: it copies before it writes (dirtydiff.snapshots).
SNAPSHOT_OPS = frozenset({"snapshot.list", "snapshot.release"})
ROUTED |= SNAPSHOT_OPS
OWN = frozenset({"scan.start", "scan.status", "scan.list", "scan.cancel", "scan.abort", "rebuild"})
OPS = ROUTED | OWN

# How long scan.abort waits for a running job to save its place and stop.
STOP_TIMEOUT = 30.0


class SidecarApi:
    def __init__(self, state: StateDir, disk: str, jobs: ScanJobs) -> None:
        self.state = state
        # The sidecar's own requests go to the tracker or the files, never to itself.
        self.owner = StateOwner(state, ask_sidecar=False)
        self.disk = disk  # what scans read unless told otherwise: the export's disk
        self.jobs = jobs

    def handle(self, message: control.Message) -> control.Message:
        """One request; every failure is a structured error reply."""
        try:
            op, args = control.parse_request(message, OPS)
            if op == "checkpoint":
                _check_snapshot_dir(args)
            if op in ROUTED:
                return control.reply_ok(self.owner.request(op, **args))
            return control.reply_ok(getattr(self, "_" + op.replace(".", "_"))(args))
        except errors.DirtydiffError as e:
            return control.reply_error(e)
        except (TypeError, ValueError) as e:  # argument names or types
            return control.reply_error(errors.BadRequest("bad-request", str(e)))

    # -- scans ------------------------------------------------------------

    def _options(self, args: dict[str, Any], **fixed: Any) -> ScanOptions:
        fields = {k: args[k] for k in ScanOptions.__dataclass_fields__ if k in args}
        fields.update(fixed)
        fields.setdefault("disk", self.disk)
        for key in ("disk", "backup", "name"):
            if not isinstance(fields.get(key), str):
                raise errors.BadRequest("bad-request", f"argument {key!r} must be str")
        for key in ("granularity", "chunk", "in_flight"):
            value = fields.get(key)
            if value is not None and (type(value) is not int or value <= 0):
                raise errors.BadRequest("bad-request", f"argument {key!r} must be a positive int")
        rate = fields.get("max_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)):
            raise errors.BadRequest("bad-request", "argument 'max_rate' must be a number")
        for key in ("rebuild", "estimate"):
            if not isinstance(fields.get(key, False), bool):
                raise errors.BadRequest("bad-request", f"argument {key!r} must be bool")
        for key in ("manifest", "write_manifest"):
            if not isinstance(fields.get(key, ""), str):
                raise errors.BadRequest("bad-request", f"argument {key!r} must be str")
        for key in ("max_changed", "estimate_seed"):
            value = fields.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise errors.BadRequest("bad-request", f"argument {key!r} must be a number")
        options = ScanOptions(**fields)
        self._check_sources(options)
        return options

    def _check_sources(self, options: ScanOptions) -> None:
        """Refuse a scan that would open what the operator did not name (see
        the module's docstring), before anything is opened."""
        if _where(options.disk) != _where(self.disk):
            raise errors.PermissionDenied(
                "disk-not-allowed",
                f"the sidecar scans only its own disk, {self.disk} (the default): "
                f"not {options.disk!r}",
            )
        for path in (options.manifest, options.write_manifest):
            if path:
                # A path in a request: the operator did not name it.
                raise errors.PermissionDenied(
                    "manifest-not-allowed",
                    f"the sidecar opens no manifest a request names ({path}); "
                    "dirtydiff scan runs a manifest scan in the foreground",
                )
        if not options.manifest and not is_nbd_uri(options.backup):
            schemes = ", ".join(f"{scheme}://" for scheme in NBD_SCHEMES)
            raise errors.PermissionDenied(
                "backup-not-allowed",
                f"the sidecar reads a backup only over NBD ({schemes}), not "
                f"{options.backup!r}; export a backup file with qemu-nbd -r",
            )

    def _scan_start(self, args: dict[str, Any]) -> object:
        return self.jobs.start(self._options(args)).as_dict()

    def _rebuild(self, args: dict[str, Any]) -> object:
        """Rebuild inconsistent NAME against the backup it refers to."""
        name = control.arg(args, "name", str)
        given = control.arg(args, "backup", str, "")
        info = self.owner.info(name)
        if control.arg(args, "manifest", str, ""):
            rebuild_backup(info, given or info.backup or "manifest")
            backup = given or info.backup
        else:
            backup = rebuild_backup(info, given)
        options = self._options(
            {**args, "backup": backup}, rebuild=True, granularity=info.granularity
        )
        return self.jobs.start(options).as_dict()

    def _scan_status(self, args: dict[str, Any]) -> object:
        return self.jobs.get(control.arg(args, "name", str)).as_dict()

    def _scan_list(self, args: dict[str, Any]) -> object:
        return [job.as_dict() for job in list(self.jobs.jobs.values())]

    def _scan_cancel(self, args: dict[str, Any]) -> object:
        return self.jobs.cancel(control.arg(args, "name", str)).as_dict()

    def _scan_abort(self, args: dict[str, Any]) -> object:
        name = control.arg(args, "name", str)
        job = self.jobs.jobs.get(name)
        if job is not None and job.state in ACTIVE:
            job.cancel.set()
            if not job.stopped.wait(STOP_TIMEOUT):
                raise errors.Unavailable("busy", f"the scan of {name!r} did not stop in time")
        return {"bitmap_removed": abort_scan(self.state, name)}

    def resume_interrupted(self, *, rebuild_inconsistent: bool) -> list[Job]:
        """At start: go on with every scan a previous run left unfinished
        (STATE/scans/NAME.json names its disk and backup) and, if asked,
        rebuild every inconsistent bitmap that knows its backup."""
        started: list[Job] = []
        for name, record in ScanRecord.unfinished(self.state):
            try:
                info = find_bitmap(self.owner.request, name)
                if info is None or record_is_over(record, info):
                    outlived = ScanRecord(self.state, name)
                    with outlived.exclusive():
                        outlived.remove()
                    continue
                if info.why is not Reason.SCAN_IN_PROGRESS:
                    continue  # aborted, or made inconsistent since: nothing to go on with
                options = ScanOptions(
                    disk=str(record["disk"]),
                    backup=str(record["backup"]),
                    name=name,
                    granularity=int(record["granularity"]),
                    rebuild=bool(record.get("rebuild", False)),
                    # A manifest is a path: refused below, and the same
                    # command resumes that scan in the foreground.
                    manifest=str(record.get("manifest") or ""),
                    write_manifest=str(record.get("write_manifest") or ""),
                )
                # A record is a file of the state directory, not the
                # operator's command line: the same rule as a request's. A
                # foreground scan's record (a file backup) is resumed by
                # the same command.
                self._check_sources(options)
                # Patient: at boot the tracker or the backup may come up later.
                started.append(self.jobs.start(options, patient=True))
            except (KeyError, ValueError, TypeError, errors.DirtydiffError) as e:
                log.warning("unfinished scan of %s not resumed: %s", name, e)
        if not rebuild_inconsistent:
            return started
        for info in self.owner.bitmaps():
            name = info.name
            if info.consistent or info.why is Reason.SCAN_IN_PROGRESS:
                continue  # a scan being filled is resumed from its record, or not at all
            if not is_user_name(name):
                continue
            if not info.backup:
                log.warning("bitmap %s is inconsistent and names no backup: not rebuilt", name)
                continue
            try:
                started.append(self.jobs.start(self._options(
                    {"name": name, "backup": info.backup},
                    rebuild=True, granularity=info.granularity,
                )))  # fmt: skip
            except errors.DirtydiffError as e:
                log.warning("bitmap %s not rebuilt: %s", name, e.message)
        return started


def start_in_background(api: SidecarApi, *, rebuild_inconsistent: bool) -> None:
    """Resume and rebuild without delaying the export's start (listing the
    bitmaps may wait on the tracker)."""

    def run() -> None:
        try:
            api.resume_interrupted(rebuild_inconsistent=rebuild_inconsistent)
        except errors.DirtydiffError as e:
            log.warning("scans not resumed: %s", e.message)

    threading.Thread(target=run, name="resume-scans", daemon=True).start()


def _check_snapshot_dir(args: dict[str, Any]) -> None:
    """A snapshot's store where a client says is refused here (see the
    module's docstring: the tracker may run as root, and this socket may be
    a group's); ``dirtydiff checkpoint --snapshot-dir`` asks the tracker
    itself, with the caller's rights over its socket."""
    snapshot = args.get("snapshot")
    if isinstance(snapshot, dict) and snapshot.get("dir") is not None:
        raise errors.PermissionDenied(
            "snapshot-dir-not-allowed",
            "the sidecar does not choose a snapshot's store directory for a client; "
            "ask the tracker's socket (dirtydiff checkpoint --snapshot-dir does)",
        )


def _where(disk: str) -> str:
    """A disk as the sidecar compares it: a URI as written, a path made
    absolute (by its text alone: nothing is looked up)."""
    return disk if is_nbd_uri(disk) else os.path.abspath(disk)

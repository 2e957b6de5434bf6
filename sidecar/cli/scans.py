"""``dirtydiff scan`` and ``dirtydiff rebuild``: in the sidecar when one runs
(it may refuse what it may not open: the scan then runs here), else here, in
the foreground."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from dirtydiff import errors
from dirtydiff.disk import is_nbd_uri
from dirtydiff.owner import Actor, SidecarActor, StateOwner
from dirtydiff.state import StateDir
from sidecar.cli.output import emit, progress_printer, scan_summary
from sidecar.scan.engine import DEFAULT_CHUNK, DEFAULT_IN_FLIGHT
from sidecar.scan.estimate import Estimate, describe_estimate
from sidecar.scan.job import ScanOptions, abort_scan, rebuild_backup, run_scan
from sidecar.scan.jobs import JobStatus

# The sidecar's refusals of a disk or backup it may not open (sidecar.api):
# the command can still run that scan itself, with the caller's own rights.
NOT_FOR_THE_SIDECAR = ("disk-not-allowed", "backup-not-allowed", "manifest-not-allowed")


def _start_in_sidecar(sidecar: Actor, op: str, options: ScanOptions) -> JobStatus | None:
    """Start a scan job (``scan.start`` or ``rebuild``) in the sidecar; None
    if the sidecar may not open what it names, and the scan is to run here,
    in the foreground (a terminal is told so; a script's stderr keeps to one
    line per error)."""
    fields = dataclasses.asdict(options)
    if not options.disk:
        del fields["disk"]  # the sidecar's own disk
    elif not is_nbd_uri(options.disk):
        fields["disk"] = os.path.abspath(options.disk)  # the sidecar's cwd is not ours
    try:
        return JobStatus.from_wire(sidecar.call(op, **fields))
    except errors.PermissionDenied as e:
        if e.code not in NOT_FOR_THE_SIDECAR:
            raise
        if not options.disk:
            raise errors.PermissionDenied(
                e.code, f"{e.message}; or give --disk to scan here, in the foreground"
            ) from None
        if sys.stderr.isatty():
            print(f"dirtydiff: {e.message}; scanning here, in the foreground", file=sys.stderr)
        return None


def _scan_in_sidecar(
    sidecar: Actor, job: JobStatus, options: ScanOptions, args: argparse.Namespace,
    interactive: bool,
) -> int:  # fmt: skip
    """The sidecar runs the scan; return at once, or follow it with --wait."""
    if not args.wait:
        if args.json:
            emit(job.as_dict(), True, print)
        else:
            print(f"scan of {options.name} started in the sidecar; follow it with --wait")
        return 0
    return _follow(sidecar, job, options, args, interactive)


def _follow(
    sidecar: Actor,
    job: JobStatus,
    options: ScanOptions,
    args: argparse.Namespace,
    interactive: bool,
) -> int:
    """Show a sidecar's scan job until it ends."""
    show = progress_printer(interactive)
    waiting = None
    estimated = False
    while job.active:
        time.sleep(0.5)  # polling the sidecar's job for the progress display
        job = JobStatus.from_wire(sidecar.call("scan.status", name=options.name))
        if job.estimate is not None and not estimated:
            estimated = True
            print(f"dirtydiff: {describe_estimate(job.estimate)}", file=sys.stderr)
        if job.state == "waiting" and job.error != waiting:
            waiting = job.error
            print(f"\ndirtydiff: scan of {options.name} waiting: {waiting}", file=sys.stderr)
        progress = job.seen_progress()
        if progress is not None:
            show(progress)
    if interactive:
        sys.stderr.write("\n")
    if job.state != "done":
        raise errors.DirtydiffError(
            "scan-" + job.state, f"scan of {options.name}: {job.state}: {job.error}"
        )
    if args.json:
        emit(job.as_dict(), True, print)
    else:
        print(
            f"scan of {options.name} done in the sidecar; "
            f"{options.name} is consistent and recording"
        )
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    state = StateDir(args.state)
    sidecar = StateOwner(state).sidecar()
    if args.abort:
        if sidecar is not None:  # it stops its job first
            reply = sidecar.call("scan.abort", name=args.bitmap)
            # A sidecar started before it told (answering None) removed it.
            removed = not isinstance(reply, dict) or bool(reply.get("bitmap_removed", True))
        else:
            removed = abort_scan(state, args.bitmap)
        if removed:
            print(f"scan of {args.bitmap} aborted, and the bitmap it was filling removed")
        else:
            print(
                f"unfinished scan of {args.bitmap} forgotten; bitmap {args.bitmap} was not "
                "being filled by it and stays"
            )
        return 0
    if args.cancel:  # with no sidecar, its socket's error says so
        cancelled = (sidecar or SidecarActor(state)).call("scan.cancel", name=args.bitmap)
        print(f"scan of {args.bitmap}: {JobStatus.from_wire(cancelled).state}, cancel requested")
        return 0
    if args.backup is not None and args.manifest is not None:
        raise errors.BadRequest("usage", "--manifest stands in for --backup: give one of them")
    if (args.backup is None and args.manifest is None) or (args.disk is None and sidecar is None):
        raise errors.BadRequest(
            "usage", "--backup (or --manifest) is required, and --disk too when no sidecar runs"
        )
    options = ScanOptions(
        disk=args.disk or "",
        backup=args.backup or "",
        name=args.bitmap,
        granularity=args.granularity,
        max_rate=args.max_rate,
        chunk=DEFAULT_CHUNK if args.chunk_size is None else args.chunk_size,
        in_flight=DEFAULT_IN_FLIGHT if args.in_flight is None else args.in_flight,
        manifest=_path(args.manifest),
        write_manifest=_path(args.write_manifest),
        estimate=args.estimate,
        max_changed=args.max_changed,
    )
    interactive = sys.stderr.isatty() and not args.json
    if sidecar is not None:
        job = _start_in_sidecar(sidecar, "scan.start", options)
        if job is not None:
            return _scan_in_sidecar(sidecar, job, options, args, interactive)
    result = run_scan(
        state, options, on_progress=progress_printer(interactive), on_estimate=_show_estimate
    )
    if interactive:
        sys.stderr.write("\n")
    emit(
        result.as_dict(),
        args.json,
        lambda _: print(f"scan of {args.bitmap}: {scan_summary(result)}"),
    )
    return 0


def _path(path: str | None) -> str:
    """A manifest's path as the sidecar (whose cwd is not ours) would see it."""
    return os.path.abspath(path) if path else ""


def _show_estimate(estimate: Estimate) -> None:
    """The estimate, on stderr before the full scan starts (it goes in --json too)."""
    print(f"dirtydiff: {estimate.describe()}", file=sys.stderr, flush=True)


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Refill an inconsistent bitmap by a diff scan against its backup."""
    state = StateDir(args.state)
    owner = StateOwner(state)
    sidecar = owner.sidecar()
    info = owner.info(args.name)
    if args.manifest:  # the manifest stands in for the backup; its reference stays
        rebuild_backup(info, args.backup or info.backup or args.manifest)
        backup = args.backup or info.backup
    else:
        backup = rebuild_backup(info, args.backup)
    options = ScanOptions(
        disk=args.disk or "",
        backup=backup,
        name=args.name,
        granularity=info.granularity,
        max_rate=args.max_rate,
        rebuild=True,
        manifest=_path(args.manifest),
    )
    interactive = sys.stderr.isatty() and not args.json
    job = _start_in_sidecar(sidecar, "rebuild", options) if sidecar is not None else None
    if job is not None:
        if not args.wait:
            emit(
                job.as_dict(),
                args.json,
                lambda _: print(f"rebuild of {args.name} started in the sidecar"),
            )
            return 0
        assert sidecar is not None
        return _follow(sidecar, job, options, args, interactive)
    if not args.disk:
        raise errors.BadRequest("usage", "no sidecar runs: give --disk (the tracker's URI or file)")
    result = run_scan(state, options, on_progress=progress_printer(interactive))
    if interactive:
        sys.stderr.write("\n")
    emit(
        result.as_dict(), args.json, lambda _: print(f"{args.name} rebuilt: {scan_summary(result)}")
    )
    return 0

"""The ``dirtydiff`` command line.

Every command takes ``--state DIR``. Bitmap commands go to the running tracker
through its control socket; when no tracker runs they take the state lock
themselves and work on the files (the lock keeps a tracker from starting
meanwhile). Both paths run the same request code (dirtydiff.control.dispatch);
who serves a request is decided in one place, dirtydiff.owner.

Exit codes: 0 success; 1 the request failed (one line on stderr says why);
2 bad command line; 3 the tracker is running but did not answer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dirtydiff import errors, sockets
from dirtydiff.bitmapfile import DEFAULT_GRANULARITY, Header, check_granularity, inconsistency
from dirtydiff.control import replies
from dirtydiff.control.replies import StoreStatus
from dirtydiff.disk import is_nbd_uri
from dirtydiff.nbdproto import STATE_DIRTY
from dirtydiff.owner import Actor, SidecarActor, StateOwner
from dirtydiff.state import BitmapInfo, StateDir, check_name, record_first_disk
from dirtydiff.store import DRAIN_TIMEOUT, CheckpointResult
from sidecar.limits import HANDSHAKE_LIMIT, MAX_CONNECTIONS
from sidecar.nbdclient import context_extents
from sidecar.scan.engine import DEFAULT_CHUNK, DEFAULT_IN_FLIGHT, Progress
from sidecar.scan.job import ScanOptions, abort_scan, rebuild_backup, run_scan

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

PLUGIN = Path(__file__).resolve().parent.parent / "nbd_plugins" / "tracker.py"


def run_request(state_dir: str, op: str, **args: object) -> Any:
    """Run one control request: through the sidecar's API when a sidecar
    runs, else through the tracker, else on the files (``dirtydiff.owner``)."""
    return StateOwner(StateDir(state_dir)).request(op, **args)


# -- output -------------------------------------------------------------


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _print_table(bitmaps: list[BitmapInfo]) -> None:
    rows = [("NAME", "GRANULARITY", "RECORDING", "CONSISTENT", "DIRTY")]
    for b in bitmaps:
        rows.append(
            (
                b.name,
                _human(b.granularity),
                "yes" if b.recording else ("enabled" if b.enabled else "no"),
                "yes" if b.consistent else f"NO: {b.reason}",
                _human(b.dirty_bytes),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _emit(result: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        human(result)


def _emit_bitmap(result: object, as_json: bool) -> None:
    """A request's BitmapInfo, as one line of the table or as JSON (the map
    it travels as)."""
    info = replies.bitmap_info(result)
    _emit(info.as_dict(), as_json, lambda _: _print_table([info]))


# -- commands -------------------------------------------------------------


def cmd_track(args: argparse.Namespace) -> NoReturn:
    state = StateDir(args.state)
    state.check_writer()  # the tracker refuses it too; this says so before nbdkit starts
    if args.disk is None and args.uri is None:
        raise errors.BadRequest("usage", "give a DISK or --uri URI")
    if args.uri is None and "://" in args.disk:  # one DISK setting for files and URIs
        args.uri, args.disk = args.disk, None
    if args.disk is not None and not Path(args.disk).exists():
        raise errors.NotFound("no-disk", f"disk {args.disk} does not exist")
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise errors.NotFound(
            "no-nbdkit", "nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)"
        )
    source = f"file={os.path.abspath(args.disk)}" if args.disk is not None else f"uri={args.uri}"
    argv = [nbdkit, "-f", "-U", args.socket]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.readonly:
        argv.append("-r")
    argv += [
        "python",
        str(PLUGIN),
        source,
        f"state={state.path.resolve()}",
        f"granularity={args.granularity}",
    ]
    if args.readonly:
        argv.append("readonly=true")
    env = dict(os.environ)
    # nbdkit embeds /usr/bin/python3: let it see this installation's packages.
    paths = [str(PLUGIN.parent.parent), sysconfig.get_paths()["purelib"]]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if args.debug:
        print(" ".join(argv), file=sys.stderr)
    # A tracker killed with -9 leaves its socket behind, and nbdkit would
    # refuse to bind: removed if nobody answers on it (anything else stays).
    sockets.clear_path(Path(args.socket))
    _leave_the_launching_session()
    os.execve(nbdkit, argv, env)  # nbdkit takes over this process


def _leave_the_launching_session() -> None:
    """Run the tracker, the VM's disk, in a session of its own unless it is
    the foreground job of a terminal (where ^C must stop it).

    Started with ``&`` from a script, it would stay in the script's process
    group and session, and whatever ends those once the script is done
    would stop it: a job runner's SIGTERM to the group, a terminal's SIGHUP
    at hangup. (The script's exit alone stops nothing: nbdkit sets a
    parent-death signal only with --exit-with-parent, which we do not
    pass.) A process group leader (a job of an interactive shell, a systemd
    service) may not make a session, and is in no group but its own.
    """
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return
    except OSError:
        pass  # no terminal to be the foreground of
    with contextlib.suppress(PermissionError):
        os.setsid()


def cmd_serve(args: argparse.Namespace) -> int:
    # Imported here: the export pulls in numpy and asyncio (~60 ms), which
    # would cost every other command (a checkpoint from a backup script) a
    # noticeable start.
    import asyncio  # noqa: PLC0415

    from sidecar.serve import serve  # noqa: PLC0415

    state = StateDir(args.state)
    asyncio.run(
        serve(
            state,
            args.disk,
            Path(args.socket),
            tcp=args.tcp,
            export_name=args.export_name,
            bitmaps=args.bitmap,
            metrics=args.metrics,
            metrics_disk=args.metrics_disk,
            control_group=args.control_group,
            auto_rebuild=args.auto_rebuild,
            max_connections=args.max_connections,
            handshake_limit=args.handshake_limit,
        )
    )
    return 0


def _progress_printer(enabled: bool) -> Callable[[Progress], None]:
    def show(p: Progress) -> None:
        if not enabled:
            return
        width = 30
        filled = int(width * p.ratio)
        eta = f"{p.eta:.0f}s" if p.eta is not None else "?"
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * p.ratio:5.1f}% "
            f"{_human(p.position)}/{_human(p.total)} {_human(int(p.rate))}/s "
            f"differing {p.differing_granules} granules, eta {eta}   "
        )
        sys.stderr.flush()

    return show


# The sidecar's refusals of a disk or backup it may not open (sidecar.api):
# the command can still run that scan itself, with the caller's own rights.
NOT_FOR_THE_SIDECAR = ("disk-not-allowed", "backup-not-allowed")


def _start_in_sidecar(sidecar: Actor, op: str, options: ScanOptions) -> dict[str, Any] | None:
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
        job: dict[str, Any] = sidecar.call(op, **fields)
        return job
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
    sidecar: Actor, job: dict[str, Any], options: ScanOptions, args: argparse.Namespace,
    interactive: bool,
) -> int:  # fmt: skip
    """The sidecar runs the scan; return at once, or follow it with --wait."""
    if not args.wait:
        if args.json:
            _emit(job, True, print)
        else:
            print(f"scan of {options.name} started in the sidecar; follow it with --wait")
        return 0
    return _follow(sidecar, job, options, args, interactive)


def _follow(
    sidecar: Actor,
    job: dict[str, Any],
    options: ScanOptions,
    args: argparse.Namespace,
    interactive: bool,
) -> int:
    """Show a sidecar's scan job until it ends."""
    show = _progress_printer(interactive)
    waiting = None
    while job["state"] in ("running", "waiting"):
        time.sleep(0.5)  # polling the sidecar's job for the progress display
        job = sidecar.call("scan.status", name=options.name)
        if job["state"] == "waiting" and job["error"] != waiting:
            waiting = job["error"]
            print(f"\ndirtydiff: scan of {options.name} waiting: {waiting}", file=sys.stderr)
        if job["progress"]:
            p = Progress(total=job["progress"]["total"])
            p.position = job["progress"]["position"]
            p.compared = job["progress"]["compared"]
            p.differing_granules = job["progress"]["differing_granules"]
            show(p)
    if interactive:
        sys.stderr.write("\n")
    if job["state"] != "done":
        raise errors.DirtydiffError(
            "scan-" + job["state"], f"scan of {options.name}: {job['state']}: {job['error']}"
        )
    if args.json:
        _emit(job, True, print)
    else:
        print(
            f"scan of {options.name} done in the sidecar; "
            f"{options.name} is consistent and recording"
        )
    return 0


def _scan_summary(r: dict[str, Any]) -> str:
    p, b = r["progress"], r["bitmap"]
    return (
        f"{_human(p['compared'])} compared in {p['elapsed']:.1f}s "
        f"({_human(int(p['rate']))}/s), read {_human(p['read_disk'])} of the disk and "
        f"{_human(p['read_backup'])} of the backup; {p['differing_granules']} granules "
        f"differ; {b['name']} is consistent and recording ({_human(b['dirty_bytes'])} dirty)"
    )


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
    if not args.cancel and (args.backup is None or (args.disk is None and sidecar is None)):
        raise errors.BadRequest(
            "usage", "--backup is required, and --disk too when no sidecar runs"
        )
    options = ScanOptions(
        disk=args.disk or "",
        backup=args.backup,
        name=args.bitmap,
        granularity=args.granularity,
        max_rate=args.max_rate,
        chunk=args.chunk_size,
        in_flight=args.in_flight,
    )
    interactive = sys.stderr.isatty() and not args.json
    if args.cancel:  # with no sidecar, its socket's error says so
        job = (sidecar or SidecarActor(state)).call("scan.cancel", name=args.bitmap)
        print(f"scan of {args.bitmap}: {job['state']}, cancel requested")
        return 0
    if sidecar is not None:
        job = _start_in_sidecar(sidecar, "scan.start", options)
        if job is not None:
            return _scan_in_sidecar(sidecar, job, options, args, interactive)
    result = run_scan(state, options, on_progress=_progress_printer(interactive))
    if interactive:
        sys.stderr.write("\n")
    _emit(result, args.json, lambda r: print(f"scan of {args.bitmap}: {_scan_summary(r)}"))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Refill an inconsistent bitmap by a diff scan against its backup."""
    state = StateDir(args.state)
    owner = StateOwner(state)
    sidecar = owner.sidecar()
    info = owner.info(args.name)
    backup = rebuild_backup(info, args.backup)
    options = ScanOptions(
        disk=args.disk or "",
        backup=backup,
        name=args.name,
        granularity=info.granularity,
        max_rate=args.max_rate,
        rebuild=True,
    )
    interactive = sys.stderr.isatty() and not args.json
    job = _start_in_sidecar(sidecar, "rebuild", options) if sidecar is not None else None
    if job is not None:
        if not args.wait:
            _emit(job, args.json, lambda j: print(f"rebuild of {args.name} started in the sidecar"))
            return 0
        assert sidecar is not None
        return _follow(sidecar, job, options, args, interactive)
    if not args.disk:
        raise errors.BadRequest("usage", "no sidecar runs: give --disk (the tracker's URI or file)")
    result = run_scan(state, options, on_progress=_progress_printer(interactive))
    if interactive:
        sys.stderr.write("\n")
    _emit(result, args.json, lambda r: print(f"{args.name} rebuilt: {_scan_summary(r)}"))
    return 0


def cmd_bitmap_list(args: argparse.Namespace) -> int:
    bitmaps = StateOwner(StateDir(args.state)).bitmaps()
    _emit([b.as_dict() for b in bitmaps], args.json, lambda _: _print_table(bitmaps))
    return 0


def cmd_bitmap_show(args: argparse.Namespace) -> int:
    from dirtydiff.extents import bitmap_extents, nbdinfo_json, nbdinfo_text  # noqa: PLC0415 (numpy)

    state = StateDir(args.state)
    with state.open_bitmap(args.name) as bitmap:
        created = bitmap.header.created_ns
        _refuse_inconsistent(args, bitmap.header)
        found = bitmap_extents(bitmap)
        # Asked again once the bits are read (see "Incarnations" in
        # dirtydiff.bitmapfile): a rebuild may have begun meanwhile.
        header = bitmap.reload_header()
        _refuse_inconsistent(args, header)
        if header.created_ns != created and not args.allow_inconsistent:
            raise errors.Conflict(
                "changed", f"bitmap {args.name!r} was rebuilt while it was read; try again"
            )
    sys.stdout.write(nbdinfo_json(found) if args.json else nbdinfo_text(found))
    return 0


def _refuse_inconsistent(args: argparse.Namespace, header: Header) -> None:
    why = inconsistency(header)
    if why.value and not args.allow_inconsistent:
        raise errors.Conflict(
            "inconsistent",
            f"bitmap {args.name!r} is inconsistent ({why.describe()}): it may miss changes "
            "and cannot be used for an incremental backup "
            "(--allow-inconsistent prints it anyway)",
        )


def cmd_bitmap_add(args: argparse.Namespace) -> int:
    info = run_request(
        args.state,
        "bitmap.add",
        name=args.name,
        granularity=args.granularity,
        enabled=not args.disabled,
        backup=args.backup or "",
    )
    _emit_bitmap(info, args.json)
    return 0


def _simple(op: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        result = run_request(args.state, op, name=args.name)
        if result is not None:  # bitmap.remove answers nothing
            _emit_bitmap(result, args.json)
        return 0

    return command


IMPORT_BATCH = 16384  # ranges per control message, well under its size limit


def cmd_bitmap_import(args: argparse.Namespace) -> int:
    """Made inconsistent ("an import is filling it"), filled, then declared
    consistent: killed half way, it is never taken for the bitmap it was to
    be."""
    state = StateDir(args.state)
    size, found = context_extents(args.from_uri, args.context)
    known = state.disk_size()
    if known is not None and known != size:
        raise errors.Conflict(
            "disk-size-mismatch",
            f"{args.from_uri} exports {size} bytes but the disk of {state.path} has {known} bytes",
        )
    if known is None:
        # Never tracked: the export a bitmap comes from is the disk it
        # describes (qemu-nbd of the image a tracker will serve), and the
        # state records it so. Checked first, so that a refused import
        # leaves nothing behind.
        check_name(args.name)
        check_granularity(args.granularity)
        record_first_disk(state, size, args.from_uri)
    with _TerminateAsInterrupt() as terminate:
        begun = replies.bitmap_info(run_request(
            args.state, "bitmap.add", name=args.name, granularity=args.granularity,
            enabled=not args.disabled, importing=True,
        ))  # fmt: skip
        try:
            terminate.arm()
            batch: list[tuple[int, int]] = []
            for offset, length, flags in found:
                if flags & STATE_DIRTY:
                    batch.append((offset, length))
                if len(batch) >= IMPORT_BATCH:
                    run_request(args.state, "bitmap.mark", name=args.name, ranges=batch)
                    batch = []
            run_request(args.state, "bitmap.mark", name=args.name, ranges=batch)
            info = run_request(
                args.state, "import.complete", name=args.name, created_ns=begun.created_ns
            )
        except BaseException:
            # Half an import is worth nothing: it goes (it stays inconsistent,
            # and so never exported, if even this fails).
            with contextlib.suppress(errors.DirtydiffError):
                run_request(
                    args.state, "bitmap.remove", name=args.name, created_ns=begun.created_ns
                )
            raise
    _emit_bitmap(info, args.json)
    return 0


class _TerminateAsInterrupt:
    """SIGTERM raises KeyboardInterrupt, so that a command's cleanup runs as
    for ^C; until ``arm``, it waits (a request under way finishes first, and
    its caller learns what there is to clean up)."""

    def __init__(self) -> None:
        self.armed = False
        self.pending = False

    def _handler(self, signum: int, frame: object) -> None:
        if not self.armed:
            self.pending = True
            return
        raise KeyboardInterrupt

    def arm(self) -> None:
        self.armed = True
        if self.pending:
            raise KeyboardInterrupt

    def __enter__(self) -> _TerminateAsInterrupt:
        self._previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def cmd_bitmap_clear(args: argparse.Namespace) -> int:
    info = run_request(args.state, "bitmap.clear", name=args.name, backup=args.backup or "")
    _emit_bitmap(info, args.json)
    return 0


def cmd_bitmap_merge(args: argparse.Namespace) -> int:
    info = run_request(args.state, "bitmap.merge", target=args.target, sources=args.sources)
    _emit_bitmap(info, args.json)
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    result = replies.checkpoint_result(
        run_request(
            args.state,
            "checkpoint",
            name=args.name,
            timeout=float(args.timeout),
            backup=args.backup or "",
        )
    )

    def human(r: CheckpointResult) -> None:
        print(f"checkpoint {r.name}: {_human(r.dirty_bytes)} changed since the previous one")
        if not r.drained:
            print(
                "warning: writes were still in flight when the drain timed out; they are "
                "recorded in the next interval too",
                file=sys.stderr,
            )

    _emit(dataclasses.asdict(result), args.json, lambda r: human(result))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = StateDir(args.state)
    running = StateOwner(state).tracker_runs()
    status: dict[str, Any] = {
        "state": str(state.path),
        "tracker": {"running": running, "pid": state.holder_pid() if running else None},
    }
    store: StoreStatus | None = None
    try:
        store = StateOwner(state).status()
        status.update(store.as_dict())
    except errors.NotFound as e:
        if e.code != "never-tracked":
            raise
        status["bitmaps"] = []

    def human(s: dict[str, Any]) -> None:
        tracker = s["tracker"]
        print(f"state:    {s['state']}")
        print(
            "tracker:  "
            + (f"running (pid {tracker['pid']})" if tracker["running"] else "not running")
        )
        bitmaps = store.bitmaps if store is not None else []
        if store is not None:
            print(f"disk:     {_human(store.disk_size)} ({store.disk_size} bytes)")
        print()
        _print_table(bitmaps)
        bad = [b.name for b in bitmaps if not b.consistent]
        if bad:
            print(
                f"\n{len(bad)} bitmap(s) inconsistent: {', '.join(bad)} — they may miss changes "
                "and are not exported; `dirtydiff rebuild NAME` refills one by a diff scan "
                "against the backup it names, or remove them"
            )

    _emit(status, args.json, human)
    return 0


# -- parser ---------------------------------------------------------------


def _granularity(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    try:
        if text[-1:].lower() in units:
            return int(text[:-1]) * units[text[-1].lower()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad granularity {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dirtydiff",
        description="Keep and rebuild dirty bitmaps for incremental VM backups over NBD.",
        epilog="Exit codes: 0 ok, 1 request failed, 2 bad command line, 3 tracker not answering.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def state_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state", required=True, metavar="DIR", help="state directory of the disk")

    def json_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("track", help="serve a disk through nbdkit and record every write")
    p.add_argument("disk", nargs="?", metavar="DISK", help="raw file or block device")
    p.add_argument("--uri", help="an upstream NBD export instead of DISK (e.g. qemu-nbd for qcow2)")
    state_arg(p)
    p.add_argument("--socket", required=True, metavar="SOCK", help="unix socket the VM connects to")
    p.add_argument(
        "--granularity",
        type=_granularity,
        default=DEFAULT_GRANULARITY,
        help="granularity of the checkpoint bitmap when first created (default 64k)",
    )
    p.add_argument("--readonly", action="store_true", help="serve read-only")
    p.add_argument("--threads", type=int, help="nbdkit worker threads per connection")
    p.set_defaults(func=cmd_track)

    p = sub.add_parser("scan", help="rebuild a bitmap by diffing the disk against a backup")
    state_arg(p)
    json_arg(p)
    p.add_argument(
        "--disk", metavar="FILE|URI", help="the disk, or the tracker's URI while the VM runs"
    )
    p.add_argument("--backup", metavar="URI", help="the backup, exported over NBD")
    p.add_argument("--bitmap", required=True, metavar="NAME", help="the bitmap to fill")
    p.add_argument("--granularity", type=_granularity, default=DEFAULT_GRANULARITY)
    p.add_argument("--max-rate", type=float, metavar="BYTES/S", help="cap on bytes read per second")
    p.add_argument("--chunk-size", type=_granularity, default=DEFAULT_CHUNK, help=argparse.SUPPRESS)
    p.add_argument("--in-flight", type=int, default=DEFAULT_IN_FLIGHT, help=argparse.SUPPRESS)
    p.add_argument(
        "--wait",
        action="store_true",
        help="with a running sidecar, follow the scan to its end "
        "(without one, scans run in the foreground)",
    )
    p.add_argument("--cancel", action="store_true", help="stop the sidecar's scan (it can resume)")
    p.add_argument("--abort", action="store_true", help="forget an unfinished scan and its bitmap")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("serve", help="export the disk and its bitmaps over NBD, read-only")
    state_arg(p)
    p.add_argument(
        "--disk", required=True, metavar="FILE|URI", help="the disk, or the tracker's URI"
    )
    p.add_argument("--socket", required=True, metavar="SOCK", help="unix socket to listen on")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (give the address)")
    p.add_argument("--export-name", default="", help="export name (default: empty)")
    p.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics (e.g. 127.0.0.1:9300)"
    )
    p.add_argument(
        "--metrics-disk",
        metavar="LABEL",
        help="the disk label of every metric (default: the state directory's name)",
    )
    p.add_argument(
        "--bitmap",
        action="append",
        metavar="NAME",
        help="export only these bitmaps (repeat); default: every consistent one",
    )
    p.add_argument(
        "--control-group",
        metavar="GROUP",
        help="let GROUP use the control socket STATE/sidecar.sock (default: owner only, 0600)",
    )
    p.add_argument(
        "--auto-rebuild",
        action="store_true",
        help="at start, rebuild every inconsistent bitmap that names its backup "
        "(unfinished scans always resume)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help=f"export clients served at once (default {MAX_CONNECTIONS}, or fewer if the "
        "file descriptor limit is low); past N, the one still negotiating longest is "
        "closed, or else the new one",
    )
    p.add_argument(
        "--handshake-limit",
        type=float,
        default=HANDSHAKE_LIMIT,
        metavar="SECONDS",
        help=f"close a client that has not finished its handshake in SECONDS "
        f"(default {HANDSHAKE_LIMIT:g}, as qemu-nbd)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "rebuild", help="refill an inconsistent bitmap by a diff scan against its backup"
    )
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument(
        "--disk", metavar="FILE|URI", help="the disk (default: the running sidecar's disk)"
    )
    p.add_argument(
        "--backup", metavar="URI", help="the backup to compare with (default: the one recorded)"
    )
    p.add_argument("--max-rate", type=float, metavar="BYTES/S", help="cap on bytes read per second")
    p.add_argument("--wait", action="store_true", help="follow the sidecar's rebuild to its end")
    p.set_defaults(func=cmd_rebuild)

    bitmap = sub.add_parser(
        "bitmap", help="add, remove, clear, enable, disable, merge, list, show bitmaps"
    )
    bsub = bitmap.add_subparsers(dest="bitmap_command", required=True, metavar="ACTION")

    p = bsub.add_parser("add", help="create a bitmap that records from now on")
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument("--granularity", type=_granularity, default=DEFAULT_GRANULARITY)
    p.add_argument("--disabled", action="store_true", help="create it not recording")
    p.add_argument(
        "--backup", metavar="URI", help="the backup it counts changes from (for rebuild)"
    )
    p.set_defaults(func=cmd_bitmap_add)

    p = bsub.add_parser(
        "clear", help="empty a bitmap: it counts changes from now on, not from its backup"
    )
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument(
        "--backup", metavar="URI", help="a backup taken just now, which it then counts from"
    )
    p.set_defaults(func=cmd_bitmap_clear)

    for action, op, text in (
        ("remove", "bitmap.remove", "delete a bitmap"),
        ("enable", "bitmap.enable", "start recording into a bitmap"),
        ("disable", "bitmap.disable", "stop recording into a bitmap (after in-flight writes)"),
    ):
        p = bsub.add_parser(action, help=text)
        state_arg(p)
        json_arg(p)
        p.add_argument("name")
        p.set_defaults(func=_simple(op))

    p = bsub.add_parser("merge", help="OR bitmaps into a target bitmap")
    state_arg(p)
    json_arg(p)
    p.add_argument("target")
    p.add_argument("sources", nargs="+")
    p.set_defaults(func=cmd_bitmap_merge)

    p = bsub.add_parser("import", help="import a dirty bitmap from any NBD server")
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument("--from", dest="from_uri", required=True, metavar="URI", help="NBD URI")
    p.add_argument(
        "--context", required=True, metavar="CONTEXT", help="e.g. qemu:dirty-bitmap:bitmap0"
    )
    p.add_argument("--granularity", type=_granularity, default=DEFAULT_GRANULARITY)
    p.add_argument("--disabled", action="store_true", help="import it not recording")
    p.set_defaults(func=cmd_bitmap_import)

    p = bsub.add_parser("list", help="list bitmaps")
    state_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_bitmap_list)

    p = bsub.add_parser("show", help="print a bitmap's extents as nbdinfo --map does")
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument("--allow-inconsistent", action="store_true", help="print an inconsistent bitmap")
    p.set_defaults(func=cmd_bitmap_show)

    p = sub.add_parser("checkpoint", help="freeze the changes since the last checkpoint as NAME")
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=DRAIN_TIMEOUT, help="drain timeout, seconds")
    p.add_argument(
        "--backup",
        metavar="URI",
        help="where the backup taken at this checkpoint lives: the next interval counts "
        "changes from it, and `dirtydiff rebuild @open` scans against it after a crash",
    )
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("status", help="tracker state and bitmaps")
    state_arg(p)
    json_arg(p)
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s"
    )
    try:
        code: int = args.func(args)
        return code
    except errors.Unavailable as e:
        if args.debug:
            raise
        print(f"dirtydiff: {e.message}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.DirtydiffError as e:
        if args.debug:
            raise
        print(f"dirtydiff: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        if args.debug:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"dirtydiff:{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

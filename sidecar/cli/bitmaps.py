"""The bitmap commands, ``checkpoint`` and ``status``: one request each (a
few for an import), served by whoever ``dirtydiff.owner`` says."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
from typing import Any

from dirtydiff import errors
from dirtydiff.bitmapfile import Header, check_granularity, inconsistency
from dirtydiff.control import replies
from dirtydiff.control.replies import StoreStatus
from dirtydiff.nbdproto import STATE_DIRTY
from dirtydiff.owner import StateOwner
from dirtydiff.state import StateDir, check_name, record_first_disk
from dirtydiff.store import CheckpointResult
from sidecar.cli.output import emit, emit_bitmap, human_size, print_table


def run_request(state_dir: str, op: str, **args: object) -> Any:
    """Run one control request: through the sidecar's API when a sidecar
    runs, else through the tracker, else on the files (``dirtydiff.owner``)."""
    return StateOwner(StateDir(state_dir)).request(op, **args)


def cmd_bitmap_list(args: argparse.Namespace) -> int:
    bitmaps = StateOwner(StateDir(args.state)).bitmaps()
    emit([b.as_dict() for b in bitmaps], args.json, lambda _: print_table(bitmaps))
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
    emit_bitmap(info, args.json)
    return 0


def cmd_simple(args: argparse.Namespace) -> int:
    """remove, enable, disable: the op the parser set, on bitmap NAME."""
    result = run_request(args.state, args.op, name=args.name)
    if result is not None:  # bitmap.remove answers nothing
        emit_bitmap(result, args.json)
    return 0


IMPORT_BATCH = 16384  # ranges per control message, well under its size limit


def cmd_bitmap_import(args: argparse.Namespace) -> int:
    """Made inconsistent ("an import is filling it"), filled, then declared
    consistent: killed half way, it is never taken for the bitmap it was to
    be."""
    from sidecar.nbdclient import context_extents  # noqa: PLC0415 (libnbd, for this command only)

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
    emit_bitmap(info, args.json)
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
    emit_bitmap(info, args.json)
    return 0


def cmd_bitmap_merge(args: argparse.Namespace) -> int:
    info = run_request(args.state, "bitmap.merge", target=args.target, sources=args.sources)
    emit_bitmap(info, args.json)
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from sidecar.cli import snapshots  # noqa: PLC0415 (only a checkpoint needs it)

    try:
        snapshot = snapshots.snapshot_request(args)
    except snapshots.UsageError as e:
        print(f"dirtydiff checkpoint: error: {e.message}", file=sys.stderr)
        return 2  # a bad command line, as argparse's own errors
    extra: dict[str, object] = {} if snapshot is None else {"snapshot": snapshot}
    answer = snapshots.owner_for(StateDir(args.state), snapshot).request(
        "checkpoint",
        name=args.name,
        timeout=float(args.timeout),
        backup=args.backup or "",
        **extra,
    )
    result = replies.checkpoint_result(answer)
    taken = snapshots.checked(answer["snapshot"]) if snapshot is not None else None

    def human(r: CheckpointResult) -> None:
        print(f"checkpoint {r.name}: {human_size(r.dirty_bytes)} changed since the previous one")
        if taken is not None:
            print(snapshots.snapshot_summary(taken))
        if not r.drained:
            print(
                "warning: writes were still in flight when the drain timed out; they are "
                "recorded in the next interval too",
                file=sys.stderr,
            )

    shown: dict[str, object] = dataclasses.asdict(result)
    if taken is not None:
        shown["snapshot"] = taken
    emit(shown, args.json, lambda r: human(result))
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
    from sidecar.cli.snapshots import list_snapshots, print_snapshots  # noqa: PLC0415

    status["snapshots"] = list_snapshots(state)

    def human(s: dict[str, Any]) -> None:
        tracker = s["tracker"]
        print(f"state:    {s['state']}")
        print(
            "tracker:  "
            + (f"running (pid {tracker['pid']})" if tracker["running"] else "not running")
        )
        bitmaps = store.bitmaps if store is not None else []
        if store is not None:
            print(f"disk:     {human_size(store.disk_size)} ({store.disk_size} bytes)")
        print()
        print_table(bitmaps)
        bad = [b.name for b in bitmaps if not b.consistent]
        if bad:
            print(
                f"\n{len(bad)} bitmap(s) inconsistent: {', '.join(bad)} — they may miss changes "
                "and are not exported; `dirtydiff rebuild NAME` refills one by a diff scan "
                "against the backup it names, or remove them"
            )
        if s["snapshots"]:
            print()
            print_snapshots(s["snapshots"])
            broken = [n["name"] for n in s["snapshots"] if n["state"] == "broken"]
            if broken:
                print(
                    f"\n{len(broken)} snapshot(s) broken: {', '.join(broken)} — their exports "
                    "answer every read with EIO; the VM's writes went on. Release them, and "
                    "take the backup from a new checkpoint --snapshot"
                )

    emit(status, args.json, human)
    return 0


# -- parser ---------------------------------------------------------------

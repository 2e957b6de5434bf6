"""The snapshot commands: ``snapshot list``, ``snapshot release``, the
snapshot arguments of ``checkpoint``, and the snapshot table ``status``
prints. A snapshot lives in the tracker (``dirtydiff.snapshots``); these
commands ask it, through the sidecar when one runs (``dirtydiff.owner``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from dirtydiff import errors
from dirtydiff.owner import StateOwner
from dirtydiff.snapshots import SnapshotInfo
from dirtydiff.state import StateDir
from sidecar.cli.output import emit, human_size


def checked(snapshot: object) -> dict[str, Any]:
    """A snapshot map from a reply, every field of its type
    (``SnapshotInfo.from_dict``: a ProtocolError otherwise)."""
    return SnapshotInfo.from_dict(snapshot).as_dict()


def snapshot_request(args: argparse.Namespace) -> dict[str, object] | None:
    """The ``snapshot`` argument of a checkpoint request, from the command
    line; None without ``--snapshot`` (then its options are a usage error)."""
    given = [
        flag
        for flag, value in (
            ("--snapshot-scope", args.snapshot_scope),
            ("--snapshot-dir", args.snapshot_dir),
            ("--snapshot-limit", args.snapshot_limit),
        )
        if value is not None
    ]
    if not args.snapshot:
        if given:
            raise UsageError(f"{', '.join(given)} needs --snapshot")
        return None
    # The tracker's working directory is not ours: a relative path is made
    # absolute here, by its text alone.
    where = os.path.abspath(args.snapshot_dir) if args.snapshot_dir is not None else None
    return {"scope": args.snapshot_scope or "all", "dir": where, "limit": args.snapshot_limit}


class UsageError(errors.BadRequest):
    """A bad combination of flags: the command line's fault (exit 2)."""


def owner_for(state: StateDir, snapshot: dict[str, object] | None) -> StateOwner:
    """Who a checkpoint goes to: a store directory of the caller's choosing
    goes to the tracker itself, with the caller's rights over its socket (the
    sidecar refuses to choose a path for a client, as it does for scans)."""
    return StateOwner(state, ask_sidecar=snapshot is None or snapshot.get("dir") is None)


def print_snapshots(snapshots: list[dict[str, Any]]) -> None:
    rows = [("SNAPSHOT", "STATE", "SCOPE", "PROTECTED", "COPIED", "STORE", "LIMIT")]
    for s in snapshots:
        rows.append((
            s["name"],
            s["state"] if s["state"] != "broken" else f"BROKEN: {s['reason']}",
            s["scope"],
            human_size(s["protected_bytes"]),
            human_size(s["copied_bytes"]),
            human_size(s["store_bytes"]),
            human_size(s["limit"]) if s["limit"] is not None else "none",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def snapshot_summary(snapshot: dict[str, Any]) -> str:
    """One line on a snapshot just taken."""
    limit = snapshot["limit"]
    bound = f", store bounded by {human_size(limit)}" if limit is not None else ""
    return (
        f"snapshot {snapshot['name']}: {snapshot['state']}, scope {snapshot['scope']}, "
        f"{human_size(snapshot['protected_bytes'])} protected{bound}; "
        f"export {snapshot['name']!r} serves the disk as at the checkpoint"
    )


def list_snapshots(state: StateDir) -> list[dict[str, Any]]:
    return [checked(s) for s in StateOwner(state).snapshots()]


def cmd_snapshot_list(args: argparse.Namespace) -> int:
    found = list_snapshots(StateDir(args.state))
    emit(found, args.json, lambda _: print_snapshots(found))
    return 0


def cmd_snapshot_release(args: argparse.Namespace) -> int:
    released = checked(StateOwner(StateDir(args.state)).request("snapshot.release", name=args.name))

    def human(s: dict[str, Any]) -> None:
        print(
            f"snapshot {s['name']} released: its store is removed and export {s['name']!r} "
            f"is gone; bitmap {s['name']} stays"
        )

    emit(released, args.json, human)
    return 0

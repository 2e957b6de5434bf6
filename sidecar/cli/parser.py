"""The ``dirtydiff`` command line's arguments: one subcommand per command."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from dirtydiff.bitmapfile import DEFAULT_GRANULARITY
from dirtydiff.storebase import DRAIN_TIMEOUT
from sidecar.limits import HANDSHAKE_LIMIT, MAX_CONNECTIONS

Command = Callable[[argparse.Namespace], int]


def _command(name: str) -> Command:
    """The command ``name`` of this package ("scans.cmd_scan"), imported
    when it runs: a command pays for its own imports only (a checkpoint run
    by a backup script loads neither libnbd nor the scan engine)."""
    module, _, function = name.rpartition(".")

    def run(args: argparse.Namespace) -> int:
        command: Command = getattr(importlib.import_module(f"sidecar.cli.{module}"), function)
        return command(args)

    return run


def _granularity(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    try:
        if text[-1:].lower() in units:
            return int(text[:-1]) * units[text[-1].lower()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad granularity {text!r}") from None


def manifest_args(p: argparse.ArgumentParser) -> None:
    """``--manifest``: compare with a manifest of the backup instead of reading it."""
    p.add_argument(
        "--manifest",
        metavar="FILE",
        help="a manifest of the backup (dirtydiff digest): only the disk is read",
    )


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
    p.set_defaults(func=_command("processes.cmd_track"))

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
    # Hidden tuning knobs; unset, the scan engine's defaults.
    p.add_argument("--chunk-size", type=_granularity, help=argparse.SUPPRESS)
    p.add_argument("--in-flight", type=int, help=argparse.SUPPRESS)
    p.add_argument(
        "--wait",
        action="store_true",
        help="with a running sidecar, follow the scan to its end "
        "(without one, scans run in the foreground)",
    )
    p.add_argument("--cancel", action="store_true", help="stop the sidecar's scan (it can resume)")
    p.add_argument("--abort", action="store_true", help="forget an unfinished scan and its bitmap")
    manifest_args(p)
    p.add_argument(
        "--write-manifest",
        metavar="FILE",
        help="also write a manifest of the backup as it is read, for one-sided scans later",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="first read a random sample: print the changed fraction (95%% interval) "
        "and how long the full scan will take",
    )
    p.add_argument(
        "--max-changed",
        type=float,
        metavar="PCT",
        help="with the estimate: stop before the full scan (nothing marked) if surely "
        "more than PCT%% changed, when a full backup would read less",
    )
    p.set_defaults(func=_command("scans.cmd_scan"))

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
    p.add_argument(
        "--tls-creds",
        metavar="DIR",
        help="serve TCP clients only over TLS: QEMU's x509 directory (ca-cert.pem, "
        "server-cert.pem, server-key.pem, optional ca-crl.pem)",
    )
    p.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="require a client certificate signed by the CA of --tls-creds",
    )
    p.add_argument(
        "--tls-authz",
        metavar="FILE",
        help="admit only the client certificate DNs FILE lists, one a line "
        "(CN=...,O=...), or a QEMU authz-list-file; implies --tls-verify-peer",
    )
    p.add_argument("--tls-unix", action="store_true", help="require TLS on the unix socket too")
    p.add_argument(
        "--insecure-tcp",
        action="store_true",
        help="allow --tcp beyond loopback without TLS (a warning at every start)",
    )
    p.add_argument(
        "--metrics-tls-creds",
        metavar="DIR",
        help="serve /metrics over https, to clients with a certificate of DIR's CA "
        "(same layout as --tls-creds)",
    )
    p.set_defaults(func=_command("processes.cmd_serve"))

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
    manifest_args(p)
    p.set_defaults(func=_command("scans.cmd_rebuild"))

    p = sub.add_parser(
        "digest", help="write a manifest of a backup: one digest per granule, for one-sided scans"
    )
    p.add_argument(
        "--backup", required=True, metavar="URI|FILE", help="the backup: an NBD URI or a file"
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the manifest to write")
    p.add_argument(
        "--granularity",
        type=_granularity,
        default=DEFAULT_GRANULARITY,
        help="bytes per digest (default 64k); a bitmap's granularity must be a multiple",
    )
    json_arg(p)
    p.set_defaults(func=_command("digest.cmd_digest"))

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
    p.set_defaults(func=_command("bitmaps.cmd_bitmap_add"))

    p = bsub.add_parser(
        "clear", help="empty a bitmap: it counts changes from now on, not from its backup"
    )
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument(
        "--backup", metavar="URI", help="a backup taken just now, which it then counts from"
    )
    p.set_defaults(func=_command("bitmaps.cmd_bitmap_clear"))

    for action, op, text in (
        ("remove", "bitmap.remove", "delete a bitmap"),
        ("enable", "bitmap.enable", "start recording into a bitmap"),
        ("disable", "bitmap.disable", "stop recording into a bitmap (after in-flight writes)"),
    ):
        p = bsub.add_parser(action, help=text)
        state_arg(p)
        json_arg(p)
        p.add_argument("name")
        p.set_defaults(func=_command("bitmaps.cmd_simple"), op=op)

    p = bsub.add_parser("merge", help="OR bitmaps into a target bitmap")
    state_arg(p)
    json_arg(p)
    p.add_argument("target")
    p.add_argument("sources", nargs="+")
    p.set_defaults(func=_command("bitmaps.cmd_bitmap_merge"))

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
    p.set_defaults(func=_command("bitmaps.cmd_bitmap_import"))

    p = bsub.add_parser("list", help="list bitmaps")
    state_arg(p)
    json_arg(p)
    p.set_defaults(func=_command("bitmaps.cmd_bitmap_list"))

    p = bsub.add_parser("show", help="print a bitmap's extents as nbdinfo --map does")
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.add_argument("--allow-inconsistent", action="store_true", help="print an inconsistent bitmap")
    p.set_defaults(func=_command("bitmaps.cmd_bitmap_show"))

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
    add_snapshot_args(p)
    p.set_defaults(func=_command("bitmaps.cmd_checkpoint"))

    p = sub.add_parser("status", help="tracker state and bitmaps")
    state_arg(p)
    json_arg(p)
    p.set_defaults(func=_command("bitmaps.cmd_status"))
    add_snapshot_commands(sub, state_arg, json_arg)
    return parser


def _byte_count(text: str) -> int:
    """BYTES, or with a unit: 512k, 64m, 2g, 1t (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        scale = units.get(text[-1:].lower(), 1)
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad byte count {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a byte count must be positive, not {text!r}")
    return value


def add_snapshot_args(p: argparse.ArgumentParser) -> None:
    """``checkpoint NAME --snapshot``: the disk as at the checkpoint, served as export NAME."""
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="also freeze the data: the tracker copies what the VM overwrites, and the "
        "sidecar serves the disk as at this checkpoint as export NAME (a point-in-time backup)",
    )
    p.add_argument(
        "--snapshot-scope",
        choices=("all", "dirty"),
        help="what the snapshot protects: every granule (all, the default: a full backup) "
        "or only those dirty in NAME (dirty: an incremental backup)",
    )
    p.add_argument(
        "--snapshot-dir",
        metavar="DIR",
        help="where the snapshot's store file lives (default: the state directory); asked "
        "of the tracker itself, not through the sidecar",
    )
    p.add_argument(
        "--snapshot-limit",
        type=_byte_count,
        metavar="BYTES",
        help="most bytes the store may hold (e.g. 10g); past it the snapshot breaks "
        "(its reads fail), never the VM's writes",
    )


def add_snapshot_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    state_arg: Callable[[argparse.ArgumentParser], None],
    json_arg: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``snapshot list`` and ``snapshot release NAME``."""
    snapshot = sub.add_parser("snapshot", help="list or release point-in-time snapshots")
    ssub = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    p = ssub.add_parser("list", help="list snapshots: state, protected, copied and store bytes")
    state_arg(p)
    json_arg(p)
    p.set_defaults(func=_command("snapshots.cmd_snapshot_list"))
    p = ssub.add_parser(
        "release", help="end a snapshot and free its store (its export goes; bitmap NAME stays)"
    )
    state_arg(p)
    json_arg(p)
    p.add_argument("name")
    p.set_defaults(func=_command("snapshots.cmd_snapshot_release"))

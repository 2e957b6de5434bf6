"""``dirtydiff track`` and ``dirtydiff serve``: the two long-running processes."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import NoReturn

from dirtydiff import errors, sockets
from dirtydiff.state import StateDir

PLUGIN = Path(__file__).resolve().parent.parent.parent / "nbd_plugins" / "tracker.py"


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
            tls_creds=Path(args.tls_creds) if args.tls_creds else None,
            tls_verify_peer=args.tls_verify_peer,
            tls_authz=Path(args.tls_authz) if args.tls_authz else None,
            tls_unix=args.tls_unix,
            insecure_tcp=args.insecure_tcp,
            metrics_tls_creds=Path(args.metrics_tls_creds) if args.metrics_tls_creds else None,
        )
    )
    return 0

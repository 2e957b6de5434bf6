"""The processes of one scenario: tracker, sidecar, backup servers, CLI.

A ``World`` starts the real programs (nbdkit with the tracker plugin,
``dirtydiff serve``, ``qemu-nbd -r``) on unix sockets in the scenario's temp
dir, kills and restarts them, and stops every one of them in ``close``. The
state directory is a tmpfs of the scenario's own, so that it can be filled up
(and is unmounted in ``close``).

Every process and every CLI call gets ``DIRTYDIFF_BOOT_ID``: the scenario's
host has its own boot id, and a simulated host crash gives it a new one. The
sidecar and the CLI must see the same boot as the tracker, as on a real host,
or they would take every recording bitmap for a crashed one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirtydiff.bitmapfile import BOOT_ID_ENV
from tests.conftest import DIRTYDIFF, ROOT, Processes, Server, run, stop

START_DEADLINE = 30.0
STATE_FS_SIZE = 4 << 20  # bitmaps of a 64 MiB disk at 4 KiB granules are 6 KiB each
MiB = 1 << 20


@dataclass
class Backup:
    """A full copy of the disk, and the qemu-nbd that exports it (when running)."""

    index: int
    path: Path
    sock: Path
    server: Server | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


class World:
    def __init__(self, tmp: Path, rng: random.Random) -> None:
        self.tmp = tmp
        self.procs = Processes(tmp)
        self.size = rng.choice([8, 16, 24, 32, 48, 64]) * MiB + rng.choice([0, 0, 512, 4096 * 3])
        self.granularity = rng.choice([4096, 65536, 1 << 20])
        self.boot_id = rng.randbytes(16).hex()
        self.disk = tmp / "disk.raw"
        self.state = tmp / "state"
        self.tracker_sock = tmp / "tracker.sock"
        self.export_sock = tmp / "export.sock"
        self.tracker: Server | None = None
        self.sidecar: Server | None = None
        self.backups: list[Backup] = []
        self.mounted = False
        self.filler = self.state / "filler"
        self._make_disk(rng)

    # -- set-up and tear-down ---------------------------------------------

    def _make_disk(self, rng: random.Random) -> None:
        """Random content in places and holes elsewhere, as a used disk has."""
        with self.disk.open("wb") as f:
            f.truncate(self.size)
            for _ in range(rng.randint(4, 24)):
                offset = rng.randrange(self.size)
                f.seek(offset)
                f.write(rng.randbytes(min(self.size - offset, rng.randint(1, 4 * MiB))))

    def mount_state(self) -> None:
        self.state.mkdir(mode=0o700)
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={STATE_FS_SIZE},mode=0700", "tmpfs",
             str(self.state)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        # Not root (or no mount in this container): the state is a plain
        # directory and the scenarios skip "state filesystem full".
        self.mounted = mounted.returncode == 0

    def close(self) -> None:
        """Stop everything, unmount, remove the temp dir. Never raises early:
        each step runs even if one before it failed."""
        try:
            self.procs.stop_all()
        finally:
            try:
                if self.mounted:
                    umounted = run(["umount", str(self.state)], check=False)
                    if umounted.returncode != 0:  # a process still in it: lazily
                        run(["umount", "-l", str(self.state)], check=False)
                    self.mounted = False
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        return {BOOT_ID_ENV: self.boot_id}

    # -- the CLI -----------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([*DIRTYDIFF, *args], check=check, cwd=ROOT, env={**os.environ, **self.env})

    def status(self) -> dict[str, dict[str, Any]]:
        """dirtydiff status --json, as {bitmap name: its fields}."""
        found = json.loads(self.cli("status", "--state", str(self.state), "--json").stdout)
        return {b["name"]: b for b in found["bitmaps"]}

    def exported_bitmaps(self) -> set[str]:
        """The qemu:dirty-bitmap:NAME contexts ``nbdinfo --list`` sees offered."""
        listed = run(["nbdinfo", "--list", "--json", self.export_uri])
        contexts: list[str] = json.loads(listed.stdout)["exports"][0]["contexts"]
        prefix = "qemu:dirty-bitmap:"
        return {c[len(prefix) :] for c in contexts if c.startswith(prefix)}

    # -- processes -----------------------------------------------------------

    @property
    def tracker_uri(self) -> str:
        return f"nbd+unix:///?socket={self.tracker_sock}"

    @property
    def export_uri(self) -> str:
        return f"nbd+unix:///?socket={self.export_sock}"

    def _start(self, what: str, starter: Any) -> Server:
        """Start a server, retrying while it refuses for a transient reason
        (a tracker finds the state lock still held by a scan that is about to
        fail because the tracker was down)."""
        end = time.monotonic() + START_DEADLINE
        while True:
            try:
                server: Server = starter()
                return server
            except RuntimeError as e:
                if time.monotonic() > end:
                    raise RuntimeError(f"{what} would not start: {e}") from None
            time.sleep(0.05)  # polling for the cause to go away, under a deadline

    def start_tracker(self) -> None:
        self.tracker = self._start(
            "tracker",
            lambda: self.procs.tracker(
                self.state,
                disk=self.disk,
                sock=self.tracker_sock,
                extra=[f"granularity={self.granularity}"],
                env=self.env,
            ),
        )

    def kill_tracker(self) -> None:
        assert self.tracker is not None
        stop(self.tracker.proc, signal.SIGKILL)
        self.tracker = None

    def stop_tracker(self) -> None:
        """SIGTERM, as a VM's shutdown stops it; returns once it exited."""
        assert self.tracker is not None
        stop(self.tracker.proc, signal.SIGTERM)
        self.tracker = None

    def start_sidecar(self) -> None:
        argv = [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(self.state),
                "--disk", self.tracker_uri, "--socket", str(self.export_sock)]  # fmt: skip
        self.sidecar = self._start(
            "sidecar", lambda: self.procs.start(argv, self.export_sock, self.env)
        )

    def kill_sidecar(self, sig: int = signal.SIGKILL) -> None:
        assert self.sidecar is not None
        stop(self.sidecar.proc, sig)
        self.sidecar = None

    def take_backup(self) -> Backup:
        """A full copy of the disk file as it is now (writes may go on)."""
        backup = Backup(
            len(self.backups),
            self.tmp / f"backup{len(self.backups)}.raw",
            self.tmp / f"backup{len(self.backups)}.sock",
        )
        shutil.copyfile(self.disk, backup.path)
        self.backups.append(backup)
        return backup

    def serve_backup(self, backup: Backup) -> None:
        """Export the backup with qemu-nbd (at the same socket after a kill:
        a scan resumes only against the backup URI it started with)."""
        if backup.server is not None and backup.server.proc.poll() is None:
            return
        argv = ["qemu-nbd", "-t", "-r", "-f", "raw", "-k", str(backup.sock), str(backup.path)]
        backup.server = self._start("qemu-nbd", lambda: self.procs.start(argv, backup.sock))

    def kill_backup(self, backup: Backup) -> None:
        assert backup.server is not None
        stop(backup.server.proc, signal.SIGKILL)
        backup.server = None

    def logs(self) -> str:
        return "\n".join(f"--- {s.log.name}\n{s.stderr()[-3000:]}" for s in self.procs.started)

    # -- the state filesystem --------------------------------------------------

    def fill_state(self) -> None:
        """Take every free byte of the state filesystem."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            free = os.statvfs(self.state).f_bavail * os.statvfs(self.state).f_frsize
            if free:
                os.posix_fallocate(fd, 0, free)
            # What fallocate's rounding left: page by page until ENOSPC.
            os.lseek(fd, 0, os.SEEK_END)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(4096))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def free_state(self) -> None:
        self.filler.unlink(missing_ok=True)

"""One seeded scenario: a disk in use, faults at random moments, then the check.

``Scenario(seed).run()`` makes a disk (8-64 MiB, random content), a state
directory on a tmpfs of its own, and starts the tracker (random granularity
among 4K/64K/1M), the sidecar and writer clients. It takes a full backup B0
before the first write, then plays a random list of actions (or the ``kinds``
it is given), each injecting faults while the writers go on:

- ``kill-tracker``: kill -9 the tracker, sometimes in the middle of a
  checkpoint, and restart it; the writers reconnect;
- ``kill-sidecar`` / ``kill-backup``: kill -9 the export or a backup's
  qemu-nbd, and restart it;
- ``checkpoint``: a checkpoint under heavy writes, then maybe a backup copy
  (and a user bitmap added just before it);
- ``scan``: a background scan against a backup, interrupted part way
  (cancelled, or its sidecar, tracker or backup server killed, or the host
  crashing), then brought to its end: the same command with --wait resumes
  it, unless the sidecar went on with it by itself;
- ``fs-full``: the state filesystem filled; adding a bitmap, a checkpoint and
  a scan must fail with a one-line error while the writers go on; then freed,
  and the same operations succeed;
- ``host-crash``: the tracker and sidecar die with the host, which comes back
  with a new boot id; the bitmaps that were recording must be inconsistent and
  not exported; a scan against a backup makes a new complete one, and
  ``dirtydiff rebuild`` refills one of those the crash spoilt;
- ``wrong-disk``: scans that name another disk (a file of another size as
  disk and backup, a same-sized copy, another state's tracker, a backup's
  qemu-nbd) are refused with one line, and leave nothing under their name;
- ``offline-resume``: the VM stops (writers held, tracker and sidecar
  stopped), an offline scan of the disk file is killed part way, the VM runs
  again for a while and stops, the same scan command resumes: the tracker's
  writes meanwhile must be in the result;
- ``rebind-while-reading``: a client bound to a bitmap reads half of it, the
  bitmap is checkpointed (@open), cleared, removed and added again, or
  disabled, or another checkpoint is taken; the rest of the walk must fail
  with EIO where the name now holds another bitmap, and go on, missing
  nothing, where it does not;
- ``import-killed``: ``bitmap import`` held half way (its source's first
  block status request is held by a relay) is inconsistent and not exported;
  kill -9 leaves it so, SIGTERM removes it; sometimes an import then runs
  whole and completes what its source completed;
- ``clear-after-crash``: after a host crash, clearing or disabling @open is
  refused; clearing a bitmap the crash spoilt makes it a new consistent one
  that counts from the clear;
- ``snapshot`` / ``snapshot-limit`` (only when named): point-in-time
  snapshots read while the writers go on, through kills, trims and a store
  limit (tests/torture/snapshots.py).

The scenario ends by quiescing the writers and running ``verify.check``. The
seed fixes the disk, the actions, their parameters and the writers' requests;
thread and process timing still varies from run to run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from dirtydiff import control, errors
from dirtydiff.bitmapfile import Reason
from tests.conftest import DIRTYDIFF, ROOT, Server, stop
from tests.torture import verify
from tests.torture.model import OPEN, Claim, Model
from tests.torture.relay import HoldingRelay
from tests.torture.snapshots import SnapshotActions
from tests.torture.world import Backup, MiB, World
from tests.torture.writers import WriterPool

ACTIONS = ("kill-tracker", "kill-sidecar", "kill-backup", "checkpoint", "scan", "fs-full",
           "host-crash", "wrong-disk", "offline-resume", "rebind-while-reading",
           "import-killed", "clear-after-crash")  # fmt: skip
# What a client bound to a bitmap meets half way through its walk: the first
# three put another bitmap under the name (EIO), the last two leave it.
REBINDS = ("checkpoint", "clear", "remove-add", "disable", "other-checkpoint")
# What --kinds may name: the actions, one way a scan is interrupted that a
# random "scan" picks only now and then, and each rebind on its own.
# The snapshot actions (tests/torture/snapshots.py) are played when named.
KINDS = (*ACTIONS, "scan-re-add", *(f"rebind-{how}" for how in REBINDS), "snapshot",
         "snapshot-limit")  # fmt: skip
GRANULARITIES = (4096, 65536, 1 << 20)
ACTIVE = ("running", "waiting")  # a sidecar's scan job that has not ended
MAX_BACKUPS = 5  # full copies kept per scenario (disk space, copy time)
JOB_DEADLINE = 120.0


@dataclass
class Outcome:
    seed: int
    actions: list[str]
    faults: Counter[str] = field(default_factory=Counter)
    verdict: verify.Verdict | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # oddities that lose nothing
    error: str | None = None
    seconds: float = 0.0
    description: str = ""
    writes: int = 0
    writer_reconnects: int = 0

    @property
    def failed(self) -> bool:
        return bool(self.error or self.problems or (self.verdict and self.verdict.granules_lost))


class Scenario(SnapshotActions):
    def __init__(self, seed: int, base: Path | None = None, kinds: list[str] | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.base = base
        if kinds is None:
            kinds = [self.rng.choice(ACTIONS) for _ in range(self.rng.randint(3, 6))]
        self.outcome = Outcome(seed, list(kinds))
        self.model = Model()
        self.backup_of: dict[str, Backup] = {}  # bitmaps that count from one backup

    # -- driver -------------------------------------------------------------

    def run(self) -> Outcome:
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"t{self.seed}-", dir=self.base))
        world = World(tmp, self.rng)
        self.world = world
        pool: WriterPool | None = None
        try:
            world.mount_state()
            world.start_tracker()
            world.start_sidecar()
            rng = self.rng
            pool = WriterPool(
                world.tracker_uri,
                world.size,
                rng,
                count=rng.randint(2, 4),
                depth=rng.choice([4, 16, 32, 64]),
                pause=rng.choice([0.03, 0.1, 0.3]),
            )
            self.pool = pool
            self.outcome.description = (
                f"{world.size} bytes, granularity {world.granularity}, "
                f"{len(pool.writers)} writers x {pool.writers[0].depth} in flight"
            )
            b0 = world.take_backup()  # before the first write: the whole chain completes it
            self.model.claims.append(Claim(b0, "B0, before any write", chain_from=0))
            pool.start()
            for action in self.outcome.actions:
                pool.wait_completed(rng.randint(20, 300))
                getattr(self, "_" + action.replace("-", "_"))()
            pool.wait_completed(rng.randint(20, 200))
            pool.quiesce()
            self.outcome.verdict = verify.check(world, self.model)
            self.outcome.problems += self.outcome.verdict.problems
        except Exception:
            self.outcome.error = traceback.format_exc()
        finally:
            if pool is not None:
                pool.stopping.set()
                self.outcome.writes = pool.stats.completed
                self.outcome.writer_reconnects = pool.stats.reconnects
                for error, n in pool.stats.request_errors.items():
                    self.outcome.problems.append(
                        f"{n} write(s) failed on a live connection: {error}"
                    )
            if self.outcome.failed:
                self.outcome.error = (self.outcome.error or "") + "\n" + world.logs()
            try:
                world.close()
            finally:
                if pool is not None:
                    for w in pool.writers:
                        w.thread.join(30)
                shutil.rmtree(tmp, ignore_errors=True)
            self.outcome.seconds = time.monotonic() - started
        return self.outcome

    def expect(self, ok: bool, problem: str) -> None:
        """A broken promise that does not stop the scenario: the final check
        still runs, and finds out what it cost."""
        if not ok:
            self.outcome.problems.append(problem)

    def _expect_clear_error(self, result: subprocess.CompletedProcess[str], what: str) -> bool:
        """A request refused as it should be: exit 1 and one line, no traceback."""
        ok = (
            result.returncode == 1
            and "Traceback" not in result.stderr
            and len(result.stderr.strip().splitlines()) == 1
        )
        self.expect(ok, f"{what}: wanted a one-line error, got {result.returncode}: "
                        f"{result.stdout!r} {result.stderr!r}")  # fmt: skip
        return result.returncode != 0

    @property
    def state(self) -> str:
        return str(self.world.state)

    # -- building blocks -------------------------------------------------------

    def _restart_tracker(self) -> None:
        self.world.start_tracker()

    def _take_checkpoint(self) -> str:
        name = self.model.fresh("cp")
        self.world.cli("checkpoint", "--state", self.state, name)
        self.model.checkpointed(name)
        return name

    def _start_cli(self, *args: str) -> subprocess.Popen[str]:
        """A CLI command in the background (stopped by the caller's finally)."""
        return subprocess.Popen(
            [*DIRTYDIFF, *args], cwd=ROOT, env={**os.environ, **self.world.env},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def _add_user(self, name: str) -> None:
        """bitmap add NAME, and a copy it completes (while room is left)."""
        granularity = self.rng.choice(GRANULARITIES)
        self.world.cli(
            "bitmap", "add", "--state", self.state, "--granularity", str(granularity), name
        )
        self._copy_completed_by(name, f"copied after adding {name}")

    def _copy_completed_by(self, name: str, why: str) -> None:
        """``name`` records every write from now on: a copy taken now is
        completed by it."""
        self.model.recording.add(name)
        self.backup_of.pop(name, None)
        if len(self.world.backups) < MAX_BACKUPS:
            self._recording_since(name, self.world.take_backup(), why)

    def _backup_after_checkpoint(self, name: str) -> None:
        if len(self.world.backups) >= MAX_BACKUPS:
            return
        if self.rng.random() < 0.4:
            # A bitmap added now records every write after the add returned,
            # so a copy made after it is completed by it alone.
            user = self.model.fresh("since")
            granularity = self.rng.choice(GRANULARITIES)
            self.world.cli(
                "bitmap", "add", "--state", self.state, "--granularity", str(granularity), user
            )
            backup = self.world.take_backup()
            self._recording_since(user, backup, f"copied after adding {user}")
        else:
            backup = self.world.take_backup()
        self.model.claims.append(
            Claim(backup, f"copied after checkpoint {name}", chain_from=len(self.model.chain))
        )

    def _job(self, name: str) -> dict[str, Any] | None:
        """The sidecar's job for ``name``; None if this sidecar has none."""
        try:
            job: dict[str, Any] = control.call(
                self.world.state / "sidecar.sock", "scan.status", name=name
            )
        except errors.NotFound:
            return None
        return job

    def _wait_job(
        self, name: str, done: Callable[[dict[str, Any] | None], bool]
    ) -> dict[str, Any] | None:
        """Poll the sidecar's scan job until ``done(job)``, under a deadline."""
        end = time.monotonic() + JOB_DEADLINE
        while True:
            job = self._job(name)
            if done(job):
                return job
            if time.monotonic() > end:
                raise TimeoutError(f"scan of {name}: still {job}")
            time.sleep(0.02)  # polling the job's state under a deadline

    def _saved_position(self, name: str) -> int:
        try:
            record = json.loads((self.world.state / "scans" / f"{name}.json").read_text())
            return int(record["position"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0  # not saved yet, or caught half written

    def _scan_args(self, name: str, backup: Backup, granularity: int) -> list[str]:
        return ["scan", "--state", self.state, "--disk", self.world.tracker_uri, "--backup",
                backup.uri, "--bitmap", name, "--granularity", str(granularity)]  # fmt: skip

    def _finish_scan(self, name: str, backup: Backup, args: list[str], counter: str) -> None:
        """The same command with --wait resumes the scan and follows it to its end."""
        self.world.cli(*args, "--wait")
        self.outcome.faults[counter] += 1
        self._recording_since(name, backup, f"scan of {name}")

    def _recording_since(self, name: str, backup: Backup, why: str) -> None:
        """``name`` records from now on every change since ``backup``."""
        self.model.recording.add(name)
        self.model.claims.append(Claim(backup, why, names=(name,)))
        self.backup_of[name] = backup

    def _not_offered(self, name: str, while_: str) -> None:
        status = self.world.status()
        self.expect(
            name not in status or not status[name]["consistent"],
            f"{name!r} reported consistent {while_}",
        )
        self.expect(name not in self.world.exported_bitmaps(), f"export offers {name!r} {while_}")

    # -- actions ---------------------------------------------------------------

    def _kill_tracker(self) -> None:
        world, rng = self.world, self.rng
        if rng.random() < 0.35:
            # In the middle of a checkpoint under load: did it happen or not,
            # the restarted tracker must know, and lose nothing either way.
            name = self.model.fresh("cp")
            argv = [*DIRTYDIFF, "checkpoint", "--state", self.state, name]
            proc = subprocess.Popen(
                argv, cwd=ROOT, env={**os.environ, **world.env}, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                time.sleep(rng.uniform(0.0, 0.2))  # a random moment: the fault, not a wait
                world.kill_tracker()
            finally:
                proc.communicate(timeout=60)
            self._restart_tracker()
            if name in world.status():
                self.model.checkpointed(name)
            self.outcome.faults["kill-tracker-mid-checkpoint"] += 1
        else:
            world.kill_tracker()
            self._restart_tracker()
        self.outcome.faults["kill-tracker"] += 1
        self.pool.wait_completed(rng.randint(10, 50))  # the VM came back

    def _kill_sidecar(self) -> None:
        self.world.kill_sidecar()
        self.world.start_sidecar()
        self.outcome.faults["kill-sidecar"] += 1

    def _kill_backup(self) -> None:
        backup = self.rng.choice(self.world.backups)
        self.world.serve_backup(backup)
        self.world.kill_backup(backup)
        self.world.serve_backup(backup)
        self.outcome.faults["kill-backup"] += 1

    def _checkpoint(self) -> None:
        name = self._take_checkpoint()
        self.outcome.faults["checkpoint-under-load"] += 1
        if self.rng.random() < 0.8:
            self._backup_after_checkpoint(name)

    def _scan_re_add(self) -> None:
        self._scan(how="re-add")

    def _scan(self, how: str | None = None) -> None:
        world, rng = self.world, self.rng
        backup = rng.choice(world.backups)
        world.serve_backup(backup)
        name = self.model.fresh("scan")
        args = self._scan_args(name, backup, rng.choice(GRANULARITIES))
        # Slow enough (4-8 s for both sides' reads) that the interruption
        # lands part way through, once a position was saved to resume from.
        # Small chunks, few in flight: the scan saves positions as it goes
        # (it saves one only between rounds of requests in flight).
        args += ["--chunk-size", rng.choice(["64k", "256k", "1m"]),
                 "--in-flight", str(rng.choice([1, 2, 4]))]  # fmt: skip
        world.cli(*args, "--max-rate", str(int(2 * world.size / rng.uniform(4.0, 8.0))))
        self._wait_job(
            name, lambda j: j is None or j["state"] not in ACTIVE or self._saved_position(name) > 0
        )
        how = how or rng.choice(["cancel", "cancel", "kill-sidecar", "kill-tracker",
                                 "kill-backup", "host-crash", "re-add"])  # fmt: skip
        if how == "re-add":
            self._re_add_mid_scan(name, backup, args)
            return
        if how == "cancel":
            world.cli("scan", "--state", self.state, "--bitmap", name, "--cancel")
            self._wait_job(name, lambda j: j is None or j["state"] not in ACTIVE)
            self.outcome.faults["scan-cancelled"] += 1
        elif how == "kill-sidecar":
            self._kill_sidecar()
        elif how == "kill-tracker":
            # No waiting for the job to notice: it may fail, or wait for the
            # tracker to come back; either way the scan must end complete.
            world.kill_tracker()
            self._restart_tracker()
            self.outcome.faults["kill-tracker"] += 1
        elif how == "kill-backup":
            world.kill_backup(backup)
            world.serve_backup(backup)
            self.outcome.faults["kill-backup"] += 1
        else:
            self._crash_host()
        # Exported first, status second: here a bitmap only ever turns
        # consistent, so one offered while reported inconsistent is a lie.
        exported = world.exported_bitmaps()
        consistent = world.status()[name]["consistent"]
        self.expect(
            consistent or name not in exported,
            f"export offers {name!r} while its scan is interrupted ({how})",
        )
        self._complete_scan(name, backup, args)

    def _re_add_mid_scan(self, name: str, backup: Backup, args: list[str]) -> None:
        """The scan is stopped, its user removes the bitmap and adds it again
        saying it counts from the same backup: the same scan command must
        not take the new bitmap for its result (it compared nothing for it).
        It is refused, its record is forgotten, and once the name is free
        again the scan runs whole."""
        world = self.world
        world.cli("scan", "--state", self.state, "--bitmap", name, "--cancel")
        self._wait_job(name, lambda j: j is None or j["state"] not in ACTIVE)
        world.cli("bitmap", "remove", name, "--state", self.state)
        world.cli("bitmap", "add", name, "--state", self.state, "--backup", backup.uri,
                  "--granularity", args[args.index("--granularity") + 1])  # fmt: skip
        rerun = world.cli(*args, "--wait", check=False)
        if self._expect_clear_error(rerun, f"the scan of {name} run again over a new {name}"):
            self.expect("already exists" in rerun.stderr, f"scan over a new {name}: {rerun.stderr}")
        self.expect(
            not (world.state / "scans" / f"{name}.json").exists(),
            f"the scan record of {name} outlived the bitmap it was filling",
        )
        world.cli("bitmap", "remove", name, "--state", self.state)
        world.cli(*args, "--wait")
        self.outcome.faults["scan-bitmap-re-added"] += 1
        self._recording_since(name, backup, f"scan of {name}, after a re-added {name}")

    def _complete_scan(self, name: str, backup: Backup, args: list[str]) -> None:
        """Bring an interrupted scan to its end, as its user would: the same
        command with --wait resumes it, unless the sidecar already went on
        with it by itself (it resumes interrupted scans when it starts, and
        waits for a tracker or backup server that went away)."""
        world = self.world
        end = time.monotonic() + JOB_DEADLINE
        while True:
            self._wait_job(name, lambda j: j is None or j["state"] not in ACTIVE)
            if world.status()[name]["consistent"]:
                self.outcome.faults["scan-completed-by-sidecar"] += 1
                break
            rerun = world.cli(*args, "--wait", check=False)
            if rerun.returncode == 0:
                self.outcome.faults["scan-resumed"] += 1
                break
            if "already running" not in rerun.stderr or time.monotonic() > end:
                raise AssertionError(f"resuming the scan of {name}: {rerun.stderr}")
        self._recording_since(name, backup, f"scan of {name}")

    def _fs_full(self) -> None:
        world, rng = self.world, self.rng
        if not world.mounted:
            return
        backup = rng.choice(world.backups)
        world.serve_backup(backup)
        user, cp, scan = self.model.fresh("full"), self.model.fresh("cp"), self.model.fresh("scan")
        scan_args = self._scan_args(scan, backup, rng.choice(GRANULARITIES))
        world.fill_state()
        self.outcome.faults["state-fs-full"] += 1
        try:
            self.pool.wait_completed(rng.randint(10, 100))  # the VM's writes go on
            refused = world.cli("bitmap", "add", "--state", self.state, user, check=False)
            self._expect_clear_error(refused, "bitmap add on a full state filesystem")
            refused = world.cli("checkpoint", "--state", self.state, cp, check=False)
            if not self._expect_clear_error(refused, "checkpoint on a full state filesystem"):
                self.model.checkpointed(cp)
            refused = world.cli(*scan_args, "--wait", check=False)
            self._expect_clear_error(refused, "scan on a full state filesystem")
            self.pool.wait_completed(rng.randint(10, 100))
            status = world.status()
            self.expect(user not in status, f"a failed bitmap add left {status.get(user)}")
            self._not_offered(scan, "after its scan failed for lack of space")
        finally:
            world.free_state()
        # With room again, the same requests succeed and the chain goes on.
        if user not in world.status():
            world.cli("bitmap", "add", "--state", self.state, user)
        self.model.recording.add(user)
        if cp not in self.model.chain:
            world.cli("checkpoint", "--state", self.state, cp)
            self.model.checkpointed(cp)
        backup_now = world.take_backup() if len(world.backups) < MAX_BACKUPS else None
        if backup_now is not None:
            self.model.claims.append(
                Claim(backup_now, f"copied after {cp}", chain_from=len(self.model.chain))
            )
        self._finish_scan(scan, backup, scan_args, "scan-retried-with-room")

    def _crash_host(self) -> None:
        """kill -9 of everything on the host, and a new boot."""
        world = self.world
        world.kill_tracker()
        world.kill_sidecar()
        world.boot_id = self.rng.randbytes(16).hex()
        self.model.host_crashed()
        self.outcome.faults["host-crash"] += 1
        world.start_tracker()
        world.start_sidecar()
        status, exported = world.status(), world.exported_bitmaps()
        for name in sorted(self.model.expected_inconsistent()):
            self.expect(
                name in status and not status[name]["consistent"],
                f"after a host crash {name!r} is {status.get(name)}",
            )
            self.expect(name not in exported, f"after a host crash the export offers {name!r}")

    def _host_crash(self) -> None:
        world, rng = self.world, self.rng
        self._crash_host()
        self.pool.wait_completed(rng.randint(10, 100))
        # Rebuild: a diff scan against a backup the lost bitmaps referred to.
        backup = rng.choice(world.backups)
        world.serve_backup(backup)
        name = self.model.fresh("rebuilt")
        args = self._scan_args(name, backup, rng.choice(GRANULARITIES))
        world.cli(*args, "--wait")
        self._recording_since(name, backup, f"{name}, after a host crash")
        lost = sorted(set(self.backup_of) & self.model.doubtful)
        if lost and rng.random() < 0.7:
            # dirtydiff rebuild refills a bitmap the crash made inconsistent,
            # against the backup it counts from; its claim holds again.
            victim = rng.choice(lost)
            world.serve_backup(self.backup_of[victim])
            # --backup even where the bitmap records it: one added without
            # --backup is rebuilt against the backup given (and records it).
            world.cli("rebuild", "--state", self.state, victim, "--backup",
                      self.backup_of[victim].uri, "--wait")  # fmt: skip
            self.model.doubtful.discard(victim)
            self.outcome.faults["rebuild"] += 1
        if rng.random() < 0.5:
            # The next checkpoint freezes the doubtful @open; the new one is whole.
            cp = self._take_checkpoint()
            self._backup_after_checkpoint(cp)
        assert OPEN in world.status()

    # -- operator paths ----------------------------------------------------------

    def _scan_refused(self, args: list[str], what: str, why: str) -> None:
        """A scan that must be refused before it makes anything."""
        name = args[args.index("--bitmap") + 1]
        refused = self.world.cli(*args, check=False)
        if self._expect_clear_error(refused, f"a scan of {what}"):
            self.expect(why in refused.stderr, f"a scan of {what}: {refused.stderr.strip()!r}")
        status = self.world.status()
        self.expect(name not in status, f"a refused scan of {what} left {status.get(name)}")
        self.expect(
            not (self.world.state / "scans" / f"{name}.json").exists(),
            f"a refused scan of {what} left a scan record",
        )
        if self.world.sidecar is not None:
            self._not_offered(name, f"after its scan of {what} was refused")
        self.outcome.faults["wrong-disk-refused"] += 1

    def _wrong_disk(self) -> None:
        """While the VM writes, scans that read another disk than this
        state's: each would call a written granule clean."""
        world, rng = self.world, self.rng
        backup = rng.choice(world.backups)
        world.serve_backup(backup)
        small, copy = world.tmp / "small.raw", world.tmp / "copy.raw"
        with small.open("wb") as f:
            f.truncate(rng.choice([MiB, world.size // 2, world.size + 65536]))
        shutil.copyfile(backup.path, copy)  # the same size, another file
        other_state = world.tmp / "other-state"
        other_state.mkdir(mode=0o700)
        other: Server | None = None
        try:
            other = world.procs.tracker(other_state, disk=copy, sock=world.tmp / "other.sock")
            cases = [
                (str(small), str(small), "a file of another size", "bytes"),
                (str(copy), backup.uri, "a copy of a backup", "is not the disk of"),
                (other.uri, backup.uri, "another state's tracker",
                 "tracker of another state directory"),
                # The copy as the backup: qemu-nbd serves one client at a time.
                (backup.uri, str(copy), "a backup's qemu-nbd", "cannot tell that"),
            ]  # fmt: skip
            rng.shuffle(cases)
            for disk, against, what, why in cases:
                name = self.model.fresh("wrong")
                args = ["scan", "--state", self.state, "--disk", disk, "--backup", against,
                        "--bitmap", name, "--granularity", str(rng.choice(GRANULARITIES)),
                        "--wait"]  # fmt: skip
                self._scan_refused(args, what, why)
                self.pool.wait_completed(rng.randint(5, 30))
        finally:
            if other is not None:
                stop(other.proc)
            small.unlink(missing_ok=True)
            copy.unlink(missing_ok=True)
            shutil.rmtree(other_state, ignore_errors=True)

    def _offline_resume(self) -> None:
        """The VM stops; an offline scan of its disk file is killed part way;
        the VM runs again (a tracker that starts records its writes for the
        scan, in @scan:NAME) and stops; the same command resumes the scan,
        and its result must hold those writes."""
        world, rng, pool = self.world, self.rng, self.pool
        backup = rng.choice(world.backups)
        world.serve_backup(backup)
        name = self.model.fresh("offline")
        args = ["scan", "--state", self.state, "--disk", str(world.disk), "--backup", backup.uri,
                "--bitmap", name, "--granularity", str(rng.choice(GRANULARITIES)),
                "--chunk-size", rng.choice(["64k", "256k", "1m"]),
                "--in-flight", str(rng.choice([1, 2, 4])), "--json"]  # fmt: skip
        pool.hold()  # the VM stops: nothing in flight, no connection
        # A sidecar would go on with the scan itself once it starts (it
        # resumes what it finds unfinished): it is stopped with the VM.
        world.kill_sidecar(rng.choice([signal.SIGTERM, signal.SIGKILL]))
        world.stop_tracker()
        copy = world.tmp / "copy.raw"
        shutil.copyfile(backup.path, copy)
        try:
            wrong = ["scan", "--state", self.state, "--disk", str(copy), "--backup", backup.uri,
                     "--bitmap", self.model.fresh("wrong")]  # fmt: skip
            self._scan_refused(wrong, "a copy of a backup, offline", "is not the disk of")
        finally:
            copy.unlink()
        # Slow (4-8 s for both sides' reads): the kill lands part way.
        rate = str(int(2 * world.size / rng.uniform(4.0, 8.0)))
        proc = self._start_cli(*args, "--max-rate", rate)
        try:
            end = time.monotonic() + JOB_DEADLINE
            while self._saved_position(name) == 0 and proc.poll() is None:
                if time.monotonic() > end:
                    raise TimeoutError(f"offline scan of {name}: no position saved")
                time.sleep(0.02)  # polling for a saved position, under a deadline
        finally:
            proc.kill()
            _, stderr = proc.communicate(timeout=60)
        killed = proc.returncode == -signal.SIGKILL
        if not killed:  # it ended before the kill
            if proc.returncode != 0:
                raise AssertionError(f"offline scan of {name}: {stderr}")
            self.outcome.notes.append(f"the offline scan of {name} ended before its kill")
        world.start_tracker()
        if killed:
            self.expect(
                not world.status()[name]["consistent"],
                f"{name!r} reported consistent while its offline scan is killed part way",
            )
        pool.release()
        pool.wait_completed(rng.randint(20, 300))  # the VM writes, the tracker records
        # And where the scan already compared, away from the writers' hot
        # regions: a later write there would mark what a lost one missed.
        self._write_before(self._saved_position(name))
        pool.hold()
        world.stop_tracker()
        if killed:  # the same command goes on with it
            result = json.loads(world.cli(*args).stdout)
            resumed = int(result["resumed_from"]) > 0
            counter = "offline-scan-resumed" if resumed else "offline-scan-restarted"
            self.outcome.faults[counter] += 1
        world.start_tracker()
        world.start_sidecar()
        pool.release()
        self._recording_since(name, backup, f"offline scan of {name}, resumed after the VM ran")

    def _write_before(self, position: int) -> None:
        """A few writes of new bytes through the tracker, below ``position``."""
        h = nbd.NBD()
        h.connect_uri(self.world.tracker_uri)
        try:
            for _ in range(self.rng.randint(1, 4)):
                offset = self.rng.randrange(max(1, min(position, self.world.size - 4096)))
                h.pwrite(self.rng.randbytes(4096), offset)
        finally:
            h.shutdown()
        self.outcome.faults["written-while-scan-stopped"] += 1

    def _rebind_checkpoint(self) -> None:
        self._rebind_while_reading("checkpoint")

    def _rebind_clear(self) -> None:
        self._rebind_while_reading("clear")

    def _rebind_remove_add(self) -> None:
        self._rebind_while_reading("remove-add")

    def _rebind_disable(self) -> None:
        self._rebind_while_reading("disable")

    def _rebind_other_checkpoint(self) -> None:
        self._rebind_while_reading("other-checkpoint")

    def _bound_target(self, how: str) -> str:
        """The bitmap a client binds to, for what ``how`` does next."""
        model = self.model
        if how == "checkpoint":
            return OPEN
        if how == "other-checkpoint":
            # Bound to the last checkpoint, which the next one leaves alone
            # (one that froze a doubtful @open is not exported: freeze again).
            while not model.chain or model.chain[-1] in model.doubtful:
                self._take_checkpoint()
            return model.chain[-1]
        candidates = sorted(model.recording - model.doubtful)
        if candidates and self.rng.random() < 0.6:
            return self.rng.choice(candidates)
        name = model.fresh("bound")
        self._add_user(name)
        return name

    def _rebind(self, how: str, name: str) -> None:
        """Do ``how`` to ``name``, and tell the model what it changed."""
        world, model = self.world, self.model
        if how in ("checkpoint", "other-checkpoint"):
            cp = self._take_checkpoint()
            if self.rng.random() < 0.8:
                self._backup_after_checkpoint(cp)
        elif how == "clear":
            world.cli("bitmap", "clear", "--state", self.state, name)
            model.forget(name)
            self._copy_completed_by(name, f"copied after clearing {name}")
            cleared = world.status()[name]
            self.expect(
                cleared["consistent"] and cleared["backup"] == "",
                f"cleared {name!r} is {cleared}",
            )
        elif how == "remove-add":
            world.cli("bitmap", "remove", "--state", self.state, name)
            model.forget(name)
            self._add_user(name)
        else:
            world.cli("bitmap", "disable", "--state", self.state, name)
            model.disabled(name)
            self.backup_of.pop(name, None)

    def _rebind_while_reading(self, how: str | None = None) -> None:
        """A backup tool's connection bound to a bitmap reads its first half;
        then the bitmap is checkpointed, cleared, removed and added again,
        disabled, or another checkpoint is taken; then it reads the rest.

        Where the name now holds another bitmap the rest must fail with EIO
        (finishing the walk in the new bitmap would miss what the first
        half found dirty); an answer is accepted only if it is the chosen
        bitmap's. Where it holds the same one (disabled: frozen), the walk
        goes on and misses nothing the bitmap held."""
        world, rng, pool = self.world, self.rng, self.pool
        how = how or rng.choice(REBINDS)
        if how == "checkpoint" and self.model.open_doubtful:
            how = "other-checkpoint"  # the crashed @open is not exported
        name = self._bound_target(how)
        self.outcome.faults[f"rebind-{how}"] += 1
        granularity = int(world.status()[name]["granularity"])
        half = max(granularity, world.size // 2 // granularity * granularity)
        context = f"qemu:dirty-bitmap:{name}"
        h = nbd.NBD()
        h.add_meta_context(context)
        h.connect_uri(world.export_uri)
        answers: list[tuple[int, int, list[tuple[int, int]]]] = []
        failures: list[nbd.Error] = []
        try:
            if not h.can_meta_context(context):
                self.expect(False, f"the export refuses {context} to a client that binds to it")
                return
            first = verify.read_dirty(h, context, 0, half)
            pool.wait_completed(rng.randint(5, 50))
            # Everything dirty now stays dirty in the bitmap the client chose.
            before = verify.dirty_ranges(world.export_uri, name, world.size)
            self._rebind(how, name)
            pool.wait_completed(rng.randint(5, 50))
            # The rest of the walk, then the first half again: no request
            # may answer from another bitmap, the first failed or not.
            for start, length in ((half, world.size - half), (0, half)):
                try:
                    answers.append((start, length, verify.read_dirty(h, context, start, length)))
                except nbd.Error as e:
                    failures.append(e)
        finally:
            with contextlib.suppress(nbd.Error):
                h.shutdown()

        def dirty(ranges: list[tuple[int, int]], start: int, length: int) -> set[int]:
            """The granules dirty in ``ranges`` within [start, start+length)
            (a granule boundary: ``half`` is one)."""
            found: set[int] = set()
            for offset, n in ranges:
                low, high = max(offset, start), min(offset + n, start + length)
                if low < high:
                    found.update(verify.granules(low, high - low, granularity))
            return found

        stays = how in ("disable", "other-checkpoint")
        for failure in failures:
            self.expect(
                failure.errno == "EIO" and not stays,
                f"a client bound to {name!r}, after {how}: {failure.errno} {failure.string}",
            )
        for start, length, ranges in answers:
            # ``first`` is in ``before`` (read later, of the same bitmap).
            missing = dirty(before, start, length) - dirty(ranges, start, length)
            self.expect(
                not missing,
                f"a client bound to {name!r} read {len(missing)} granule(s) clean after {how} "
                "that its bitmap had dirty: it answered from another bitmap",
            )
        missing_first = dirty(first, 0, half) - dirty(before, 0, half)
        self.expect(not missing_first, f"{name!r} lost {len(missing_first)} dirty granule(s)")
        if stays and not failures:
            self.outcome.faults["bound-client-read-on"] += 1
        elif not stays and not answers and all(f.errno == "EIO" for f in failures):
            self.outcome.faults["rebound-client-eio"] += 1
        elif not stays:
            self.outcome.notes.append(f"a client bound to {name!r} was answered after {how}")
        if name != OPEN or not self.model.open_doubtful:
            self.expect(name in world.exported_bitmaps(), f"after {how} the export drops {name!r}")

    def _import_killed(self) -> None:
        """bitmap import held half way: inconsistent and not exported while
        it runs; kill -9 leaves it so, SIGTERM removes it. Then, now and
        then, an import run whole completes what its source completed."""
        world, rng = self.world, self.rng
        if not world.exported_bitmaps():
            self._take_checkpoint()  # nothing consistent left by a crash: a new @open is
        for sig in rng.sample([signal.SIGKILL, signal.SIGTERM], 2):
            self._import_stopped(sig, rng.choice(sorted(world.exported_bitmaps())))
        if rng.random() < 0.5:
            self._import_whole()

    def _import_stopped(self, sig: int, source: str) -> None:
        world = self.world
        name = self.model.fresh("import")
        relay = HoldingRelay(world.export_sock, world.tmp / f"{name}-relay.sock")
        proc: subprocess.Popen[str] | None = None
        try:
            proc = self._start_cli("bitmap", "import", "--state", self.state, name,
                                   "--from", relay.uri, "--context",
                                   f"qemu:dirty-bitmap:{source}")  # fmt: skip
            end = time.monotonic() + JOB_DEADLINE
            # Held at its first block status request: NAME exists by then.
            while not relay.held.wait(0.02) and proc.poll() is None:
                if time.monotonic() > end:
                    raise TimeoutError(f"import of {name} never asked for block status")
            if proc.poll() is not None:
                raise AssertionError(f"import of {name} ended unheld: {proc.communicate()}")
            found = world.status().get(name)
            self.expect(
                found is not None
                and not found["consistent"]
                and found["reason"] == Reason.IMPORT_IN_PROGRESS.describe(),
                f"half way through its import {name!r} is {found}",
            )
            self.expect(name not in world.exported_bitmaps(), f"export offers half made {name!r}")
            proc.send_signal(sig)  # SIGTERM acts once the held request is answered
            if sig == signal.SIGKILL:
                proc.wait(60)
        finally:
            relay.release()
            if proc is not None:
                try:
                    proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
            relay.close()
        self.expect(proc.returncode != 0, f"the import of {name} stopped by {sig} exited 0")
        found = world.status().get(name)
        if sig == signal.SIGKILL:
            self.expect(
                found is not None
                and not found["consistent"]
                and found["reason"] == Reason.IMPORT_IN_PROGRESS.describe(),
                f"after its import was killed -9 {name!r} is {found}",
            )
            self.expect(name not in world.exported_bitmaps(), f"export offers {name!r} killed")
            shown = world.cli("bitmap", "show", "--state", self.state, name, check=False)
            self._expect_clear_error(shown, f"bitmap show of {name}, killed half imported")
            world.cli("bitmap", "remove", "--state", self.state, name)
            self.outcome.faults["import-killed-9"] += 1
        else:
            self.expect(found is None, f"after its import got SIGTERM {name!r} is {found}")
            self.outcome.faults["import-terminated"] += 1

    def _import_whole(self) -> None:
        """NAME joins the recording set before the source is read: it holds
        what its source held, and every write after: it completes every
        backup its source completes alone."""
        world, model = self.world, self.model
        sources = ([] if model.open_doubtful else [OPEN]) + sorted(model.recording - model.doubtful)
        if not sources:
            return
        source = self.rng.choice(sources)
        name = model.fresh("import")
        world.cli("bitmap", "import", "--state", self.state, name, "--from", world.export_uri,
                  "--context", f"qemu:dirty-bitmap:{source}")  # fmt: skip
        model.recording.add(name)
        for claim in list(model.claims):
            alone = (claim.chain_from == len(model.chain)) if source == OPEN else (
                claim.names == (source,))  # fmt: skip
            if alone:
                model.claims.append(Claim(claim.backup, f"{claim.why}, via {name}", names=(name,)))
                self.backup_of.setdefault(name, claim.backup)
        self.outcome.faults["import-whole"] += 1

    def _clear_after_crash(self) -> None:
        """After a host crash: @open can be neither cleared nor disabled; a
        bitmap the crash spoilt, cleared, is a new one that counts from the
        clear (and names no backup)."""
        world, rng, model = self.world, self.rng, self.model
        if not model.recording:
            self._add_user(model.fresh("since"))
        self._crash_host()
        self.pool.wait_completed(rng.randint(10, 100))
        for op in ("clear", "disable"):
            refused = world.cli("bitmap", op, "--state", self.state, OPEN, check=False)
            if self._expect_clear_error(refused, f"bitmap {op} @open after a host crash"):
                self.expect(OPEN in refused.stderr, f"bitmap {op} @open: {refused.stderr!r}")
        self.expect(not world.status()[OPEN]["consistent"], "@open turned consistent, refused")
        victim = rng.choice(sorted(model.doubtful & model.recording))
        world.cli("bitmap", "clear", "--state", self.state, victim)
        cleared = world.status()[victim]
        self.expect(
            cleared["consistent"] and cleared["backup"] == "",
            f"{victim!r} cleared after a host crash is {cleared}",
        )
        self.expect(victim in world.exported_bitmaps(), f"the export drops cleared {victim!r}")
        model.doubtful.discard(victim)
        model.forget(victim)
        self._copy_completed_by(victim, f"copied after clearing {victim} after a host crash")
        self.outcome.faults["clear-after-crash"] += 1
        if rng.random() < 0.5:
            cp = self._take_checkpoint()
            self._backup_after_checkpoint(cp)

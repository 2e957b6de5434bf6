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
  ``dirtydiff rebuild`` refills one of those the crash spoilt.

The scenario ends by quiescing the writers and running ``verify.check``. The
seed fixes the disk, the actions, their parameters and the writers' requests;
thread and process timing still varies from run to run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dirtydiff import control, errors
from tests.conftest import DIRTYDIFF, ROOT
from tests.torture import verify
from tests.torture.model import OPEN, Claim, Model
from tests.torture.world import Backup, World
from tests.torture.writers import WriterPool

ACTIONS = ("kill-tracker", "kill-sidecar", "kill-backup", "checkpoint", "scan", "fs-full",
           "host-crash")  # fmt: skip
# What --kinds may name: the actions, and one way a scan is interrupted that
# a random "scan" picks only now and then.
KINDS = (*ACTIONS, "scan-re-add")
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


class Scenario:
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

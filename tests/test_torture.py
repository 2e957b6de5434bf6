"""The torture suite's short run: seeded scenarios with faults, no granule lost.

Each test plays one scenario (tests/torture/scenario.py) with a fixed seed and
a fixed list of actions, so that every kind of fault and operator path is
played on every run; the last one plays random scenarios from a fixed master seed. Every scenario
ends with the check of tests/torture/verify.py. The long run is
``.venv/bin/python -m tests.torture --scenarios 200 --seed N``.
"""

from __future__ import annotations

import os

import pytest

from tests.torture.runner import describe, run_scenarios, scenario_seeds
from tests.torture.scenario import Outcome, Scenario

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="fills a tmpfs of its own as the state dir (mount needs root)"
)


def play(seed: int, kinds: list[str]) -> Outcome:
    outcome = Scenario(seed, kinds=kinds).run()
    assert not outcome.failed, describe(1, 1, outcome)
    assert outcome.verdict is not None and outcome.verdict.granules_lost == 0
    assert outcome.verdict.claims_verified >= 1
    return outcome


def test_kill9_of_tracker_sidecar_and_backup_server_loses_no_write() -> None:
    outcome = play(101, ["kill-tracker", "kill-sidecar", "kill-backup", "kill-tracker"])
    assert outcome.faults["kill-tracker"] >= 2
    assert outcome.faults["kill-sidecar"] >= 1 and outcome.faults["kill-backup"] >= 1
    assert outcome.writer_reconnects > 0  # the VM's connections died and came back


def test_checkpoints_under_heavy_writes_complete_every_later_backup() -> None:
    outcome = play(202, ["checkpoint", "checkpoint", "kill-tracker", "checkpoint"])
    assert outcome.faults["checkpoint-under-load"] == 3
    assert outcome.verdict is not None and outcome.verdict.claims_verified >= 3


def test_scans_interrupted_and_resumed_rebuild_complete_bitmaps() -> None:
    outcome = play(303, ["scan", "scan", "scan", "scan-re-add"])
    finished = outcome.faults["scan-resumed"] + outcome.faults["scan-completed-by-sidecar"]
    assert finished + outcome.faults["scan-bitmap-re-added"] == 4, outcome.faults
    assert outcome.faults["scan-resumed"] >= 1, outcome.faults
    assert outcome.faults["scan-bitmap-re-added"] >= 1, outcome.faults


@needs_root
def test_full_state_filesystem_fails_requests_cleanly_and_loses_nothing() -> None:
    outcome = play(404, ["fs-full", "checkpoint", "fs-full"])
    assert outcome.faults["state-fs-full"] == 2
    assert outcome.faults["scan-retried-with-room"] == 2


def test_host_crash_makes_bitmaps_inconsistent_unexported_and_a_scan_rebuilds_one() -> None:
    outcome = play(505, ["scan", "host-crash", "checkpoint"])
    assert outcome.faults["host-crash"] == 1
    # The claims through the crashed @open cannot be proven: they were
    # checked to be reported inconsistent and not exported instead.
    assert outcome.verdict is not None and outcome.verdict.claims_unprovable >= 1


def test_scans_of_a_wrong_disk_are_refused_and_an_offline_scan_resumes_whole() -> None:
    outcome = play(606, ["wrong-disk", "offline-resume", "checkpoint", "offline-resume"])
    # Four online cases, and a copy as the disk of each offline scan.
    assert outcome.faults["wrong-disk-refused"] == 6, outcome.faults
    # Killed part way, the VM ran and wrote where it had compared: resumed.
    assert outcome.faults["offline-scan-resumed"] >= 1, outcome.faults
    assert outcome.faults["written-while-scan-stopped"] == 2


def test_a_client_bound_to_a_bitmap_never_ends_its_walk_in_another() -> None:
    kinds = ["rebind-checkpoint", "rebind-clear", "rebind-remove-add", "rebind-disable",
             "rebind-other-checkpoint"]  # fmt: skip
    outcome = play(707, kinds)
    # Checkpoint of @open, clear, remove and add: EIO. Disabled, or another
    # checkpoint taken: the walk goes on, missing nothing.
    assert outcome.faults["rebound-client-eio"] == 3, outcome.faults
    assert outcome.faults["bound-client-read-on"] == 2, outcome.faults


def test_imports_stopped_half_way_and_a_clear_after_a_host_crash() -> None:
    outcome = play(810, ["import-killed", "clear-after-crash", "checkpoint", "import-killed"])
    assert outcome.faults["import-killed-9"] == 2 and outcome.faults["import-terminated"] == 2
    assert outcome.faults["clear-after-crash"] == 1


def test_random_scenarios_from_a_fixed_seed_lose_no_granule() -> None:
    lines: list[str] = []
    summary = run_scenarios(scenario_seeds(20261125, 2), master=20261125, out=lines.append)
    assert not summary.failed, "\n".join(lines)
    assert summary.granules_lost == 0
    assert sum(summary.faults.values()) > 0, "\n".join(lines)
    assert summary.bytes_verified > 0


def test_snapshots_read_the_instant_through_kills_trims_and_limits() -> None:
    outcome = play(909, ["snapshot", "snapshot", "kill-tracker", "snapshot-limit", "snapshot"])
    reads = outcome.faults["snapshot-read-all"] + outcome.faults["snapshot-read-dirty"]
    assert reads == 3 and outcome.faults["snapshot-released"] == 3, outcome.faults
    assert outcome.faults["snapshot-wrong-data"] == 0
    assert outcome.faults["snapshot-tracker-killed"] >= 1, outcome.faults

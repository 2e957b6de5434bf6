"""Scans as background jobs of a running sidecar, watched through /metrics.

``dirtydiff scan`` with a sidecar running returns at once; the scan runs in the
sidecar, ``--wait`` follows it, ``--cancel`` stops it, and Prometheus sees its
progress rise to completion.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from dirtydiff.state import StateDir
from sidecar.scan.job import ScanRecord
from tests.conftest import Processes, Server, dirtydiff, qemu_io
from tests.test_scan import BACKUP, differing, dirty_set, pair_files

MiB = 1 << 20


def sidecar(procs: Processes, tmp_path: Path, state: Path, disk_uri: str) -> tuple[Server, int]:
    sock = tmp_path / "export.sock"
    server = procs.start(
        [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk", disk_uri,
         "--socket", str(sock), "--metrics", "127.0.0.1:0"],
        sock,
    )  # fmt: skip
    end = time.monotonic() + 30
    while "metrics on" not in server.stderr():
        assert time.monotonic() < end, server.stderr()
        time.sleep(0.02)  # polling the log for the chosen port, under a deadline
    port = int(re.search(r"127\.0\.0\.1:(\d+)/metrics", server.stderr()).group(1))  # type: ignore[union-attr]
    return server, port


def scrape(port: int, bitmap: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        m = re.match(r"(dirtydiff_scan_\w+)\{([^}]*)\} (\S+)", line)
        if m and f'bitmap="{bitmap}"' in m.group(2):
            state = re.search(r'state="(\w+)"', m.group(2))
            key = f"{m.group(1)}:{state.group(1)}" if state else m.group(1)
            found[key] = float(m.group(3))
    return found


def test_background_scan_with_metrics_rising_to_completion(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 96 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 41, "dense")
    backup_server = procs.nbdkit(*BACKUP, str(backup))
    tracker = procs.tracker(state, disk=disk)
    _, port = sidecar(procs, tmp_path, state, tracker.uri)
    started = dirtydiff("scan", "--state", str(state), "--disk", tracker.uri, "--backup",
                        backup_server.uri, "--bitmap", "bg", "--max-rate", "60000000")  # fmt: skip
    assert "started in the sidecar" in started.stdout
    ratios = []
    end = time.monotonic() + 120
    while True:
        sample = scrape(port, "bg")
        if "dirtydiff_scan_progress_ratio" in sample:
            ratios.append(sample["dirtydiff_scan_progress_ratio"])
        if sample.get("dirtydiff_scan_state:done") == 1.0:
            break
        assert sample.get("dirtydiff_scan_state:failed") != 1.0
        assert time.monotonic() < end, ratios
        time.sleep(0.2)  # scrape interval
    assert ratios == sorted(ratios), ratios
    assert ratios[-1] == 1.0 and any(0 < r < 1 for r in ratios), ratios
    final = scrape(port, "bg")
    assert final["dirtydiff_scan_bytes_total"] == size
    assert final["dirtydiff_scan_differing_granules"] == len(
        differing(backup_bytes, disk_bytes, 65536)
    )
    assert dirty_set(state, "bg") == differing(backup_bytes, disk_bytes, 65536)

    # --wait follows a scan to its end; the bitmap is then consistent.
    waited = dirtydiff("scan", "--state", str(state), "--disk", tracker.uri, "--backup",
                       backup_server.uri, "--bitmap", "bg2", "--wait")  # fmt: skip
    assert "done in the sidecar" in waited.stdout
    assert dirty_set(state, "bg2") == dirty_set(state, "bg")


def test_background_scan_cancelled_then_resumed(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 96 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 43, "dense")
    backup_server = procs.nbdkit(*BACKUP, str(backup))
    tracker = procs.tracker(state, disk=disk)
    _, port = sidecar(procs, tmp_path, state, tracker.uri)
    args = ["scan", "--state", str(state), "--disk", tracker.uri, "--backup", backup_server.uri,
            "--bitmap", "c"]  # fmt: skip
    dirtydiff(*args, "--max-rate", "30000000")
    end = time.monotonic() + 60
    while scrape(port, "c").get("dirtydiff_scan_progress_ratio", 0.0) <= 0:
        assert time.monotonic() < end
        time.sleep(0.2)
    dirtydiff(*args, "--cancel")
    while scrape(port, "c").get("dirtydiff_scan_state:cancelled") != 1.0:
        assert time.monotonic() < end
        time.sleep(0.2)
    assert (state / "scans" / "c.json").exists()  # the position, for the resume
    dirtydiff(*args, "--wait")
    assert dirty_set(state, "c") == differing(backup_bytes, disk_bytes, 65536)


def test_sidecar_scan_waits_for_a_restarted_tracker_and_resumes(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The tracker dies mid-scan (the VM's writes go on once it is back):
    the job waits, goes on from its saved position when the tracker answers
    again, and the result is exact plus whatever was written meanwhile."""
    size = 96 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 47, "dense")
    backup_server = procs.nbdkit(*BACKUP, str(backup))
    tracker = procs.tracker(state, disk=disk)
    _, port = sidecar(procs, tmp_path, state, tracker.uri)
    dirtydiff("scan", "--state", str(state), "--backup", backup_server.uri, "--bitmap", "w",
              "--max-rate", "40000000")  # fmt: skip
    end = time.monotonic() + 60
    while scrape(port, "w").get("dirtydiff_scan_progress_ratio", 0.0) < 0.2:
        assert time.monotonic() < end
        time.sleep(0.1)
    tracker.proc.kill()
    tracker.proc.wait(10)
    while scrape(port, "w").get("dirtydiff_scan_state:waiting") != 1.0:
        assert time.monotonic() < end, scrape(port, "w")
        time.sleep(0.1)
    at_kill = scrape(port, "w")["dirtydiff_scan_progress_ratio"]
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock)
    written = 5 * MiB + 12345
    qemu_io(tracker.uri, f"write -P 0x7e {written} 1")  # the VM goes on
    while scrape(port, "w").get("dirtydiff_scan_state:done") != 1.0:
        sample = scrape(port, "w")
        assert sample.get("dirtydiff_scan_state:failed") != 1.0, sample
        assert time.monotonic() < end + 60, sample
        time.sleep(0.2)
    assert 0.2 <= at_kill < 1.0
    expected = differing(backup_bytes, disk_bytes, 65536) | {written // 65536}
    assert dirty_set(state, "w") == expected  # nothing missed, nothing extra


class ScannedK:
    """A tracker, a sidecar and a backup server; bitmap k filled by a scan in
    the sidecar; and ``left``, the record its scan would leave if killed."""

    def __init__(self, procs: Processes, tmp_path: Path, state: Path, seed: int) -> None:
        backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, 16 * MiB, seed, "dense")
        self.expected = differing(backup_bytes, disk_bytes, 65536)
        self.backup_server = procs.nbdkit(*BACKUP, str(backup))
        self.tracker = procs.tracker(state, disk=disk)
        self.server, _ = sidecar(procs, tmp_path, state, self.tracker.uri)
        self.args = ["scan", "--state", str(state), "--disk", self.tracker.uri, "--backup",
                     self.backup_server.uri, "--bitmap", "k", "--wait"]  # fmt: skip
        dirtydiff(*self.args)
        self.record = ScanRecord(StateDir(state), "k")
        self.left = {"backup": self.backup_server.uri, "disk": self.tracker.uri,
                     "granularity": 65536, "rebuild": False, "position": 3 * MiB,
                     "created_ns": show(state, "k")["created_ns"]}  # fmt: skip


def test_a_scan_record_outliving_its_completed_scan_blocks_nothing(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Found by the torture suite: a sidecar killed between scan.complete and
    removing STATE/scans/NAME.json left a record that made the same command
    fail ("already exists") for good."""
    k = ScannedK(procs, tmp_path, state, seed=53)
    args, record, left, tracker, server = k.args, k.record, k.left, k.tracker, k.server
    expected = k.expected
    assert dirty_set(state, "k") == expected
    record.save(left)  # what a kill right after scan.complete leaves

    again = dirtydiff(*args)  # the user runs the same command again
    assert "done in the sidecar" in again.stdout
    assert not record.path.exists()
    assert dirty_set(state, "k") == expected  # untouched: not cleared, not rescanned

    record.save(left)
    restart_sidecar_until_forgotten(procs, tmp_path, state, tracker.uri, server, record)
    assert dirty_set(state, "k") == expected
    assert show(state, "k")["consistent"]


def restart_sidecar_until_forgotten(
    procs: Processes, tmp_path: Path, state: Path, disk_uri: str, old: Server, record: ScanRecord
) -> None:
    """Kill the sidecar and start another, which must forget ``record``."""
    old.proc.kill()
    old.proc.wait(10)
    sidecar(procs, tmp_path, state, disk_uri)
    end = time.monotonic() + 30
    while record.path.exists():
        assert time.monotonic() < end
        time.sleep(0.05)  # the start-up resume runs in the background


def show(state: Path, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(
        dirtydiff("bitmap", "list", "--state", str(state), "--json").stdout
    )
    return next(b for b in found if b["name"] == name)


def test_a_scan_record_does_not_answer_for_a_bitmap_added_again_under_its_name(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """A scan of k is interrupted; the user removes k and adds it again,
    saying it counts from the same backup. The same scan command must not
    report the new k as the scan's result (it compared nothing for it): the
    record is forgotten and the name is reported in use, and neither a new
    sidecar nor ``scan --abort`` takes the new k for the scan's."""
    k = ScannedK(procs, tmp_path, state, seed=54)
    args, record, left, tracker, server = k.args, k.record, k.left, k.tracker, k.server
    backup_server = k.backup_server
    record.save(left)  # k's scan, interrupted (or its record outliving it)
    dirtydiff("bitmap", "remove", "k", "--state", str(state))
    dirtydiff("bitmap", "add", "k", "--state", str(state), "--backup", backup_server.uri)
    qemu_io(tracker.uri, "write -P 7 1M 64k")
    user_k = show(state, "k")
    assert user_k["created_ns"] != left["created_ns"]
    assert user_k["consistent"] and user_k["backup"] == backup_server.uri
    assert dirty_set(state, "k") == {16}

    again = dirtydiff(*args, check=False)
    assert again.returncode != 0, again.stdout
    assert "done" not in again.stdout
    assert "already exists" in again.stderr, again.stderr
    assert not record.path.exists()
    assert show(state, "k") == user_k  # not cleared, not claimed, not scanned
    assert dirty_set(state, "k") == {16}

    record.save(left)
    out = dirtydiff("scan", "--state", str(state), "--bitmap", "k", "--abort").stdout
    assert "forgotten" in out and "stays" in out  # the record only
    assert not record.path.exists()
    assert show(state, "k") == user_k
    gone = dirtydiff("scan", "--state", str(state), "--bitmap", "k", "--abort", check=False)
    assert gone.returncode != 0 and "not being filled by a scan" in gone.stderr, gone.stderr

    record.save(left)
    restart_sidecar_until_forgotten(procs, tmp_path, state, tracker.uri, server, record)
    assert show(state, "k") == user_k
    assert dirty_set(state, "k") == {16}

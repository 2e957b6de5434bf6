"""The sidecar's /metrics: every documented family, with its disk label,
counting what really happened (the scan families are watched rising during
a scan in test_scan_sidecar.py).

The names come from docs/metrics.md, from the Grafana dashboard and from
the alert rules in contrib/: each must be exposed, so none can drift from
what the sidecar serves.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.request
from pathlib import Path

import nbd

from tests.conftest import ROOT, Processes, dirtydiff, make_disk, qemu_io, run
from tests.test_scan_sidecar import sidecar

MiB = 1 << 20
Sample = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, prefix: str = "dirtydiff_") -> Sample:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found: Sample = {}
    for line in text.splitlines():
        m = re.match(f"({prefix}" + r"\w+)(?:\{([^}]*)\})? (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            found[m.group(1), labels] = float(m.group(3))
    return found


def value(sample: Sample, name: str, **labels: str) -> float:
    want = set(labels.items())
    matches = [v for (n, ls), v in sample.items() if n == name and want <= ls]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def documented_names() -> set[str]:
    """Metric names in docs/metrics.md, the dashboard and the alert rules."""
    page = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"`(dirtydiff_[a-z_]+)", page))
    rules = (ROOT / "contrib" / "prometheus" / "dirtydiff-alerts.yml").read_text()
    names.update(re.findall(r"\b(dirtydiff_[a-z_]+)", rules))
    dashboard = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names.update(re.findall(r"\b(dirtydiff_[a-z_]+)", target["expr"]))
    return names


def test_metrics_count_what_happened_with_a_disk_label(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 16 * MiB)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "--disabled", "idle", "--granularity", "4k")
    server, port = sidecar(procs, tmp_path, state, tracker.uri)
    # The read counts in the tracker's preads: the sidecar reads the file itself.
    qemu_io(tracker.uri, "write -P 1 0 1M", "write -z 4M 64k", "discard 8M 128k", "read 0 4k")
    run(["nbdinfo", "--map=qemu:dirty-bitmap:@open", server.uri])
    h = nbd.NBD()
    h.set_strict_mode(0)  # let a bad request reach the server
    h.connect_uri(server.uri)
    try:
        h.pread(4096, 0)
        with contextlib.suppress(nbd.Error):
            h.pread(4096, 16 * MiB)  # past the end: EINVAL from the export
        sample = scrape(port)
        assert value(sample, "dirtydiff_nbd_connections_open") >= 1
    finally:
        h.shutdown()

    disk_label = state.name
    assert all(dict(labels)["disk"] == disk_label for _, labels in sample)
    assert value(sample, "dirtydiff_tracker_up") == 1
    assert value(sample, "dirtydiff_tracker_marked_bytes_total", kind="pwrite") == 1 * MiB
    assert value(sample, "dirtydiff_tracker_marked_bytes_total", kind="zero") == 64 * 1024
    assert value(sample, "dirtydiff_tracker_marked_bytes_total", kind="trim") == 128 * 1024
    assert value(sample, "dirtydiff_tracker_requests_total", kind="pwrite") >= 1
    assert value(sample, "dirtydiff_tracker_requests_total", kind="pread") >= 1
    assert value(sample, "dirtydiff_bitmap_dirty_bytes", bitmap="@open") == (16 + 1 + 2) * 65536
    assert value(sample, "dirtydiff_bitmap_consistent", bitmap="@open") == 1
    assert value(sample, "dirtydiff_bitmap_recording", bitmap="@open") == 1
    assert value(sample, "dirtydiff_bitmap_recording", bitmap="idle") == 0
    assert value(sample, "dirtydiff_bitmap_granularity_bytes", bitmap="idle") == 4096
    assert value(sample, "dirtydiff_nbd_connections_total") >= 2
    assert value(sample, "dirtydiff_nbd_requests_total", command="block_status") >= 1
    assert value(sample, "dirtydiff_nbd_requests_total", command="read") >= 2
    assert value(sample, "dirtydiff_nbd_errors_total", kind="EINVAL") == 1
    assert value(sample, "dirtydiff_nbd_connections_max") >= 1
    assert value(sample, "dirtydiff_bitmap_generation", bitmap="@open") == 1  # the first interval
    created = value(sample, "dirtydiff_bitmap_created_timestamp_seconds", bitmap="@open")
    assert 0 < created <= time.time()
    process = scrape(port, "process_")  # the sidecar's own, for the fd alert
    assert 0 < value(process, "process_open_fds") < value(process, "process_max_fds")

    # A scan's families appear once a scan ran (their progress is followed
    # in test_scan_sidecar.py); then every documented name is served.
    backup = procs.qemu_nbd(make_disk(tmp_path / "backup.raw", 16 * MiB), "-r")
    dirtydiff(
        "scan", "--state", str(state), "--backup", backup.uri, "--bitmap", "s", "--wait",
        "--estimate",
    )  # fmt: skip
    # And a snapshot's once one is taken.
    dirtydiff("checkpoint", "--state", str(state), "snap", "--snapshot", "--snapshot-limit", "8m")
    qemu_io(tracker.uri, "write -P 2 0 256k")  # copied to its store first
    sample = scrape(port)
    assert value(sample, "dirtydiff_snapshot_state", snapshot="snap", state="active") == 1
    assert value(sample, "dirtydiff_snapshot_state", snapshot="snap", state="broken") == 0
    assert value(sample, "dirtydiff_snapshot_limit_bytes", snapshot="snap") == 8 * MiB
    assert value(sample, "dirtydiff_snapshot_copied_bytes", snapshot="snap") == 256 * 1024
    assert value(sample, "dirtydiff_snapshot_protected_bytes", snapshot="snap") == 16 * MiB
    assert value(sample, "dirtydiff_scan_progress_ratio", bitmap="s") == 1
    estimated = {b: value(sample, "dirtydiff_scan_estimated_changed_ratio", bitmap="s", bound=b)
                 for b in ("estimate", "low", "high")}  # fmt: skip
    assert 0 <= estimated["low"] <= estimated["estimate"] <= estimated["high"] <= 1
    assert value(sample, "dirtydiff_scan_eta_seconds", bitmap="s") == 0
    served = {name for name, _ in sample}
    missing = documented_names() - served
    assert not missing, missing

    # The tracker gone: the sidecar says so instead of failing the scrape.
    tracker.proc.kill()
    tracker.proc.wait(10)
    sample = scrape(port)
    assert value(sample, "dirtydiff_tracker_up") == 0
    assert value(sample, "dirtydiff_bitmap_recording", bitmap="@open") == 0

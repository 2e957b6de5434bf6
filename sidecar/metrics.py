"""Prometheus metrics of one sidecar: ``dirtydiff serve --metrics HOST:PORT``.

Every ``dirtydiff_`` family carries a ``disk`` label (the state directory's
name, or ``--metrics-disk``), so one Prometheus can watch many disks. Values are read
at scrape time from what already exists: the scan jobs, the bitmap files'
headers, the export's counters and the tracker's (its control request
``stats``); nothing is counted twice and no scrape takes the state lock.

Families (docs/metrics.md lists them with their labels):

- scans: ``dirtydiff_scan_{progress_ratio, bytes_compared, bytes_total,
  bytes_read{side}, differing_granules, rate_bytes_per_second, eta_seconds,
  duration_seconds, state{state}}`` per ``bitmap``;
- bitmaps: ``dirtydiff_bitmap_{dirty_bytes, consistent, recording,
  granularity_bytes, generation, created_timestamp_seconds}`` per ``bitmap``;
- tracker: ``dirtydiff_tracker_up``, ``dirtydiff_tracker_requests_total{kind}``,
  ``dirtydiff_tracker_marked_bytes_total{kind}``,
  ``dirtydiff_tracker_errors_total{kind}``;
- export: ``dirtydiff_nbd_connections_open``, ``dirtydiff_nbd_connections_max``,
  ``dirtydiff_nbd_connections_total``, ``dirtydiff_nbd_requests_total{command}``,
  ``dirtydiff_nbd_errors_total{kind}``;
- snapshots: ``dirtydiff_snapshot_{state{state}, protected_bytes, copied_bytes,
  store_bytes, limit_bytes, created_timestamp_seconds}`` per ``snapshot``;
- the process: prometheus-client's ``process_*`` (``process_open_fds``,
  ``process_max_fds``, ...), without a ``disk`` label: one sidecar is one
  process, and the rules join them to the disk by ``instance``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from dirtydiff import control, errors
from dirtydiff.bitmapfile import BitmapFile, Flag
from dirtydiff.owner import StateOwner
from dirtydiff.snapshots import read_snapshots
from dirtydiff.state import StateDir, describe
from sidecar.export import NbdServer
from sidecar.scan.jobs import STATES, ScanJobs

log = logging.getLogger(__name__)

Family = GaugeMetricFamily | CounterMetricFamily

# A scrape must not hang on a tracker that stopped answering.
TRACKER_WAIT = 2.0


class ScanMetrics(Collector):
    """``dirtydiff_scan_*``, read from the jobs at scrape time."""

    def __init__(self, jobs: ScanJobs, disk: str) -> None:
        self.jobs = jobs
        self.disk = disk

    def collect(self) -> Iterator[Family]:
        labels = ["disk", "bitmap"]

        def family(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dirtydiff_scan_{name}", doc, labels=labels + (extra or []))

        ratio = family("progress_ratio", "Share of the disk compared, 0 to 1")
        compared = family("bytes_compared", "Bytes of the disk compared so far")
        total = family("bytes_total", "Bytes of the disk to compare")
        read = family("bytes_read", "Bytes read, per side", ["side"])
        differing = family("differing_granules", "Granules found different")
        rate = family("rate_bytes_per_second", "Bytes compared per second")
        eta = family("eta_seconds", "Estimated time to the end, at the current rate")
        duration = family("duration_seconds", "Time since the scan started")
        state = family("state", "1 for the scan's current state", ["state"])
        for name, job in list(self.jobs.jobs.items()):
            key = [self.disk, name]
            p = job.progress
            if p is not None:
                done = job.state == "done"
                ratio.add_metric(key, 1.0 if done else p.ratio)
                compared.add_metric(key, p.compared)
                total.add_metric(key, p.total)
                read.add_metric([*key, "disk"], p.read_disk)
                read.add_metric([*key, "backup"], p.read_backup)
                differing.add_metric(key, p.differing_granules)
                rate.add_metric(key, p.rate)
                left = 0.0 if done else p.eta
                if left is not None and job.state in ("running", "done"):
                    eta.add_metric(key, left)
            duration.add_metric(key, (job.finished or time.monotonic()) - job.started)
            for s in STATES:
                state.add_metric([*key, s], 1.0 if job.state == s else 0.0)
        yield from (ratio, compared, total, read, differing, rate, eta, duration, state)


class ScanEstimateMetrics(Collector):
    """``dirtydiff_scan_estimated_changed_ratio``: what a scan's sample
    (``--estimate``) told of the changed fraction, with its 95% interval."""

    def __init__(self, jobs: ScanJobs, disk: str) -> None:
        self.jobs = jobs
        self.disk = disk

    def collect(self) -> Iterator[Family]:
        found = GaugeMetricFamily(
            "dirtydiff_scan_estimated_changed_ratio",
            "Estimated share of the disk's granules changed, 0 to 1 (bound: the estimate, "
            "or the low or high end of its 95% interval)",
            labels=["disk", "bitmap", "bound"],
        )
        for name, job in list(self.jobs.jobs.items()):
            e = job.estimate
            if e is not None:
                for bound, value in (("estimate", e.fraction), ("low", e.low), ("high", e.high)):
                    found.add_metric([self.disk, name, bound], value)
        yield found


class BitmapMetrics(Collector):
    """``dirtydiff_bitmap_*`` from the files, read-only: a scrape never
    takes the state lock (which would keep a tracker from starting)."""

    def __init__(self, state: StateDir, disk: str) -> None:
        self.state = state
        self.disk = disk

    def collect(self) -> Iterator[Family]:
        labels = ["disk", "bitmap"]
        dirty = GaugeMetricFamily(
            "dirtydiff_bitmap_dirty_bytes", "Bytes marked dirty", labels=labels
        )
        consistent = GaugeMetricFamily(
            "dirtydiff_bitmap_consistent",
            "1 if the bitmap can be trusted (and is exported), 0 if it may miss changes",
            labels=labels,
        )
        recording = GaugeMetricFamily(
            "dirtydiff_bitmap_recording",
            "1 if the running tracker records writes into it",
            labels=labels,
        )
        granularity = GaugeMetricFamily(
            "dirtydiff_bitmap_granularity_bytes", "Bytes per bit", labels=labels
        )
        generation = GaugeMetricFamily(
            "dirtydiff_bitmap_generation",
            "The checkpoint interval it records, 0 if none",
            labels=labels,
        )
        # For @open a checkpoint makes a new file, so this is the time of the
        # last checkpoint (or of a later clear or rebuild): what an alert on
        # a missed backup schedule needs.
        created = GaugeMetricFamily(
            "dirtydiff_bitmap_created_timestamp_seconds",
            "When the file took its meaning (made, checkpointed, rebuilt), since the epoch",
            labels=labels,
        )
        tracking = StateOwner(self.state).tracker_listening()
        for name in self.state.user_names():  # a scan's scratch has its scan's metrics
            try:
                with BitmapFile(self.state.bitmap_path(name), writable=False) as bitmap:
                    info = describe(name, bitmap, recording=False)
                    enabled = bool(bitmap.header.flags & Flag.ENABLED)
            except (OSError, errors.DirtydiffError) as e:  # removed meanwhile, or corrupt
                log.debug("bitmap %s not in metrics: %s", name, e)
                continue
            key = [self.disk, name]
            dirty.add_metric(key, info.dirty_bytes)
            consistent.add_metric(key, 1.0 if info.consistent else 0.0)
            recording.add_metric(key, 1.0 if tracking and enabled else 0.0)
            granularity.add_metric(key, info.granularity)
            generation.add_metric(key, info.generation)
            created.add_metric(key, info.created_ns / 1e9)
        yield from (dirty, consistent, recording, granularity, generation, created)


class TrackerMetrics(Collector):
    """``dirtydiff_tracker_*``: the tracker's counters, asked for at scrape
    time over its control socket."""

    def __init__(self, state: StateDir, disk: str) -> None:
        self.state = state
        self.disk = disk

    def collect(self) -> Iterator[Family]:
        up = GaugeMetricFamily(
            "dirtydiff_tracker_up",
            "1 if the tracker answers on its control socket",
            labels=["disk"],
        )
        try:
            stats = control.call_within(self.state.socket_path, TRACKER_WAIT, "stats")
        except errors.DirtydiffError:
            up.add_metric([self.disk], 0.0)
            yield up
            return
        up.add_metric([self.disk], 1.0)
        yield up
        for key, name, doc in (
            ("requests", "requests", "Requests the tracker served, per kind"),
            ("marked_bytes", "marked_bytes", "Bytes of writes, zeroes and trims marked"),
            ("errors", "errors", "Requests that failed, per kind"),
        ):
            family = CounterMetricFamily(f"dirtydiff_tracker_{name}", doc, labels=["disk", "kind"])
            counts = dict(stats.get(key) or {})
            if key == "errors":  # a zero for every kind served: rate() needs a start
                counts = {kind: 0 for kind in stats.get("requests") or {}} | counts
            for kind, value in sorted(counts.items()):
                family.add_metric([self.disk, str(kind)], float(value))
            yield family


class ExportMetrics(Collector):
    """``dirtydiff_nbd_*``: the export's connections, requests and errors."""

    def __init__(self, server: NbdServer, disk: str) -> None:
        self.server = server
        self.disk = disk

    def collect(self) -> Iterator[Family]:
        stats = self.server.stats
        now = GaugeMetricFamily(
            "dirtydiff_nbd_connections_open", "Clients connected to the export", labels=["disk"]
        )
        now.add_metric([self.disk], len(self.server.connections))
        cap = GaugeMetricFamily(
            "dirtydiff_nbd_connections_max",
            "Clients the export allows at once (--max-connections, or what the fds allow)",
            labels=["disk"],
        )
        cap.add_metric([self.disk], self.server.max_connections)
        total = CounterMetricFamily(
            "dirtydiff_nbd_connections", "Clients that connected to the export", labels=["disk"]
        )
        total.add_metric([self.disk], stats.connections_total)
        requests = CounterMetricFamily(
            "dirtydiff_nbd_requests",
            "Requests received by the export, per command",
            labels=["disk", "command"],
        )
        # Copies first: the event loop's thread bumps them while this runs.
        for command, value in sorted(dict(stats.requests).items()):
            requests.add_metric([self.disk, command], value)
        failed = CounterMetricFamily(
            "dirtydiff_nbd_errors",
            "Requests the export failed, per errno; 'protocol': connections it ended",
            labels=["disk", "kind"],
        )
        for kind, value in sorted(dict(stats.errors).items()):
            failed.add_metric([self.disk, kind], value)
        yield from (now, cap, total, requests, failed)


SNAPSHOT_STATES = ("active", "broken")


def _number(value: object) -> float:
    """A count from a reply, or TypeError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


class SnapshotMetrics(Collector):
    """``dirtydiff_snapshot_*``: the tracker's answer to ``snapshot.list``
    (a few milliseconds: it counts as it copies), or while it does not
    answer, what the state directory last recorded."""

    def __init__(self, state: StateDir, disk: str) -> None:
        self.state = state
        self.disk = disk

    def _snapshots(self) -> list[dict[str, object]]:
        try:
            answer = control.call_within(self.state.socket_path, TRACKER_WAIT, "snapshot.list")
            found = answer["snapshots"]
            if isinstance(found, list):
                return [s for s in found if isinstance(s, dict)]
        except (errors.DirtydiffError, KeyError, TypeError) as e:
            log.debug("snapshots from the state directory: %s", e)
        try:
            return [info.as_dict() for info in read_snapshots(self.state)]
        except (OSError, errors.DirtydiffError) as e:
            log.debug("snapshots not in metrics: %s", e)
            return []

    def collect(self) -> Iterator[Family]:
        labels = ["disk", "snapshot"]

        def family(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(
                f"dirtydiff_snapshot_{name}", doc, labels=labels + (extra or [])
            )

        state = family("state", "1 for the snapshot's state: active, or broken (reads fail)",
                       ["state"])  # fmt: skip
        protected = family("protected_bytes", "Bytes the snapshot still protects")
        copied = family("copied_bytes", "Bytes copied to its store before the VM overwrote them")
        store = family("store_bytes", "Bytes allocated in its store file now")
        limit = family("limit_bytes", "The store's bound (--snapshot-limit), if it has one")
        created = family("created_timestamp_seconds", "When it was taken, since the epoch")
        for s in self._snapshots():
            try:
                key = [self.disk, str(s["name"])]
                for each in SNAPSHOT_STATES:
                    state.add_metric([*key, each], 1.0 if s["state"] == each else 0.0)
                protected.add_metric(key, _number(s["protected_bytes"]))
                copied.add_metric(key, _number(s["copied_bytes"]))
                store.add_metric(key, _number(s["store_bytes"]))
                if s["limit"] is not None:
                    limit.add_metric(key, _number(s["limit"]))
                created.add_metric(key, _number(s["created_ns"]) / 1e9)
            except (KeyError, TypeError, ValueError) as e:  # a reply not of its shape
                log.debug("snapshot not in metrics: %r", e)
        yield from (state, protected, copied, store, limit, created)


def registry(state: StateDir, jobs: ScanJobs, server: NbdServer, disk: str) -> CollectorRegistry:
    found = CollectorRegistry()
    for collector in (
        ScanMetrics(jobs, disk),
        BitmapMetrics(state, disk),
        TrackerMetrics(state, disk),
        ExportMetrics(server, disk),
        ScanEstimateMetrics(jobs, disk),
        SnapshotMetrics(state, disk),
    ):
        found.register(collector)
    # Open fds against the limit (the export's cap is derived from it), CPU, memory.
    ProcessCollector(registry=found)
    return found

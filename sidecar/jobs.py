"""Scans as background jobs of a running sidecar, and their Prometheus metrics.

``dirtydiff serve`` owns a ``ScanJobs``: ``dirtydiff scan`` asks it (over
``STATE/sidecar.sock``) to start a scan, which then runs in a thread of the
sidecar while the command returns at once, or follows it with ``--wait``. The
scan itself is the same job as in the foreground (``sidecar.scanjob``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dirtydiff import errors
from dirtydiff.state import StateDir
from sidecar.scan import Cancelled, Progress
from sidecar.scanjob import ScanOptions, run_scan

log = logging.getLogger(__name__)

STATES = ("running", "done", "failed", "cancelled")


@dataclass
class Job:
    options: ScanOptions
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "running"
    error: str | None = None
    progress: Progress | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stopped: threading.Event = field(default_factory=threading.Event)  # set once it ended

    def as_dict(self) -> dict[str, Any]:
        return {
            "bitmap": self.options.name,
            "backup": self.options.backup,
            "rebuild": self.options.rebuild,
            "state": self.state,
            "error": self.error,
            "progress": self.progress.as_dict() if self.progress else None,
        }


class ScanJobs:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, options: ScanOptions) -> Job:
        with self._lock:
            running = self.jobs.get(options.name)
            if running is not None and running.state == "running":
                raise errors.Conflict(
                    "scan-running", f"a scan of {options.name!r} is already running"
                )
            job = Job(options)
            self.jobs[options.name] = job
        threading.Thread(
            target=self._run, args=(job,), name=f"scan-{options.name}", daemon=True
        ).start()
        return job

    def _run(self, job: Job) -> None:
        def on_progress(progress: Progress) -> None:
            job.progress = progress

        try:
            run_scan(self.state, job.options, on_progress=on_progress, cancel=job.cancel)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except errors.DirtydiffError as e:
            job.state, job.error = "failed", e.message
        except Exception as e:  # a bug must not take the sidecar down
            log.exception("scan of %s failed", job.options.name)
            job.state, job.error = "failed", str(e)
        finally:
            job.finished = time.monotonic()
            job.stopped.set()

    def get(self, name: str) -> Job:
        try:
            return self.jobs[name]
        except KeyError:
            raise errors.NotFound("unknown-scan", f"no scan of {name!r} in this sidecar") from None

    def cancel(self, name: str) -> Job:
        job = self.get(name)
        job.cancel.set()
        return job


class ScanMetrics(Collector):
    """``dirtydiff_scan_*`` gauges, read from the jobs at scrape time."""

    def __init__(self, jobs: ScanJobs, disk: str) -> None:
        self.jobs = jobs
        self.disk = disk

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["disk", "bitmap"]

        def family(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dirtydiff_scan_{name}", doc, labels=labels + (extra or []))

        ratio = family("progress_ratio", "Share of the disk compared, 0 to 1")
        compared = family("bytes_compared", "Bytes of the disk compared so far")
        total = family("bytes_total", "Bytes of the disk to compare")
        read = family("bytes_read", "Bytes read, per side", ["side"])
        differing = family("differing_granules", "Granules found different")
        rate = family("rate_bytes_per_second", "Bytes compared per second")
        duration = family("duration_seconds", "Time since the scan started")
        state = family("state", "1 for the scan's current state", ["state"])
        for name, job in list(self.jobs.jobs.items()):
            key = [self.disk, name]
            p = job.progress
            if p is not None:
                ratio.add_metric(key, 1.0 if job.state == "done" else p.ratio)
                compared.add_metric(key, p.compared)
                total.add_metric(key, p.total)
                read.add_metric([*key, "disk"], p.read_disk)
                read.add_metric([*key, "backup"], p.read_backup)
                differing.add_metric(key, p.differing_granules)
                rate.add_metric(key, p.rate)
            duration.add_metric(key, (job.finished or time.monotonic()) - job.started)
            for s in STATES:
                state.add_metric([*key, s], 1.0 if job.state == s else 0.0)
        yield from (ratio, compared, total, read, differing, rate, duration, state)

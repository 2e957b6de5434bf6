"""Scans as background jobs of a running sidecar (metrics: sidecar.metrics).

``dirtydiff serve`` owns a ``ScanJobs``: ``dirtydiff scan`` asks it (over
``STATE/sidecar.sock``) to start a scan, which then runs in a thread of the
sidecar while the command returns at once, or follows it with ``--wait``. The
scan itself is the same job as in the foreground (``sidecar.scan.job``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dirtydiff import errors
from dirtydiff.disk import is_nbd_uri
from dirtydiff.state import StateDir
from sidecar.nbdclient import Cancelled
from sidecar.scan.engine import Progress
from sidecar.scan.estimate import Estimate
from sidecar.scan.job import ScanOptions, run_scan

log = logging.getLogger(__name__)

# "waiting": a side or the tracker went away mid-scan; the job retries.
STATES = ("running", "waiting", "done", "failed", "cancelled")
ACTIVE = ("running", "waiting")
# Pauses between attempts after a lost connection, then every last one; a job
# that makes no progress for RETRY_FOR seconds gives up (state "failed").
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
RETRY_FOR = 600.0


@dataclass(frozen=True)
class JobStatus:
    """What ``scan.start``, ``scan.status``, ``scan.cancel`` and ``rebuild``
    answer of a job, and what ``--json`` prints of it."""

    bitmap: str
    backup: str
    rebuild: bool
    state: str  # one of STATES
    error: str | None  # why it failed, or why it waits
    progress: dict[str, Any] | None  # Progress.as_dict(), once it began
    # Estimate.as_dict() of the sample taken first (--estimate); a sidecar of
    # before tells none.
    estimate: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def seen_progress(self) -> Progress | None:
        """The progress as the job last told it (what a display shows)."""
        if self.progress is None:
            return None
        p = Progress(total=self.progress["total"])
        p.position = self.progress["position"]
        p.compared = self.progress["compared"]
        p.differing_granules = self.progress["differing_granules"]
        return p

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, result: object) -> JobStatus:
        """A JobStatus from a sidecar's reply; ProtocolError if it has not
        the shape of one."""
        # A field a newer sidecar adds is left out, not refused.
        if not isinstance(result, dict) or not result.keys() >= _JOB_FIELDS:
            raise _malformed(result)
        status = cls(
            **{name: result[name] for name in _JOB_FIELDS},
            estimate=_estimate(result.get("estimate")),
        )
        progress = status.progress
        if not (
            isinstance(status.bitmap, str)
            and isinstance(status.backup, str)
            and type(status.rebuild) is bool
            and status.state in STATES
            and (status.error is None or isinstance(status.error, str))
            and (
                progress is None
                or (
                    isinstance(progress, dict)
                    and all(type(progress.get(key)) is int for key in _PROGRESS_SHOWN)
                )
            )
        ):
            raise _malformed(result)
        return status


_JOB_FIELDS = {f.name for f in dataclasses.fields(JobStatus)} - {"estimate"}
_PROGRESS_SHOWN = ("total", "position", "compared", "differing_granules")


_ESTIMATE_SHOWN = ("fraction", "low", "high", "changed", "sampled", "full_scan_seconds")


def _estimate(told: object) -> dict[str, Any] | None:
    """A job's estimate as a sidecar told it, if it has its shape (else none)."""
    if isinstance(told, dict) and all(
        isinstance(told.get(key), int | float) and not isinstance(told.get(key), bool)
        for key in _ESTIMATE_SHOWN
    ):
        return told
    return None


def _malformed(result: object) -> errors.ProtocolError:
    return errors.ProtocolError(
        "malformed-reply", f"a scan job reply has not its shape: {repr(result)[:200]}"
    )


@dataclass
class Job:
    options: ScanOptions
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "running"
    error: str | None = None
    progress: Progress | None = None
    estimate: Estimate | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stopped: threading.Event = field(default_factory=threading.Event)  # set once it ended

    def status(self) -> JobStatus:
        return JobStatus(
            bitmap=self.options.name,
            backup=self.options.backup,
            rebuild=self.options.rebuild,
            state=self.state,
            error=self.error,
            progress=self.progress.as_dict() if self.progress else None,
            estimate=self.estimate.as_dict() if self.estimate else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return self.status().as_dict()


class ScanJobs:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, options: ScanOptions, *, patient: bool = False) -> Job:
        """Start a scan job. ``patient``: retry a lost connection even
        before the scan got going (a resumed scan, at start-up)."""
        with self._lock:
            running = self.jobs.get(options.name)
            if running is not None and running.state in ACTIVE:
                raise errors.Conflict(
                    "scan-running", f"a scan of {options.name!r} is already running"
                )
            job = Job(options)
            self.jobs[options.name] = job
        threading.Thread(
            target=self._run, args=(job, patient), name=f"scan-{options.name}", daemon=True
        ).start()
        return job

    def _run(self, job: Job, patient: bool) -> None:
        """Run the scan; after a lost connection (the tracker restarting, the
        backup server coming back) go on from the saved position. A scan
        that never got going (a wrong URI, no tracker) fails at once."""
        started_once = patient
        position = -1
        failing_since: float | None = None
        attempt = 0

        def on_progress(progress: Progress) -> None:
            nonlocal started_once
            started_once = True
            job.progress = progress

        def on_estimate(estimate: Estimate) -> None:
            job.estimate = estimate

        # A scan through a URI needs the tracker: without it the job would
        # hold the state lock for its whole run and keep the tracker -- the
        # VM's disk -- from starting. A local file is scanned offline.
        need_tracker = is_nbd_uri(job.options.disk)
        try:
            while True:
                try:
                    run_scan(
                        self.state, job.options, on_progress=on_progress, cancel=job.cancel,
                        need_tracker=need_tracker, on_estimate=on_estimate,
                    )  # fmt: skip
                    job.state, job.error = "done", None
                    return
                except errors.Unavailable as e:
                    if not started_once or job.cancel.is_set():
                        raise
                    now = time.monotonic()
                    if job.progress is not None and job.progress.position > position:
                        position, failing_since = job.progress.position, now
                    failing_since = failing_since or now
                    if now - failing_since > RETRY_FOR:
                        raise
                    job.state, job.error = "waiting", e.message
                    delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                    attempt += 1
                    log.warning("scan of %s: %s; retrying in %.1fs", job.options.name, e, delay)
                    if job.cancel.wait(delay):
                        raise Cancelled("scan cancelled") from None
                    job.state = "running"
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

"""Scans as background jobs of a running sidecar (metrics: sidecar.metrics).

``dirtydiff serve`` owns a ``ScanJobs``: ``dirtydiff scan`` asks it (over
``STATE/sidecar.sock``) to start a scan, which then runs in a thread of the
sidecar while the command returns at once, or follows it with ``--wait``. The
scan itself is the same job as in the foreground (``sidecar.scanjob``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

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

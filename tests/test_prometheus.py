"""A real Prometheus (Debian's ``prometheus``) scraping a real sidecar.

The shipped alert rules (contrib/prometheus/dirtydiff-alerts.yml) are loaded
with every ``for:`` cut to a second, and Prometheus scrapes and evaluates
four times a second, so the test sees what an operator would: a scan's
progress rising to 1 in Prometheus's own storage, every Grafana panel's
query answered from the live scrape, and after a simulated host crash
``DirtydiffBitmapInconsistent`` raised through ``/api/v1/alerts``.

Prometheus listens on a loopback port found free at run time, keeps its
data in the test's temp dir and is stopped in ``finally``; every wait polls
its HTTP API under a deadline.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nbd

from dirtydiff.bitmapfile import BOOT_ID_ENV
from tests.conftest import GRANULE, ROOT, Processes, Server, dirtydiff, qemu_io, run, stop

MiB = 1 << 20
RULES = ROOT / "contrib" / "prometheus" / "dirtydiff-alerts.yml"
DASHBOARD = ROOT / "contrib" / "grafana-dashboard.json"
# Scrape and rule evaluation, in the test's Prometheus.
INTERVAL = "250ms"
DEADLINE = 30.0

T = TypeVar("T")


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def until(what: str, probe: Callable[[], T | None], deadline: float = DEADLINE) -> T:
    """Poll ``probe`` until it returns something other than None."""
    end = time.monotonic() + deadline
    while True:
        found = probe()
        if found is not None:
            return found
        assert time.monotonic() < end, f"{what}: not seen in {deadline}s"
        time.sleep(0.1)  # polling interval while waiting on a deadline


class Prometheus:
    """Prometheus's HTTP API at ``base``."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result

    def ready(self) -> bool | None:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as reply:
                return True if reply.status == 200 else None
        except (urllib.error.URLError, ConnectionError):
            return None


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """Debian's prometheus scraping ``target`` as job "dirtydiff", with the
    shipped rules (``for:`` cut to 1s), until the block ends."""
    rules = tmp_path / "dirtydiff-alerts.yml"
    rules.write_text(re.sub(r"\bfor: \w+", "for: 1s", RULES.read_text()))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": INTERVAL, "evaluation_interval": INTERVAL},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {"job_name": "dirtydiff", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        api = Prometheus(f"http://127.0.0.1:{port}")
        end = time.monotonic() + DEADLINE
        while not api.ready():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < end, log.read_text()
            time.sleep(0.1)  # polling interval while waiting on a deadline
        yield api
    finally:
        stop(proc)


def sidecar(
    procs: Processes, tmp_path: Path, state: Path, disk_uri: str, metrics: str, env: dict[str, str]
) -> Server:
    sock = tmp_path / f"export{len(procs.started)}.sock"
    return procs.start(
        [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk", disk_uri,
         "--socket", str(sock), "--metrics", metrics],
        sock,
        env,
    )  # fmt: skip


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every Grafana panel, for every disk."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$disk", ".+"))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_prometheus_scrapes_the_sidecar_and_raises_the_alerts(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    # Dense data on both sides: a scan skips what both sides show as holes,
    # and must last several scrapes here. Two granules differ.
    size = 32 * MiB
    data = bytearray(random.Random(18).randbytes(size))
    disk, backup_file = tmp_path / "disk.raw", tmp_path / "backup.raw"
    disk.write_bytes(data)
    for granule in (3, 300):
        data[granule * GRANULE] ^= 0xFF
    backup_file.write_bytes(data)
    tracker = procs.tracker(state, disk=disk)
    metrics = f"127.0.0.1:{free_port()}"  # fixed: the sidecar is restarted on it
    export = sidecar(procs, tmp_path, state, tracker.uri, metrics, {})
    backup = procs.qemu_nbd(backup_file, "-r")

    with prometheus(tmp_path, metrics) as api:

        def scraped() -> bool | None:
            return True if api.query('up{job="dirtydiff"} == 1') else None

        until("the sidecar scraped", scraped)

        # A scan slow enough for several scrapes; Prometheus's raw samples
        # of its progress rise to 1.
        dirtydiff("scan", "--state", str(state), "--backup", backup.uri, "--bitmap", "s",
                  "--max-rate", str(12 * MiB))  # fmt: skip

        def progress() -> list[float] | None:
            found = api.query('dirtydiff_scan_progress_ratio{bitmap="s"}[5m]')
            values = [float(v) for _, v in found[0]["values"]] if found else []
            return values if values and values[-1] == 1.0 else None

        ratios = until("the scan done in Prometheus", progress)
        assert ratios == sorted(ratios), ratios
        assert len({r for r in ratios if 0 < r < 1}) >= 2, ratios
        # Progress reaches 1 when the last chunk is compared; the job is done
        # once the bitmap is completed, which a scrape may see a moment later.
        until(
            "the scan's done state in Prometheus",
            lambda: api.query('dirtydiff_scan_state{bitmap="s",state="done"} == 1') or None,
        )
        assert api.query('dirtydiff_scan_differing_granules{bitmap="s"} == 2')

        # A VM's write for the tracker's panels; export traffic, and one
        # failed request, for the export's.
        qemu_io(tracker.uri, "write -P 7 1M 64k")
        run(["nbdinfo", "--map=qemu:dirty-bitmap:@open", export.uri])
        h = nbd.NBD()
        h.set_strict_mode(0)  # let a bad request reach the server
        h.connect_uri(export.uri)
        try:
            with contextlib.suppress(nbd.Error):
                h.pread(4096, size)  # past the end: EINVAL from the export
        finally:
            h.shutdown()

        # A snapshot with a store limit, for the snapshot panels.
        dirtydiff("checkpoint", "--state", str(state), "snap", "--snapshot",
                  "--snapshot-limit", "16m")  # fmt: skip

        # Every panel's query answers from the live scrape (a rate() once
        # two scrapes saw its counter).
        for title, expr in dashboard_queries():

            def answered(expr: str = expr) -> list[dict[str, Any]] | None:
                return api.query(expr) or None

            until(f"panel {title!r}: {expr}", answered)
        disks = api.get("/api/v1/label/disk/values", **{"match[]": "dirtydiff_bitmap_dirty_bytes"})
        assert disks == [state.name]  # the dashboard's $disk variable
        assert not api.query('ALERTS{alertname="DirtydiffBitmapInconsistent"}')

        # A host crash: everything killed, and a new boot. @open was being
        # recorded, so the restarted tracker finds it may have lost bits.
        for server in (tracker, export):
            server.proc.kill()
            server.proc.wait(10)
        boot = {BOOT_ID_ENV: secrets.token_hex(16)}
        tracker = procs.tracker(state, disk=disk, env=boot)
        sidecar(procs, tmp_path, state, tracker.uri, metrics, boot)

        def raised() -> dict[str, Any] | None:
            for alert in api.get("/api/v1/alerts")["alerts"]:
                labels = alert["labels"]
                if (labels["alertname"], labels.get("bitmap")) == (
                    "DirtydiffBitmapInconsistent",
                    "@open",
                ):
                    return alert  # type: ignore[no-any-return]
            return None

        alert = until("DirtydiffBitmapInconsistent", raised)
        assert alert["state"] in ("pending", "firing"), alert
        assert alert["labels"]["severity"] == "warning"
        assert alert["labels"]["disk"] == state.name
        assert f"--state /var/lib/dirtydiff/{state.name}" in alert["annotations"]["description"]

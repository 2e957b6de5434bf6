"""``make demo`` runs ``python -m sidecar.demo``: CI runs only ``make test``,
so this is what proves the README's first command on a fresh clone."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_the_demo_restores_the_disk_from_a_rebuilt_bitmap() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.demo"], capture_output=True, text=True, timeout=300,
        cwd=ROOT, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "\nidentical\n" in out
    ratios = [float(r) for r in re.findall(r"dirtydiff_scan_progress_ratio (\S+)", out)]
    assert ratios == sorted(ratios) and ratios[-1] == 1.0, ratios
    read = re.search(r"incremental read: +(\S+) MiB instead of 256 MiB", out)
    assert read is not None and 0 < float(read.group(1)) < 256, out
    # The point-in-time incremental, from the snapshot's export.
    assert out.count("\nidentical\n") == 2, out
    during = re.search(r"point in time: .* at least (\d+) VM writes hit the extents", out)
    assert during is not None and int(during.group(1)) >= 20, out

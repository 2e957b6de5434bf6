"""``python -m bench`` ends with one table of ratios gathered from every benchmark run."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from bench.__main__ import main as bench_main
from bench.report import Ratio, Target, format_summary
from tests.conftest import ROOT


def summary_of(output: str) -> list[list[str]]:
    """The summary table's data rows, split on the two-space column gaps."""
    table = output.split("\n== summary", 1)[1].splitlines()[1:]
    assert table[0].split() == ["benchmark", "case", "unit", "ours", "peer", "ratio", "target",
                                "met"]  # fmt: skip
    assert set(table[1]) <= {"-", " "}
    rows = []
    for line in table[2:]:
        if "targets met" in line:
            break
        rows.append([cell.strip() for cell in line.split("  ") if cell.strip()])
    return rows


def test_format_summary_of_every_kind_of_row() -> None:
    text = format_summary(
        [
            Ratio("tracker", "fio rand 4K QD16 vs nbdkit-file", "IOPS", 41234.6, 50000.0,
                  Target(">=", 0.8)),
            Ratio("tracker", "fio rand 4K QD1 vs nbdkit-file", "IOPS", 9000.0, 10000.0),
            Ratio("export", "nbdinfo --map vs qemu-nbd", "s", 0.25, 0.125, Target("<=", 1.0)),
            Ratio("scan", "dense vs qemu-img compare", "GiB/s", 1.5, 0.0, Target(">", 1.0)),
        ]
    )  # fmt: skip
    rows = summary_of("\n== summary\n" + text)
    assert rows == [
        ["tracker", "fio rand 4K QD16 vs nbdkit-file", "IOPS", "41235", "50000", "0.82", ">= 0.8",
         "yes"],
        ["tracker", "fio rand 4K QD1 vs nbdkit-file", "IOPS", "9000", "10000", "0.90", "-", "-"],
        ["export", "nbdinfo --map vs qemu-nbd", "s", "0.25", "0.125", "2.00", "<= 1", "no"],
        ["scan", "dense vs qemu-img compare", "GiB/s", "1.5", "0", "nan", "> 1", "no"],
    ]  # fmt: skip
    assert text.splitlines()[-1] == "1 of 3 targets met"


def test_unknown_benchmark_is_refused_before_anything_runs() -> None:
    assert bench_main(["nonesuch"]) == 2


def test_quick_export_bench_ends_with_the_summary_table() -> None:
    """The real thing at its smallest (a few seconds): every export ratio, numeric."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "export", "--quick", "--extents", "1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = summary_of(done.stdout)
    assert [row[:3] for row in rows] == [
        ["export", "nbdinfo --map, 1000 extents vs qemu-nbd", "s"],
        ["export", "nbdcopy 0.25 GiB dense vs qemu-nbd", "GiB/s"],
        ["export", "8 MiB 4 KiB reads QD1, deployed vs qemu-nbd", "MiB/s"],
        ["export", "15 TiB sparse map, deployed vs qemu-nbd", "s"],
        ["export", "nbdcopy 0.25 GiB over TLS vs qemu-nbd --tls-creds", "GiB/s"],
    ]
    for _, _, _, ours, peer, ratio, target, met in rows:
        assert float(ours) > 0 and float(peer) > 0
        # the ratio is printed to 2 decimals, ours and peer to 3 figures
        assert math.isclose(float(ratio), float(ours) / float(peer), rel_tol=0.01, abs_tol=0.006)
        assert target in ("<= 1", ">= 0.8", ">= 0.6", "<= 1.5")
        assert met in ("yes", "no")
    assert re.match(r"[0-5] of 5 targets met", done.stdout.rstrip().splitlines()[-1])


def test_quick_scan_bench_ends_with_the_summary_table() -> None:
    """The scan bench at its smallest: every pair's ratios and the 15 TiB
    sparse pair's time, numeric, each measured on fresh servers."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "scan", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = summary_of(done.stdout)
    assert [row[:3] for row in rows[:5]] == [
        ["scan", "dense 0.25 GiB vs nbdcopy x2 (limit)", "GiB/s"],
        ["scan", "dense 0.25 GiB vs qemu-img compare", "GiB/s"],
        ["scan", "50% sparse 0.25 GiB vs nbdcopy x2 (limit)", "GiB/s"],
        ["scan", "50% sparse 0.25 GiB vs qemu-img compare", "GiB/s"],
        ["scan", "15 TiB sparse, 20 MiB data vs nbdcopy x2 (time)", "s"],
    ]
    for _, _, _, ours, peer, ratio, _, met in rows[:5]:
        assert float(ours) > 0 and float(peer) > 0
        assert math.isclose(float(ratio), float(ours) / float(peer), rel_tol=0.01, abs_tol=0.006)
        assert met in ("yes", "no")
    assert "CPU s/GiB" in done.stdout and "load average" in done.stdout


@pytest.mark.bench
def test_quick_snapshot_read_bench_measures_both_cases_against_qemu() -> None:
    """The snapshot export against qemu-storage-daemon's fleecing, at its
    smallest: both cases, numeric, each with the issue's target."""
    done = subprocess.run(
        [sys.executable, "-m", "bench", "snapshot-read", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = summary_of(done.stdout)
    assert [row[:3] for row in rows] == [
        ["snapshot-read", "nbdcopy snapshot (a) as taken vs qemu fleecing", "GiB/s"],
        ["snapshot-read", "nbdcopy snapshot (b) a quarter copied vs qemu fleecing", "GiB/s"],
    ]
    for _, _, _, ours, peer, _, target, met in rows:
        assert float(ours) > 0 and float(peer) > 0
        assert target == ">= 0.8" and met in ("yes", "no")
    assert done.stdout.count("servers' CPU") == 6

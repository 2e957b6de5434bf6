"""The estimate: the 95% interval holds the true changed fraction (in at
least 19 of 20 seeded samples, on both sides and against a manifest), and
--max-changed stops a scan before anything is marked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtydiff.manifest import open_manifest
from sidecar.cli.digest import write_manifest
from sidecar.scan.engine import FileSide
from sidecar.scan.estimate import sample_changed, sample_granules, wilson
from sidecar.scan.manifest import ManifestSide
from tests.conftest import dirtydiff

G = 4096
GRANULES = 4096  # 16 MiB pairs


@given(changed=st.integers(0, 2000), extra=st.integers(0, 2000))
def test_wilson_interval_is_within_0_1_and_holds_the_sample_fraction(
    changed: int, extra: int
) -> None:
    sampled = changed + extra
    low, high = wilson(changed, sampled)
    assert 0.0 <= low <= high <= 1.0
    if sampled:
        assert low <= changed / sampled <= high
        assert (low == 0.0) == (changed == 0) and (high == 1.0) == (changed == sampled)


def test_wilson_against_known_values() -> None:
    # 10 of 100: the textbook 95% Wilson interval is 0.0552 to 0.1744.
    low, high = wilson(10, 100)
    assert round(low, 4) == 0.0552 and round(high, 4) == 0.1744
    assert wilson(0, 0) == (0.0, 1.0)


def test_samples_are_distinct_uniform_and_repeatable() -> None:
    assert sample_granules(10, 100) == list(range(10))
    a = sample_granules(1_000_000, 1000, seed=5)
    assert a == sample_granules(1_000_000, 1000, seed=5) != sample_granules(1_000_000, 1000, 6)
    assert len(set(a)) == 1000 and a == sorted(a)
    # Uniform: each tenth of the disk gets about a tenth of the sample.
    tenths = [sum(1 for g in a if g * 10 // 1_000_000 == t) for t in range(10)]
    assert all(60 <= n <= 140 for n in tenths), tenths


def known_pair(tmp: Path, fraction: float, seed: int) -> tuple[Path, Path, float]:
    """Files whose granules differ in exactly ``fraction`` of the granules,
    chosen at random; a third of the rest are holes on both sides."""
    rng = random.Random(seed)
    changed = set(rng.sample(range(GRANULES), round(fraction * GRANULES)))
    holes = set(rng.sample(sorted(set(range(GRANULES)) - changed), (GRANULES - len(changed)) // 3))
    backup, disk = tmp / f"b{fraction}.raw", tmp / f"d{fraction}.raw"
    with backup.open("wb") as b, disk.open("wb") as d:
        b.truncate(GRANULES * G)
        d.truncate(GRANULES * G)
        for g in range(GRANULES):
            if g in holes:
                continue
            data = rng.randbytes(G)
            b.seek(g * G)
            b.write(data)
            d.seek(g * G)
            d.write(
                bytes(G)
                if g in changed and g % 5 == 0
                else rng.randbytes(G)
                if g in changed
                else data
            )
    return backup, disk, len(changed) / GRANULES


@pytest.mark.parametrize("fraction", [0.01, 0.30, 0.90])
@pytest.mark.parametrize("against", ["backup", "manifest"])
def test_the_interval_holds_the_truth_in_19_of_20_seeded_runs(
    tmp_path: Path, fraction: float, against: str
) -> None:
    backup_path, disk_path, truth = known_pair(tmp_path, fraction, seed=int(fraction * 100))
    disk = FileSide("disk", str(disk_path))
    manifest_path = tmp_path / "m.ddm"
    try:
        if against == "manifest":
            write_manifest(str(backup_path), str(manifest_path), G)
        held = 0
        for seed in range(20):
            if against == "manifest":
                with open_manifest(manifest_path) as (manifest, _):
                    side = ManifestSide(manifest, G, str(manifest_path))
                    estimate = sample_changed(disk, side, G, count=400, seed=seed)
                    side.close()
                    del side, manifest
            else:
                backup = FileSide("backup", str(backup_path))
                estimate = sample_changed(disk, backup, G, count=400, seed=seed)
                backup.close()
            assert estimate.sampled == 400
            held += estimate.low <= truth <= estimate.high
            assert 0 < estimate.data_fraction <= 1 and estimate.full_scan_seconds >= 0
        assert held >= 19, (held, truth)
    finally:
        disk.close()


def test_max_changed_stops_before_anything_is_marked(tmp_path: Path, state: Path) -> None:
    backup, disk, truth = known_pair(tmp_path, 0.30, seed=9)
    manifest = tmp_path / "m.ddm"
    write_manifest(str(backup), str(manifest), G)
    refused = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--manifest",
                        str(manifest), "--bitmap", "b", "--granularity", "4k",
                        "--max-changed", "10", check=False)  # fmt: skip
    assert refused.returncode == 1
    assert "a full backup would read less" in refused.stderr and "Traceback" not in refused.stderr
    assert not (state / "bitmaps" / "b.bitmap").exists()
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    assert "b" not in {b["name"] for b in status["bitmaps"]}
    # Under the bound, the scan goes on, and tells its estimate.
    done = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--manifest",
                     str(manifest), "--bitmap", "b", "--granularity", "4k",
                     "--max-changed", "60", "--json")  # fmt: skip
    result = json.loads(done.stdout)
    assert result["estimate"]["low"] <= truth <= result["estimate"]["high"]
    assert "estimated changed" in done.stderr
    assert result["progress"]["differing_granules"] == round(0.30 * GRANULES)

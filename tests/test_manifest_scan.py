"""The one-sided scan: the disk against a manifest of the backup.

Exactness: for random pairs the one-sided bitmap equals the two-sided one,
and both equal the set of differing granules. The backup server is stopped
(and the backup file moved away) before the one-sided scan starts, which
proves that it reads nothing of the backup. Online: writes during a manifest
scan, then a byte-identical incremental restore. Faults: kill -9 and resume,
a manifest changed under a resume, corrupt, truncated and wrong-disk
manifests refused with nothing marked consistent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, Processes, dirtydiff, make_disk, stop
from tests.test_scan import (
    BACKUP,
    differing,
    dirty_set,
    live_pair,
    pair_files,
    restore,
    scan,
    start_writers,
    wait_for_position,
)

MiB = 1 << 20


def digest(backup: str, output: Path, *extra: str) -> dict[str, Any]:
    result = dirtydiff("digest", "--backup", backup, "-o", str(output), "--json", *extra)
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def manifest_scan(state: Path, disk: str, manifest: Path, name: str, *extra: str) -> dict[str, Any]:
    result = dirtydiff(
        "scan", "--state", str(state), "--disk", disk, "--manifest", str(manifest),
        "--bitmap", name, "--json", *extra,
    )  # fmt: skip
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def bitmaps(state: Path) -> dict[str, dict[str, Any]]:
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    return {b["name"]: b for b in status["bitmaps"]}


CASES = [
    # seed, kind, bitmap granularity, manifest granularity, size
    (101, "dense", 65536, 65536, 8 * MiB + 12345),
    (102, "sparse", 65536, 65536, 8 * MiB + 12345),
    (103, "sparse", 4096, 4096, 3 * MiB + 7),
    (104, "dense", 65536, 4096, 4 * MiB + 1),  # a bitmap granule holds 16 digests
    (105, "sparse", 1 << 20, 65536, 9 * MiB + 1),
    (106, "dense", 2 << 20, 2 << 20, 5 * MiB + 3),
]


@pytest.mark.parametrize(("seed", "kind", "granularity", "manifest_granularity", "size"), CASES)
def test_one_sided_equals_two_sided_equals_the_differing_granules(
    procs: Processes,
    tmp_path: Path,
    state: Path,
    seed: int,
    kind: str,
    granularity: int,
    manifest_granularity: int,
    size: int,
) -> None:
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, seed, kind)
    expected = differing(backup_bytes, disk_bytes, granularity)
    server = procs.nbdkit(*BACKUP, str(backup))
    written = tmp_path / "written.ddm"
    g = str(granularity)
    two = scan(state, str(disk), server.uri, "two", "--granularity", g,
               "--write-manifest", str(written))  # fmt: skip
    made = tmp_path / "made.ddm"
    told = digest(server.uri, made, "--granularity", str(manifest_granularity))
    assert told["granules"] == -(-size // manifest_granularity)
    # From here on the backup cannot be read: its server is gone, its file moved.
    stop(server.proc)
    backup.rename(tmp_path / "gone.raw")
    one = manifest_scan(state, str(disk), made, "one", "--granularity", g)
    manifest_scan(state, str(disk), written, "again", "--granularity", g)
    assert dirty_set(state, "two") == dirty_set(state, "one") == dirty_set(state, "again")
    assert dirty_set(state, "one") == expected
    assert one["progress"]["read_backup"] == 0 and one["progress"]["differing_granules"] == len(
        expected
    )
    assert two["bitmap"]["consistent"] and one["bitmap"]["consistent"]
    # The bitmap counts from the backup the manifest was made of.
    assert bitmaps(state)["one"]["backup"] == told["source"]
    # Through the tracker as well (online: the disk is the tracker's URI).
    tracker = procs.tracker(state, disk=disk)
    manifest_scan(state, tracker.uri, made, "online", "--granularity", g)
    assert dirty_set(state, "online") == expected


def test_a_manifest_scan_with_writes_during_it_restores_byte_for_byte(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 48 * MiB
    backup_bytes, disk, backup, backup_server, tracker = live_pair(
        procs, tmp_path, state, size, 111, "sparse"
    )
    manifest = tmp_path / "m.ddm"
    digest(str(backup), manifest)  # from the file, as on the backup's own host
    stop(backup_server.proc)
    stop_writers, threads, done = start_writers(tracker.uri, size)
    try:
        result = manifest_scan(state, tracker.uri, manifest, "b", "--max-rate", "40000000")
    finally:
        stop_writers.set()
        for t in threads:
            t.join(30)
    assert len(done) > 20 and result["bitmap"]["consistent"]
    current = disk.read_bytes()
    assert differing(backup_bytes, current, 65536) <= dirty_set(state, "b")
    assert restore(backup_bytes, state, "b", tracker.uri, 65536) == current


def scan_process(state: Path, disk: str, manifest: Path, name: str, *extra: str) -> Any:
    argv = [sys.executable, "-m", "sidecar.cli", "scan", "--state", str(state), "--disk", disk,
            "--manifest", str(manifest), "--bitmap", name, "--json", *extra]  # fmt: skip
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_manifest_scan_killed_resumes_and_refuses_a_changed_manifest(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 64 * MiB
    backup_bytes, disk, _, backup_server, tracker = live_pair(
        procs, tmp_path, state, size, 121, "dense"
    )
    manifest = tmp_path / "m.ddm"
    digest(backup_server.uri, manifest)
    stop(backup_server.proc)
    stop_writers, threads, _ = start_writers(tracker.uri, size, n=1)
    try:
        proc = scan_process(state, tracker.uri, manifest, "b", "--max-rate", "30000000")
        try:
            wait_for_position(state, "b", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        assert not bitmaps(state)["b"]["consistent"]
        record = json.loads((state / "scans" / "b.json").read_text())
        assert record["manifest"] == str(manifest) and len(record["manifest_checksum"]) == 64
        # Another manifest under the same name: the resume is refused.
        saved = manifest.read_bytes()
        other = make_disk(tmp_path / "other.raw", size)
        digest(str(other), manifest)
        refused = dirtydiff("scan", "--state", str(state), "--disk", tracker.uri, "--manifest",
                            str(manifest), "--bitmap", "b", check=False)  # fmt: skip
        assert refused.returncode == 1 and "changed since the unfinished scan" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not bitmaps(state)["b"]["consistent"]
        manifest.write_bytes(saved)
        result = manifest_scan(state, tracker.uri, manifest, "b")
    finally:
        stop_writers.set()
        for t in threads:
            t.join(30)
    assert result["resumed_from"] > 0
    assert result["progress"]["compared"] <= size - result["resumed_from"]
    current = disk.read_bytes()
    assert differing(backup_bytes, current, 65536) <= dirty_set(state, "b")
    assert restore(backup_bytes, state, "b", tracker.uri, 65536) == current


def test_corrupt_truncated_and_wrong_disk_manifests_are_refused(
    tmp_path: Path, state: Path
) -> None:
    size = 4 * MiB
    disk = make_disk(tmp_path / "d.raw", size)
    good = tmp_path / "good.ddm"
    digest(str(disk), good)
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 1
    other = tmp_path / "other.raw"
    make_disk(other, size + 65536)
    cases = {
        "flipped.ddm": (bytes(flipped), "checksum does not match"),
        "truncated.ddm": (raw[:-100], "truncated"),
        "empty.ddm": (b"", "is empty"),
        "junk.ddm": (b"DDBITMAP" + bytes(200), "wrong magic"),
    }
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    wrong = tmp_path / "wrong.ddm"
    digest(str(other), wrong)
    cases["wrong.ddm"] = (b"", "another disk")
    coarse = tmp_path / "coarse.ddm"
    digest(str(disk), coarse, "--granularity", "1m")
    cases["coarse.ddm"] = (b"", "as fine or finer")
    cases["missing.ddm"] = (b"", "No such file")
    (tmp_path / "missing.ddm").unlink(missing_ok=True)
    for name, (_, why) in cases.items():
        done = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--manifest",
                         str(tmp_path / name), "--bitmap", "b", check=False)  # fmt: skip
        assert done.returncode != 0, name
        assert why in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr
    # Nothing was made, let alone marked consistent.
    assert "b" not in bitmaps(state)
    scans = state / "scans"
    assert not scans.exists() or not list(scans.glob("*.json"))
    # The good one works.
    manifest_scan(state, str(disk), good, "b")
    assert bitmaps(state)["b"]["consistent"] and dirty_set(state, "b") == set()


def test_rebuild_with_a_manifest(procs: Processes, tmp_path: Path, state: Path) -> None:
    size = 8 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 131, "dense")
    manifest = tmp_path / "m.ddm"
    digest(str(backup), manifest)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "b", "--backup", "nbd://backup-host/x")
    tracker.proc.kill()  # then the host "crashes": another boot finds it in use
    tracker.proc.wait(10)
    crashed = {"DIRTYDIFF_BOOT_ID": "00000000-0000-0000-0000-0000000000c7"}
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock, env=crashed)
    assert not bitmaps(state)["b"]["consistent"]
    dirtydiff("rebuild", "--state", str(state), "b", "--disk", tracker.uri,
              "--manifest", str(manifest))  # fmt: skip
    b = bitmaps(state)["b"]
    assert b["consistent"] and b["backup"] == "nbd://backup-host/x"
    assert dirty_set(state, "b") == differing(backup_bytes, disk_bytes, 65536)


def test_with_a_sidecar_a_manifest_scan_runs_in_the_foreground(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The sidecar opens no path a request names: it refuses the manifest,
    and the command scans in the foreground, through the tracker."""
    from dirtydiff import errors  # noqa: PLC0415
    from dirtydiff.owner import SidecarActor  # noqa: PLC0415
    from dirtydiff.state import StateDir  # noqa: PLC0415
    from tests.test_scan_sidecar import sidecar  # noqa: PLC0415

    size = 8 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 141, "sparse")
    manifest = tmp_path / "m.ddm"
    digest(str(backup), manifest)
    tracker = procs.tracker(state, disk=disk)
    sidecar(procs, tmp_path, state, tracker.uri)
    with pytest.raises(errors.PermissionDenied, match="opens no manifest"):
        SidecarActor(StateDir(state)).call(
            "scan.start", name="x", backup="", manifest=str(manifest)
        )
    result = manifest_scan(state, tracker.uri, manifest, "b", "--estimate")
    assert result["bitmap"]["consistent"] and "estimate" in result
    assert dirty_set(state, "b") == differing(backup_bytes, disk_bytes, 65536)


def test_a_two_sided_scan_killed_while_writing_a_manifest_finishes_it(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """--write-manifest survives kill -9: the resumed scan goes on with the
    partial file, and the manifest is the one digest makes of the backup."""
    from dirtydiff.manifest import open_manifest, partial_path  # noqa: PLC0415

    size = 64 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 151, "dense")
    server = procs.nbdkit(*BACKUP, str(backup))
    written = tmp_path / "w.ddm"
    argv = [sys.executable, "-m", "sidecar.cli", "scan", "--state", str(state), "--disk",
            str(disk), "--backup", server.uri, "--bitmap", "b", "--json",
            "--write-manifest", str(written), "--max-rate", "30000000"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_position(state, "b", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert partial_path(written).exists() and not written.exists()
    result = scan(state, str(disk), server.uri, "b", "--write-manifest", str(written))
    assert result["resumed_from"] > 0
    assert not partial_path(written).exists()
    made = tmp_path / "made.ddm"
    digest(server.uri, made)
    with open_manifest(written) as (ours, _), open_manifest(made) as (theirs, _):
        assert bytes(ours.flags) == bytes(theirs.flags)
        assert bytes(ours.digests) == bytes(theirs.digests)
        assert ours.header.source == theirs.header.source == server.uri
    stop(server.proc)
    manifest_scan(state, str(disk), written, "one")
    assert (
        dirty_set(state, "one")
        == dirty_set(state, "b")
        == differing(backup_bytes, disk_bytes, 65536)
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    backup_granules=st.lists(st.sampled_from(["zero", "a", "b", "c"]), min_size=1, max_size=48)
    | st.lists(st.sampled_from(["zero", "a", "b", "c"]), min_size=24, max_size=48),
    changes=st.lists(
        st.tuples(st.integers(0, 47), st.sampled_from(["zero", "a", "b", "x"])), max_size=6
    ),
    per_granule=st.sampled_from([1, 2, 8]),
    chunk_granules=st.sampled_from([1, 3, 8, 16]),
    tail=st.sampled_from([0, 1, 100]),
    order=st.randoms(use_true_random=False),
)
def test_the_manifest_side_finds_exactly_the_differing_granules(
    tmp_path: Path,
    backup_granules: list[str],
    changes: list[tuple[int, str]],
    per_granule: int,
    chunk_granules: int,
    tail: int,
    order: Any,
) -> None:
    """In process, chunk by chunk, in order or not: the fast paths (flag
    bytes, the digest cursor) and the long one give the same answer as
    comparing bytes."""
    from dirtydiff.manifest import ManifestWriter, granule_digests, open_manifest  # noqa: PLC0415
    from sidecar.scan.manifest import ManifestSide  # noqa: PLC0415

    g = 4096
    content = {"zero": bytes(g), "a": b"a" * g, "b": b"b" * g, "c": bytes(g - 1) + b"c",
               "x": b"x" * g}  # fmt: skip
    backup = b"".join(content[k] for k in backup_granules) + b"t" * tail
    disk = bytearray(backup)
    for i, k in changes:
        if i < len(backup_granules):
            disk[i * g : (i + 1) * g] = content[k]
    size = len(backup)
    path = tmp_path / f"m{order.random()}.ddm"
    writer = ManifestWriter.create(path, size, g, "s")
    flags, digests = granule_digests(backup, g)
    writer.record(0, flags, digests)
    writer.commit()
    bitmap_g = g * per_granule
    expected = differing(backup, bytes(disk), bitmap_g)
    chunk = bitmap_g * chunk_granules
    starts = list(range(0, size, chunk))
    if order.random() < 0.5:
        order.shuffle(starts)
    found = set()
    with open_manifest(path) as (manifest, _):
        side = ManifestSide(manifest, bitmap_g, str(path))
        try:
            for start in starts:
                data = bytearray(disk[start : start + chunk])
                zero = data.count(0) == len(data) and order.random() < 0.5
                for o in side.differing(start, len(data), None if zero else data):
                    found.add((start + o) // bitmap_g)
        finally:
            side.close()
            del side, manifest
    assert found == expected


def test_digest_errors_are_one_line_and_leave_no_manifest(tmp_path: Path) -> None:
    from dirtydiff.manifest import partial_path  # noqa: PLC0415

    out = tmp_path / "m.ddm"
    gone = dirtydiff("digest", "--backup", f"nbd+unix:///?socket={tmp_path / 'none.sock'}",
                     "-o", str(out), check=False)  # fmt: skip
    assert gone.returncode == 3 and "cannot connect to the backup" in gone.stderr
    nowhere = dirtydiff("digest", "--backup", str(make_disk(tmp_path / "b.raw", MiB)), "-o",
                        str(tmp_path / "no" / "m.ddm"), check=False)  # fmt: skip
    assert nowhere.returncode != 0 and "No such file or directory" in nowhere.stderr
    for done in (gone, nowhere):
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not out.exists() and not partial_path(out).exists()

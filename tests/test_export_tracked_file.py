"""The deployed export (``serve --disk TRACKER-URI``) reads the file its
tracker tracks itself, once that file is proven the tracked one, and keeps
the hop through the tracker otherwise (sidecar.serve.TrackedFile).

Which way it reads shows in the tracker's request counters (its control
socket's ``stats``): a read through the hop is a pread in the tracker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbd
import pytest

from dirtydiff import control
from dirtydiff.bitmapfile import BOOT_ID_ENV, current_boot_id
from dirtydiff.state import DiskRecord
from tests.conftest import (
    GRANULE,
    Processes,
    Server,
    bitmap_json,
    make_disk,
    nbdinfo_map,
    qemu_io,
)

MiB = 1 << 20
SIZE = 8 * MiB
# The same disk's writes before a tracker runs: data, a hole, data at the end.
FIRST_WRITES = ["write -P 0x11 0 1M", "write -P 0x22 3M 64k", f"write -P 0x33 {SIZE - 4096} 4k"]


def serve_argv(state: Path, disk: str, sock: Path) -> list[str]:
    return [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
            "--disk", disk, "--socket", str(sock)]  # fmt: skip


def tracker_requests(state: Path, kind: str) -> int:
    """How many requests of ``kind`` (pread, extents) the tracker served."""
    stats = control.call(state / "tracker.sock", "stats")
    return int(stats["requests"].get(kind, 0))


def read_all(uri: str) -> bytes:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        return b"".join(bytes(h.pread(MiB, offset)) for offset in range(0, h.get_size(), MiB))
    finally:
        h.shutdown()


def deployed(
    procs: Processes, tmp_path: Path, state: Path, disk: Path, env: dict[str, str] | None = None
) -> tuple[Server, Server]:
    tracker = procs.tracker(state, disk=disk)
    sock = tmp_path / "export.sock"
    return tracker, procs.start(serve_argv(state, tracker.uri, sock), sock, env)


def test_only_a_tracker_s_record_of_this_boot_names_a_file() -> None:
    identity = ("file", 2049, 1234)
    boot = current_boot_id().hex()
    record = DiskRecord(SIZE, "file:/var/lib/disk.raw", "0" * 32, identity, boot, tracked=True)
    assert record.names_file(identity)
    assert not record.names_file(("file", 2049, 1235))
    assert not DiskRecord(SIZE, record.source, record.id, identity, "1" * 32).names_file(identity)
    # Written by an import or an offline scan, not by a tracker of the file:
    untracked = DiskRecord(SIZE, record.source, record.id, identity, boot, tracked=False)
    assert not untracked.names_file(identity)
    upstream = DiskRecord(SIZE, "nbd+unix:///?socket=/run/q.sock", record.id, None, boot)
    assert not upstream.names_file(identity)


def test_the_deployed_export_reads_the_tracked_file_itself(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The same bytes, allocation and bitmap as the tracker shows, and no
    request of ours reaches the tracker; a write through the tracker is in
    the next read, and dirty in the bitmap."""
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(disk), *FIRST_WRITES)
    tracker, sidecar = deployed(procs, tmp_path, state, disk)
    qemu_io(tracker.uri, "write -P 0x44 5M 4k")
    expected_map = nbdinfo_map(tracker.uri)
    preads, extents = tracker_requests(state, "pread"), tracker_requests(state, "extents")

    assert read_all(sidecar.uri) == disk.read_bytes()
    assert nbdinfo_map(sidecar.uri) == expected_map
    assert nbdinfo_map(sidecar.uri, "qemu:dirty-bitmap:@open") == bitmap_json(state)
    assert (tracker_requests(state, "pread"), tracker_requests(state, "extents")) == (
        preads,
        extents,
    )

    qemu_io(tracker.uri, "write -P 0x55 6M 4k")
    data = read_all(sidecar.uri)
    assert data[6 * MiB : 6 * MiB + 4096] == b"\x55" * 4096
    dirty = nbdinfo_map(sidecar.uri, "qemu:dirty-bitmap:@open")
    assert {"offset": 6 * MiB, "length": GRANULE, "type": 1, "description": "dirty"} in dirty
    assert tracker_requests(state, "pread") == preads


def test_a_tracker_of_an_nbd_disk_is_read_through(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """A tracker in front of an NBD disk (qemu-nbd, as for qcow2) has no
    file to read: every read goes through the tracker, as before."""
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(disk), *FIRST_WRITES)
    upstream = procs.qemu_nbd(disk)
    tracker = procs.tracker(state, uri=upstream.uri)
    sock = tmp_path / "export.sock"
    sidecar = procs.start(serve_argv(state, tracker.uri, sock), sock)
    preads = tracker_requests(state, "pread")
    assert read_all(sidecar.uri) == disk.read_bytes()
    assert tracker_requests(state, "pread") > preads


def test_through_the_tracker_a_restart_costs_the_clients_nothing(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """On the hop, the export's tracker connections break when the tracker
    restarts: a client moves to a new one and tries its read again."""
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    upstream = procs.qemu_nbd(disk, "-e", "8")  # a tracker, then its successor
    tracker = procs.tracker(state, uri=upstream.uri)
    sock = tmp_path / "export.sock"
    sidecar = procs.start(serve_argv(state, tracker.uri, sock), sock)
    qemu_io(tracker.uri, "write -P 7 1M 4k")
    h = nbd.NBD()
    h.connect_uri(sidecar.uri)
    try:
        assert bytes(h.pread(4096, MiB)) == b"\x07" * 4096
        tracker.proc.kill()  # nbdkit stops on SIGTERM only once its clients leave
        tracker.proc.wait(15)
        restarted = procs.tracker(state, uri=upstream.uri, sock=tracker.sock)
        qemu_io(restarted.uri, "write -P 8 2M 4k")
        assert bytes(h.pread(4096, 2 * MiB)) == b"\x08" * 4096
    finally:
        h.shutdown()


def test_a_record_of_another_boot_is_no_proof(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Device and inode numbers name the file only within the boot they were
    seen in: a sidecar that sees another boot reads through the tracker."""
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(disk), *FIRST_WRITES)
    other_boot = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    assert current_boot_id() != bytes(16)  # the kernel's is never all zeroes
    _, sidecar = deployed(procs, tmp_path, state, disk, env={BOOT_ID_ENV: other_boot})
    preads = tracker_requests(state, "pread")
    assert read_all(sidecar.uri) == disk.read_bytes()
    assert tracker_requests(state, "pread") > preads


def test_a_file_renamed_over_the_disk_is_never_read(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The tracker keeps writing the file it opened when another is renamed
    over its path: the export reads that one still, never the newcomer."""
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(disk), *FIRST_WRITES)
    tracker, sidecar = deployed(procs, tmp_path, state, disk)
    newcomer = make_disk(tmp_path / "other.raw", SIZE)
    qemu_io(str(newcomer), f"write -P 0x99 0 {SIZE}")
    os.replace(newcomer, disk)
    qemu_io(tracker.uri, "write -P 0x66 2M 4k")
    data = read_all(sidecar.uri)
    assert data[:MiB] == b"\x11" * MiB
    assert data[2 * MiB : 2 * MiB + 4096] == b"\x66" * 4096


def test_a_tracker_restarted_on_another_file_moves_the_export_to_it(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """A tracker started on another disk of the state marks every bitmap
    inconsistent and records that disk. The first export client after it
    is refused (the file it would have read is not the disk any more), and
    later ones read the new disk through the tracker. A client connected
    before keeps its bitmap, which now fails: the old file's data never goes
    out beside a bitmap of the new disk."""
    first = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(first), *FIRST_WRITES)
    second = make_disk(tmp_path / "second.raw", SIZE)
    qemu_io(str(second), f"write -P 0x77 0 {SIZE}")
    tracker, sidecar = deployed(procs, tmp_path, state, first)
    early = nbd.NBD()
    early.add_meta_context("qemu:dirty-bitmap:@open")
    early.connect_uri(sidecar.uri)
    try:
        early.block_status(SIZE, 0, lambda *args: 0)
        tracker.proc.kill()  # nbdkit stops on SIGTERM only once its clients leave
        tracker.proc.wait(15)
        procs.tracker(state, disk=second, sock=tracker.sock)

        with pytest.raises(nbd.Error):
            read_all(sidecar.uri)
        preads = tracker_requests(state, "pread")
        assert read_all(sidecar.uri) == second.read_bytes()
        assert tracker_requests(state, "pread") > preads
        with pytest.raises(nbd.Error):  # EIO: the bitmap is inconsistent
            early.block_status(SIZE, 0, lambda *args: 0)
    finally:
        early.shutdown()

"""Same writes, same bitmap as QEMU.

The same qemu-io operations go (a) through the tracker to a raw disk and (b)
straight to a qcow2 image with an enabled persistent bitmap. QEMU's bitmap,
served by ``qemu-nbd -B`` and read with ``nbdinfo --map``, must equal ours
printed by ``dirtydiff bitmap show --json`` byte for byte, and the two disks
must hold the same content.
"""

from __future__ import annotations

import json
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.conftest import (
    Processes,
    Server,
    bitmap_json,
    dirtydiff,
    make_disk,
    nbdinfo_map,
    qemu_io,
    run,
    stop,
)

MiB = 1 << 20
# Not a multiple of the larger granularities: the last granule is partial.
DISK_SIZE = 12 * MiB + 5 * 4096 + 512


def operations(size: int) -> list[str]:
    return [
        "write -P 0x11 0 64k",  # aligned
        "write -P 0x22 100000 5000",  # unaligned
        "write -P 0x33 300001 1",  # one byte
        "write -P 0x44 65535 2",  # across a granule boundary
        "write -P 0x55 1048575 1048578",  # large, unaligned both ends
        "write -z 2M 100k",  # write zeroes
        "write -z -u 3M 200k",  # write zeroes, may unmap
        "write -P 0x66 4M 1M",
        "discard 4194304 70000",  # trim, unaligned end
        "discard 4456448 1",
        "write -P 0x77 6M 4M",  # large: many granules at once
        f"write -P 0x88 {size - 1} 1",  # the last byte of the disk
        f"write -z {size - 4096} 4096",
    ]


@pytest.mark.parametrize("granularity", [4096, 65536, 1 << 20, 2 << 20])
def test_same_bitmap_and_data_as_qemu(
    procs: Processes, tmp_path: Path, state: Path, granularity: int
) -> None:
    raw = make_disk(tmp_path / "disk.raw", DISK_SIZE)
    qcow2 = tmp_path / "ref.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(DISK_SIZE)])
    run(["qemu-img", "bitmap", "--add", "--enable", "-g", str(granularity), str(qcow2), "ref"])

    tracker = procs.tracker(state, disk=raw)
    dirtydiff("bitmap", "add", "--state", str(state), "--granularity", str(granularity), "ours")
    ops = operations(DISK_SIZE)
    qemu_io(tracker.uri, *ops)
    qemu_io(str(qcow2), *ops, fmt="qcow2")

    reference = procs.qemu_nbd(qcow2, "-r", "-B", "ref", fmt="qcow2")
    expected = nbdinfo_map(reference.uri, "qemu:dirty-bitmap:ref")
    assert any(e["type"] == 1 for e in expected)
    assert bitmap_json(state, "ours") == expected

    # Same text, not just the same JSON value: scripts may compare output.
    ours_text = dirtydiff("bitmap", "show", "--state", str(state), "--json", "ours").stdout
    theirs_text = run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:ref", reference.uri]).stdout
    assert ours_text == theirs_text

    # And the same data (qemu-img compare reads both whole). What a discard
    # leaves is undefined (qcow2 drops whole clusters only, the file plugin
    # punches exactly), so those ranges are rewritten alike on both sides first;
    # they are dirty already, so the bitmaps do not change.
    settle = [
        f"write -P 0x99 {op.split()[1]} {op.split()[2]}" for op in ops if op.startswith("discard")
    ]
    stop(reference.proc)  # it holds qcow2's write lock
    qemu_io(tracker.uri, *settle)
    qemu_io(str(qcow2), *settle, fmt="qcow2")
    assert bitmap_json(state, "ours") == expected
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow2)])


def test_reads_flush_and_cache_mark_nothing(procs: Processes, tmp_path: Path, state: Path) -> None:
    raw = make_disk(tmp_path / "disk.raw", 4 * MiB)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", str(raw)])
    tracker = procs.tracker(state, disk=raw)
    qemu_io(tracker.uri, "read -P 0x5a 0 4M", "flush", "read -P 0x5a 1 100")
    run(["nbdinfo", "--map", tracker.uri])  # block status too
    assert bitmap_json(state) == [
        {"offset": 0, "length": 4 * MiB, "type": 0, "description": "clean"}
    ]


def test_base_allocation_passes_through(procs: Processes, tmp_path: Path, state: Path) -> None:
    raw = make_disk(tmp_path / "disk.raw", 8 * MiB)
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", "-c", "write -P 2 5M 64k", str(raw)])
    tracker = procs.tracker(state, disk=raw)
    reference = procs.nbdkit("file", str(raw))
    assert nbdinfo_map(tracker.uri) == nbdinfo_map(reference.uri)


def test_upstream_qcow2_through_qemu_nbd(procs: Processes, tmp_path: Path, state: Path) -> None:
    """uri= mode: the tracker in front of qemu-nbd serving a qcow2 image."""
    qcow2 = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(8 * MiB)])
    upstream = procs.qemu_nbd(qcow2, "--discard=unmap", fmt="qcow2")
    tracker = procs.tracker(state, uri=upstream.uri)
    qemu_io(tracker.uri, "write -P 0x42 1M 64k", "write -z 3M 4k", "discard 5M 64k", "flush")
    qemu_io(tracker.uri, "read -P 0x42 1M 64k", "read -P 0 3M 4k")
    dirty = [e for e in bitmap_json(state) if e["type"] == 1]
    assert dirty == [
        {"offset": 1 * MiB, "length": 65536, "type": 1, "description": "dirty"},
        {"offset": 3 * MiB, "length": 65536, "type": 1, "description": "dirty"},
        {"offset": 5 * MiB, "length": 65536, "type": 1, "description": "dirty"},
    ]
    allocation = nbdinfo_map(tracker.uri)
    assert any(e["type"] == 0 and int(str(e["offset"])) <= 1 * MiB for e in allocation)


def qemu_bitmap(procs: Processes, tmp: Path, size: int) -> tuple[Path, Server]:
    """A raw disk and a qcow2 image with the same writes, the qcow2's QEMU
    bitmap b0 recording them, and ``qemu-nbd -B b0`` of the qcow2."""
    raw = make_disk(tmp / "disk.raw", size)
    qcow2 = tmp / "ref.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(size)])
    run(["qemu-img", "bitmap", "--add", "--enable", str(qcow2), "b0"])
    ops = operations(size)
    qemu_io(str(raw), *ops)
    qemu_io(str(qcow2), *ops, fmt="qcow2")
    return raw, procs.qemu_nbd(qcow2, "-r", "-B", "b0", fmt="qcow2")


def import_b0(state: Path, reference: Server, name: str = "b0") -> CompletedProcess[str]:
    """``bitmap import`` of QEMU's b0 as NAME, disabled (it stays as QEMU has it)."""
    return dirtydiff("bitmap", "import", "--state", str(state), "--disabled", name, "--from",
                     reference.uri, "--context", "qemu:dirty-bitmap:b0", check=False)  # fmt: skip


def test_a_bitmap_imported_into_a_never_tracked_state_is_served_as_qemu_serves_it(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    # Was refused ("has never been tracked"): a user who only wanted to
    # import QEMU's bitmap and serve it had to run a tracker once first.
    from tests.test_sidecar_api import start_sidecar  # noqa: PLC0415 (a test helper)

    raw, reference = qemu_bitmap(procs, tmp_path, DISK_SIZE)
    refused_name = import_b0(state, reference, "a/b")
    assert refused_name.returncode == 1 and "bad bitmap name" in refused_name.stderr
    assert list(state.iterdir()) == []  # a refused import sets up nothing
    assert import_b0(state, reference).returncode == 0
    record = json.loads((state / "disk.json").read_text())
    # The disk it describes: the export it came from, of that size.
    assert record["size"] == DISK_SIZE and record["source"] == reference.uri
    assert "file" not in record
    export = start_sidecar(procs, tmp_path, state, str(raw))
    expected = nbdinfo_map(reference.uri, "qemu:dirty-bitmap:b0")
    assert any(e["type"] == 1 for e in expected)
    assert nbdinfo_map(export.uri, "qemu:dirty-bitmap:b0") == expected
    assert bitmap_json(state, "b0") == expected
    stop(export.proc)

    # The checks hold: a tracker on a disk of another size is refused, and
    # an offline scan of a disk nothing proves to be this one.
    other_size = make_disk(tmp_path / "other-size.raw", DISK_SIZE + 4096)
    with pytest.raises(RuntimeError, match="size"):
        procs.tracker(state, disk=other_size)
    other = make_disk(tmp_path / "other.raw", DISK_SIZE)
    refused = dirtydiff("scan", "--state", str(state), "--disk", str(other), "--backup",
                        reference.uri, "--bitmap", "s", check=False)  # fmt: skip
    assert refused.returncode == 1 and "cannot tell" in refused.stderr, refused.stderr
    # A tracker on the disk takes the state over as its own, bitmap and all.
    tracker = procs.tracker(state, disk=raw)
    assert bitmap_json(state, "b0") == expected
    qemu_io(tracker.uri, "write 0 1")


def test_a_never_tracked_state_served_from_a_file_records_that_file(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    from tests.test_sidecar_api import start_sidecar  # noqa: PLC0415 (a test helper)

    raw, reference = qemu_bitmap(procs, tmp_path, DISK_SIZE)
    export = start_sidecar(procs, tmp_path, state, str(raw))
    record = json.loads((state / "disk.json").read_text())
    st = raw.stat()
    assert record["size"] == DISK_SIZE and record["source"] == f"file:{raw}"
    assert record["file"] == ["file", st.st_dev, st.st_ino]
    assert import_b0(state, reference).returncode == 0  # through the sidecar
    expected = nbdinfo_map(reference.uri, "qemu:dirty-bitmap:b0")
    assert nbdinfo_map(export.uri, "qemu:dirty-bitmap:b0") == expected

    # Another file of the same size is not this disk: its scan is refused
    # (run in the foreground: the sidecar scans only its own disk).
    other = make_disk(tmp_path / "other.raw", DISK_SIZE)
    refused = dirtydiff("scan", "--state", str(state), "--disk", str(other), "--backup",
                        reference.uri, "--bitmap", "s", check=False)  # fmt: skip
    assert refused.returncode == 1 and "is not the disk of" in refused.stderr, refused.stderr
    assert json.loads((state / "disk.json").read_text()) == record

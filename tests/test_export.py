"""The sidecar's export gives the same answers as qemu-nbd.

A qcow2 image gets a persistent QEMU bitmap and some writes; a raw file gets
the same writes. ``qemu-nbd -B b0`` serves the qcow2 (the bitmap reference),
``qemu-nbd -f raw`` the raw file (the allocation reference). dirtydiff imports
b0 and serves the raw file. Every client must see the same thing from both.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.conftest import (
    Processes,
    Server,
    dirtydiff,
    make_disk,
    qemu_bitmap_pair,
    qemu_io,
    run,
)

MiB = 1 << 20
SIZE = 96 * MiB + 3 * 512  # qcow2 wants whole sectors; not whole granules


def writes(size: int) -> list[str]:
    return [
        "write -P 0x11 0 64k",
        "write -P 0x22 100000 5000",
        "write -P 0x33 300001 1",
        "write -P 0x44 1048575 1048578",
        "write -z 2M 100k",
        "write -P 0x55 4M 8M",
        "write -z 6M 64k",
        "write -P 0x66 40M 1",
        "write -P 0x77 41M 17M",
        f"write -P 0x88 {size - 1} 1",
    ] + [f"write -P 0x99 {m}M 4k" for m in range(60, 90, 3)]


@dataclass
class Pair:
    raw: Path
    ours: Server
    ref_bitmap: Server
    ref_raw: Server


def serve_argv(state: Path, disk: Path, sock: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
            "--disk", str(disk), "--socket", str(sock), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("export")
    procs = Processes(tmp)
    try:
        raw, state, ref_bitmap = qemu_bitmap_pair(procs, tmp, SIZE, writes(SIZE))
        ref_raw = procs.qemu_nbd(raw, "-r")
        sock = tmp / "ours.sock"
        ours = procs.start(serve_argv(state, raw, sock, "--bitmap", "b0"), sock)
        yield Pair(raw, ours, ref_bitmap, ref_raw)
    finally:
        procs.stop_all()


def nbdinfo(*args: str) -> str:
    return run(["nbdinfo", *args]).stdout


def test_dirty_bitmap_map_is_identical(pair: Pair) -> None:
    ours = nbdinfo("--json", "--map=qemu:dirty-bitmap:b0", pair.ours.uri)
    theirs = nbdinfo("--json", "--map=qemu:dirty-bitmap:b0", pair.ref_bitmap.uri)
    assert len(json.loads(theirs)) > 10
    assert ours == theirs


def test_allocation_map_is_identical(pair: Pair) -> None:
    ours = nbdinfo("--json", "--map", pair.ours.uri)
    theirs = nbdinfo("--json", "--map", pair.ref_raw.uri)
    assert any(e["type"] == 3 for e in json.loads(theirs))
    assert ours == theirs


def test_list_shows_the_same_contexts_and_limits(pair: Pair) -> None:
    ours = json.loads(nbdinfo("--list", "--json", pair.ours.uri))["exports"][0]
    theirs = json.loads(nbdinfo("--list", "--json", pair.ref_bitmap.uri))["exports"][0]
    for key in ("contexts", "export-name", "is_read_only", "can_flush", "can_fua", "can_cache",
                "can_df", "can_trim", "can_zero", "block_size_minimum", "block_size_preferred",
                "block_size_maximum", "export-size"):  # fmt: skip
        assert ours[key] == theirs[key], key


def qemu_img_map(server: Server, bitmap: str | None) -> list[dict[str, Any]]:
    opts = f"driver=nbd,server.type=unix,server.path={server.sock}"
    if bitmap:
        opts += f",x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    found: list[dict[str, Any]] = json.loads(
        run(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout
    )
    return found


def test_qemu_img_map_with_x_dirty_bitmap_is_identical(pair: Pair) -> None:
    ours = qemu_img_map(pair.ours, "b0")
    theirs = qemu_img_map(pair.ref_bitmap, "b0")
    assert any(not e["data"] for e in theirs)
    assert ours == theirs
    assert qemu_img_map(pair.ours, None) == qemu_img_map(pair.ref_raw, None)


def queries(size: int) -> list[tuple[int, int]]:
    rng = random.Random(4)
    found = [(0, size), (0, 1), (size - 1, 1), (size - 4096, 4096), (1, size - 1), (65535, 2)]
    for _ in range(150):
        offset = rng.randrange(size)
        found.append(
            (offset, rng.randint(1, min(size - offset, rng.choice([512, 70000, 3 << 20, size]))))
        )
    return found


def block_status(uri: str, context: str, offset: int, length: int, flags: int) -> list[int]:
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    found: list[int] = []

    def collect(name: str, start: int, entries: list[int], err: Any) -> int:
        assert name == context and start == offset
        found.extend(entries)
        return 0

    h.block_status(length, offset, collect, flags)
    h.shutdown()
    return found


@pytest.mark.parametrize("flags", [0, nbd.CMD_FLAG_REQ_ONE], ids=["all", "req-one"])
def test_block_status_answers_are_identical(pair: Pair, flags: int) -> None:
    cases = [("qemu:dirty-bitmap:b0", pair.ref_bitmap), ("base:allocation", pair.ref_raw)]
    for context, reference in cases:
        for offset, length in queries(SIZE):
            ours = block_status(pair.ours.uri, context, offset, length, flags)
            theirs = block_status(reference.uri, context, offset, length, flags)
            assert ours == theirs, (context, offset, length)


def test_a_fragmented_file_is_answered_in_parts_that_add_up(
    procs: Processes, state: Path, tmp_path: Path
) -> None:
    """A local file's allocation is asked inline, a bounded number of extents
    at a time: one request over a file of 5,120 extents is answered for a
    prefix only (the NBD spec allows fewer descriptors than the range needs),
    that prefix is exactly qemu-nbd's, and a client's walk sees qemu-nbd's map."""
    from sidecar.export.contexts import INLINE_EXTENTS  # noqa: PLC0415

    raw = make_disk(tmp_path / "fragmented.raw", 40 * MiB)
    with raw.open("r+b") as f:
        for offset in range(0, 40 * MiB, 16 << 10):
            f.seek(offset)
            f.write(b"\xaa" * 4096)
    ref = procs.qemu_nbd(raw, "-r")
    sock = tmp_path / "ours.sock"
    ours = procs.start(serve_argv(state, raw, sock), sock)

    theirs = block_status(ref.uri, "base:allocation", 0, 40 * MiB, 0)
    assert len(theirs) == 2 * 2 * 2560  # qemu-nbd answers the whole range at once
    answer = block_status(ours.uri, "base:allocation", 0, 40 * MiB, 0)
    assert len(answer) == 2 * INLINE_EXTENTS
    assert answer == theirs[: len(answer)]
    assert nbdinfo("--json", "--map", ours.uri) == nbdinfo("--json", "--map", ref.uri)


def test_copies_are_byte_identical(pair: Pair, tmp_path: Path) -> None:
    copy = tmp_path / "copy.raw"
    run(["nbdcopy", pair.ours.uri, str(copy)])
    assert copy.read_bytes() == pair.raw.read_bytes()
    converted = tmp_path / "converted.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", pair.ours.uri, str(converted)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(pair.raw), str(converted)])
    last = f"read -P 0x88 {SIZE - 1} 1"
    reads = ["read -P 0x55 4M 2M", "read -P 0 6M 64k", last, "read -P 0 2M 100k"]
    qemu_io(pair.ours.uri, *reads, readonly=True)


def test_inconsistent_bitmaps_are_not_exported(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "--disabled", "kept")
    tracker.proc.kill()
    tracker.proc.wait(10)
    procs.tracker(
        state, disk=disk, env={"DIRTYDIFF_BOOT_ID": "00000000-0000-0000-0000-000000000001"}
    )
    sock = tmp_path / "ours.sock"
    ours = procs.start(serve_argv(state, disk, sock), sock)
    contexts = json.loads(nbdinfo("--list", "--json", ours.uri))["exports"][0]["contexts"]
    assert contexts == ["base:allocation", "qemu:dirty-bitmap:kept"]
    asked = subprocess.run(
        ["nbdinfo", "--map=qemu:dirty-bitmap:@open", ours.uri], capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert asked.returncode != 0


def test_live_export_through_the_tracker_and_over_tcp(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The usual deployment: the export reads the disk through the tracker's
    socket, so it sees the VM's writes, and the bitmaps it serves are live."""
    disk = make_disk(tmp_path / "disk.raw", 16 * MiB)
    tracker = procs.tracker(state, disk=disk)
    sock = tmp_path / "ours.sock"
    argv = serve_argv(state, disk, sock, "--tcp", "127.0.0.1:0")
    argv[argv.index(str(disk))] = tracker.uri
    ours = procs.start(argv, sock)
    qemu_io(tracker.uri, "write -P 0x5a 3M 64k")
    qemu_io(ours.uri, "read -P 0x5a 3M 64k", readonly=True)
    found = json.loads(nbdinfo("--json", "--map=qemu:dirty-bitmap:@open", ours.uri))
    assert [e["offset"] for e in found if e["type"] == 1] == [3 * MiB]
    qemu_io(tracker.uri, "write -P 0x5b 9M 1")  # the live bitmap follows at once
    found = json.loads(nbdinfo("--json", "--map=qemu:dirty-bitmap:@open", ours.uri))
    assert [e["offset"] for e in found if e["type"] == 1] == [3 * MiB, 9 * MiB]
    # TCP: loopback, the port the kernel chose, printed on stderr.
    port = int(ours.stderr().split("listening on tcp 127.0.0.1:")[1].split()[0])
    qemu_io(f"nbd://127.0.0.1:{port}/", "read -P 0x5b 9M 1", readonly=True)


def dirty_offsets(h: Any, context: str, size: int) -> list[int]:
    """Offsets of dirty extents of ``context`` on an open libnbd handle."""
    found: list[int] = []

    def collect(meta: str, offset: int, entries: list[int], err: int) -> int:
        if meta == context:
            position = offset
            for length, flags in zip(entries[::2], entries[1::2], strict=True):
                if flags & 1:
                    found.append(position)
                position += length
        return 0

    h.block_status(size, 0, collect)
    return found


def _walk(h: nbd.NBD, context: str, start: int, end: int) -> list[int]:
    """The dirty offsets of [start, end), one block status request per 1 MiB,
    as nbdinfo --map walks."""
    found = []
    for offset in range(start, end, MiB):
        found += [offset + d for d in dirty_offsets_at(h, context, offset, MiB)]
    return found


def dirty_offsets_at(h: nbd.NBD, context: str, offset: int, length: int) -> list[int]:
    found: list[int] = []

    def collect(ctx: str, start: int, entries: list[int], err: Any) -> int:
        if ctx == context:
            position = start - offset
            for size, flags in zip(entries[::2], entries[1::2], strict=True):
                if flags & 1:
                    found.append(position)
                position += size
        return 0

    h.block_status(length, offset, collect)
    return found


# What an operator or a backup tool may do to a bitmap while a client is
# half way through reading it; each puts another bitmap under the name.
REBINDS: dict[str, Callable[[str, str], object]] = {
    "checkpoint": lambda state, name: dirtydiff("checkpoint", "--state", state, "cp-next"),
    "clear": lambda state, name: dirtydiff("bitmap", "clear", "--state", state, name),
    "remove-and-add": lambda state, name: (
        dirtydiff("bitmap", "remove", "--state", state, name),
        dirtydiff("bitmap", "add", "--state", state, name),
    ),
}


@pytest.mark.parametrize("change", sorted(REBINDS))
def test_a_client_half_way_through_a_bitmap_never_reads_another_one(
    procs: Processes, tmp_path: Path, state: Path, change: str
) -> None:
    """A client bound to qemu:dirty-bitmap:NAME walks half the disk; then
    NAME becomes another bitmap. The second half must fail (EIO), not
    answer from the new, empty one: the granule written there would be
    reported clean. A new connection reads the new bitmap."""
    size = 16 * MiB
    disk = make_disk(tmp_path / "disk.raw", size)
    tracker = procs.tracker(state, disk=disk)
    name = "@open" if change == "checkpoint" else "b"
    if name != "@open":
        dirtydiff("bitmap", "add", "--state", str(state), name)
    sock = tmp_path / "ours.sock"
    argv = serve_argv(state, disk, sock)
    argv[argv.index(str(disk))] = tracker.uri
    ours = procs.start(argv, sock)
    qemu_io(tracker.uri, "write -P 1 1M 4k", "write -P 2 12M 4k")
    context = f"qemu:dirty-bitmap:{name}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(ours.uri)
    try:
        assert _walk(h, context, 0, size // 2) == [1 * MiB]
        REBINDS[change](str(state), name)
        with pytest.raises(nbd.Error) as failed:
            _walk(h, context, size // 2, size)
        assert failed.value.errno == "EIO"
        h.pread(4096, 12 * MiB)  # the connection goes on
    finally:
        h.shutdown()
    qemu_io(tracker.uri, "write -P 3 7M 4k")
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(ours.uri)
    try:
        assert _walk(h, context, 0, size) == [7 * MiB]
    finally:
        h.shutdown()


def test_a_removed_or_crashed_bitmap_fails_its_connections(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """A bitmap removed, or found inconsistent under a connection (a
    tracker restarted after a host crash), fails its requests instead of
    answering from the file it had."""
    size = 16 * MiB
    disk = make_disk(tmp_path / "disk.raw", size)
    tracker = procs.tracker(state, disk=disk)
    sock = tmp_path / "ours.sock"
    argv = serve_argv(state, disk, sock)
    argv[argv.index(str(disk))] = tracker.uri
    ours = procs.start(argv, sock)
    qemu_io(tracker.uri, "write -P 1 5M 4k")
    dirtydiff("checkpoint", "--state", str(state), "cp2")
    qemu_io(tracker.uri, "write -P 3 7M 4k")
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:cp2")
    h.connect_uri(ours.uri)
    try:
        assert dirty_offsets(h, "qemu:dirty-bitmap:cp2", size) == [5 * MiB]
        dirtydiff("bitmap", "remove", "--state", str(state), "cp2")
        with pytest.raises(nbd.Error) as removed:
            dirty_offsets(h, "qemu:dirty-bitmap:cp2", size)
        assert removed.value.errno == "EIO"
        h.pread(4096, 7 * MiB)  # the connection goes on
    finally:
        h.shutdown()

    # Reading the file itself, this export's connections outlive the tracker
    # (one sidecar per state directory: the first one goes first).
    ours.proc.terminate()
    assert ours.proc.wait(20) == 0
    sock = tmp_path / "direct.sock"
    direct = procs.start(serve_argv(state, disk, sock), sock)
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:@open")
    h.connect_uri(direct.uri)
    try:
        assert dirty_offsets(h, "qemu:dirty-bitmap:@open", size) == [7 * MiB]
        # A host crash: the tracker comes back under another boot and finds
        # @open was recording; it may have missed writes.
        tracker.proc.kill()
        tracker.proc.wait(10)
        procs.tracker(
            state,
            disk=disk,
            sock=tracker.sock,
            env={"DIRTYDIFF_BOOT_ID": "00000000-0000-0000-0000-000000000002"},
        )
        with pytest.raises(nbd.Error) as inconsistent:
            dirty_offsets(h, "qemu:dirty-bitmap:@open", size)
        assert inconsistent.value.errno == "EIO"
    finally:
        h.shutdown()

"""Point-in-time snapshots in the tracker: copy-before-write and ``@snapshot:NAME``.

Every test runs the real nbdkit with the tracker plugin on a file disk,
writes through libnbd or qemu-io, and reads the snapshot export with libnbd
on the tracker's socket. The reference is the disk file copied while no
write ran (the instant).
"""

from __future__ import annotations

import errno
import os
import random
import threading
from pathlib import Path
from typing import Any

import nbd
import pytest

from dirtydiff import control
from tests.conftest import Processes, Server, make_disk

MiB = 1 << 20


def call(state: Path, op: str, **args: object) -> Any:
    return control.call(state / "tracker.sock", op, **args)


def connect(server: Server, export: str = "") -> Any:
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_full_info(True)
    h.connect_unix(str(server.sock))
    return h


def read_all(h: Any, size: int, chunk: int = 4 * MiB) -> bytes:
    out = bytearray()
    for offset in range(0, size, chunk):
        out += h.pread(min(chunk, size - offset), offset)
    return bytes(out)


def snapshot_of(state: Path, name: str) -> dict[str, Any]:
    found = {s["name"]: s for s in call(state, "snapshot.list")["snapshots"]}
    return found[name]


def fill(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        for _ in range(0, size, MiB):
            f.write(rng.randbytes(MiB))
        f.truncate(size)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = make_disk(tmp_path / "disk.raw", 16 * MiB + 12345)
    fill(path, 1)
    return path


def take(state: Path, name: str, **snapshot: object) -> dict[str, Any]:
    result: dict[str, Any] = call(state, "checkpoint", name=name, snapshot=snapshot)
    return result


def test_a_snapshot_reads_the_instant_while_writers_change_every_granule(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    size = disk.stat().st_size
    reference = disk.read_bytes()
    reply = take(state, "c0")
    assert reply["snapshot"]["state"] == "active"
    assert reply["snapshot"]["protected_bytes"] == size
    assert reply["snapshot"]["export"] == "@snapshot:c0"

    stop_writing = threading.Event()
    failures: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        h = connect(tracker)
        try:
            while not stop_writing.is_set():
                offset = rng.randrange(size - 1)
                length = min(size - offset, rng.randint(1, 300_000))
                h.pwrite(rng.randbytes(1) * length, offset)
        except BaseException as e:
            failures.append(e)
        finally:
            h.shutdown()

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    try:
        reader = connect(tracker, "@snapshot:c0")
        seen = read_all(reader, size, chunk=3 * MiB + 4097)
        reader.shutdown()
    finally:
        stop_writing.set()
        for t in threads:
            t.join()
    assert not failures
    assert seen == reference
    assert disk.read_bytes() != reference  # the writers did change the disk
    info = snapshot_of(state, "c0")
    assert info["state"] == "active" and info["copied_bytes"] > 0


def test_writes_to_a_snapshot_export_fail_and_unknown_exports_are_refused(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    take(state, "c0")
    h = connect(tracker, "@snapshot:c0")
    assert h.can_trim() and not h.is_read_only() and h.can_multi_conn()
    with pytest.raises(nbd.Error) as raised:
        h.pwrite(b"x" * 512, 0)
    assert raised.value.errnum in (errno.EROFS, errno.EPERM)
    assert h.get_export_description().startswith("dirtydiff snapshot c0 of state ")
    h.shutdown()
    with pytest.raises(nbd.Error):
        connect(tracker, "@snapshot:nope")
    with pytest.raises(nbd.Error):
        connect(tracker, "other")
    lister = nbd.NBD()
    lister.set_opt_mode(True)
    lister.connect_unix(str(tracker.sock))
    names: list[str] = []
    lister.opt_list(lambda name, desc: names.append(name) or 0)
    lister.opt_abort()
    assert "" in names and "@snapshot:c0" in names

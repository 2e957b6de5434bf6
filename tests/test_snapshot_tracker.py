"""Point-in-time snapshots in the tracker: copy-before-write and ``@snapshot:NAME``.

Every test runs the real nbdkit with the tracker plugin on a file disk,
writes through libnbd or qemu-io, and reads the snapshot export with libnbd
on the tracker's socket. The reference is the disk file copied while no
write ran (the instant).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from dirtydiff import control, errors
from dirtydiff.bitmapfile import BitmapFile
from dirtydiff.owner import StateOwner
from dirtydiff.snapshots import read_snapshots
from dirtydiff.state import StateDir, record_first_disk
from dirtydiff.store import BitmapStore
from tests.conftest import GRANULE, Processes, Server, make_disk, run, stop

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
    found: dict[str, dict[str, Any]] = {
        s["name"]: s for s in call(state, "snapshot.list")["snapshots"]
    }
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
    # Any other name is the live disk, as before snapshots: a VM configured
    # with an export name keeps its disk.
    other = connect(tracker, "vda")
    assert other.get_size() == disk.stat().st_size and other.is_read_only() is False
    assert not other.get_export_description().startswith("dirtydiff snapshot")
    other.shutdown()
    lister = nbd.NBD()
    lister.set_opt_mode(True)
    lister.connect_unix(str(tracker.sock))
    names: list[str] = []

    def listed(name: str, description: str) -> int:
        names.append(name)
        return 0

    lister.opt_list(listed)
    lister.opt_abort()
    assert "" in names and "@snapshot:c0" in names


def test_a_reader_and_a_writer_hammering_one_granule_only_ever_read_the_old_data(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    offset = 5 * GRANULE
    old = disk.read_bytes()[offset : offset + GRANULE]
    take(state, "c0")
    done = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        h = connect(tracker, "@snapshot:c0")
        try:
            while not done.is_set() or len(seen) < 100:
                # Reads that cross into the next granule, and single bytes.
                seen.append(h.pread(GRANULE, offset))
                seen.append(h.pread(1, offset + GRANULE - 1) * GRANULE)
        finally:
            h.shutdown()

    thread = threading.Thread(target=reader)
    thread.start()
    h = connect(tracker)
    try:
        for i in range(200):
            h.pwrite(bytes([i]) * 4096, offset + (i % 16) * 4096)
    finally:
        done.set()
        thread.join()
        h.shutdown()
    tail = old[-1:] * GRANULE
    assert all(s in (old, tail) for s in seen), "a snapshot read returned new data"
    assert seen.count(old) >= 50  # half of them: the whole-granule reads
    assert snapshot_of(state, "c0")["copied_bytes"] == GRANULE  # copied once, and only it


def dirty_granules(state: Path, name: str) -> set[int]:
    with BitmapFile(state / "bitmaps" / f"{name}.bitmap", writable=False) as bitmap:
        bits = int.from_bytes(bitmap.bits, "little")
    return {i for i in range(bits.bit_length()) if bits >> i & 1}


def test_scope_dirty_protects_the_checkpoints_dirty_granules_only(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    h = connect(tracker)
    h.pwrite(b"a" * GRANULE, 3 * GRANULE)
    h.pwrite(b"b" * 100, 10 * GRANULE + 5)
    reference = disk.read_bytes()
    reply = take(state, "c1", scope="dirty")
    assert reply["snapshot"]["scope"] == "dirty"
    assert reply["snapshot"]["protected_bytes"] == 2 * GRANULE
    assert dirty_granules(state, "c1") == {3, 10}
    h.pwrite(b"c" * (12 * GRANULE), 0)  # over both, and over unprotected granules
    snap = connect(tracker, "@snapshot:c1")
    for g in (3, 10):
        assert snap.pread(GRANULE, g * GRANULE) == reference[g * GRANULE : (g + 1) * GRANULE]
    for offset, length in ((0, 1), (4 * GRANULE, GRANULE), (3 * GRANULE, 2 * GRANULE)):
        with pytest.raises(nbd.Error) as raised:
            snap.pread(length, offset)
        assert raised.value.errnum == errno.EIO
    assert snapshot_of(state, "c1")["copied_bytes"] == 2 * GRANULE
    snap.shutdown()
    h.shutdown()


def test_past_the_store_limit_the_snapshot_breaks_and_every_write_succeeds(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    size = disk.stat().st_size
    take(state, "c0", limit=4 * GRANULE)
    snap = connect(tracker, "@snapshot:c0")
    assert snap.pread(GRANULE, 0) == disk.read_bytes()[:GRANULE]
    h = connect(tracker)
    rng = random.Random(7)
    model = bytearray(disk.read_bytes())
    for g in range(0, 40, 3):
        data = rng.randbytes(GRANULE + 10)
        h.pwrite(data, g * GRANULE)  # raises if the guest's write failed
        model[g * GRANULE : g * GRANULE + len(data)] = data
    h.zero(GRANULE, 50 * GRANULE)
    model[50 * GRANULE : 51 * GRANULE] = bytes(GRANULE)
    h.flush()
    assert disk.read_bytes() == bytes(model[:size])
    info = snapshot_of(state, "c0")
    assert info["state"] == "broken"
    assert info["reason"] == "store limit of 256 KiB reached"
    assert info["store_bytes"] == 0 and info["protected_bytes"] == 0
    with pytest.raises(nbd.Error) as raised:
        snap.pread(GRANULE, 0)
    assert raised.value.errnum == errno.EIO
    # The bitmaps are untouched: every write is in @open.
    written = {g for g in range(0, 40, 3)} | {g + 1 for g in range(0, 40, 3)} | {50}
    assert written <= dirty_granules(state, "@open")
    snap.shutdown()
    h.shutdown()


def test_trim_on_the_snapshot_releases_granules_and_later_writes_copy_nothing(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    reference = disk.read_bytes()
    take(state, "c0")
    h = connect(tracker)
    h.pwrite(b"x" * (8 * GRANULE), 0)
    before = snapshot_of(state, "c0")
    assert before["copied_bytes"] == 8 * GRANULE
    assert before["store_bytes"] >= 8 * GRANULE
    snap = connect(tracker, "@snapshot:c0")
    assert snap.pread(8 * GRANULE, 0) == reference[: 8 * GRANULE]
    snap.trim(4 * GRANULE + 100, 0)  # granules 0..3 whole, 4 only in part
    after = snapshot_of(state, "c0")
    assert after["copied_bytes"] == 4 * GRANULE
    assert after["store_bytes"] <= before["store_bytes"] - 4 * GRANULE
    assert after["protected_bytes"] == before["protected_bytes"] - 4 * GRANULE
    with pytest.raises(nbd.Error):
        snap.pread(1, 3 * GRANULE)
    assert snap.pread(GRANULE, 4 * GRANULE) == reference[4 * GRANULE : 5 * GRANULE]
    # Released granules are not copied again, and no more is copied than before.
    snap.trim(GRANULE, 20 * GRANULE)
    h.pwrite(b"y" * (4 * GRANULE), 0)
    h.pwrite(b"y" * GRANULE, 20 * GRANULE)
    assert snapshot_of(state, "c0")["copied_bytes"] == 4 * GRANULE
    snap.shutdown()
    h.shutdown()


def test_a_snapshot_survives_kill_9_of_the_tracker_mid_writes(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    size = disk.stat().st_size
    reference = disk.read_bytes()
    take(state, "c0")
    sock = tracker.sock
    hit = threading.Event()

    def writer(seed: int, h: Any) -> None:
        rng = random.Random(seed)
        with contextlib.suppress(nbd.Error):  # the tracker dies under us
            while True:
                offset = rng.randrange(size - 1)
                h.pwrite(rng.randbytes(rng.randint(1, 200_000))[: size - offset], offset)
                hit.set()

    threads = [threading.Thread(target=writer, args=(seed, connect(tracker))) for seed in range(3)]
    for t in threads:
        t.start()
    hit.wait(30)
    tracker.proc.send_signal(signal.SIGKILL)
    tracker.proc.wait()
    for t in threads:
        t.join()
    tracker = procs.tracker(state, disk=disk, sock=sock)
    info = snapshot_of(state, "c0")
    assert info["state"] == "active", info
    assert info["copied_bytes"] > 0
    reader = connect(tracker, "@snapshot:c0")
    assert read_all(reader, size) == reference
    reader.shutdown()
    assert disk.read_bytes() != reference


def test_a_clean_restart_serves_the_snapshot_and_another_boot_breaks_it(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    size = disk.stat().st_size
    reference = disk.read_bytes()
    take(state, "c0")
    h = connect(tracker)
    h.pwrite(b"z" * (3 * MiB), MiB)
    h.shutdown()
    assert stop(tracker.proc) == 0
    # Offline, the files tell the last state.
    [offline] = [s for s in read_snapshots(StateDir(state)) if s.name == "c0"]
    assert offline.state == "active" and offline.copied_bytes == 3 * MiB
    tracker = procs.tracker(state, disk=disk)
    reader = connect(tracker, "@snapshot:c0")
    assert read_all(reader, size) == reference
    reader.shutdown()
    assert stop(tracker.proc) == 0
    other_boot = {"DIRTYDIFF_BOOT_ID": str(uuid.uuid4())}
    tracker = procs.tracker(state, disk=disk, env=other_boot)
    info = snapshot_of(state, "c0")
    assert info["state"] == "broken"
    assert info["reason"] == "host restarted since the snapshot was taken"
    with pytest.raises(nbd.Error) as raised:
        connect(tracker, "@snapshot:c0").pread(512, 0)
    assert raised.value.errnum == errno.EIO


def test_release_removes_the_files_and_keeps_the_bitmap(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    elsewhere = tmp_path / "stores"
    elsewhere.mkdir(mode=0o700)
    tracker = procs.tracker(state, disk=disk)
    info = take(state, "c0", dir=str(elsewhere))["snapshot"]
    assert Path(info["store"]).parent == elsewhere
    with pytest.raises(errors.Conflict) as refused:
        call(state, "bitmap.remove", name="c0")
    assert refused.value.code == "snapshot-exists"
    reader = connect(tracker, "@snapshot:c0")
    released = call(state, "snapshot.release", name="c0")
    assert released["name"] == "c0" and released["state"] == "active"
    assert not Path(info["store"]).exists()
    assert not (state / "snapshots" / "c0.snap").exists()
    assert "c0" in [b["name"] for b in call(state, "bitmap.list")]
    with pytest.raises(nbd.Error) as raised:
        reader.pread(512, 0)  # a client still connected
    assert raised.value.errnum == errno.EIO
    with pytest.raises(errors.NotFound) as unknown:
        call(state, "snapshot.release", name="c0")
    assert unknown.value.code == "no-such-snapshot"
    call(state, "bitmap.remove", name="c0")  # now it may go


@pytest.mark.parametrize(
    ("snapshot", "says"),
    [
        ({"scope": "some"}, "scope"),
        ({"limit": -1}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": True}, "limit"),
        ({"dir": "relative/dir"}, "absolute"),
        ({"dir": 5}, "dir"),
        ({"color": "red"}, "scope, dir and limit"),
    ],
)
def test_bad_snapshot_arguments_are_refused_and_change_nothing(
    procs: Processes, state: Path, disk: Path, snapshot: dict[str, Any], says: str
) -> None:
    procs.tracker(state, disk=disk)
    with pytest.raises(errors.BadRequest) as refused:
        call(state, "checkpoint", name="c0", snapshot=snapshot)
    assert refused.value.code == "bad-snapshot" and says in refused.value.message
    assert "c0" not in [b["name"] for b in call(state, "bitmap.list")]
    assert call(state, "snapshot.list") == {"snapshots": []}


def test_a_snapshot_dir_others_may_write_in_is_refused(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    procs.tracker(state, disk=disk)
    with pytest.raises(errors.PermissionDenied) as refused:
        call(state, "checkpoint", name="c0", snapshot={"dir": str(unsafe)})
    assert "writable by group and others" in refused.value.message
    assert "c0" not in [b["name"] for b in call(state, "bitmap.list")]
    assert list(unsafe.iterdir()) == []


def test_without_a_tracker_a_snapshot_is_refused(state: Path, disk: Path) -> None:
    record_first_disk(StateDir(state), disk.stat().st_size, f"file:{disk}")
    owner = StateOwner(StateDir(state))
    with owner.acting() as actor, pytest.raises(errors.Unavailable) as refused:
        actor.call("checkpoint", name="c0", snapshot={})
    assert refused.value.code == "snapshot-needs-tracker"
    assert "tracker" in refused.value.message


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs for a snapshot's store (root only)."""
    where = tmp_path / "small"
    where.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_store_breaks_the_snapshot_and_the_guests_writes_succeed(
    procs: Processes, state: Path, disk: Path, small_fs: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    size = disk.stat().st_size
    take(state, "c0", dir=str(small_fs))
    h = connect(tracker)
    model = bytearray(disk.read_bytes())
    rng = random.Random(3)
    for offset in range(0, 4 * MiB, 256 * 1024):
        data = rng.randbytes(256 * 1024)
        h.pwrite(data, offset)  # raises if the guest's write failed
        model[offset : offset + len(data)] = data
    h.flush()
    assert disk.read_bytes() == bytes(model[:size])
    info = snapshot_of(state, "c0")
    assert info["state"] == "broken"
    assert info["reason"] == f"store write failed: {os.strerror(errno.ENOSPC)}"
    assert info["store_bytes"] == 0  # freed
    assert shutil.disk_usage(small_fs).used < 64 * 1024
    with pytest.raises(nbd.Error) as raised:
        connect(tracker, "@snapshot:c0").pread(512, 0)
    assert raised.value.errnum == errno.EIO
    assert set(range(4 * MiB // GRANULE)) <= dirty_granules(state, "@open")
    h.shutdown()


def in_flight(state: Path, writes: int) -> None:
    """Wait (with a deadline) until the tracker has ``writes`` in flight."""
    deadline = time.monotonic() + 20
    while call(state, "status")["inflight"] < writes:
        assert time.monotonic() < deadline, "the write never reached the tracker"
        time.sleep(0.01)  # polling interval while waiting on a deadline


def test_the_instant_waits_for_a_write_in_flight(procs: Processes, state: Path) -> None:
    # A slow disk: every write spends 1.5 s in nbdkit's delay filter, so a
    # write is surely in flight when the checkpoint is asked for.
    upstream = procs.nbdkit("--filter=delay", "memory", str(4 * MiB), "delay-write=1500ms")
    tracker = procs.tracker(state, uri=upstream.uri)
    h = connect(tracker)

    def write(data: bytes) -> threading.Thread:
        thread = threading.Thread(target=h.pwrite, args=(data, 0))
        thread.start()
        in_flight(state, 1)
        return thread

    first = write(b"1" * (4 * GRANULE))
    # Too short a drain: nothing changes, and the error says why.
    with pytest.raises(errors.Unavailable) as refused:
        call(state, "checkpoint", name="c0", snapshot={}, timeout=0.2)
    assert refused.value.code == "drain-timeout"
    assert "nothing changed" in refused.value.message
    assert "c0" not in [b["name"] for b in call(state, "bitmap.list")]
    assert call(state, "snapshot.list") == {"snapshots": []}
    assert not list((state / "snapshots").iterdir())
    first.join()

    second = write(b"2" * (4 * GRANULE))
    reply = take(state, "c1")  # waits for "2" to land: the instant is after it
    assert not second.is_alive()
    assert reply["snapshot"]["state"] == "active"
    h.pwrite(b"3" * GRANULE, GRANULE)
    snap = connect(tracker, "@snapshot:c1")
    assert snap.pread(4 * GRANULE, 0) == b"2" * (4 * GRANULE)  # drained in, whole
    assert h.pread(2 * GRANULE, 0) == b"2" * GRANULE + b"3" * GRANULE  # the disk went on
    assert {0, 1, 2, 3} <= dirty_granules(state, "c1")
    assert 1 in dirty_granules(state, "@open")
    for c in (h, snap):
        c.shutdown()


def test_writers_never_leave_a_torn_write_in_the_snapshot(
    procs: Processes, state: Path, tmp_path: Path
) -> None:
    # Each writer rewrites a region of its own, whole, with a new tag each
    # time: a snapshot of one instant holds one tag per region, never two.
    region, writers = 2 * MiB, 4
    disk = make_disk(tmp_path / "tags.raw", region * writers)
    tracker = procs.tracker(state, disk=disk)
    done = threading.Event()
    acked: list[list[int]] = [[] for _ in range(writers)]

    def writer(w: int, h: Any) -> None:
        seq = 0
        while not done.is_set():
            seq += 1
            h.pwrite(struct.pack("<II", w, seq) * (region // 8), w * region)
            acked[w].append(seq)
        h.shutdown()

    threads = [threading.Thread(target=writer, args=(w, connect(tracker))) for w in range(writers)]
    for t in threads:
        t.start()
    try:
        for n in range(4):
            seen_before = [list(a) for a in acked]
            take(state, f"c{n}")
            started_after = [(a[-1] if a else 0) + 2 for a in acked]
            snap = connect(tracker, f"@snapshot:c{n}")
            image = read_all(snap, region * writers, chunk=region // 2 + 4096)
            snap.shutdown()
            for w in range(writers):
                tags = set(struct.iter_unpack("<II", image[w * region : (w + 1) * region]))
                assert len(tags) == 1, f"snapshot c{n}: region {w} holds {len(tags)} writes"
                [(who, seq)] = tags
                if seq:
                    assert who == w
                assert seq >= (seen_before[w][-1] if seen_before[w] else 0)
                assert seq < started_after[w]
            call(state, "snapshot.release", name=f"c{n}")
    finally:
        done.set()
        for t in threads:
            t.join()


def test_a_snapshot_whose_map_is_damaged_is_broken_after_a_restart(
    procs: Processes, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    take(state, "c0")
    take(state, "c1")
    assert stop(tracker.proc) == 0
    with (state / "snapshots" / "c0.snap").open("r+b") as f:
        f.seek(20)
        f.write(b"\x07")
    tracker = procs.tracker(state, disk=disk)
    found = {s["name"]: s for s in call(state, "snapshot.list")["snapshots"]}
    assert found["c0"]["state"] == "broken" and "checksum" in found["c0"]["reason"]
    assert found["c1"]["state"] == "active"
    with pytest.raises(nbd.Error):
        connect(tracker, "@snapshot:c0").pread(512, 0)
    call(state, "snapshot.release", name="c0")  # a broken one goes too
    assert [s["name"] for s in call(state, "snapshot.list")["snapshots"]] == ["c1"]


def test_a_tracker_on_another_disk_breaks_the_snapshot(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    take(state, "c0")
    assert stop(tracker.proc) == 0
    other = tmp_path / "other.raw"
    shutil.copyfile(disk, other)
    procs.tracker(state, disk=other)
    info = snapshot_of(state, "c0")
    assert info["state"] == "broken" and "not proven" in info["reason"]


def holding(store: BitmapStore) -> bool:
    return store._held


def test_while_the_instant_is_taken_new_writes_wait_and_then_go_on(tmp_path: Path) -> None:
    state = tmp_path / "store-state"
    state.mkdir(mode=0o700)
    store = BitmapStore(StateDir(state), 16 * MiB, recording=True)
    try:
        gen, token = store.begin_write(0, 10)  # in flight
        drained: list[bool] = []
        holder = threading.Thread(target=lambda: drained.append(store._hold_writes(20)))
        holder.start()
        deadline = time.monotonic() + 20
        while not holding(store):
            assert time.monotonic() < deadline
            time.sleep(0.001)  # polling interval while waiting on a deadline
        admitted = threading.Event()

        def late_write() -> None:
            g, t = store.begin_write(GRANULE, 10)
            admitted.set()
            store.end_write(g, t)

        late = threading.Thread(target=late_write)
        late.start()
        store.end_write(gen, token)
        holder.join()
        assert drained == [True]
        assert not admitted.is_set()  # held past the drain, until admitted
        store._admit_writes()
        late.join()
        assert admitted.is_set()
        # A drain that cannot finish gives up, and admits writes again.
        gen, token = store.begin_write(0, 10)
        assert store._hold_writes(0.05) is False
        assert not holding(store)
        store.end_write(*store.begin_write(GRANULE, 1))
        store.end_write(gen, token)
    finally:
        store.close()


def test_a_disk_that_cannot_be_read_for_a_copy_breaks_the_snapshot_not_the_write(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    # Reads of the disk fail with EIO once the trigger file exists: the
    # copy before the write cannot read the old data.
    trigger = tmp_path / "fail-reads"
    upstream = procs.nbdkit(
        "--filter=error", "memory", str(4 * MiB),
        "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={trigger}",
    )  # fmt: skip
    tracker = procs.tracker(state, uri=upstream.uri)
    take(state, "c0")
    trigger.touch()
    h = connect(tracker)
    h.pwrite(b"w" * GRANULE, 0)  # the guest's write succeeds
    trigger.unlink()
    assert h.pread(GRANULE, 0) == b"w" * GRANULE
    info = snapshot_of(state, "c0")
    assert info["state"] == "broken"
    assert info["reason"] == f"reading the disk to copy failed: {os.strerror(errno.EIO)}"
    with pytest.raises(nbd.Error) as raised:
        connect(tracker, "@snapshot:c0").pread(512, GRANULE)
    assert raised.value.errnum == errno.EIO
    h.shutdown()


def test_qemu_img_copies_the_instant_while_qemu_io_writes_and_nbdinfo_lists_it(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    # Whole sectors: qemu rounds an export's size up to 512 bytes.
    disk = make_disk(tmp_path / "sectors.raw", 16 * MiB)
    fill(disk, 2)
    tracker = procs.tracker(state, disk=disk)
    reference = disk.read_bytes()
    take(state, "c0", scope="all")
    listed = json.loads(run(["nbdinfo", "--list", "--json", tracker.uri]).stdout)
    names = {e["export-name"]: e for e in listed["exports"]}
    assert set(names) == {"", "@snapshot:c0"}
    assert names["@snapshot:c0"]["description"].startswith("dirtydiff snapshot c0 of state ")
    # qemu-io writes all over the disk, in the background of the copy.
    writes = [f"write -P {i % 250 + 1} {i * 1536 * 1024} 1M" for i in range(10)]
    argv = ["qemu-io", "-f", "raw", *[a for w in writes for a in ("-c", w)], tracker.uri]
    writer = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    copy = tmp_path / "copy.raw"
    snapshot_uri = f"nbd+unix:///@snapshot:c0?socket={tracker.sock}"
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", snapshot_uri, str(copy)])
    finally:
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0 and b"error" not in out.lower(), out
    assert copy.read_bytes() == reference
    # And once the writes are all in: still the instant, and the disk is not.
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", snapshot_uri, str(copy)])
    assert copy.read_bytes() == reference != disk.read_bytes()


def test_a_tracker_killed_while_it_holds_writes_for_the_instant_leaves_no_snapshot(
    procs: Processes, state: Path
) -> None:
    upstream = procs.nbdkit("--filter=delay", "memory", str(4 * MiB), "delay-write=2000ms")
    tracker = procs.tracker(state, uri=upstream.uri)
    sock = tracker.sock
    h = connect(tracker)

    def write() -> None:
        with contextlib.suppress(nbd.Error):  # the tracker dies under it
            h.pwrite(b"1" * GRANULE, 0)

    writing = threading.Thread(target=write)
    writing.start()
    in_flight(state, 1)

    def checkpoint() -> None:
        with contextlib.suppress(errors.DirtydiffError):  # the tracker dies under it
            take(state, "c0")

    asked = threading.Thread(target=checkpoint)
    asked.start()
    # The store and map are made before the writes are held: wait for them.
    deadline = time.monotonic() + 20
    while not (state / "snapshots" / ".c0.snap.new").exists():
        assert time.monotonic() < deadline
        time.sleep(0.005)  # polling for the staging map, under a deadline
    stop(tracker.proc, signal.SIGKILL)
    asked.join()
    writing.join()
    tracker = procs.tracker(state, uri=upstream.uri, sock=sock)
    # The instant never came: no snapshot, no bitmap c0, nothing left over.
    assert call(state, "snapshot.list") == {"snapshots": []}
    assert "c0" not in [b["name"] for b in call(state, "bitmap.list")]
    assert list((state / "snapshots").iterdir()) == []
    assert 0 in dirty_granules(state, "@open")  # the write in flight stays marked
    reply = take(state, "c0")  # the name is free again
    assert reply["snapshot"]["state"] == "active"


def test_a_snapshot_dir_others_may_write_in_after_a_restart_breaks_its_snapshot(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    stores = tmp_path / "stores"
    stores.mkdir(mode=0o700)
    tracker = procs.tracker(state, disk=disk)
    take(state, "c0", dir=str(stores))
    assert stop(tracker.proc) == 0
    stores.chmod(0o777)
    procs.tracker(state, disk=disk)
    info = snapshot_of(state, "c0")
    assert info["state"] == "broken" and "writable by group and others" in info["reason"]

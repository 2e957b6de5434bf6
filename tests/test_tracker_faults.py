"""The tracker under load and under faults: nothing written is ever unrecorded.

- many clients with many requests in flight: exactly the touched granules are
  dirty, and the data is intact;
- kill -9 mid-workload: every acknowledged write is dirty after a restart;
- a simulated host crash: bitmaps are inconsistent, and say so;
- a checkpoint under load with a slow disk: drain and generation switch.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import nbd
import pytest

from dirtydiff import control
from dirtydiff.bitmapfile import BitmapFile
from dirtydiff.extents import granules_of
from tests.conftest import GRANULE, Processes, dirtydiff, make_disk, stop

MiB = 1 << 20


def connect(uri: str) -> Any:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def dirty_set(state: Path, name: str) -> set[int]:
    with BitmapFile(state / "bitmaps" / f"{name}.bitmap", writable=False) as bitmap:
        bits = int.from_bytes(bitmap.bits, "little")
    return {i for i in range(bits.bit_length()) if bits >> i & 1}


def random_intervals(
    rng: random.Random, size: int, count: int, max_len: int
) -> list[tuple[int, int]]:
    """Non-overlapping [offset, offset+length) ranges, so that requests in
    flight at the same time never race on the same byte and the expected
    content is well defined."""
    cuts = sorted(rng.sample(range(1, size), count * 2))
    found = []
    for start, end in zip(cuts[::2], cuts[1::2], strict=True):
        length = min(end - start, rng.randint(1, max_len))
        found.append((start, length))
    return found


def test_many_clients_many_requests_in_flight(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 48 * MiB + 12345
    disk = make_disk(tmp_path / "disk.raw", size)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "--granularity", "4k", "fine")
    rng = random.Random(20261125)
    clients = [connect(tracker.uri) for _ in range(4)]
    assert all(c.can_multi_conn() for c in clients)
    model = bytearray(size)
    touched: dict[int, set[int]] = {GRANULE: set(), 4096: set()}
    buffers: list[Any] = []  # keep write buffers alive until completion

    for _ in range(4):
        plans: list[list[tuple[str, int, int]]] = [[] for _ in clients]
        for offset, length in random_intervals(rng, size, 150, 300_000):
            kind = rng.choices(["write", "zero", "trim"], weights=[6, 3, 2])[0]
            plans[rng.randrange(len(clients))].append((kind, offset, length))
            if kind == "write":
                model[offset : offset + length] = rng.randbytes(1) * length
            else:
                model[offset : offset + length] = bytes(length)  # trim punches a hole: zeroes
            for g, seen in touched.items():
                seen.update(granules_of(offset, length, g))

        failures: list[BaseException] = []

        def submit(
            h: Any, plan: list[tuple[str, int, int]], failures: list[BaseException] = failures
        ) -> None:
            try:
                cookies = []
                for kind, offset, length in plan:
                    if kind == "write":
                        buf = nbd.Buffer.from_bytearray(bytearray(model[offset : offset + length]))
                        buffers.append(buf)
                        cookies.append(h.aio_pwrite(buf, offset))
                    elif kind == "zero":
                        flags = rng.choice([0, nbd.CMD_FLAG_NO_HOLE])
                        cookies.append(h.aio_zero(length, offset, flags=flags))
                    else:
                        cookies.append(h.aio_trim(length, offset))
                while h.aio_in_flight() > 0:
                    h.poll(-1)
                for cookie in cookies:  # raises if the server failed the request
                    assert h.aio_command_completed(cookie)
            except BaseException as e:
                failures.append(e)

        threads = [
            threading.Thread(target=submit, args=(h, plan))
            for h, plan in zip(clients, plans, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures

    clients[0].flush()
    for h in clients:
        h.shutdown()
    assert disk.read_bytes() == bytes(model)
    assert dirty_set(state, "@open") == touched[GRANULE]
    assert dirty_set(state, "fine") == touched[4096]


def _writer(
    uri: str, acked: list[int], stop_flag: threading.Event, enough: threading.Event
) -> None:
    rng = random.Random(7)
    h = connect(uri)
    try:
        while not stop_flag.is_set():
            offset = rng.randrange(0, 32 * MiB - 4096)
            h.pwrite(rng.randbytes(4096), offset)
            acked.append(offset)
            if len(acked) >= 300:
                enough.set()
    except nbd.Error:
        pass  # the tracker was killed under us: expected


def test_kill9_mid_workload_loses_no_acknowledged_write(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 32 * MiB)
    tracker = procs.tracker(state, disk=disk)
    acked: list[int] = []
    stop_flag, enough = threading.Event(), threading.Event()
    writer = threading.Thread(target=_writer, args=(tracker.uri, acked, stop_flag, enough))
    writer.start()
    try:
        assert enough.wait(60)
        tracker.proc.send_signal(signal.SIGKILL)
        tracker.proc.wait(10)
    finally:
        stop_flag.set()
        writer.join(30)
    written = set().union(*(granules_of(o, 4096, GRANULE) for o in acked))

    procs.tracker(state, disk=disk)  # restart on the same state
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    open_bitmap = next(b for b in status["bitmaps"] if b["name"] == "@open")
    assert open_bitmap["consistent"], open_bitmap
    assert written <= dirty_set(state, "@open")


def test_simulated_host_crash_makes_recording_bitmaps_inconsistent(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "recording")
    dirtydiff("bitmap", "add", "--state", str(state), "--disabled", "frozen")
    h = connect(tracker.uri)
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    tracker.proc.send_signal(signal.SIGKILL)
    tracker.proc.wait(10)

    # The host "reboots": another boot id. Whatever was recording may have
    # lost dirty pages; the disabled bitmap was durable and stays valid.
    other_boot = {"DIRTYDIFF_BOOT_ID": str(uuid.uuid4())}
    tracker = procs.tracker(state, disk=disk, env=other_boot)
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    by_name = {b["name"]: b for b in status["bitmaps"]}
    assert not by_name["@open"]["consistent"]
    assert not by_name["recording"]["consistent"]
    assert "host went down" in by_name["recording"]["reason"]
    assert by_name["frozen"]["consistent"]
    human = dirtydiff("status", "--state", str(state)).stdout
    assert "inconsistent" in human and "recording" in human

    shown = dirtydiff("bitmap", "show", "--state", str(state), "--json", "recording", check=False)
    assert shown.returncode == 1
    assert "inconsistent" in shown.stderr and "Traceback" not in shown.stderr
    assert shown.stdout == ""

    # Sticky: a clean stop and a start in the real boot do not make it whole.
    stop(tracker.proc)
    procs.tracker(state, disk=disk)
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    assert not {b["name"]: b for b in status["bitmaps"]}["recording"]["consistent"]
    # Clearing starts it afresh: empty and consistent from now on.
    dirtydiff("bitmap", "clear", "--state", str(state), "recording")
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    assert {b["name"]: b for b in status["bitmaps"]}["recording"]["consistent"]


def test_clean_restart_keeps_every_bit(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    h = connect(tracker.uri)
    for offset in (0, 3 * MiB + 1, 8 * MiB - 1):
        h.pwrite(b"y", offset)
    h.shutdown()
    before = dirty_set(state, "@open")
    assert stop(tracker.proc) == 0
    procs.tracker(state, disk=disk)
    assert dirty_set(state, "@open") == before == {0, 48, 127}


@pytest.mark.parametrize("writers", [4])
def test_checkpoint_under_load_drains_and_switches(
    procs: Processes, tmp_path: Path, state: Path, writers: int
) -> None:
    # A slow disk: every write spends 50 ms in nbdkit's delay filter, so a
    # checkpoint always meets writes in flight.
    upstream = procs.nbdkit("--filter=delay", "memory", str(64 * MiB), "delay-write=50ms")
    tracker = procs.tracker(state, uri=upstream.uri)
    granules = 64 * MiB // GRANULE
    order = list(range(granules))
    random.Random(3).shuffle(order)
    lock = threading.Lock()
    log: list[tuple[int, float, float]] = []  # granule, sent, done
    stop_flag, warmed = threading.Event(), threading.Event()

    def pattern(g: int) -> bytes:
        return g.to_bytes(4, "big") * 1024

    def write_loop() -> None:
        h = connect(tracker.uri)
        while not stop_flag.is_set():
            with lock:
                if not order:
                    return
                g = order.pop()
            sent = time.monotonic()
            h.pwrite(pattern(g), g * GRANULE)
            with lock:
                log.append((g, sent, time.monotonic()))
                if len(log) >= 20:
                    warmed.set()
        h.shutdown()

    threads = [threading.Thread(target=write_loop) for _ in range(writers)]
    for t in threads:
        t.start()
    try:
        assert warmed.wait(60)
        requested = time.monotonic()
        result = control.call(state / "tracker.sock", "checkpoint", name="cp1")
        acked = time.monotonic()
        # Drain: every write recorded in cp1 has reached the disk by the ack.
        frozen = dirty_set(state, "cp1")
        reader = connect(upstream.uri)
        missing = [g for g in sorted(frozen) if reader.pread(4096, g * GRANULE) != pattern(g)]
        reader.shutdown()
        with lock:
            target = len(log) + 20
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if len(log) >= target:
                    break
            time.sleep(0.01)  # polling a counter under a deadline
    finally:
        stop_flag.set()
        for t in threads:
            t.join(30)

    assert result["drained"] is True
    assert missing == [], "cp1 was acknowledged before these writes reached the disk"
    control.call(state / "tracker.sock", "checkpoint", name="cp2")
    following = dirty_set(state, "cp2")
    written = {g for g, _, _ in log}
    assert written <= frozen | following, "a write is in neither interval"
    assert {g for g, _, done in log if done < requested} <= frozen
    assert {g for g, sent, _ in log if sent > acked} <= following
    assert {g for g, _, done in log if done > acked} <= frozen | following
    assert len([g for g, sent, _ in log if sent > acked]) >= 10


KILLED_CLIENT = """
import nbd, os, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(64):
    h.aio_pread(nbd.Buffer(1 << 20), (i % 16) << 20)
h.poll(0)
os._exit(0)  # vanish with the reads in flight
"""


def test_tracker_survives_clients_vanishing_with_requests_in_flight(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Regression: with worker threads per connection (nbdkit's PARALLEL and
    SERIALIZE_ALL_REQUESTS models), nbdkit 1.32 aborts on
    `raw_send_socket: Assertion sock >= 0` when a client dies with replies
    pending, taking the VM's disk down with it. The tracker's thread model
    must not expose it."""
    disk = make_disk(tmp_path / "disk.raw", 16 * MiB)
    tracker = procs.tracker(state, disk=disk)
    vm = connect(tracker.uri)
    vm.pwrite(b"before", 0)
    for _ in range(30):
        subprocess.run([sys.executable, "-c", KILLED_CLIENT, tracker.uri], check=True, timeout=60)
    assert tracker.proc.poll() is None, tracker.stderr()
    vm.pwrite(b"after", MiB)  # the VM's own connection never noticed
    assert vm.pread(5, MiB) == b"after"
    vm.shutdown()

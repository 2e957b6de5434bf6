"""The diff scan: exactly the granules that differ, online and offline.

Offline pairs are generated at random (seeded) and compared with the set of
granules whose bytes differ, computed here from the two files: no missing
granule and no extra one. Online, clients write through the tracker while the
scan runs, and an incremental restore (the backup plus only the dirty
granules) must reproduce the disk byte for byte.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nbd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtydiff import errors
from dirtydiff.bitmapfile import BitmapFile
from dirtydiff.disk import EXTENT_ZERO
from dirtydiff.state import StateDir
from sidecar.scan.engine import DEFAULT_CHUNK, differing_granules, open_side
from sidecar.scan.job import ScanRecord, fills, finished_meanwhile
from tests.conftest import ROOT, Processes, Server, dirtydiff, make_disk, stop

MiB = 1 << 20


def write_sparse(path: Path, data: bytes, rng: random.Random) -> None:
    """Write data leaving zero 4 KiB blocks as holes (or, at random, as
    allocated zeroes), so both kinds of zero are scanned."""
    with path.open("wb") as f:
        f.truncate(len(data))
        for offset in range(0, len(data), 4096):
            block = data[offset : offset + 4096]
            if block.count(0) != len(block) or rng.random() < 0.2:
                f.seek(offset)
                f.write(block)


def random_pair(rng: random.Random, size: int, kind: str) -> tuple[bytes, bytes]:
    if kind == "dense":
        backup = bytearray(rng.randbytes(size))
    else:  # mostly holes, some data
        backup = bytearray(size)
        for _ in range(12):
            offset = rng.randrange(size)
            length = min(size - offset, rng.randint(1, 600_000))
            backup[offset : offset + length] = rng.randbytes(length)
    disk = bytearray(backup)
    for _ in range(rng.randint(0, 25)):
        offset = rng.randrange(size)
        length = min(size - offset, rng.choice([1, 2, 100, 4096, 70_000, 300_000]))
        change = rng.choice(["data", "zero", "same"])
        if change == "data":
            disk[offset : offset + length] = rng.randbytes(length)
        elif change == "zero":
            disk[offset : offset + length] = bytes(length)
        else:  # rewrite what is there: no difference
            pass
    if rng.random() < 0.5:
        disk[-1] ^= 0xFF  # the last byte, in the partial last granule
    return bytes(backup), bytes(disk)


def pair_files(tmp_path: Path, size: int, seed: int, kind: str) -> tuple[bytes, bytes, Path, Path]:
    """A random (backup, disk) pair written sparsely: their bytes and files."""
    rng = random.Random(seed)
    backup_bytes, disk_bytes = random_pair(rng, size, kind)
    backup, disk = tmp_path / "backup.raw", tmp_path / "disk.raw"
    write_sparse(backup, backup_bytes, rng)
    write_sparse(disk, disk_bytes, rng)
    return backup_bytes, disk_bytes, backup, disk


def live_pair(
    procs: Processes, tmp_path: Path, state: Path, size: int, seed: int, kind: str
) -> tuple[bytes, Path, Path, Server, Server]:
    """A pair in use: (backup bytes, disk, backup file, backup server, tracker)."""
    backup_bytes, _, backup, disk = pair_files(tmp_path, size, seed, kind)
    backup_server = procs.nbdkit(*BACKUP, str(backup))
    return backup_bytes, disk, backup, backup_server, procs.tracker(state, disk=disk)


def differing(a: bytes, b: bytes, granularity: int) -> set[int]:
    return {
        i // granularity
        for i in range(0, len(a), granularity)
        if a[i : i + granularity] != b[i : i + granularity]
    }


def dirty_set(state: Path, name: str) -> set[int]:
    with BitmapFile(state / "bitmaps" / f"{name}.bitmap", writable=False) as bitmap:
        bits = int.from_bytes(bitmap.bits, "little")
    return {i for i in range(bits.bit_length()) if bits >> i & 1}


def scan(state: Path, disk: str, backup: str, name: str, *extra: str) -> dict[str, Any]:
    result = dirtydiff(
        "scan", "--state", str(state), "--disk", disk, "--backup", backup, "--bitmap", name,
        "--json", *extra,
    )  # fmt: skip
    found: dict[str, Any] = json.loads(result.stdout)
    return found


# nbdkit 1.32's worker threads can hit an assertion (raw_send_socket:
# sock >= 0) when a client dies with requests in flight; these backup servers
# see scanners killed on purpose, so they run one worker per connection.
BACKUP = ("--threads=1", "-r", "file")

CASES = [
    # seed, kind, granularity, size, extra options
    (1, "dense", 65536, 8 * MiB + 12345, ()),
    (2, "sparse", 65536, 8 * MiB + 12345, ()),
    (3, "sparse", 4096, 3 * MiB + 7, ("--chunk-size", "64k", "--in-flight", "3")),
    (4, "dense", 4096, 2 * MiB, ("--chunk-size", "16k")),
    (5, "sparse", 1 << 20, 9 * MiB + 1, ()),
    (6, "dense", 2 << 20, 5 * MiB + 3, ()),
    (7, "sparse", 65536, 16 * MiB, ("--in-flight", "1")),
]


@pytest.mark.parametrize(("seed", "kind", "granularity", "size", "extra"), CASES)
def test_offline_scan_marks_exactly_the_differing_granules(
    procs: Processes,
    tmp_path: Path,
    state: Path,
    seed: int,
    kind: str,
    granularity: int,
    size: int,
    extra: tuple[str, ...],
) -> None:
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, seed, kind)
    server = procs.nbdkit("-r", "file", str(backup))
    # The disk as a local file, and the disk over NBD: the same answer.
    result = scan(state, str(disk), server.uri, "local", "--granularity", str(granularity), *extra)
    expected = differing(backup_bytes, disk_bytes, granularity)
    assert dirty_set(state, "local") == expected
    assert result["progress"]["differing_granules"] == len(expected)
    assert result["bitmap"]["consistent"] and result["bitmap"]["enabled"]
    # Over NBD, the disk is read through its tracker: nothing else proves
    # that an NBD export is this state's disk.
    tracker = procs.tracker(state, disk=disk)
    scan(state, tracker.uri, server.uri, "remote", "--granularity", str(granularity), *extra)
    assert dirty_set(state, "remote") == expected


def test_zero_ranges_on_both_sides_are_not_read(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    backup, disk = make_disk(tmp_path / "b.raw", 64 * MiB), make_disk(tmp_path / "d.raw", 64 * MiB)
    with disk.open("r+b") as f:
        f.seek(10 * MiB)
        f.write(b"x" * 4096)
    server = procs.nbdkit("-r", "file", str(backup))
    result = scan(state, str(disk), server.uri, "b")
    assert result["progress"]["read_backup"] == 0  # all zero: tested on the disk side only
    assert result["progress"]["read_disk"] == DEFAULT_CHUNK  # the local file's one chunk
    assert dirty_set(state, "b") == {10 * MiB // 65536}


def test_scan_errors(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = make_disk(tmp_path / "d.raw", 8 * MiB)
    other = make_disk(tmp_path / "o.raw", 16 * MiB)
    server = procs.nbdkit("-r", "file", str(other))
    wrong = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup", server.uri,
                      "--bitmap", "b", check=False)  # fmt: skip
    assert wrong.returncode == 1 and "16777216 bytes but the disk has 8388608" in wrong.stderr
    gone = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup",
                     f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}", "--bitmap", "b",
                     check=False)  # fmt: skip
    assert gone.returncode == 3 and "cannot connect to the backup" in gone.stderr
    assert "Traceback" not in wrong.stderr + gone.stderr
    same = procs.nbdkit("-r", "file", str(make_disk(tmp_path / "s.raw", 8 * MiB)))
    scan(state, str(disk), same.uri, "b")
    taken = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup", same.uri,
                      "--bitmap", "b", check=False)  # fmt: skip
    assert taken.returncode == 1 and "already exists" in taken.stderr


def restore(backup: bytes, state: Path, name: str, source_uri: str, granularity: int) -> bytes:
    """The backup plus only the dirty granules, read with libnbd."""
    image = bytearray(backup)
    h = nbd.NBD()
    h.connect_uri(source_uri)
    for g in sorted(dirty_set(state, name)):
        offset = g * granularity
        length = min(granularity, len(image) - offset)
        image[offset : offset + length] = h.pread(length, offset)
    h.shutdown()
    return bytes(image)


def writer(uri: str, size: int, stop: threading.Event, seed: int, done: list[int]) -> None:
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        while not stop.is_set():
            offset = rng.randrange(size - 70_000)
            kind = rng.random()
            if kind < 0.7:
                h.pwrite(rng.randbytes(rng.choice([1, 512, 4096, 65536])), offset)
            elif kind < 0.85:
                h.zero(rng.choice([4096, 65536]), offset)
            else:
                h.trim(65536, offset)
            done.append(offset)
        h.shutdown()
    except nbd.Error:
        pass  # the tracker was killed under this "VM": it stops writing


def start_writers(
    uri: str, size: int, n: int = 2
) -> tuple[threading.Event, list[threading.Thread], list[int]]:
    stop, done = threading.Event(), list[int]()
    threads = [threading.Thread(target=writer, args=(uri, size, stop, i, done)) for i in range(n)]
    for t in threads:
        t.start()
    return stop, threads, done


def test_online_scan_with_writes_during_it(procs: Processes, tmp_path: Path, state: Path) -> None:
    size = 48 * MiB
    backup_bytes, disk, _, backup_server, tracker = live_pair(
        procs, tmp_path, state, size, 11, "sparse"
    )
    stop, threads, done = start_writers(tracker.uri, size)
    try:
        # Slow enough that the writers overlap the whole scan.
        result = scan(
            state, tracker.uri, backup_server.uri, "since-backup", "--max-rate", "40000000"
        )
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert len(done) > 20 and result["bitmap"]["consistent"]
    current = disk.read_bytes()
    assert differing(backup_bytes, current, 65536) <= dirty_set(state, "since-backup")
    assert restore(backup_bytes, state, "since-backup", tracker.uri, 65536) == current
    # It keeps recording like any enabled bitmap.
    h = nbd.NBD()
    h.connect_uri(tracker.uri)
    h.pwrite(b"late", size - 4)
    h.shutdown()
    assert (size - 1) // 65536 in dirty_set(state, "since-backup")
    assert not list((state / "bitmaps").glob("@scan:*"))


def scan_process(
    state: Path, disk: str, backup: str, name: str, *extra: str
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "sidecar.cli", "scan", "--state", str(state), "--disk", disk,
            "--backup", backup, "--bitmap", name, "--json", *extra]  # fmt: skip
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_position(state: Path, name: str, proc: subprocess.Popen[bytes]) -> int:
    """Wait until the scan saved a position past 0."""
    record = state / "scans" / f"{name}.json"
    end = time.monotonic() + 60.0
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"scan ended early: {proc.communicate()}")
        try:
            position = int(json.loads(record.read_text())["position"])
            if position > 0:
                return position
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.05)  # polling a file under a deadline
    raise TimeoutError("the scan saved no position")


def test_scan_killed_and_resumed_with_writes_going_on(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 64 * MiB
    backup_bytes, disk, _, backup_server, tracker = live_pair(
        procs, tmp_path, state, size, 21, "dense"
    )
    stop, threads, _ = start_writers(tracker.uri, size, n=1)
    try:
        # 1. the scanning process dies (kill -9) part way.
        proc = scan_process(state, tracker.uri, backup_server.uri, "b", "--max-rate", "30000000")
        try:
            wait_for_position(state, "b", proc)
        finally:
            proc.kill()
            proc.communicate()
        status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
        assert not {x["name"]: x for x in status["bitmaps"]}["b"]["consistent"]
        # 2. the tracker dies (kill -9) and comes back: the VM goes on writing.
        tracker.proc.send_signal(signal.SIGKILL)
        tracker.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        tracker = procs.tracker(state, disk=disk, sock=tracker.sock)
        stop, threads, _ = start_writers(tracker.uri, size, n=1)
        # 3. the same command resumes where the first one stopped.
        result = scan(state, tracker.uri, backup_server.uri, "b")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert result["resumed_from"] > 0
    assert result["progress"]["compared"] <= size - result["resumed_from"]
    current = disk.read_bytes()
    assert differing(backup_bytes, current, 65536) <= dirty_set(state, "b")
    assert restore(backup_bytes, state, "b", tracker.uri, 65536) == current


def test_backup_server_killed_mid_scan(procs: Processes, tmp_path: Path, state: Path) -> None:
    size = 64 * MiB
    backup_bytes, disk, backup, backup_server, tracker = live_pair(
        procs, tmp_path, state, size, 31, "dense"
    )
    proc = scan_process(state, tracker.uri, backup_server.uri, "b", "--max-rate", "30000000")
    wait_for_position(state, "b", proc)
    backup_server.proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert b"backup" in err and b"Traceback" not in err
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    b = {x["name"]: x for x in status["bitmaps"]}["b"]
    assert not b["consistent"] and "scan" in b["reason"]
    # Never exported as complete.
    sock = tmp_path / "export.sock"
    export = procs.start(
        [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk",
         tracker.uri, "--socket", str(sock)], sock,
    )  # fmt: skip
    listed = subprocess.run(["nbdinfo", "--list", "--json", export.uri], capture_output=True,
                            text=True, check=True, timeout=60)  # fmt: skip
    assert "qemu:dirty-bitmap:b" not in json.loads(listed.stdout)["exports"][0]["contexts"]
    stop(export.proc)  # a running sidecar would take the next scan as a background job
    # With the backup back (at the same address), the same command finishes the job.
    backup_server = procs.nbdkit(*BACKUP, str(backup), sock=backup_server.sock)
    result = scan(state, tracker.uri, backup_server.uri, "b")
    assert result["resumed_from"] > 0
    assert dirty_set(state, "b") == differing(backup_bytes, disk.read_bytes(), 65536)


def test_offline_scan_refuses_a_disk_written_without_a_tracker(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    size = 64 * MiB
    disk = make_disk(tmp_path / "d.raw", size)
    backup = make_disk(tmp_path / "b.raw", size)
    with disk.open("r+b") as f:
        f.write(b"\1" * size)  # dense: the scan reads everything, slowly
    server = procs.nbdkit("-r", "file", str(backup))
    proc = scan_process(state, str(disk), server.uri, "b", "--max-rate", "8000000")
    wait_for_position(state, "b", proc)
    with disk.open("r+b") as f:  # a VM writing with nobody recording
        f.seek(size - 1)
        f.write(b"\2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"modified during the scan" in err
    status = json.loads(dirtydiff("status", "--state", str(state), "--json").stdout)
    assert not {x["name"]: x for x in status["bitmaps"]}["b"]["consistent"]


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_scan_reuses_its_libnbd_buffers_across_reads(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """libnbd 1.14's Python aio_pread never releases the nbd.Buffer it is
    given: a Buffer per read leaked ~200 bytes per request (GBs over a large
    disk in a long-lived sidecar). The scan makes a bounded set of them."""
    from sidecar.scan import engine as scan_module  # noqa: PLC0415

    size = 48 * MiB + 12345
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 61, kind)
    sides = [procs.nbdkit(*BACKUP, str(path)) for path in (disk, backup)]
    made, reads = [0], [0]
    from_buffer = nbd.Buffer.from_buffer
    submit = scan_module.NbdSide.submit

    def counting_from_buffer(view: Any) -> Any:
        made[0] += 1
        return from_buffer(view)

    def counting_submit(self: Any, *args: Any) -> None:
        reads[0] += 1
        submit(self, *args)

    monkeypatch.setattr(nbd.Buffer, "from_buffer", staticmethod(counting_from_buffer))
    monkeypatch.setattr(scan_module.NbdSide, "submit", counting_submit)
    marks: list[tuple[int, int]] = []
    d, b = (
        scan_module.open_side("disk", sides[0].uri),
        scan_module.open_side("backup", sides[1].uri),
    )
    try:
        scan_module.Scan(d, b, 65536, chunk=256 * 1024, on_marks=marks.extend).run()
    finally:
        d.close()
        b.close()
    marked = {g for o, n in marks for g in range(o // 65536, (o + n - 1) // 65536 + 1)}
    assert marked == differing(backup_bytes, disk_bytes, 65536)
    assert reads[0] >= 100
    # Each chunk buffer (a few per side) is read in at most chunk/64 KiB x
    # chunk/64 KiB pieces; the short last chunk's pieces are made anew.
    assert made[0] <= 6 * 16 + 4, (made[0], reads[0])


def test_an_offline_scan_record_answers_only_for_the_bitmap_it_was_filling(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Offline (no tracker, no sidecar): a record left for k no longer holds
    once k is removed, whether or not k is added again: a scan against another
    backup is not refused for it, one against the same backup does not take
    the new k for its result, and ``--abort`` forgets the record only."""
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, 8 * MiB, 61, "dense")
    server = procs.nbdkit("-r", "file", str(backup))
    other = procs.nbdkit("-r", "file", str(disk))  # a second "backup": equal to the disk
    first = scan(state, str(disk), server.uri, "k")["bitmap"]
    record = ScanRecord(StateDir(state), "k")
    left = {"backup": server.uri, "disk": str(disk), "granularity": 65536, "rebuild": False,
            "position": 2 * MiB, "created_ns": first["created_ns"]}  # fmt: skip

    record.save(left)
    dirtydiff("bitmap", "remove", "k", "--state", str(state))
    again = scan(state, str(disk), other.uri, "k")  # was: "compares against another backup"
    assert again["bitmap"]["backup"] == other.uri and again["progress"]["compared"] == 8 * MiB
    assert dirty_set(state, "k") == set()
    assert not record.path.exists()

    record.save({**left, "created_ns": again["bitmap"]["created_ns"]})
    dirtydiff("bitmap", "remove", "k", "--state", str(state))
    dirtydiff("bitmap", "add", "k", "--state", str(state), "--backup", server.uri)
    readded = json.loads(dirtydiff("bitmap", "list", "--state", str(state), "--json").stdout)
    [user_k] = [b for b in readded if b["name"] == "k"]
    refused = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup",
                        server.uri, "--bitmap", "k", check=False)  # fmt: skip
    assert refused.returncode == 1 and "already exists" in refused.stderr, refused
    assert not record.path.exists()
    assert dirty_set(state, "k") == set()  # the new k: not filled by a scan it never had

    record.save(left)
    out = dirtydiff("scan", "--state", str(state), "--bitmap", "k", "--abort").stdout
    assert "forgotten" in out and not record.path.exists()
    after = json.loads(dirtydiff("bitmap", "list", "--state", str(state), "--json").stdout)
    assert [b for b in after if b["name"] == "k"] == [user_k]
    assert differing(backup_bytes, disk_bytes, 65536)  # the pair did differ all along


@given(
    st.binary(min_size=1, max_size=3000),
    st.lists(st.tuples(st.integers(0, 2999), st.integers(1, 255)), max_size=8),
    st.sampled_from([1, 7, 64, 512, 4096]),
)
def test_differing_granules_are_exactly_those_with_a_differing_byte(
    backup: bytes, flips: list[tuple[int, int]], granularity: int
) -> None:
    """The in-place comparison (no slices copied) against the plain one,
    including a short last granule and flips in the first and last byte."""
    disk = bytearray(backup)
    for at, mask in flips:
        disk[at % len(disk)] ^= mask
    found = differing_granules(disk, backup, granularity)
    assert found == sorted(g * granularity for g in differing(backup, bytes(disk), granularity))
    assert differing_granules(disk, bytes(disk), granularity) == []


def test_a_scan_record_matches_its_bitmap_by_creation_time() -> None:
    """The pure rule behind the record tests: a record answers for the bitmap
    created when it says. A tracker started before bitmaps told their
    creation time tells none, and records saved against it name none: they
    match, as they did then. A record from then, against a bitmap that tells
    one, does not: that scan starts over."""
    info = {"created_ns": 5, "consistent": True, "backup": "nbd://b"}
    assert fills({"created_ns": 5}, info)
    assert not fills({"created_ns": 4}, info)
    assert not fills({}, info)
    older = {"consistent": True, "backup": "nbd://b"}  # from a tracker of before
    assert fills({"created_ns": None}, older)
    assert finished_meanwhile(info, {"created_ns": 5, "backup": "nbd://b"})
    assert not finished_meanwhile(info, {"created_ns": 5, "backup": "nbd://other"})
    assert not finished_meanwhile(
        {**info, "consistent": False}, {"created_ns": 5, "backup": "nbd://b"}
    )


def test_a_side_of_another_scheme_is_refused_not_opened_as_a_path(tmp_path: Path) -> None:
    """Where a side is, is decided by the one scheme table (dirtydiff.disk):
    a URI that is not NBD is refused as such, not looked up as a file name."""
    with pytest.raises(errors.Unavailable) as refused:
        open_side("backup", "http://backup-host/vda.raw")
    assert refused.value.code == "backup-unreachable"
    assert "http:// is not a disk" in refused.value.message
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 4096)
    side = open_side("disk", str(disk))
    try:
        assert side.size == 4096
    finally:
        side.close()


# -- several connections per side, windows sized from the map ------------------

TiB = 1 << 40


def dirty_granules(state: Path, name: str) -> set[int]:
    """The dirty granules of a bitmap too large to walk bit by bit."""
    import re  # noqa: PLC0415

    with BitmapFile(state / "bitmaps" / f"{name}.bitmap", writable=False) as bitmap:
        bits = bytes(bitmap.bits)
    return {
        8 * m.start() + i
        for m in re.finditer(rb"[^\x00]", bits)
        for i in range(8)
        if bits[m.start()] >> i & 1
    }


def count_reads_by_connection(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Reads submitted per connection (by id), from now on."""
    from sidecar.scan import sides  # noqa: PLC0415

    counts: dict[int, int] = {}
    submit = sides.NbdConnection.submit

    def counting(self: Any, *args: Any) -> None:
        counts[id(self)] = counts.get(id(self), 0) + 1
        submit(self, *args)

    monkeypatch.setattr(sides.NbdConnection, "submit", counting)
    return counts


def engine_scan(disk_uri: str, backup_uri: str, **kwargs: Any) -> tuple[set[int], list[int]]:
    """Scan with the engine itself: the marked 64 KiB granules, and how many
    connections each side (disk, backup) had."""
    from sidecar.scan import engine  # noqa: PLC0415

    marks: list[tuple[int, int]] = []
    d, b = engine.open_side("disk", disk_uri), engine.open_side("backup", backup_uri)
    try:
        widths = [len(s.connections) for s in (d, b) if isinstance(s, engine.NbdSide)]
        engine.Scan(d, b, 65536, on_marks=marks.extend, **kwargs).run()
    finally:
        d.close()
        b.close()
    return {g for o, n in marks for g in range(o // 65536, (o + n - 1) // 65536 + 1)}, widths


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_a_multi_conn_scan_marks_exactly_the_differing_granules(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """qemu-nbd -e 4 advertises multi-conn: each side reads on 4
    connections, all of them used, and the marks are the same."""
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, 24 * MiB + 4097, 71, kind)
    d = procs.qemu_nbd(disk, "-r", "-e", "4")
    b = procs.qemu_nbd(backup, "-r", "-e", "4")
    counts = count_reads_by_connection(monkeypatch)
    marked, widths = engine_scan(d.uri, b.uri)
    assert widths == [4, 4]
    assert marked == differing(backup_bytes, disk_bytes, 65536)
    assert len(counts) == 8 if kind == "dense" else len(counts) >= 2, counts


def test_a_server_without_multi_conn_gets_one_connection(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """qemu-nbd without -e serves one client at a time and advertises no
    multi-conn: that side keeps one connection (a second one would wait in
    its listen queue), and the scan is as exact, from the command line too."""
    size = 8 * MiB + 1536  # qemu-nbd serves a whole number of 512-byte sectors
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 72, "dense")
    d = procs.qemu_nbd(disk, "-r", "-e", "4")
    b = procs.qemu_nbd(backup, "-r")
    marked, widths = engine_scan(d.uri, b.uri)
    assert widths == [4, 1]
    assert marked == differing(backup_bytes, disk_bytes, 65536)
    started = time.monotonic()
    result = scan(state, str(disk), b.uri, "b")
    assert time.monotonic() - started < 10  # no connection waited for its timeout
    assert dirty_set(state, "b") == differing(backup_bytes, disk_bytes, 65536)
    assert result["progress"]["differing_granules"] == len(marked)


def test_a_side_lost_mid_scan_on_several_connections_fails_cleanly_then_resumes_exactly(
    procs: Processes, tmp_path: Path
) -> None:
    """The backup's server dies with reads in flight on its 4 connections:
    the scan raises backup-lost (no hang, no traceback of libnbd's), and the
    position it saved covers only chunks compared on both sides: a scan
    resumed from it, with the server back, completes the marks exactly."""
    from sidecar.scan import engine  # noqa: PLC0415

    size = 32 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 73, "dense")
    d = procs.qemu_nbd(disk, "-r", "-e", "4")
    b = procs.qemu_nbd(backup, "-r", "-e", "4")
    marks: list[tuple[int, int]] = []
    saved: list[int] = []
    killed = threading.Event()

    def on_position(progress: engine.Progress) -> None:
        saved.append(progress.position)
        if progress.position > 0 and not killed.is_set():
            killed.set()
            b.proc.send_signal(signal.SIGKILL)

    disk_side, backup_side = engine.open_side("disk", d.uri), engine.open_side("backup", b.uri)
    try:
        assert isinstance(backup_side, engine.NbdSide) and len(backup_side.connections) == 4
        with pytest.raises(errors.Unavailable) as lost:
            engine.Scan(disk_side, backup_side, 65536, max_rate=16 * MiB,
                        on_marks=marks.extend, on_position=on_position).run()  # fmt: skip
    finally:
        disk_side.close()
        backup_side.close()
    assert lost.value.code == "backup-lost", lost.value.message
    assert killed.is_set() and 0 < saved[-1] < size
    b.proc.wait(10)
    b = procs.qemu_nbd(backup, "-r", "-e", "4")
    rest, _ = engine_scan(d.uri, b.uri, start=saved[-1])
    before = {g for o, n in marks for g in range(o // 65536, (o + n - 1) // 65536 + 1)}
    expected = differing(backup_bytes, disk_bytes, 65536)
    assert before | rest == expected
    assert {g for g in expected if g * 65536 < saved[-1]} <= before  # nothing skipped


def test_a_15_tib_sparse_pair_scans_exactly(procs: Processes, tmp_path: Path, state: Path) -> None:
    """A huge sparse pair costs what its data costs: its windows grow while
    they come back all hole. Differences at the edges of 4 GiB windows, and
    in the last byte, are all found, and nothing else is marked (the time is
    measured in bench scan, not here)."""
    size = 15 * TiB
    backup, disk = tmp_path / "backup.raw", tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(backup), str(size)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), str(size)], check=True)
    rng = random.Random(74)
    expected: set[int] = set()
    places = [0, 4 * TiB - 2 * MiB, 4 * TiB, 7 * TiB + 12345, 11 * TiB - 1, size - 2 * MiB]
    with backup.open("r+b") as fb, disk.open("r+b") as fd:
        for at in places:
            data = rng.randbytes(2 * MiB)
            fb.seek(at)
            fb.write(data)
            fd.seek(at)
            changed = bytearray(data)
            for _ in range(3):
                flip = rng.randrange(len(changed))
                changed[flip] ^= 0xFF
                expected.add((at + flip) // 65536)
            fd.write(changed)
        fd.seek(9 * TiB + 3)  # data on the disk only, where the backup is a hole
        fd.write(b"only on the disk")
        expected.add((9 * TiB + 3) // 65536)
        fd.seek(size - 1)
        fd.write(b"\1")
        expected.add((size - 1) // 65536)
    d = procs.qemu_nbd(disk, "-r", "-e", "4")
    b = procs.qemu_nbd(backup, "-r", "-e", "4")
    result = scan(state, d.uri, b.uri, "b")
    assert result["bitmap"]["consistent"]
    assert dirty_granules(state, "b") == expected
    assert result["progress"]["differing_granules"] == len(expected)
    assert result["progress"]["read_backup"] <= 64 * MiB  # the data only, not the holes


def test_connections_a_multi_conn_server_does_not_accept_are_left_out(
    procs: Processes, tmp_path: Path
) -> None:
    """qemu-nbd -e 2 advertises multi-conn but serves 2 clients: the other
    connections wait in its listen queue. The side goes on with 2, after a
    bounded wait, and the scan is exact."""
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, 8 * MiB, 75, "dense")
    d = procs.qemu_nbd(disk, "-r", "-e", "2")
    b = procs.qemu_nbd(backup, "-r", "-e", "4")
    started = time.monotonic()
    marked, widths = engine_scan(d.uri, b.uri)
    assert widths == [2, 4]
    assert time.monotonic() - started < 5  # the extra connections' wait is bounded
    assert marked == differing(backup_bytes, disk_bytes, 65536)


@given(
    st.lists(st.tuples(st.integers(1, 5000), st.booleans()), min_size=1, max_size=30),
    st.integers(0, 3000),
    st.integers(1, 20000),
    st.lists(st.integers(1, 6), max_size=10),
)
def test_a_map_answered_in_pieces_describes_exactly_its_zero_ranges(
    extents: list[tuple[int, bool]], start: int, length: int, pieces: list[int]
) -> None:
    """A side's map arrives in replies of any number of extents (a server
    may describe less than asked, and its last extent may run past the
    window): the window's zero ranges are exactly the zero bytes described,
    and beyond what was described nothing is taken for zero."""
    from sidecar.scan.sides import MapRequest  # noqa: PLC0415

    end = start + length
    # The server's view from ``start``: (length, zero?) runs.
    zero_bytes: set[int] = set()
    offset = start
    for n, is_zero in extents:
        if is_zero:
            zero_bytes.update(range(offset, min(offset + n, end)))
        offset += n
    described = min(offset, end)
    request = MapRequest(start, end)
    replies, counts = list(extents), list(pieces)
    asked = 0
    while not request.done:  # as NbdSide.ask_map is called again
        asked += 1
        assert asked <= len(extents) + len(pieces) + 1  # each reply moves it on
        count = counts.pop(0) if counts else len(replies)
        batch, replies = replies[:count], replies[count:]
        request.pending = True
        request.answered([(n, EXTENT_ZERO if z else 0) for n, z in batch])  # none: gives up
    zero_map = request.zero_map()
    found = {b for s, e in zip(zero_map.starts, zero_map.ends, strict=True) for b in range(s, e)}
    assert found == zero_bytes
    assert all(start <= s < e <= end for s, e in zip(zero_map.starts, zero_map.ends, strict=True))
    # What was never described is data to the scan: read, not assumed zero.
    assert not any(b >= described for b in found)


def test_extra_connections_a_server_refuses_at_once_are_left_out_at_once(
    procs: Processes, tmp_path: Path
) -> None:
    """nbdkit's limit filter closes the connections past its limit during
    the handshake: the side reads on those it kept, without waiting."""
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, 8 * MiB, 76, "sparse")
    d = procs.nbdkit("-r", "--filter=limit", "file", str(disk), "limit=3")
    b = procs.nbdkit("-r", "file", str(backup))
    started = time.monotonic()
    marked, widths = engine_scan(d.uri, b.uri)
    assert widths == [3, 4]
    assert time.monotonic() - started < 5
    assert marked == differing(backup_bytes, disk_bytes, 65536)


def test_read_errors_on_one_of_several_connections_end_the_scan_cleanly(
    procs: Processes, tmp_path: Path
) -> None:
    """The backup's server fails some reads (nbdkit's error filter, EIO, 30%
    of them: over 32 reads, none failing has a chance of 1e-5):
    whichever connection it was, the scan ends with backup-lost naming the
    error, and what it saved resumes to exact marks on a sound server."""
    from sidecar.scan import engine  # noqa: PLC0415

    size = 16 * MiB
    backup_bytes, disk_bytes, backup, disk = pair_files(tmp_path, size, 77, "dense")
    d = procs.nbdkit("-r", "file", str(disk))
    flaky = procs.nbdkit(*BACKUP[:2], "--filter=error", "file", str(backup),
                         "error-pread=EIO", "error-pread-rate=30%")  # fmt: skip
    marks: list[tuple[int, int]] = []
    saved = [0]

    def on_position(progress: engine.Progress) -> None:
        saved.append(progress.position)

    disk_side, backup_side = engine.open_side("disk", d.uri), engine.open_side("backup", flaky.uri)
    try:
        assert isinstance(backup_side, engine.NbdSide) and len(backup_side.connections) == 4
        with pytest.raises(errors.Unavailable) as lost:
            engine.Scan(disk_side, backup_side, 65536, on_marks=marks.extend,
                        on_position=on_position).run()  # fmt: skip
    finally:
        disk_side.close()
        backup_side.close()
    assert lost.value.code == "backup-lost"
    assert "Input/output error" in lost.value.message, lost.value.message
    sound = procs.nbdkit("-r", "file", str(backup))
    rest, _ = engine_scan(d.uri, sound.uri, start=saved[-1])
    before = {g for o, n in marks for g in range(o // 65536, (o + n - 1) // 65536 + 1)}
    expected = differing(backup_bytes, disk_bytes, 65536)
    assert before | rest == expected
    assert {g for g in expected if g * 65536 < saved[-1]} <= before


def test_a_cancel_is_heeded_while_a_side_sits_on_its_map(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup's server holds every block status for 60 s (nbdkit's delay
    filter): a cancel made once the map is asked ends the scan at once,
    with its position saved, not after the server's answer."""
    from sidecar.nbdclient import Cancelled  # noqa: PLC0415
    from sidecar.scan import engine, sides  # noqa: PLC0415

    _, _, backup, disk = pair_files(tmp_path, 8 * MiB, 78, "dense")
    d = procs.nbdkit("-r", "file", str(disk))
    slow = procs.nbdkit("-r", "--filter=delay", "file", str(backup), "delay-extents=60")
    cancel = threading.Event()
    ask_map = sides.NbdSide.ask_map

    def asked_then_cancelled(self: Any, request: Any) -> None:
        ask_map(self, request)
        if self.name == "backup":
            cancel.set()  # the operator gives up while the map is on the wire

    monkeypatch.setattr(sides.NbdSide, "ask_map", asked_then_cancelled)
    saved: list[int] = []
    disk_side, backup_side = engine.open_side("disk", d.uri), engine.open_side("backup", slow.uri)
    started = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            engine.Scan(disk_side, backup_side, 65536, on_marks=lambda marks: None,
                        on_position=lambda p: saved.append(p.position),
                        cancel=cancel).run()  # fmt: skip
    finally:
        disk_side.close()
        backup_side.close()
    assert time.monotonic() - started < 30  # not held for the server's 60 s
    assert saved == [0]  # saved on the way out; nothing was compared


def test_a_side_lost_while_its_map_is_asked_is_a_lost_side(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backup's server dies with a block status on the wire (the delay
    filter holds it): backup-lost, at once, and not a hang or a traceback."""
    from sidecar.scan import engine, sides  # noqa: PLC0415

    _, _, backup, disk = pair_files(tmp_path, 8 * MiB, 79, "dense")
    d = procs.nbdkit("-r", "file", str(disk))
    slow = procs.nbdkit("-r", "--filter=delay", "file", str(backup), "delay-extents=60")
    ask_map = sides.NbdSide.ask_map

    def asked_then_killed(self: Any, request: Any) -> None:
        ask_map(self, request)
        if self.name == "backup" and slow.proc.poll() is None:
            slow.proc.send_signal(signal.SIGKILL)
            slow.proc.wait(10)

    monkeypatch.setattr(sides.NbdSide, "ask_map", asked_then_killed)
    disk_side, backup_side = engine.open_side("disk", d.uri), engine.open_side("backup", slow.uri)
    started = time.monotonic()
    try:
        with pytest.raises(errors.Unavailable) as lost:
            engine.Scan(disk_side, backup_side, 65536, on_marks=lambda marks: None).run()
    finally:
        disk_side.close()
        backup_side.close()
    assert lost.value.code == "backup-lost", lost.value.message
    assert time.monotonic() - started < 30

"""Every path that makes a bitmap consistent proves it first.

One test per way a bitmap could be served or reported consistent while it
misses a written granule (docs/architecture.md lists the paths and the proof
each gives). Real processes throughout: the tracker, the sidecar, qemu-nbd
or nbdkit as backups, qemu-io as the VM; a granule is written that must be
dirty in every bitmap dirtydiff then calls consistent.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nbd
import pytest

from dirtydiff import control, errors
from dirtydiff.bitmapfile import BitmapFile, Reason, inconsistency
from dirtydiff.state import StateDir
from tests.conftest import (
    ROOT,
    Processes,
    Server,
    bitmap_json,
    dirtydiff,
    make_disk,
    qemu_io,
    stop,
    uri_of,
)
from tests.test_scan import BACKUP, dirty_set, scan_process, wait_for_position

MiB = 1 << 20
G = 65536


def listing(state: Path) -> dict[str, dict[str, Any]]:
    found = json.loads(dirtydiff("bitmap", "list", "--state", str(state), "--json").stdout)
    return {b["name"]: b for b in found}


def refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 1 and one line that says why."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def sidecar(procs: Processes, tmp_path: Path, state: Path, disk: str) -> Server:
    sock = tmp_path / "export.sock"
    argv = [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk", disk,
            "--socket", str(sock)]  # fmt: skip
    return procs.start(argv, sock)


def exported(server: Server) -> set[str]:
    listed = subprocess.run(
        ["nbdinfo", "--list", "--json", server.uri], capture_output=True, text=True, check=True
    )
    contexts: list[str] = json.loads(listed.stdout)["exports"][0]["contexts"]
    prefix = "qemu:dirty-bitmap:"
    return {c[len(prefix) :] for c in contexts if c.startswith(prefix)}


# -- 1. a scan reads this state's disk, or nothing ------------------------------------


@pytest.mark.parametrize("where", ["tracker", "sidecar"])
def test_an_online_scan_of_another_disk_is_refused(
    procs: Processes, tmp_path: Path, state: Path, where: str
) -> None:
    """A 4 GiB disk is tracked and written at 1 GiB. A scan that names a
    1 MiB file as both disk and backup, a same-sized other file, or another
    state's tracker would call that granule clean: each is refused, and no
    bitmap is left consistent."""
    disk = make_disk(tmp_path / "disk.raw", 4 << 30)
    tracker = procs.tracker(state, disk=disk)
    qemu_io(tracker.uri, "write -P 7 1G 4k")
    small = make_disk(tmp_path / "small.raw", MiB)
    small_server = procs.nbdkit(*BACKUP, str(small))
    other = make_disk(tmp_path / "other.raw", 4 << 30)
    other_state = tmp_path / "other-state"
    other_state.mkdir(mode=0o700)
    other_tracker = procs.tracker(other_state, disk=other)
    other_backup = procs.nbdkit(*BACKUP, str(other))
    if where == "sidecar":
        sidecar(procs, tmp_path, state, tracker.uri)
    wrong = [
        (str(small), small_server.uri, "bytes"),  # the case: 1 MiB on both sides
        (str(other), other_backup.uri, "not the disk"),
        (other_tracker.uri, other_backup.uri, "another state"),
        (other_backup.uri, other_backup.uri, "cannot tell"),
    ]
    for n, (disk_arg, backup, why) in enumerate(wrong):
        args = ["scan", "--state", str(state), "--disk", disk_arg, "--backup", backup,
                "--bitmap", f"x{n}"]  # fmt: skip
        result = dirtydiff(*args, *(["--wait"] if where == "sidecar" else []), check=False)
        refused(result, why)
    assert {n for n, b in listing(state).items() if b["consistent"]} == {"@open"}
    # The disk itself, through its tracker or as its file, is fine.
    for n, disk_arg in enumerate([tracker.uri, str(disk)]):
        args = ["scan", "--state", str(state), "--disk", disk_arg, "--backup",
                other_backup.uri, "--bitmap", f"ok{n}"]  # fmt: skip
        dirtydiff(*args, *(["--wait"] if where == "sidecar" else []))
        assert (1 << 30) // G in dirty_set(state, f"ok{n}")


def test_an_offline_scan_of_another_file_is_refused(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    stop(tracker.proc)
    copy = tmp_path / "copy.raw"
    shutil.copyfile(disk, copy)
    backup = procs.nbdkit(*BACKUP, str(copy))
    result = dirtydiff("scan", "--state", str(state), "--disk", str(copy), "--backup",
                       backup.uri, "--bitmap", "x", check=False)  # fmt: skip
    refused(result, "not the disk")
    dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup", backup.uri,
              "--bitmap", "x")  # fmt: skip
    assert listing(state)["x"]["consistent"]


# -- 2. an offline scan resumed after a tracker ran ----------------------------------


def test_an_offline_scan_resumed_after_a_tracker_wrote_keeps_that_write(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """An offline scan is killed part way; a tracker starts, the VM writes
    granule 0 (already compared), the tracker stops; the same scan resumes
    from its position. The tracker recorded that write for the scan, so the
    finished bitmap has it."""
    size = 64 * MiB
    disk = make_disk(tmp_path / "disk.raw", size)
    with disk.open("r+b") as f:
        f.write(b"\x5a" * size)  # dense: every chunk is read
    backup = tmp_path / "backup.raw"
    shutil.copyfile(disk, backup)
    tracker = procs.tracker(state, disk=disk)  # the state knows its disk
    stop(tracker.proc)
    slow = procs.nbdkit("--filter=delay", *BACKUP, str(backup), "rdelay=50ms")
    proc = scan_process(state, str(disk), slow.uri, "inc")
    try:
        position = wait_for_position(state, "inc", proc)
    finally:
        proc.kill()
        proc.communicate()
    assert 0 < position < size
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock)
    qemu_io(tracker.uri, "write -P 1 0 4k")
    stop(tracker.proc)
    result = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup",
                       slow.uri, "--bitmap", "inc", "--json")  # fmt: skip
    assert json.loads(result.stdout)["resumed_from"] > 0  # it did resume
    assert listing(state)["inc"]["consistent"]
    assert 0 in dirty_set(state, "inc")


# -- 3, 5. a bitmap being filled is inconsistent from its first byte -----------------


def test_a_bitmap_a_scan_begins_is_inconsistent_the_moment_it_has_its_name(
    procs: Processes, tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill at the rename that gives the scan's bitmap its name: the file
    under the name must already say "a scan is filling it", and the same
    scan must then go on with it."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    stop(tracker.proc)
    copy = tmp_path / "backup.raw"
    shutil.copyfile(disk, copy)
    backup = procs.nbdkit(*BACKUP, str(copy))
    # The scan runs in a child that dies (kill -9 from inside) right after
    # the rename to inc.bitmap.
    killer = (
        "import os, signal, sys\n"
        "real = os.rename\n"
        "def rename(src, dst):\n"
        "    real(src, dst)\n"
        "    if str(dst).endswith('/inc.bitmap'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.rename = rename\n"
        "from sidecar.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", killer, "scan", "--state", str(state), "--disk", str(disk),
            "--backup", backup.uri, "--bitmap", "inc"]  # fmt: skip
    killed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    header = StateDir(state).read_header("inc")
    assert inconsistency(header) is Reason.SCAN_IN_PROGRESS
    qemu_io(str(disk), "write -P 3 1M 4k")
    dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup", backup.uri,
              "--bitmap", "inc")  # fmt: skip
    assert dirty_set(state, "inc") == {MiB // G}


def many_dirty_extents(procs: Processes, tmp_path: Path, size: int, count: int) -> Server:
    """A dirty bitmap with ``count`` extents, served by a sidecar of a state
    of its own: an import of it takes many control requests."""
    source = tmp_path / "source-state"
    source.mkdir(mode=0o700)
    disk = make_disk(tmp_path / "source.raw", size)
    tracker = procs.tracker(source, disk=disk)
    stop(tracker.proc)
    with BitmapFile(source / "bitmaps" / "@open.bitmap", writable=True) as bitmap:
        for i in range(count):
            bitmap.mark(2 * i * G, 1)
    sock = tmp_path / "source-export.sock"
    argv = [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(source), "--disk",
            str(disk), "--socket", str(sock)]  # fmt: skip
    return procs.start(argv, sock)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_an_import_killed_half_way_is_never_consistent(
    procs: Processes, tmp_path: Path, state: Path, sig: int
) -> None:
    """While an import walks its source, the new bitmap is inconsistent and
    not exported; killed (-9), it stays so; stopped (SIGTERM), it goes."""
    size = 1 << 40
    count = 400_000
    source = many_dirty_extents(procs, tmp_path, size, count)
    disk = make_disk(tmp_path / "disk.raw", size)
    tracker = procs.tracker(state, disk=disk)
    ours = sidecar(procs, tmp_path, state, tracker.uri)
    argv = [sys.executable, "-m", "sidecar.cli", "bitmap", "import", "--state", str(state),
            "imp", "--from", source.uri, "--context", "qemu:dirty-bitmap:@open"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    path = state / "bitmaps" / "imp.bitmap"
    try:
        end = time.monotonic() + 60
        while not path.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end
            time.sleep(0.002)  # polling for the file, under a deadline
        # The import walks its source now: hold the source still, so that
        # what follows happens half way, whatever the machine's speed.
        source.proc.send_signal(signal.SIGSTOP)
        try:
            seen = inconsistency(StateDir(state).read_header("imp"))
            assert seen is not Reason.NONE, "consistent before anything was imported"
            assert seen is Reason.IMPORT_IN_PROGRESS
            assert "imp" not in exported(ours)
            proc.send_signal(sig)
        finally:
            source.proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode != 0
    found = listing(state)
    if sig == signal.SIGKILL:
        assert not found["imp"]["consistent"], found["imp"]
        assert found["imp"]["reason"] == Reason.IMPORT_IN_PROGRESS.describe()
        assert "imp" not in exported(ours)
        refused(
            dirtydiff("bitmap", "show", "--state", str(state), "imp", check=False),
            "inconsistent",
        )
    else:
        assert "imp" not in found
    # And whole, it is what the source holds.
    dirtydiff("bitmap", "remove", "--state", str(state), "imp", check=False)
    dirtydiff("bitmap", "import", "--state", str(state), "imp", "--from", source.uri,
              "--context", "qemu:dirty-bitmap:@open")  # fmt: skip
    assert listing(state)["imp"]["dirty_bytes"] == count * G
    assert "imp" in exported(ours)


# -- 6, 7. @open always records, a cleared bitmap speaks only for itself ------------


def test_clear_after_a_host_crash_no_longer_speaks_for_the_old_backup(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """After a host crash @open and a bitmap counting from a backup are
    inconsistent. Clearing @open is refused (the next checkpoint would say
    "since c1's backup" without the writes before the crash); a cleared
    named bitmap counts from the clear and names no backup any more."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("checkpoint", "--state", str(state), "c1", "--backup", "nbd://backup/c1")
    dirtydiff("bitmap", "add", "--state", str(state), "since-b", "--backup", "nbd://backup/b")
    qemu_io(tracker.uri, "write -P 1 2M 4k")
    tracker.proc.kill()
    tracker.proc.wait(10)
    crashed = {"DIRTYDIFF_BOOT_ID": "00000000-0000-0000-0000-0000000000c1"}
    procs.tracker(state, disk=disk, sock=tracker.sock, env=crashed)
    found = listing(state)
    assert not found["@open"]["consistent"] and not found["since-b"]["consistent"]
    refused(dirtydiff("bitmap", "clear", "--state", str(state), "@open", check=False), "@open")
    assert not listing(state)["@open"]["consistent"]
    dirtydiff("bitmap", "clear", "--state", str(state), "since-b")
    cleared = listing(state)["since-b"]
    assert cleared["consistent"] and cleared["backup"] == ""
    assert cleared["created_ns"] > found["since-b"]["created_ns"]


def test_the_open_interval_cannot_be_disabled(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """A disabled @open would let the next checkpoint say "0 B changed"
    though the VM wrote."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    refused(dirtydiff("bitmap", "disable", "--state", str(state), "@open", check=False), "@open")
    qemu_io(tracker.uri, "write -P 1 3M 4k")
    result = json.loads(dirtydiff("checkpoint", "--state", str(state), "c1", "--json").stdout)
    assert result["dirty_bytes"] == G
    assert [e["offset"] for e in bitmap_json(state, "c1") if e["type"] == 1] == [3 * MiB]


def test_uri_of_a_tracker_names_its_state(procs: Processes, tmp_path: Path, state: Path) -> None:
    """The tracker's export description is what proves a scan reads it."""
    disk = make_disk(tmp_path / "disk.raw", MiB)
    tracker = procs.tracker(state, disk=disk)
    info = subprocess.run(["nbdinfo", "--json", uri_of(tracker.sock)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    description = json.loads(info.stdout)["exports"][0]["description"]
    assert description == f"dirtydiff tracker of state {StateDir(state).disk().id}"  # type: ignore[union-attr]


# -- the drain relies on one view of the disk --------------------------------------


def test_connections_share_an_upstream_without_multi_conn(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """An upstream that does not advertise multi-conn (qemu-nbd of a
    writable qcow2 does not) promises nothing across its connections: a
    write completed on one need not be seen by a read on another, and a
    checkpoint's drain, or a scan through the tracker, would rely on it.
    The tracker's connections then share one upstream connection."""
    image = make_disk(tmp_path / "disk.raw", 8 * MiB)
    log = tmp_path / "upstream.log"
    upstream = procs.nbdkit("--filter=log", "--filter=multi-conn", "file", str(image),
                            "multi-conn-mode=disable", f"logfile={log}")  # fmt: skip
    tracker = procs.tracker(state, uri=upstream.uri)
    before = log.read_text().count(" Connect ")  # the tracker's probe at start
    clients = []
    try:
        for i in range(3):
            h = nbd.NBD()
            h.connect_uri(tracker.uri)
            clients.append(h)
            h.pwrite(bytes([i + 1]) * 4096, i * MiB)
        for i, h in enumerate(clients):  # each sees every other's write
            for j in range(3):
                assert h.pread(4096, j * MiB) == bytes([j + 1]) * 4096, (i, j)
    finally:
        for h in clients:
            h.shutdown()
    assert log.read_text().count(" Connect ") - before == 1
    assert {e["offset"] for e in bitmap_json(state) if e["type"] == 1} == {0, MiB, 2 * MiB}


def test_the_export_refuses_a_disk_shown_to_be_another(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Its bitmaps paired with another disk's data would have a backup copy
    the wrong bytes of every dirty granule."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    other = make_disk(tmp_path / "other.raw", 8 * MiB)
    other_state = tmp_path / "other-state"
    other_state.mkdir(mode=0o700)
    other_tracker = procs.tracker(other_state, disk=other)
    for wrong, why in ((str(other), "not the disk"), (other_tracker.uri, "another state")):
        result = dirtydiff("serve", "--state", str(state), "--disk", wrong, "--socket",
                           str(tmp_path / "x.sock"), check=False)  # fmt: skip
        refused(result, why)
    sidecar(procs, tmp_path, state, tracker.uri)


def test_a_tracker_on_another_disk_of_the_same_size_makes_every_bitmap_inconsistent(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The bitmaps describe the disk they recorded: a tracker started on
    another file (a copy, a disk restored elsewhere) could have them call
    clean what differs, so they become inconsistent (a rebuild refills
    them); the same disk again changes nothing."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "b", "--backup", "nbd://backup/b")
    qemu_io(tracker.uri, "write -P 1 1M 4k")
    stop(tracker.proc)
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock)
    assert all(b["consistent"] for b in listing(state).values())
    stop(tracker.proc)
    copy = tmp_path / "copy.raw"
    shutil.copyfile(disk, copy)
    procs.tracker(state, disk=copy, sock=tracker.sock)
    found = listing(state)
    assert {n: b["consistent"] for n, b in found.items()} == {"@open": False, "b": False}
    assert found["b"]["reason"] == Reason.DISK_REPLACED.describe()


# -- a backup server that never answers holds nothing --------------------------------


def busy_qemu_nbd(procs: Processes, tmp_path: Path, size: int) -> tuple[Server, nbd.NBD]:
    """qemu-nbd serves one client at a time: with one connected, the next
    waits in its queue, handshake unfinished."""
    image = make_disk(tmp_path / "backup.raw", size)
    server = procs.qemu_nbd(image, "-r")
    holder = nbd.NBD()
    holder.connect_uri(server.uri)
    return server, holder


def test_connecting_to_a_server_that_never_finishes_the_handshake_times_out(
    procs: Processes, tmp_path: Path
) -> None:
    from sidecar.nbdclient import connect  # noqa: PLC0415

    server, holder = busy_qemu_nbd(procs, tmp_path, MiB)
    try:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match="did not finish the NBD handshake"):
            connect(server.uri, timeout=1.0, what="the backup")
        assert time.monotonic() - started < 10
    finally:
        holder.shutdown()


def test_a_scan_waiting_on_a_busy_backup_server_can_be_cancelled(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Found by the torture suite: the job stayed "running" for good, and
    --cancel answered but changed nothing."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    sidecar(procs, tmp_path, state, tracker.uri)
    server, holder = busy_qemu_nbd(procs, tmp_path, 8 * MiB)
    try:
        sock = state / "sidecar.sock"
        control.call(sock, "scan.start", name="x", backup=server.uri)
        control.call(sock, "scan.cancel", name="x")
        end = time.monotonic() + 10
        while (job := control.call(sock, "scan.status", name="x"))["state"] in (
            "running",
            "waiting",
        ):
            assert time.monotonic() < end, job
            time.sleep(0.05)  # polling the job under a deadline
        assert job["state"] == "cancelled", job
    finally:
        holder.shutdown()
    assert "x" not in {n for n, b in listing(state).items() if b["consistent"]}

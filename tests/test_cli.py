"""The dirtydiff CLI, with and without a running tracker.

The same bitmap commands must work on the state directory directly when no
tracker runs, and through the tracker's control socket when one does, with
the change in effect at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dirtydiff import control
from dirtydiff.bitmapfile import Flag, Header
from dirtydiff.state import StateDir
from tests.conftest import (
    ROOT,
    Processes,
    bitmap_json,
    dirtydiff,
    make_disk,
    qemu_io,
    stop,
    wait_for_socket,
)

MiB = 1 << 20


def listing(state: Path) -> dict[str, dict[str, object]]:
    found = json.loads(dirtydiff("bitmap", "list", "--state", str(state), "--json").stdout)
    return {b["name"]: b for b in found}


def dirty_offsets(state: Path, name: str) -> list[int]:
    return [int(str(e["offset"])) for e in bitmap_json(state, name) if e["type"] == 1]


def test_help_lists_the_commands() -> None:
    out = dirtydiff("--help").stdout
    commands = ("track", "scan", "serve", "rebuild", "bitmap", "checkpoint", "status")
    for command in commands:
        assert command in out
        assert dirtydiff(command, "--help").returncode == 0
    assert "Exit codes" in out
    for action in ("add", "remove", "clear", "enable", "disable", "merge", "import", "list",
                   "show"):  # fmt: skip
        assert dirtydiff("bitmap", action, "--help").returncode == 0
    # every query has --json for scripts
    for query in (("status",), ("bitmap", "list"), ("bitmap", "show"), ("scan",), ("rebuild",),
                  ("checkpoint",)):  # fmt: skip
        assert "--json" in dirtydiff(*query, "--help").stdout, query
    bad = dirtydiff("bitmap", "frobnicate", "--state", ".", check=False)
    assert bad.returncode == 2


def test_track_wrapper_runs_nbdkit_and_stops_cleanly(tmp_path: Path, state: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    sock = tmp_path / "vm.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "track", str(disk), "--state", str(state),
         "--socket", str(sock), "--granularity", "1M"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_socket(sock, proc)
        qemu_io(f"nbd+unix:///?socket={sock}", "write 3M 1")
        assert listing(state)["@open"]["granularity"] == MiB
        assert listing(state)["@open"]["recording"] is True
    finally:
        assert stop(proc, signal.SIGTERM) == 0
    header = Header.unpack((state / "bitmaps" / "@open.bitmap").read_bytes()[:4096], "@open")
    assert not header.flags & Flag.IN_USE  # a clean stop made it durable and released it
    assert dirty_offsets(state, "@open") == [3 * MiB]


def gone(pid: int) -> bool:
    """Process ``pid`` has ended (or is a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_track_started_with_ampersand_outlives_the_script_and_its_process_group(
    tmp_path: Path, state: Path
) -> None:
    """Seen: ``dirtydiff track ... &`` in a script stopped when the script
    was done. What stops it is what ends the script's process group then (a
    job runner's SIGTERM to the group, a terminal's SIGHUP), which the
    tracker was a member of; not a parent-death signal (nbdkit sets none
    without --exit-with-parent)."""
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    sock, log = tmp_path / "vm.sock", tmp_path / "track.log"
    command = " ".join([sys.executable, "-m", "sidecar.cli", "track", str(disk), "--state",
                        str(state), "--socket", str(sock)])  # fmt: skip
    # The script in a process group and session of its own, as a job
    # runner or a login shell starts it. A sleep stays in its group, to
    # show when a signal to the group has been delivered.
    script = subprocess.Popen(
        ["bash", "-c", f"{command} >{log} 2>&1 & echo $! >{tmp_path}/tracker.pid; "
         f"sleep 600 & echo $! >{tmp_path}/sleep.pid; exit"],
        cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    assert script.wait(30) == 0
    pid, sleeper = (int((tmp_path / f"{n}.pid").read_text()) for n in ("tracker", "sleep"))
    try:
        end = time.monotonic() + 20
        while not (sock.is_socket() and (state / "tracker.sock").is_socket()):
            assert not gone(pid) and time.monotonic() < end, log.read_text()
            time.sleep(0.02)  # polling the tracker's start under a deadline
        assert ping_tracker(state) == {"api": 1}
        # What ends the script's group when it is done: a job runner's
        # SIGTERM, a terminal's SIGHUP.
        os.killpg(script.pid, signal.SIGHUP)
        os.killpg(script.pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while not gone(sleeper):
            assert time.monotonic() < end, "the signals never reached the script's group"
            time.sleep(0.02)  # polling a process that is not our child, under a deadline
        assert not gone(pid), log.read_text()
        assert ping_tracker(state) == {"api": 1}
        qemu_io(f"nbd+unix:///?socket={sock}", "write 1M 1")
        assert dirty_offsets(state, "@open") == [MiB]
        assert not gone(pid), log.read_text()
    finally:
        for leftover in (pid, sleeper):
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGTERM)
        end = time.monotonic() + 15
        while not gone(pid):
            assert time.monotonic() < end, "tracker did not stop"
            time.sleep(0.02)  # polling a process that is not our child, under a deadline


def ping_tracker(state: Path) -> object:
    return control.call(state / "tracker.sock", "ping")


def test_track_wrapper_replaces_a_stale_socket(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    sock = tmp_path / "vm.sock"
    first = procs.tracker(state, disk=disk, sock=sock)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert sock.is_socket()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar.cli", "track", str(disk), "--state", str(state),
         "--socket", str(sock)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Wait on the control socket: the old NBD socket file exists already.
        wait_for_socket(state / "tracker.sock", proc)
        wait_for_socket(sock, proc)
        qemu_io(f"nbd+unix:///?socket={sock}", "write 0 1")
    finally:
        stop(proc)


def test_bitmap_commands_offline_then_online(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    stop(tracker.proc)

    # Offline: the CLI takes the state lock and changes the files.
    dirtydiff("bitmap", "add", "--state", str(state), "a")
    dirtydiff("bitmap", "add", "--state", str(state), "--disabled", "b")
    dirtydiff("bitmap", "add", "--state", str(state), "--granularity", "1M", "coarse")
    dirtydiff("bitmap", "add", "--state", str(state), "gone")
    dirtydiff("bitmap", "remove", "--state", str(state), "gone")
    bitmaps = listing(state)
    assert set(bitmaps) == {"@open", "a", "b", "coarse"}
    assert bitmaps["a"]["enabled"] and not bitmaps["b"]["enabled"]
    assert not any(b["recording"] for b in bitmaps.values())

    # Online: the tracker honours the offline changes and takes new ones at once.
    tracker = procs.tracker(state, disk=disk)
    qemu_io(tracker.uri, "write 1M 1")
    assert dirty_offsets(state, "a") == [1 * MiB]
    assert dirty_offsets(state, "b") == []
    dirtydiff("bitmap", "enable", "--state", str(state), "b")
    dirtydiff("bitmap", "disable", "--state", str(state), "a")
    qemu_io(tracker.uri, "write 2M 1")
    assert dirty_offsets(state, "a") == [1 * MiB]
    assert dirty_offsets(state, "b") == [2 * MiB]
    dirtydiff("bitmap", "merge", "--state", str(state), "b", "a")
    assert dirty_offsets(state, "b") == [1 * MiB, 2 * MiB]
    merge = dirtydiff("bitmap", "merge", "--state", str(state), "b", "coarse", check=False)
    assert merge.returncode == 1 and "granularity" in merge.stderr
    dirtydiff("bitmap", "clear", "--state", str(state), "b")
    assert dirty_offsets(state, "b") == []
    qemu_io(tracker.uri, "write 5M 1")
    assert dirty_offsets(state, "b") == [5 * MiB]
    # 1 MiB granules: writes at 1M, 2M and 5M give [1M, 3M) and [5M, 6M).
    assert dirty_offsets(state, "coarse") == [1 * MiB, 5 * MiB]

    # Errors: one line, exit 1, nothing changed.
    before = listing(state)
    for argv in (
        ["bitmap", "add", "--state", str(state), "a"],
        ["bitmap", "remove", "--state", str(state), "@open"],
        ["bitmap", "add", "--state", str(state), "../escape"],
        ["bitmap", "enable", "--state", str(state), "nope"],
        ["checkpoint", "--state", str(state), "a"],
    ):
        result = dirtydiff(*argv, check=False)
        assert result.returncode == 1, argv
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert listing(state) == before


def test_checkpoints_chain(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    qemu_io(tracker.uri, "write 0 1")
    first = json.loads(dirtydiff("checkpoint", "--state", str(state), "--json", "c1").stdout)
    assert first["drained"] is True and first["dirty_bytes"] == 65536
    qemu_io(tracker.uri, "write 1M 1")
    dirtydiff("checkpoint", "--state", str(state), "c2")
    qemu_io(tracker.uri, "write 2M 1")
    assert dirty_offsets(state, "c1") == [0]
    assert dirty_offsets(state, "c2") == [1 * MiB]
    assert dirty_offsets(state, "@open") == [2 * MiB]
    generations = {n: int(str(b["generation"])) for n, b in listing(state).items()}
    assert generations["c1"] < generations["c2"] < generations["@open"]
    # The chain survives a restart, and the frozen bitmaps stay frozen.
    stop(tracker.proc)
    tracker = procs.tracker(state, disk=disk)
    qemu_io(tracker.uri, "write 3M 1")
    assert dirty_offsets(state, "c2") == [1 * MiB]
    assert dirty_offsets(state, "@open") == [2 * MiB, 3 * MiB]


def test_a_state_dir_locked_by_an_offline_scan_gets_a_clear_error(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    # The lock held with no tracker answering (an offline scan holds it the
    # same way) once read as "control socket ... tracker.sock: No such file".
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    stop(procs.tracker(state, disk=disk).proc)
    lock = StateDir(state).try_lock()
    assert lock is not None
    try:
        busy = dirtydiff("bitmap", "list", "--state", str(state), check=False)
    finally:
        lock.release()
    assert busy.returncode != 0
    assert "is locked by another process (an offline scan" in busy.stderr, busy.stderr
    assert "@open" in dirtydiff("bitmap", "list", "--state", str(state)).stdout

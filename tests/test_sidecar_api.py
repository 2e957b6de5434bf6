"""The sidecar's control API (STATE/sidecar.sock) and ``dirtydiff rebuild``.

With a sidecar running, every bitmap request goes through its socket and
reaches the tracker; its errors are structured replies; its socket is the
owner's unless a group is given. A bitmap found inconsistent after a host
crash is rebuilt by a diff scan against the backup recorded with its
checkpoint, and an incremental backup from it then restores the disk byte for
byte.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import nbd
import pytest

from dirtydiff import control, errors
from tests.conftest import (
    DIRTYDIFF,
    ROOT,
    Processes,
    Server,
    dirtydiff,
    make_disk,
    qemu_io,
    uri_of,
)

MiB = 1 << 20
SIZE = 32 * MiB
OTHER_BOOT = {"DIRTYDIFF_BOOT_ID": "00000000-0000-0000-0000-00000000abcd"}


def start_sidecar(
    procs: Processes,
    tmp: Path,
    state: Path,
    disk_uri: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Server:
    sock = tmp / "export.sock"
    argv = [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
            "--disk", disk_uri, "--socket", str(sock), *extra]  # fmt: skip
    server = procs.start(argv, sock, env)
    # The export's socket is bound before the control socket: wait for both.
    end = time.monotonic() + 20
    while not (state / "sidecar.sock").is_socket():
        assert time.monotonic() < end, server.stderr()
        time.sleep(0.02)  # polling under a deadline
    return server


def api(state: Path, op: str, **args: object) -> Any:
    return control.call(state / "sidecar.sock", op, **args)


def raw_exchange(path: Path, data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Send raw bytes; return the replies and whether the server closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        replies: list[dict[str, Any]] = []
        while True:
            try:
                reply = control.read_message(sock)
            except errors.ProtocolError:
                return replies, True
            if reply is None:
                return replies, True
            replies.append(reply)


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def dirty_extents(uri: str, bitmap: str) -> list[tuple[int, int]]:
    context = f"qemu:dirty-bitmap:{bitmap}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    got: list[tuple[int, int, int]] = []
    found: list[tuple[int, int]] = []

    def collect(meta: str, start: int, entries: list[int], err: int) -> int:
        if meta == context:
            position = start
            for length, flags in zip(entries[::2], entries[1::2], strict=True):
                got.append((position, length, flags))
                position += length
        return 0

    try:
        size = h.get_size()
        offset = 0
        while offset < size:
            got.clear()
            h.block_status(min(size - offset, 1 << 30), offset, collect)
            offset = got[-1][0] + got[-1][1]
            found += [(start, length) for start, length, flags in got if flags & 1]
        return found
    finally:
        h.shutdown()


def incremental_restore(export: str, bitmap: str, base: Path, into: Path) -> int:
    """Copy ``base`` to ``into``, then only the dirty extents from the
    export, as a backup tool would; return the bytes read."""
    shutil.copyfile(base, into)
    h = nbd.NBD()
    h.connect_uri(export)
    read = 0
    try:
        with into.open("r+b") as f:
            for offset, length in dirty_extents(export, bitmap):
                for start in range(offset, offset + length, 4 * MiB):
                    count = min(4 * MiB, offset + length - start)
                    f.seek(start)
                    f.write(h.pread(count, start))
                    read += count
    finally:
        h.shutdown()
    return read


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(path), "write -P 0x11 0 8M", "write -P 0x22 20M 4M")
    return path


def take_backup(procs: Processes, tmp: Path, disk: Path, name: str) -> tuple[Path, str]:
    """A full backup of the disk as it is now, and the NBD URI it will be
    served at (known before the server runs, to record it at the checkpoint)."""
    copy = tmp / f"{name}.raw"
    shutil.copyfile(disk, copy)
    return copy, uri_of(tmp / f"{name}.sock")


def serve_backup(procs: Processes, tmp: Path, copy: Path, name: str) -> Server:
    return procs.start(
        ["qemu-nbd", "-t", "-r", "-f", "raw", "-k", str(tmp / f"{name}.sock"), str(copy)],
        tmp / f"{name}.sock",
    )


@pytest.mark.parametrize("auto", [False, True], ids=["rebuild-command", "auto-rebuild"])
def test_open_interval_rebuilt_after_a_host_crash_restores_the_disk(
    procs: Processes, tmp_path: Path, state: Path, disk: Path, auto: bool
) -> None:
    tracker = procs.tracker(state, disk=disk)
    # The backup tool's cycle: checkpoint naming the backup it takes now.
    backup, backup_uri = take_backup(procs, tmp_path, disk, "full")
    dirtydiff("checkpoint", "--state", str(state), "full", "--backup", backup_uri)
    listed = {b["name"]: b for b in api_or_cli_list(state)}
    assert listed["@open"]["backup"] == backup_uri and listed["full"]["backup"] == ""
    qemu_io(tracker.uri, "write -P 0x33 1M 64k", "write -z 21M 1M", "write -P 0x44 30M 3")

    # The host goes down: the tracker dies with @open recording, and comes
    # back under another boot.
    tracker.proc.kill()
    tracker.proc.wait(10)
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock, env=OTHER_BOOT)
    qemu_io(tracker.uri, "write -P 0x55 5M 4k")  # the VM goes on meanwhile
    serve_backup(procs, tmp_path, backup, "full")
    extra = ["--auto-rebuild"] if auto else []
    # The same (simulated) boot as the tracker's, or it would see every
    # recording bitmap as left by another boot.
    export = start_sidecar(procs, tmp_path, state, tracker.uri, *extra, env=OTHER_BOOT)
    if auto:
        end = time.monotonic() + 60
        while not bitmap_info(state, "@open")["consistent"]:
            assert time.monotonic() < end, export.stderr()
            time.sleep(0.1)  # polling the sidecar's job under a deadline
    else:
        info = bitmap_info(state, "@open")
        assert not info["consistent"] and "host went down" in info["reason"]
        out = dirtydiff("rebuild", "--state", str(state), "@open", "--wait").stdout
        assert "done in the sidecar" in out
    qemu_io(tracker.uri, "write -P 0x66 9M 4k")  # recorded like any write
    assert bitmap_info(state, "@open")["recording"]

    restored = tmp_path / "restored.raw"
    read = incremental_restore(export.uri, "@open", backup, restored)
    assert restored.read_bytes() == disk.read_bytes()
    assert read < SIZE // 4  # an incremental, not a full copy


def test_rebuild_given_a_backup_the_bitmap_never_recorded_uses_it_and_records_it(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    # Found by the torture suite: a bitmap added without --backup could not
    # be rebuilt even with --backup given; it stayed inconsistent for good.
    tracker = procs.tracker(state, disk=disk)
    backup, backup_uri = take_backup(procs, tmp_path, disk, "full")
    dirtydiff("bitmap", "add", "--state", str(state), "plain")
    qemu_io(tracker.uri, "write -P 0x33 1M 64k", "write -z 21M 1M")
    tracker.proc.kill()  # a host crash
    tracker.proc.wait(10)
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock, env=OTHER_BOOT)
    qemu_io(tracker.uri, "write -P 0x55 5M 4k")
    serve_backup(procs, tmp_path, backup, "full")
    export = start_sidecar(procs, tmp_path, state, tracker.uri, env=OTHER_BOOT)
    assert not bitmap_info(state, "plain")["consistent"]

    dirtydiff("rebuild", "--state", str(state), "plain", "--backup", backup_uri, "--wait")
    info = bitmap_info(state, "plain")
    assert info["consistent"] and info["recording"] and info["backup"] == backup_uri
    qemu_io(tracker.uri, "write -P 0x66 9M 4k")
    restored = tmp_path / "restored.raw"
    incremental_restore(export.uri, "plain", backup, restored)
    assert restored.read_bytes() == disk.read_bytes()


def api_or_cli_list(state: Path) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(
        dirtydiff("bitmap", "list", "--state", str(state), "--json").stdout
    )
    return found


def bitmap_info(state: Path, name: str) -> dict[str, Any]:
    return next(b for b in api_or_cli_list(state) if b["name"] == name)


def test_rebuild_refuses_what_it_cannot_do(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "plain")
    dirtydiff("bitmap", "add", "--state", str(state), "known", "--backup", "nbd://x/y")
    refused = dirtydiff("rebuild", "--state", str(state), "known", "--wait", check=False)
    assert refused.returncode == 1 and "is consistent" in refused.stderr
    missing = dirtydiff("rebuild", "--state", str(state), "nosuch", check=False)
    assert missing.returncode == 1 and "no bitmap named 'nosuch'" in missing.stderr

    tracker.proc.kill()  # a host crash
    tracker.proc.wait(10)
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock, env=OTHER_BOOT)
    start_sidecar(procs, tmp_path, state, tracker.uri, env=OTHER_BOOT)
    unknown = dirtydiff("rebuild", "--state", str(state), "plain", check=False)
    assert unknown.returncode == 1 and "does not know the backup" in unknown.stderr
    info = bitmap_info(state, "plain")  # untouched by the refusal: still there, still flagged
    assert not info["consistent"] and "host went down" in info["reason"]
    assert bitmap_info(state, "known")["backup"] == "nbd://x/y"


def test_every_request_goes_through_the_sidecar_with_structured_errors(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    tracker = procs.tracker(state, disk=disk)
    start_sidecar(procs, tmp_path, state, tracker.uri)
    sock = state / "sidecar.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600

    assert api(state, "ping") == {"api": 1}
    api(state, "bitmap.add", name="a", granularity=65536)
    api(state, "bitmap.add", name="b", granularity=4096, enabled=False)
    qemu_io(tracker.uri, "write -P 1 3M 4k")  # the tracker records it in a
    assert api(state, "bitmap.info", name="a")["dirty_bytes"] == 65536
    api(state, "bitmap.mark", name="b", ranges=[[0, 4096]])
    api(state, "bitmap.disable", name="a")
    api(state, "bitmap.enable", name="a")
    api(state, "bitmap.merge", target="a", sources=["@open"])
    result = api(state, "checkpoint", name="cp", backup="nbd+unix:///?socket=/b.sock")
    assert result["name"] == "cp" and result["drained"]
    assert {b["name"] for b in api(state, "bitmap.list")} == {"@open", "a", "b", "cp"}
    assert api(state, "status")["disk_size"] == SIZE
    api(state, "bitmap.clear", name="b")
    api(state, "bitmap.remove", name="b")
    assert api(state, "scan.list") == []

    before = api(state, "bitmap.info", name="a")
    cases: list[tuple[str, dict[str, object], str]] = [
        ("bitmap.info", {"name": "nosuch"}, "unknown-bitmap"),
        ("bitmap.add", {"name": "a"}, "name-in-use"),
        ("bitmap.merge", {"target": "a", "sources": ["cp", "nosuch"]}, "unknown-bitmap"),
        ("bitmap.add", {"name": "../x"}, "bad-name"),
        ("bitmap.add", {"name": 7}, "bad-request"),
        ("scan.begin", {"name": "x"}, "unknown-op"),  # the scan's own steps are not offered
        ("scan.status", {"name": "x"}, "unknown-scan"),
        ("rebuild", {"name": "nosuch"}, "unknown-bitmap"),
        ("checkpoint", {"name": "cp"}, "name-in-use"),
        # Scan options that would size its buffers: bounded, checked before
        # anything is allocated (a terabyte chunk once reached the scan).
        ("scan.start", {"name": "s", "backup": str(disk), "chunk": 1 << 40}, "bad-chunk"),
        ("scan.start", {"name": "s", "backup": str(disk), "in_flight": 10**6}, "bad-in-flight"),
        (
            "scan.start",
            {"name": "s", "backup": str(disk), "chunk": 64 << 20, "in_flight": 64},
            "bad-in-flight",
        ),
        ("scan.start", {"name": "s", "backup": str(disk), "granularity": 3}, "bad-granularity"),
        ("scan.start", {"name": "s", "backup": str(disk), "max_rate": -1}, "bad-rate"),
    ]
    for op, args, code in cases:
        with pytest.raises(errors.DirtydiffError) as failed:
            api(state, op, **args)
        assert failed.value.code == code, (op, failed.value.message)
    # Granularities differ: QEMU refuses such a merge, and so do we.
    api(state, "bitmap.add", name="fine", granularity=4096)
    with pytest.raises(errors.DirtydiffError) as failed:
        api(state, "bitmap.merge", target="a", sources=["fine"])
    assert failed.value.code == "geometry-mismatch"

    # Malformed frames: an error reply each; framing errors end the connection.
    wrong_version = frame(msgpack.packb({"version": 2, "op": "ping"}))
    not_a_map = frame(msgpack.packb([1, 2, 3]))
    garbage = frame(b"\xc1\xc1\xc1")
    replies, closed = raw_exchange(sock, wrong_version + frame(msgpack.packb(
        {"version": 1, "op": "ping"})))  # fmt: skip
    assert replies[0]["error"]["code"] == "bad-version" and replies[1]["ok"]
    replies, closed = raw_exchange(sock, not_a_map)
    assert replies[0]["error"]["code"] == "malformed" and closed
    replies, closed = raw_exchange(sock, garbage)
    assert replies[0]["error"]["code"] == "malformed" and closed
    replies, closed = raw_exchange(sock, struct.pack("!I", (1 << 20) + 1) + b"x" * 64)
    assert replies[0]["error"]["code"] == "too-large" and closed
    replies, closed = raw_exchange(sock, b"\x00\x00")  # a truncated prefix
    assert replies == [] and closed

    # Nothing any of that changed, and the sidecar still answers.
    after = api(state, "bitmap.info", name="a")
    assert after == before
    assert api(state, "ping") == {"api": 1}


@pytest.fixture
def shared_state() -> Iterator[Path]:
    """A state directory another user may traverse (not read): pytest's
    temp dirs are root's only, which would hide the socket's own mode."""
    parent = Path(tempfile.mkdtemp(prefix="dirtydiff-perm-"))
    try:
        os.chmod(parent, 0o711)
        state = parent / "state"
        state.mkdir(mode=0o711)
        yield state
    finally:
        shutil.rmtree(parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_control_socket_is_the_owners_unless_a_group_is_given(
    procs: Processes, tmp_path: Path, shared_state: Path
) -> None:
    disk = make_disk(shared_state.parent / "disk.raw", 8 * MiB)
    tracker = procs.tracker(shared_state, disk=disk)

    def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*DIRTYDIFF, *args], capture_output=True, text=True, timeout=60, check=False,
            cwd=ROOT, user=65534, group=65534, extra_groups=[],
        )  # fmt: skip

    export = start_sidecar(procs, tmp_path, shared_state, tracker.uri)
    denied = as_nobody("bitmap", "list", "--state", str(shared_state))
    assert denied.returncode == 1, denied.stderr
    assert "Permission denied" in denied.stderr and "Traceback" not in denied.stderr
    export.proc.terminate()
    export.proc.wait(20)

    start_sidecar(procs, tmp_path, shared_state, tracker.uri, "--control-group", "65534")
    sock = shared_state / "sidecar.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and sock.stat().st_gid == 65534
    allowed = as_nobody("bitmap", "add", "--state", str(shared_state), "from-nobody")
    assert allowed.returncode == 0, allowed.stderr
    assert "from-nobody" in {b["name"] for b in api(shared_state, "bitmap.list")}


def test_abort_stops_the_sidecars_scan_and_forgets_it(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    from tests.test_scan import BACKUP, pair_files  # noqa: PLC0415 (a test helper)

    _, _, backup, disk = pair_files(tmp_path, 64 * MiB, 7, "dense")
    backup_server = procs.nbdkit(*BACKUP, str(backup))
    tracker = procs.tracker(state, disk=disk)
    start_sidecar(procs, tmp_path, state, tracker.uri)
    dirtydiff("scan", "--state", str(state), "--backup", backup_server.uri, "--bitmap", "slow",
              "--max-rate", "4000000")  # fmt: skip
    [job] = api(state, "scan.list")
    assert job["bitmap"] == "slow" and job["state"] == "running"
    out = dirtydiff("scan", "--state", str(state), "--bitmap", "slow", "--abort").stdout
    assert "aborted, and the bitmap it was filling removed" in out
    assert api(state, "scan.status", name="slow")["state"] == "cancelled"
    names = {b["name"] for b in api(state, "bitmap.list")}
    assert "slow" not in names and "@scan:slow" not in names
    assert not (state / "scans" / "slow.json").exists()


# Numbers a client may send that are not a finite number in range: msgpack
# carries all of these (integers from -2**63 to 2**64-1, any double).
NOT_NUMBERS: list[object] = [
    float("inf"), float("-inf"), float("nan"), 1e300, 2**64 - 1, -(2**63), True,
]  # fmt: skip
BACKUP_URI = "nbd+unix:///?socket=/nonexistent/backup.sock"
# Every numeric argument of every op: (op, args with X for the number, the
# sockets that serve the op).
NUMERIC_ARGUMENTS: list[tuple[str, dict[str, object], tuple[str, ...]]] = [
    ("checkpoint", {"name": "cp", "timeout": "X"}, ("sidecar", "tracker")),
    ("bitmap.disable", {"name": "a", "timeout": "X"}, ("sidecar", "tracker")),
    ("bitmap.add", {"name": "n", "granularity": "X"}, ("sidecar", "tracker")),
    ("bitmap.remove", {"name": "a", "created_ns": "X"}, ("sidecar", "tracker")),
    ("import.complete", {"name": "a", "created_ns": "X"}, ("sidecar", "tracker")),
    ("bitmap.mark", {"name": "a", "ranges": [["X", 4096]]}, ("sidecar", "tracker")),
    ("bitmap.mark", {"name": "a", "ranges": [[0, "X"]]}, ("sidecar", "tracker")),
    ("scan.complete", {"name": "a", "created_ns": "X"}, ("tracker",)),
    ("ping", {"timeout": "X"}, ("sidecar", "tracker")),
    ("rebuild", {"name": "a", "backup": BACKUP_URI, "max_rate": "X"}, ("sidecar",)),
]
NUMERIC_ARGUMENTS += [
    ("scan.start", {"name": "s", "backup": BACKUP_URI, key: "X"}, ("sidecar",))
    for key in ("granularity", "chunk", "in_flight", "max_rate")
]


def with_number(value: object, number: object) -> object:
    if value == "X":
        return number
    if isinstance(value, list):
        return [with_number(v, number) for v in value]
    if isinstance(value, dict):
        return {k: with_number(v, number) for k, v in value.items()}
    return value


def test_every_numeric_argument_not_a_finite_number_in_range_is_a_bad_request(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    # Found by trying: the sidecar answered checkpoint timeout=inf with
    # "internal" (the drain timeout added to its socket timeout overflowed)
    # and started a scan with max_rate=inf, where the tracker said bad-request.
    tracker = procs.tracker(state, disk=disk)
    start_sidecar(procs, tmp_path, state, tracker.uri)
    api(state, "bitmap.add", name="a")
    before = api(state, "bitmap.list")
    sockets = {"sidecar": state / "sidecar.sock", "tracker": state / "tracker.sock"}
    for op, args, served_by in NUMERIC_ARGUMENTS:
        for number in NOT_NUMBERS:
            for where in served_by:
                sent = with_number(args, number)
                assert isinstance(sent, dict)
                with pytest.raises(errors.DirtydiffError) as refused:
                    control.call(sockets[where], op, **sent)
                assert isinstance(refused.value, errors.BadRequest), (
                    where, op, sent, refused.value.code, refused.value.message,
                )  # fmt: skip
    assert api(state, "bitmap.list") == before
    assert api(state, "scan.list") == []
    # The CLI's own numbers: one line, exit 1, nothing started.
    for argv in (
        ["checkpoint", "--state", str(state), "cp", "--timeout", "inf"],
        ["checkpoint", "--state", str(state), "cp", "--timeout", "nan"],
        ["scan", "--state", str(state), "--backup", BACKUP_URI, "--bitmap", "s",
         "--max-rate", "inf"],
    ):  # fmt: skip
        refused_cli = dirtydiff(*argv, check=False)
        assert refused_cli.returncode == 1, refused_cli.stderr
        assert len(refused_cli.stderr.splitlines()) == 1 and "Traceback" not in refused_cli.stderr
    assert api(state, "bitmap.list") == before
    assert api(state, "scan.list") == []


def sidecar_opens(pid: int, path: str) -> bool:
    """Whether process ``pid`` holds ``path`` open now."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == path:
                return True
        except FileNotFoundError:
            pass  # closed meanwhile
    return False


def test_a_control_request_never_makes_the_sidecar_open_a_path_the_operator_did_not_name(
    procs: Processes, tmp_path: Path, state: Path, disk: Path
) -> None:
    # Found by trying: scan.start opened any path it was given and told its
    # size and whether it equalled the backup; with --control-group, a group
    # member could make a root sidecar probe any file.
    tracker = procs.tracker(state, disk=disk)
    backup, backup_uri = take_backup(procs, tmp_path, disk, "full")
    serve_backup(procs, tmp_path, backup, "full")
    api_sock = state / "sidecar.sock"
    dirtydiff("bitmap", "add", "--state", str(state), "told", "--backup", "/etc/passwd")
    tracker.proc.kill()  # a host crash: "told" is to be rebuilt
    tracker.proc.wait(10)
    tracker = procs.tracker(state, disk=disk, sock=tracker.sock, env=OTHER_BOOT)
    sidecar = start_sidecar(procs, tmp_path, state, tracker.uri, env=OTHER_BOOT)
    # A FIFO: a sidecar that tried to open it would block there, holding it
    # open for reading, which a writer opening it without blocking sees.
    fifo = tmp_path / "probe.fifo"
    os.mkfifo(fifo)
    passwd_size = str(os.path.getsize("/etc/passwd"))
    refusals: list[tuple[str, dict[str, object], str]] = [
        ("scan.start", {"name": "s", "disk": "/etc/passwd", "backup": backup_uri},
         "disk-not-allowed"),
        ("scan.start", {"name": "s", "disk": str(fifo), "backup": backup_uri},
         "disk-not-allowed"),
        ("scan.start", {"name": "s", "backup": "/etc/passwd"}, "backup-not-allowed"),
        ("scan.start", {"name": "s", "backup": "/etc/shadow"}, "backup-not-allowed"),
        ("scan.start", {"name": "s", "backup": str(fifo)}, "backup-not-allowed"),
        ("scan.start", {"name": "s", "backup": str(backup)}, "backup-not-allowed"),
        ("scan.start", {"name": "s", "backup": "file:///etc/passwd"}, "backup-not-allowed"),
        ("scan.start", {"name": "s", "disk": str(disk), "backup": backup_uri},
         "disk-not-allowed"),  # the tracker's file: still not what serve was given
        ("rebuild", {"name": "told"}, "backup-not-allowed"),  # as its header records it
        ("rebuild", {"name": "told", "backup": "/etc/shadow"}, "backup-not-allowed"),
        ("rebuild", {"name": "told", "backup": backup_uri, "disk": "/etc/passwd"},
         "disk-not-allowed"),
    ]  # fmt: skip
    for op, args, code in refusals:
        with pytest.raises(errors.PermissionDenied) as refused:
            control.call(api_sock, op, **args)
        assert refused.value.code == code, (op, args, refused.value.message)
        message = refused.value.message
        assert passwd_size not in message and "bytes" not in message, message
        assert "nbd://" in message or "own disk" in message  # what is allowed
    with pytest.raises(OSError) as no_reader:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert no_reader.value.errno == errno.ENXIO  # nobody ever opened the FIFO
    assert not sidecar_opens(sidecar.proc.pid, "/etc/passwd")
    assert api(state, "scan.list") == []
    assert "s" not in {b["name"] for b in api(state, "bitmap.list")}
    assert not (state / "scans" / "s.json").exists()

    # What is allowed still works: the sidecar's own disk, left out or as
    # serve was given it, and a backup over NBD.
    def wait_done(name: str) -> None:
        end = time.monotonic() + 60
        while (job := api(state, "scan.status", name=name))["state"] in ("running", "waiting"):
            assert time.monotonic() < end, job
            time.sleep(0.1)  # polling the sidecar's job under a deadline
        assert job["state"] == "done", job

    api(state, "scan.start", name="own", backup=backup_uri)
    wait_done("own")
    api(state, "scan.start", name="given", disk=tracker.uri, backup=backup_uri)
    wait_done("given")
    api(state, "rebuild", name="told", backup=backup_uri)
    wait_done("told")
    assert bitmap_info(state, "told")["consistent"]

    # The CLI runs a scan the sidecar may not open in the foreground, with
    # the caller's own rights; without --disk it says what to do, in one line.
    refused_cli = dirtydiff("scan", "--state", str(state), "--backup", str(backup), "--bitmap",
                            "local", check=False)  # fmt: skip
    assert refused_cli.returncode == 1
    assert refused_cli.stderr.count("\n") == 1 and "give --disk" in refused_cli.stderr
    here = dirtydiff("scan", "--state", str(state), "--disk", tracker.uri, "--backup",
                     str(backup), "--bitmap", "local")  # fmt: skip
    # Not "started in the sidecar": the foreground scan's own summary.
    assert "compared in" in here.stdout and "local is consistent" in here.stdout
    assert {job["bitmap"] for job in api(state, "scan.list")} == {"own", "given", "told"}
    assert bitmap_info(state, "local")["consistent"]

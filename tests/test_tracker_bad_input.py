"""Bad input gets a clear error naming the problem, and loses nothing.

Start-up errors come from the real nbdkit with the real plugin; request errors
from a real libnbd client. Each case checks the message (one line, no Python
traceback), that the bitmap files are untouched, and that the tracker goes on
serving where it was running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import nbd
import pytest

from dirtydiff import control
from tests.conftest import (
    PLUGIN,
    Processes,
    bitmap_json,
    dirtydiff,
    make_disk,
    qemu_io,
    run,
)

MiB = 1 << 20


def start_fails(*params: str, nbdkit_args: tuple[str, ...] = ()) -> str:
    """Run the tracker, expect it to refuse to start; return its stderr."""
    result = subprocess.run(
        ["nbdkit", "-f", "-U", "-", *nbdkit_args, "python", str(PLUGIN), *params, "--run", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def files_of(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((state / "bitmaps").glob("*.bitmap"))}


@pytest.fixture
def tracked(procs: Processes, tmp_path: Path, state: Path) -> Path:
    """A state dir that a tracker has recorded some writes in, then stopped."""
    disk = make_disk(tmp_path / "disk.raw", 8 * MiB)
    tracker = procs.tracker(state, disk=disk)
    qemu_io(tracker.uri, "write 1M 64k", "write 7M 1")
    tracker.proc.terminate()
    tracker.proc.wait(10)
    return disk


def test_missing_state_dir(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", MiB)
    err = start_fails(f"file={disk}", f"state={tmp_path / 'nope'}")
    assert "state directory" in err and "does not exist" in err
    cli = dirtydiff(
        "track", str(disk), "--state", str(tmp_path / "nope"), "--socket", "x", check=False
    )
    assert cli.returncode == 1 and "does not exist" in cli.stderr and "Traceback" not in cli.stderr


def test_state_dir_is_a_file(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", MiB)
    (tmp_path / "file").write_text("")
    err = start_fails(f"file={disk}", f"state={tmp_path / 'file'}")
    assert "is not a directory" in err


def test_missing_disk_and_missing_parameters(tmp_path: Path, state: Path) -> None:
    assert "cannot open disk" in start_fails(f"file={tmp_path / 'nodisk'}", f"state={state}")
    assert "exactly one of file= and uri=" in start_fails(f"state={state}")
    assert "state= is required" in start_fails(f"file={make_disk(tmp_path / 'd', MiB)}")
    assert "unknown parameter" in start_fails("bogus=1")


@pytest.mark.parametrize("granularity", ["3000", "1024", str(128 * MiB), "lots"])
def test_bad_granularity(tmp_path: Path, state: Path, granularity: str) -> None:
    disk = make_disk(tmp_path / "disk.raw", MiB)
    err = start_fails(f"file={disk}", f"state={state}", f"granularity={granularity}")
    assert "granularity" in err
    assert not (state / "bitmaps").exists()


def test_bad_granularity_from_the_cli(tracked: Path, state: Path) -> None:
    before = files_of(state)
    result = dirtydiff(
        "bitmap", "add", "--state", str(state), "--granularity", "3000", "b", check=False
    )
    assert result.returncode == 1
    assert "power of two" in result.stderr and "Traceback" not in result.stderr
    assert files_of(state) == before


def test_bitmap_from_a_disk_of_another_size(tracked: Path, tmp_path: Path, state: Path) -> None:
    before = files_of(state)
    disk_record = (state / "disk.json").read_bytes()
    bigger = make_disk(tmp_path / "bigger.raw", 16 * MiB)
    err = start_fails(f"file={bigger}", f"state={state}")
    assert "describes a disk of 8388608 bytes but the disk has 16777216 bytes" in err
    assert files_of(state) == before  # nothing rewritten, not even a flag
    # Nor the disk the state describes: the refused disk once took its
    # place, and the state's own disk was then refused offline.
    assert (state / "disk.json").read_bytes() == disk_record
    status = dirtydiff("status", "--state", str(state), "--json")
    assert '"disk_size": 8388608' in status.stdout


def test_corrupt_bitmap_header(tracked: Path, state: Path) -> None:
    path = state / "bitmaps" / "@open.bitmap"
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0xFF  # a header byte under the checksum
    path.write_bytes(raw)
    before = files_of(state)
    err = start_fails(f"file={tracked}", f"state={state}")
    assert "@open.bitmap" in err and "checksum" in err
    listing = dirtydiff("bitmap", "list", "--state", str(state), check=False)
    assert listing.returncode == 1 and "checksum" in listing.stderr
    assert files_of(state) == before


def test_truncated_bitmap_file(tracked: Path, state: Path) -> None:
    path = state / "bitmaps" / "@open.bitmap"
    with path.open("r+b") as f:
        f.truncate(4096 + 1)
    err = start_fails(f"file={tracked}", f"state={state}")
    assert "@open.bitmap" in err and "header says" in err


def test_second_tracker_on_the_same_state(procs: Processes, tracked: Path, state: Path) -> None:
    procs.tracker(state, disk=tracked)
    err = start_fails(f"file={tracked}", f"state={state}")
    assert "in use by another tracker" in err


def test_requests_past_the_end_fail_and_mark_nothing(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    tracker = procs.tracker(state, disk=disk)
    h = nbd.NBD()
    h.set_strict_mode(0)  # let libnbd send what a hostile client would
    h.connect_uri(tracker.uri)
    for request in (
        lambda: h.pwrite(b"z" * 4096, 4 * MiB - 100),
        lambda: h.zero(65536, 4 * MiB),
        lambda: h.trim(1, 4 * MiB),
        lambda: h.pread(10, 4 * MiB),
    ):
        with pytest.raises(nbd.Error):
            request()  # type: ignore[no-untyped-call]
    # The same connection and a new one both keep working.
    h.pwrite(b"ok", 0)
    h.shutdown()
    qemu_io(tracker.uri, "read -P 0 4096 4096")
    assert [e["type"] for e in bitmap_json(state)] == [1, 0]


def test_read_only_export_refuses_writes_and_marks_nothing(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    tracker = procs.tracker(state, disk=disk, extra=["readonly=true"])
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(tracker.uri)
    assert h.is_read_only()
    with pytest.raises(nbd.Error) as failed:
        h.pwrite(b"x", 0)
    assert failed.value.errnum == errno.EPERM
    h.shutdown()
    assert all(e["type"] == 0 for e in bitmap_json(state))


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    if run(["chattr", "+i", str(path)], check=False).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        yield
    finally:
        run(["chattr", "-i", str(path)], check=False)


def test_read_only_backing_file_is_served_read_only(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Even root cannot open an immutable file for writing: the tracker
    serves it read-only, as nbdkit's file plugin does, instead of failing."""
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    with immutable(disk):
        tracker = procs.tracker(state, disk=disk)
        h = nbd.NBD()
        h.connect_uri(tracker.uri)
        assert h.is_read_only()
        h.shutdown()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    if run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        run(["umount", "-l", str(where)], check=False)


def test_full_state_filesystem(procs: Processes, tmp_path: Path) -> None:
    """A full state filesystem fails the new bitmap, clearly; recording into
    the existing ones and serving the VM go on."""
    disk = make_disk(tmp_path / "disk.raw", 64 * MiB)
    with small_tmpfs(tmp_path / "small", "64k") as state:
        tracker = procs.tracker(state, disk=disk)
        filler = state / "filler"
        with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
        before = set(files_of(state))
        added = dirtydiff(
            "bitmap", "add", "--state", str(state), "--granularity", "4k", "big", check=False
        )
        assert added.returncode == 1
        assert "No space left on device" in added.stderr and "Traceback" not in added.stderr
        assert set(files_of(state)) == before
        assert not list((state / "bitmaps").glob(".*"))
        qemu_io(tracker.uri, "write 5M 1")
        assert [e["offset"] for e in bitmap_json(state) if e["type"] == 1] == [5 * MiB]


def raw_control(sock_path: Path, payload: bytes) -> control.Message | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(sock_path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return control.read_message(sock)


def test_control_socket_survives_bad_clients(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = make_disk(tmp_path / "disk.raw", 4 * MiB)
    tracker = procs.tracker(state, disk=disk)
    sock = state / "tracker.sock"
    assert os.stat(sock).st_mode & 0o777 == 0o600

    def frame(obj: object) -> bytes:
        body: bytes = msgpack.packb(obj)
        return struct.pack("!I", len(body)) + body

    cases = {
        "too-large": struct.pack("!I", 0xFFFFFFFF),
        "malformed": struct.pack("!I", 3) + b"\xc1\xc1\xc1",
        "bad-version": frame({"version": 99, "op": "ping"}),
        "unknown-op": frame({"version": 1, "op": "format-disk"}),
        "bad-request": frame({"version": 1, "op": "bitmap.add", "args": {"name": 5}}),
    }
    for code, payload in cases.items():
        reply = raw_control(sock, payload)
        assert reply is not None and reply["ok"] is False
        assert reply["error"]["code"] == code
    assert raw_control(sock, struct.pack("!I", 100) + b"short") is not None  # truncated
    assert raw_control(sock, b"\x00\x00") is None or True  # cut inside the prefix: closed
    # Still serving both the control socket and the VM.
    assert control.call(sock, "ping") == {"api": 1}
    qemu_io(tracker.uri, "write 0 1")
    unknown = dirtydiff("bitmap", "remove", "--state", str(state), "nope", check=False)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1

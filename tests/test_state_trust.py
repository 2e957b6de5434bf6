"""The state directory trusts nothing in it, and has one sidecar.

A state directory others may write in is refused by every command; a symlink
planted under the name of one of its files (the lock, ``disk.json``'s
temporary, a bitmap or a bitmap's temporary, a scan record, a socket) is
never followed: the file it points to is the same afterwards, and the command
either refused with one line or removed the link. A second sidecar on the
same state exits at once, naming the first's pid; a socket path that comes to
hold another file is left alone when its server exits. Real processes
throughout: nbdkit with the tracker, ``dirtydiff serve``, the CLI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dirtydiff import control, errors
from dirtydiff.state import StateDir
from tests.conftest import (
    DIRTYDIFF,
    PLUGIN,
    ROOT,
    START_DEADLINE,
    Processes,
    dirtydiff,
    make_disk,
    qemu_io,
    run,
    stop,
)
from tests.test_sidecar_api import api, start_sidecar

MiB = 1 << 20
SIZE = 8 * MiB
VICTIM = b"not dirtydiff's to write\n"
NOBODY = 65534


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A file outside the state directory that a planted symlink points to."""
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    yield path
    assert path.read_bytes() == VICTIM, "written through a symlink in the state directory"


def plant(link: Path, target: Path) -> None:
    link.parent.mkdir(mode=0o700, exist_ok=True)
    link.symlink_to(target)


def refused(argv: list[str], *words: str) -> str:
    """Run a command that must refuse at once: exit 1, one line on stderr
    (naming ``words``), never a server left running."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=START_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{argv!r} started instead of refusing") from None
    assert proc.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def track_argv(state: Path, disk: Path, sock: Path) -> list[str]:
    return [*DIRTYDIFF, "track", str(disk), "--state", str(state), "--socket", str(sock)]


def nbdkit_argv(state: Path, disk: Path, sock: Path) -> list[str]:
    return ["nbdkit", "-f", "-U", str(sock), "python", str(PLUGIN), f"file={disk}",
            f"state={state}"]  # fmt: skip


def serve_argv(state: Path, disk: Path | str, sock: Path) -> list[str]:
    return [*DIRTYDIFF, "serve", "--state", str(state), "--disk", str(disk),
            "--socket", str(sock)]  # fmt: skip


def tracked(procs: Processes, state: Path, disk: Path) -> None:
    """Run the tracker once: the state knows its disk and has its bitmaps."""
    tracker = procs.tracker(state, disk=disk)
    assert stop(tracker.proc) == 0


# -- a directory others may write in, or another user's -----------------------


def unsafe(state: Path, how: str) -> str:
    """Make ``state`` unsafe; the words the refusal must name."""
    if how == "owned-by-nobody":
        os.chown(state, NOBODY, -1)
        return "chown"
    os.chmod(state, {"group-writable": 0o770, "world-writable": 0o757}[how])
    return "chmod 0700"


UNSAFE = [
    "group-writable",
    "world-writable",
    pytest.param(
        "owned-by-nobody",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root"),
    ),
]


@pytest.mark.parametrize("how", UNSAFE)
def test_an_unsafe_state_directory_is_refused_by_every_command(
    procs: Processes, tmp_path: Path, state: Path, how: str
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracked(procs, state, disk)
    before = sorted(p.name for p in state.iterdir())
    fix = unsafe(state, how)
    sock = tmp_path / "vm.sock"
    refused(track_argv(state, disk, sock), str(state), fix)
    refused(nbdkit_argv(state, disk, sock), str(state), fix)  # the plugin checks on its own
    refused(serve_argv(state, disk, tmp_path / "export.sock"), str(state), fix)
    for command in (["bitmap", "add", "b"], ["bitmap", "list"], ["checkpoint", "c"]):
        result = dirtydiff(*command, "--state", str(state), check=False)
        assert result.returncode == 1 and fix in result.stderr, result.stderr
    assert not sock.exists() and not (tmp_path / "export.sock").exists()
    assert sorted(p.name for p in state.iterdir()) == before  # nothing made, nothing taken


def test_group_traversal_is_allowed_and_a_group_writable_subdirectory_is_not(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracked(procs, state, disk)
    os.chmod(state, 0o710)  # what --control-group needs
    assert dirtydiff("bitmap", "add", "--state", str(state), "b").returncode == 0
    os.chmod(state / "bitmaps", 0o770)
    result = dirtydiff("bitmap", "add", "--state", str(state), "c", check=False)
    assert result.returncode == 1 and f"chmod 0700 {state / 'bitmaps'}" in result.stderr
    os.chmod(state / "bitmaps", 0o700)
    # scans/ as a symlink to a directory of someone else's files.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (state / "scans").symlink_to(elsewhere)
    result = dirtydiff("bitmap", "list", "--state", str(state), check=False)
    assert result.returncode == 1 and "is a symlink" in result.stderr, result.stderr
    assert list(elsewhere.iterdir()) == []


def test_state_dir_rules_in_process(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o750)
    StateDir(state).check_writer()
    os.chmod(state, 0o1777)  # /tmp's mode: the sticky bit does not make it safe
    with pytest.raises(errors.PermissionDenied, match="writable by group and others"):
        StateDir(state)
    os.chmod(state, 0o700)
    (state / "bitmaps").symlink_to(tmp_path)
    with pytest.raises(errors.Corrupt, match="bitmaps is a symlink"):
        StateDir(state)


# -- planted symlinks -----------------------------------------------------------


def test_a_planted_lock_is_never_written_through(
    procs: Processes, tmp_path: Path, state: Path, victim: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    backup = procs.nbdkit("--threads=1", "-r", "file", str(make_disk(tmp_path / "b.raw", SIZE)))
    plant(state / "lock", victim)
    refused(nbdkit_argv(state, disk, tmp_path / "vm.sock"), f"{state / 'lock'} is a symlink")
    result = dirtydiff("bitmap", "add", "--state", str(state), "b", check=False)
    assert result.returncode == 1 and "lock is a symlink" in result.stderr, result.stderr
    result = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup",
                       backup.uri, "--bitmap", "s", check=False)  # fmt: skip
    assert result.returncode == 1 and "lock is a symlink" in result.stderr, result.stderr


def test_a_planted_disk_record_temporary_is_removed_not_written_through(
    procs: Processes, tmp_path: Path, state: Path, victim: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    plant(state / ".disk.json.new", victim)
    tracked(procs, state, disk)
    assert not os.path.lexists(state / ".disk.json.new")
    assert StateDir(state).disk_size() == SIZE
    # An offline scan records the disk of a state never tracked, the same way.
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    plant(other / ".disk.json.new", victim)
    backup = procs.nbdkit("--threads=1", "-r", "file", str(make_disk(tmp_path / "b.raw", SIZE)))
    dirtydiff("scan", "--state", str(other), "--disk", str(disk), "--backup", backup.uri,
              "--bitmap", "s")  # fmt: skip
    assert StateDir(other).disk_size() == SIZE


# (operation, the temporary it makes, the bitmap recording after it). The
# tracker runs: nothing at its start removes what is planted after it.
TEMPORARIES = [
    (["bitmap", "add", "x"], ".x.bitmap.new", "x"),
    (["bitmap", "clear", "old"], "..old.bitmap.clearing.new", "old"),
    (["checkpoint", "c1"], "..@open.staging.new", "@open"),
]


@pytest.mark.parametrize(("command", "temporary", "recording"), TEMPORARIES)
def test_a_planted_bitmap_temporary_is_removed_not_written_through(
    procs: Processes,
    tmp_path: Path,
    state: Path,
    victim: Path,
    command: list[str],
    temporary: str,
    recording: str,
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracker = procs.tracker(state, disk=disk)
    dirtydiff("bitmap", "add", "--state", str(state), "old")
    qemu_io(tracker.uri, "write -P 1 1M 64k")
    plant(state / "bitmaps" / temporary, victim)
    dirtydiff(*command[:-1], "--state", str(state), command[-1])
    assert not os.path.lexists(state / "bitmaps" / temporary)
    # The file it made is a bitmap like any other: empty, and recording.
    qemu_io(tracker.uri, "write -P 2 0 64k")
    info = control.call(state / "tracker.sock", "bitmap.info", name=recording)
    assert info["recording"] and info["consistent"] and info["dirty_bytes"] == 65536


def test_a_planted_bitmap_is_refused_at_start(
    procs: Processes, tmp_path: Path, state: Path, victim: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracked(procs, state, disk)
    plant(state / "bitmaps" / "planted.bitmap", victim)
    refused(nbdkit_argv(state, disk, tmp_path / "vm.sock"), "planted.bitmap is a symlink")
    result = dirtydiff("bitmap", "show", "--state", str(state), "planted", check=False)
    assert result.returncode == 1 and "is a symlink" in result.stderr, result.stderr


@pytest.mark.parametrize("planted", ["s.json", "s.lock"])
def test_a_planted_scan_record_is_never_written_through(
    procs: Processes, tmp_path: Path, state: Path, victim: Path, planted: str
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracked(procs, state, disk)
    backup = procs.nbdkit("--threads=1", "-r", "file", str(make_disk(tmp_path / "b.raw", SIZE)))
    absent = tmp_path / "absent"  # a file the link would create
    plant(state / "scans" / planted, victim if planted.endswith(".json") else absent)
    result = dirtydiff("scan", "--state", str(state), "--disk", str(disk), "--backup",
                       backup.uri, "--bitmap", "s", check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"{planted} is a symlink" in result.stderr and "Traceback" not in result.stderr
    assert not absent.exists()
    # A sidecar starting beside a planted record goes on without it.
    export = start_sidecar(procs, tmp_path, state, str(disk))
    assert api(state, "ping") == {"api": 1}
    assert stop(export.proc) == 0


@pytest.mark.parametrize("where", ["tracker.sock", "sidecar.sock", "sidecar.lock", "export"])
def test_a_planted_socket_path_is_refused_and_left_alone(
    tmp_path: Path, state: Path, victim: Path, where: str, procs: Processes
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracked(procs, state, disk)
    export = tmp_path / "export.sock"
    link = export if where == "export" else state / where
    plant(link, victim)
    if where == "tracker.sock":
        refused(nbdkit_argv(state, disk, tmp_path / "vm.sock"), f"{link} exists and is a symlink")
    else:
        refused(serve_argv(state, disk, export), f"{link}", "symlink")
    assert link.is_symlink()
    if where != "export":
        assert not os.path.lexists(export)  # what it bound before refusing, it removed


def test_an_export_socket_path_holding_a_file_is_not_deleted(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracked(procs, state, disk)
    image = tmp_path / "vda.raw"  # an operator's typo: --socket names a disk image
    image.write_bytes(VICTIM)
    refused(serve_argv(state, disk, image), f"{image} exists and is not a socket")
    assert image.read_bytes() == VICTIM


# -- one sidecar, and sockets removed only by their owner ----------------------


def test_a_second_sidecar_is_refused_and_the_first_goes_on(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracker = procs.tracker(state, disk=disk)
    first = start_sidecar(procs, tmp_path, state, tracker.uri)
    export = tmp_path / "export.sock"
    control_sock = state / "sidecar.sock"
    identity = {p: os.lstat(p).st_ino for p in (export, control_sock)}
    for sock in (export, tmp_path / "second.sock"):  # its own --socket, or the first's
        refused(serve_argv(state, tracker.uri, sock), f"another sidecar (pid {first.proc.pid})")
    assert not (tmp_path / "second.sock").exists()
    assert {p: os.lstat(p).st_ino for p in identity} == identity
    assert api(state, "ping") == {"api": 1}
    listed = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={export}"]).stdout
    assert "qemu:dirty-bitmap:@open" in listed
    assert stop(first.proc) == 0
    assert not export.exists() and not control_sock.exists()  # its own, removed at exit


def bind_stranger(path: Path) -> socket.socket:
    """Another server's socket, put at ``path`` while ours runs."""
    os.rename(path, path.with_name(path.name + ".moved"))
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.bind(str(path))
    stranger.listen(1)
    return stranger


def test_a_socket_swapped_under_a_running_server_is_not_removed_at_exit(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracker = procs.tracker(state, disk=disk)
    sidecar = start_sidecar(procs, tmp_path, state, tracker.uri)
    paths = [tmp_path / "export.sock", state / "sidecar.sock", state / "tracker.sock"]
    strangers = [bind_stranger(p) for p in paths]
    try:
        identity = {p: os.lstat(p).st_ino for p in paths}
        assert stop(sidecar.proc) == 0
        assert stop(tracker.proc) == 0
        assert {p: os.lstat(p).st_ino for p in paths} == identity
    finally:
        for s in strangers:
            s.close()


def test_a_stale_socket_left_by_a_killed_sidecar_is_replaced(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracker = procs.tracker(state, disk=disk)
    sidecar = start_sidecar(procs, tmp_path, state, tracker.uri)
    sidecar.proc.send_signal(signal.SIGKILL)
    sidecar.proc.wait()
    assert (state / "sidecar.sock").is_socket() and (tmp_path / "export.sock").is_socket()
    start_sidecar(procs, tmp_path, state, tracker.uri)
    assert api(state, "ping") == {"api": 1}


def test_control_group_socket_is_born_with_its_mode(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracker = procs.tracker(state, disk=disk, extra=["socket-mode=0660"])
    assert os.stat(state / "tracker.sock").st_mode & 0o777 == 0o660
    start_sidecar(procs, tmp_path, state, tracker.uri, "--control-group", str(os.getegid()))
    assert os.stat(state / "sidecar.sock").st_mode & 0o777 == 0o660
    assert os.stat(state / "sidecar.sock").st_gid == os.getegid()

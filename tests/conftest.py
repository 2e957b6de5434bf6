"""Fixtures that run the real programs: nbdkit with the tracker, qemu-nbd, qemu-io.

Every server listens on a unix socket in the test's temp dir, start-up waits
for the socket to accept with a deadline (never a fixed sleep), and every
process is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "nbd_plugins" / "tracker.py"
DIRTYDIFF = [sys.executable, "-m", "sidecar.cli"]
START_DEADLINE = 20.0
GRANULE = 65536


def uri_of(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def wait_for_socket(
    sock: Path, proc: subprocess.Popen[bytes], deadline: float = START_DEADLINE
) -> None:
    """Wait until ``sock`` accepts a connection, or fail if ``proc`` exits."""
    end = time.monotonic() + deadline
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(sock))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if time.monotonic() > end:
            raise TimeoutError(f"{sock} not ready after {deadline}s")
        time.sleep(0.02)  # polling interval while waiting on a deadline


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    sock: Path
    log: Path

    @property
    def uri(self) -> str:
        return uri_of(self.sock)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Processes:
    """Starts servers for one test and stops every one of them at the end."""

    tmp: Path
    started: list[Server] = field(default_factory=list)
    counter: int = 0

    def _sock(self, stem: str) -> Path:
        self.counter += 1
        return self.tmp / f"{stem}{self.counter}.sock"

    def start(self, argv: list[str], sock: Path, env: dict[str, str] | None = None) -> Server:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # left by a server killed with -9
        log = sock.with_suffix(f".{len(self.started)}.log")
        with log.open("wb") as stderr:
            # stderr to a file, not a pipe: a chatty server must never block on it.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, **(env or {})},
            )
        server = Server(proc, sock, log)
        self.started.append(server)
        try:
            wait_for_socket(sock, proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {server.stderr()}") from None
        return server

    def tracker(
        self,
        state: Path,
        *,
        disk: Path | None = None,
        uri: str | None = None,
        sock: Path | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        nbdkit_args: list[str] | None = None,
    ) -> Server:
        source = f"file={disk}" if disk is not None else f"uri={uri}"
        sock = sock or self._sock("tracker")
        argv = [
            "nbdkit",
            "-f",
            "-U",
            str(sock),
            *(nbdkit_args or []),
            "python",
            str(PLUGIN),
            source,
            f"state={state}",
            *(extra or []),
        ]
        return self.start(argv, sock, env)

    def qemu_nbd(self, image: Path, *args: str, fmt: str = "raw") -> Server:
        sock = self._sock("qemu-nbd")
        return self.start(["qemu-nbd", "-t", "-f", fmt, "-k", str(sock), *args, str(image)], sock)

    def nbdkit(self, *args: str, sock: Path | None = None) -> Server:
        sock = sock or self._sock("nbdkit")
        return self.start(["nbdkit", "-f", "-U", str(sock), *args], sock)

    def stop_all(self) -> None:
        for server in reversed(self.started):
            stop(server.proc)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


def make_disk(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def run(argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(f"{argv!r} failed ({result.returncode}): {result.stderr}")
    return result  # type: ignore[no-any-return]


def dirtydiff(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([*DIRTYDIFF, *args], check=check, cwd=ROOT)


def qemu_io(target: str, *commands: str, fmt: str = "raw", readonly: bool = False) -> None:
    argv = ["qemu-io", "-f", fmt, *(["-r"] if readonly else [])]
    for c in commands:
        argv += ["-c", c]
    result = run([*argv, target])
    # qemu-io reports failed commands on stdout/stderr but exits 0.
    assert "error" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[dict[str, object]]:
    out = run(["nbdinfo", "--json", f"--map={context}", uri]).stdout
    found: list[dict[str, object]] = json.loads(out)
    return found


def dirty_granules_of(extents: list[dict[str, object]], granularity: int) -> set[int]:
    """Granules covered by dirty extents of an nbdinfo-style map."""
    dirty: set[int] = set()
    for e in extents:
        if e["type"] == 1:
            start, length = int(str(e["offset"])), int(str(e["length"]))
            dirty.update(range(start // granularity, (start + length - 1) // granularity + 1))
    return dirty


def bitmap_json(state: Path, name: str = "@open") -> list[dict[str, object]]:
    found: list[dict[str, object]] = json.loads(
        dirtydiff("bitmap", "show", "--state", str(state), "--json", name).stdout
    )
    return found


def qemu_bitmap_pair(
    procs: Processes, tmp: Path, size: int, ops: list[str]
) -> tuple[Path, Path, Server]:
    """The same writes on a raw file and on a qcow2 image with QEMU bitmap b0.

    Returns the raw file, a state directory holding b0 imported from QEMU
    (disabled, so it stays as QEMU recorded it), and ``qemu-nbd -B b0``.
    """
    raw = make_disk(tmp / "disk.raw", size)
    qcow2 = tmp / "ref.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(size)])
    run(["qemu-img", "bitmap", "--add", "--enable", str(qcow2), "b0"])
    qemu_io(str(raw), *ops)
    qemu_io(str(qcow2), *ops, fmt="qcow2")
    state = tmp / "state"
    state.mkdir(mode=0o700)
    tracker = procs.tracker(state, disk=raw)  # once, so the state knows its disk
    tracker.proc.terminate()
    tracker.proc.wait(10)
    reference = procs.qemu_nbd(qcow2, "-r", "-B", "b0", fmt="qcow2")
    dirtydiff("bitmap", "import", "--state", str(state), "--disabled", "b0",
              "--from", reference.uri, "--context", "qemu:dirty-bitmap:b0")  # fmt: skip
    return raw, state, reference

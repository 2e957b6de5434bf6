"""Hostile local clients against ``dirtydiff serve``: what the sidecar holds,
and how long a real client waits meanwhile and afterwards (issue 13, 1-3).

    python -m bench.hostile [idle] [go] [unread] [soak] [--nofile SOFT:HARD]
                            [--idle N] [--go N] [--read-size MiB] [--cycles N]

The sidecar serves a 1 GiB disk through the tracker (nbdkit with
nbd_plugins/tracker.py), as deployed, with ``--metrics``, under the fd limit
``--nofile`` (default 1024:1024, the usual soft limit, and no room to raise
it). Each scenario prints one table:

- ``idle``: N connections (default 1100: with the sidecar's own dozen fds,
  past 1024; 1000 still fit at 002b827) that send nothing. During: the
  sockets the sidecar holds, how long ``nbdinfo`` takes to answer (10 s at
  most), ``dirtydiff status`` (20 s) and a /metrics scrape (10 s), log lines.
  Then the flood closes: how long until ``nbdinfo`` answers again, fds, RSS.
- ``go``: N clients (default 600) that complete NBD_OPT_GO and stay: the
  tracker's connections and threads, the sidecar's fds.
- ``unread``: 5 clients each send 16 READs of 32 MiB (``--read-size``) and
  never read a reply; a real 64 KiB read (15 s at most); RSS before, during,
  after they close.
- ``soak``: N cycles (default 300) of checkpoint, block status of
  qemu:dirty-bitmap:incN on a new connection, bitmap remove incN: the
  sidecar's fds, deleted files still mapped, RSS.

BENCH_KEEP=1 keeps the work directory (the sidecar's log is there).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbd

from dirtydiff import control
from dirtydiff import nbdproto as proto

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
DISK_SIZE = 1 << 30
DATA = 576 * MiB  # what the unread clients read: all data, no holes


@dataclass
class Setup:
    work: Path
    state: Path
    sidecar: subprocess.Popen[bytes]
    tracker: subprocess.Popen[bytes]
    sock: Path
    metrics_port: int
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


def wait_until(done: Callable[[], bool], deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while not done():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.02)  # polling interval under a deadline


def connectable(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def started(nofile: tuple[int, int], disk_data: int = DATA) -> Iterator[Setup]:
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-bench-hostile."))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        disk = work / "disk.raw"
        with disk.open("wb") as f:
            block = os.urandom(MiB)
            for _ in range(disk_data // MiB):
                f.write(block)
            f.truncate(DISK_SIZE)
        state = work / "state"
        state.mkdir(mode=0o700)
        tsock = work / "tracker.sock"
        tracker = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(tsock), "python", str(ROOT / "nbd_plugins" / "tracker.py"),
             f"file={disk}", f"state={state}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(tracker)
        wait_until(lambda: connectable(tsock), 30, "tracker")
        sock = work / "export.sock"
        log = work / "sidecar.log"
        with log.open("wb") as stderr:
            # prlimit: the sidecar starts under the limit given, as under a
            # service manager's LimitNOFILE.
            sidecar = subprocess.Popen(
                ["prlimit", f"--nofile={nofile[0]}:{nofile[1]}", "--",
                 sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk",
                 f"nbd+unix:///?socket={tsock}", "--socket", str(sock),
                 "--metrics", "127.0.0.1:0"],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        procs.append(sidecar)
        wait_until(lambda: "metrics on" in log.read_text(), 30, "sidecar")
        found = re.search(r"127\.0\.0\.1:(\d+)/metrics", log.read_text())
        assert found is not None
        wait_until(lambda: connectable(sock), 30, "export")
        yield Setup(work, state, sidecar, tracker, sock, int(found.group(1)), log)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


# -- what a process holds ------------------------------------------------------


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def rss_mb(pid: int) -> float:
    return status_field(pid, "VmRSS") / 1024


def rss_parts(pid: int) -> str:
    """RSS MB, anonymous + file-backed (the disk's and bitmaps' pages)."""
    anon, file = status_field(pid, "RssAnon") / 1024, status_field(pid, "RssFile") / 1024
    return f"{rss_mb(pid):.0f} (anonymous {anon:.0f}, files {file:.0f})"


def deleted_maps(pid: int) -> int:
    return sum("(deleted)" in line for line in Path(f"/proc/{pid}/maps").read_text().splitlines())


def log_lines(setup: Setup) -> int:
    return len(setup.log.read_bytes().splitlines())


# -- what a real client sees ---------------------------------------------------


def timed(argv: list[str], timeout: float) -> str:
    """Seconds the command took, or '> timeout' / 'failed'."""
    began = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return f"> {timeout:g} s (no answer)"
    took = time.monotonic() - began
    return f"{took:.2f} s" if done.returncode == 0 else f"failed after {took:.2f} s"


def nbdinfo(setup: Setup, timeout: float = 10) -> str:
    return timed(["nbdinfo", setup.uri], timeout)


def status(setup: Setup, timeout: float = 20) -> str:
    return timed([sys.executable, "-m", "sidecar.cli", "status", "--state", str(setup.state)],
                 timeout)  # fmt: skip


def scrape(setup: Setup, timeout: float = 10) -> str:
    began = time.monotonic()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{setup.metrics_port}/metrics",
                               timeout=timeout).read()  # fmt: skip
    except OSError as e:
        return f"failed after {time.monotonic() - began:.2f} s ({e})"
    return f"{time.monotonic() - began:.2f} s"


def read_64k(setup: Setup, timeout: float = 15) -> str:
    code = "import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(65536, 0)"
    return timed([sys.executable, "-c", code, setup.uri], timeout)


def until_nbdinfo_answers(setup: Setup, deadline: float = 15) -> str:
    """Seconds from now until nbdinfo answers, trying again and again."""
    began = time.monotonic()
    while time.monotonic() - began < deadline:
        left = deadline - (time.monotonic() - began)
        done = subprocess.run(["nbdinfo", setup.uri], capture_output=True, check=False,
                              timeout=max(left, 0.1)) if left > 0 else None  # fmt: skip
        if done is not None and done.returncode == 0:
            return f"{time.monotonic() - began:.2f} s"
    return f"> {deadline:g} s"


def table(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n{title}")
    for key, value in rows:
        print(f"  {key:48s} {value}")


# -- scenarios -----------------------------------------------------------------


def open_idle(setup: Setup, count: int, deadline: float = 15.0) -> list[socket.socket]:
    """Connections that send nothing. A unix socket's connect fails with
    EAGAIN while the listen backlog is full: a flooder tries again, until
    ``deadline`` for the whole flood."""
    held: list[socket.socket] = []
    end = time.monotonic() + deadline
    while len(held) < count and time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        while time.monotonic() < end:
            try:
                s.connect(str(setup.sock))
            except BlockingIOError:
                time.sleep(0.001)  # the backlog is full: try again
                continue
            except OSError:
                break
            held.append(s)
            break
        else:
            s.close()
    return held


def settle(pid: int, quiet: float = 0.5, deadline: float = 10.0) -> None:
    """Until the sidecar's socket count has not changed for ``quiet`` s."""
    end = time.monotonic() + deadline
    last, since = sockets(pid), time.monotonic()
    while time.monotonic() < end and time.monotonic() - since < quiet:
        time.sleep(0.05)  # sampling interval under a deadline
        now = sockets(pid)
        if now != last:
            last, since = now, time.monotonic()


def idle(setup: Setup, count: int) -> None:
    pid = setup.sidecar.pid
    before = (fds(pid), rss_mb(pid), log_lines(setup))
    began = time.monotonic()
    flood = open_idle(setup, count)
    opened = time.monotonic() - began
    settle(pid)
    lines0 = log_lines(setup)
    rows: list[tuple[str, object]] = [
        ("sidecar fds / RSS MB before", f"{before[0]} / {before[1]:.0f}"),
        (f"flood: connects that succeeded (of {count})", f"{len(flood)} in {opened:.1f} s"),
        ("sockets the sidecar holds", sockets(pid)),
        ("nbdinfo during the flood", nbdinfo(setup)),
        ("dirtydiff status during the flood", status(setup)),
        ("/metrics scrape during the flood", scrape(setup)),
        ("sockets the sidecar holds (later)", sockets(pid)),
    ]
    rows.append(("sidecar log lines during these", log_lines(setup) - lines0))
    for s in flood:
        s.close()
    rows += [
        ("nbdinfo answers again after the flood closed", until_nbdinfo_answers(setup)),
        ("sidecar fds / RSS MB after", f"{fds(pid)} / {rss_mb(pid):.0f}"),
        ("sidecar log lines in all", log_lines(setup) - before[2]),
    ]
    table(f"idle: {count} connections that send nothing", rows)


def handshake_go(s: socket.socket, *, structured: bool = False) -> None:
    """Fixed newstyle, no zeroes, structured replies if asked, then GO on
    the default export."""
    f = s.makefile("rb")
    f.read(proto.SERVER_GREETING.size)
    s.sendall(proto.CLIENT_FLAGS.pack(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
    if structured:
        s.sendall(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.Opt.STRUCTURED_REPLY, 0))
        f.read(proto.OPTION_REPLY.size)
    payload = struct.pack("!IH", 0, 0)
    s.sendall(proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.Opt.GO, len(payload)) + payload)
    while True:
        head = f.read(proto.OPTION_REPLY.size)
        if len(head) < proto.OPTION_REPLY.size:
            raise ConnectionError("closed in the handshake")
        _, _, reply, length = proto.OPTION_REPLY.unpack(head)
        f.read(length)
        if reply != proto.Rep.INFO:
            if reply != proto.Rep.ACK:
                raise ConnectionError(f"GO answered {reply:#x}")
            return


def go(setup: Setup, count: int) -> None:
    pid, tracker = setup.sidecar.pid, setup.tracker.pid
    rows: list[tuple[str, object]] = [
        (
            "tracker sockets / threads before",
            f"{sockets(tracker)} / {status_field(tracker, 'Threads')}",
        ),
    ]
    held, failed = [], 0
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5.0)
        try:
            s.connect(str(setup.sock))
            handshake_go(s)
        except OSError:
            s.close()
            failed += 1
            continue
        held.append(s)
    rows += [
        (f"clients in transmission (of {count})", f"{len(held)} ({failed} refused or failed)"),
        (
            "tracker sockets / threads during",
            f"{sockets(tracker)} / {status_field(tracker, 'Threads')}",
        ),
        ("sidecar fds / threads during", f"{fds(pid)} / {status_field(pid, 'Threads')}"),
        ("nbdinfo during, at once", nbdinfo(setup)),
    ]
    time.sleep(2)  # they stay, idle (a measurement)
    rows += [
        ("nbdinfo during, 2 s later", nbdinfo(setup)),
        ("their connections still open then", sum(not closed(s) for s in held)),
    ]
    for s in held:
        s.close()
    rows += [
        ("nbdinfo answers again after they closed", until_nbdinfo_answers(setup)),
        (
            "tracker sockets / threads after",
            f"{sockets(tracker)} / {status_field(tracker, 'Threads')}",
        ),
    ]
    table(f"go: {count} clients that complete NBD_OPT_GO and stay", rows)


def unread(setup: Setup, size: int, clients: int = 5, reads: int = 16) -> None:
    pid = setup.sidecar.pid
    subprocess.run(["nbdcopy", setup.uri, "null:"], check=True, timeout=120)  # warm-up
    rows: list[tuple[str, object]] = [("sidecar RSS MB after one nbdcopy", rss_parts(pid))]
    held = []
    for _ in range(clients):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(setup.sock))
        handshake_go(s, structured=True)
        for cookie in range(reads):
            offset = cookie * size % DATA
            s.sendall(proto.REQUEST.pack(proto.REQUEST_MAGIC, 0, proto.Cmd.READ, cookie, offset,
                                         size))  # fmt: skip
        held.append(s)
    time.sleep(2)  # let the server take what it takes of their reads (a measurement)
    rows += [
        (f"{clients} clients x {reads} READs of {size // MiB} MiB, unread", ""),
        ("a real 64 KiB read meanwhile", read_64k(setup)),
        ("sidecar RSS MB during", rss_parts(pid)),
        ("connections of theirs still open after", sum(not closed(s) for s in held)),
    ]
    for s in held:
        s.close()
    time.sleep(3)  # what stays once they are gone (a measurement)
    rows += [
        ("a real 64 KiB read after they closed", read_64k(setup)),
        ("sidecar RSS MB 3 s after they closed", rss_parts(pid)),
    ]
    table("unread: clients that never read their replies", rows)


def closed(s: socket.socket) -> bool:
    """Whether the server ended this connection (its replies may still be buffered)."""
    s.setblocking(False)
    try:
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def soak(setup: Setup, cycles: int) -> None:
    pid = setup.sidecar.pid
    control_sock = setup.state / "sidecar.sock"
    samples = []
    began = time.monotonic()
    for i in range(cycles):
        name = f"inc{i}"
        control.call(control_sock, "checkpoint", name=name)
        h = nbd.NBD()
        h.add_meta_context(f"qemu:dirty-bitmap:{name}")
        h.connect_uri(setup.uri)
        h.block_status(DISK_SIZE, 0, lambda *args: 0)
        h.shutdown()
        del h
        control.call(control_sock, "bitmap.remove", name=name)
        samples.append((fds(pid), deleted_maps(pid), rss_mb(pid)))
    took = time.monotonic() - began
    window = max(1, min(100, cycles // 3))
    first, last = samples[:window], samples[-window:]

    def spread(part: list[tuple[int, int, float]], i: int) -> str:
        low, high = min(p[i] for p in part), max(p[i] for p in part)
        return f"{low:.0f}-{high:.0f}"

    table(
        f"soak: {cycles} cycles of checkpoint, block status, remove ({took:.1f} s)",
        [
            (
                f"sidecar fds: first / last {window} cycles",
                f"{spread(first, 0)} / {spread(last, 0)}",
            ),
            (
                f"deleted files mapped: first / last {window}",
                f"{spread(first, 1)} / {spread(last, 1)}",
            ),
            (f"sidecar RSS MB: first / last {window}", f"{spread(first, 2)} / {spread(last, 2)}"),
        ],
    )


SCENARIOS = ("idle", "go", "unread", "soak")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hostile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", metavar="idle|go|unread|soak")
    parser.add_argument("--nofile", default="1024:1024", help="the sidecar's RLIMIT_NOFILE")
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--go", type=int, default=600)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--read-size", type=int, default=32, help="MiB per unread READ")
    args = parser.parse_args(argv)
    soft, hard = (int(n) for n in args.nofile.split(":"))
    wanted = args.scenarios or list(SCENARIOS)
    for scenario in wanted:
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario!r}")
    print(f"sidecar RLIMIT_NOFILE {soft}:{hard}; git {git_head()}")
    for scenario in wanted:
        with started((soft, hard), disk_data=DATA if scenario == "unread" else 64 * MiB) as setup:
            if scenario == "idle":
                idle(setup, args.idle)
            elif scenario == "go":
                go(setup, args.go)
            elif scenario == "unread":
                unread(setup, args.read_size * MiB)
            else:
                soak(setup, args.cycles)
    return 0


def git_head() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the write tracker costs: fio against ``nbdkit file`` and against the tracker.

    python -m bench tracker [--quick] [--rounds N] [--runtime S] [--threads N] ...

One raw file (2 GiB, every block written, so both servers see the same
allocated file), served in turn by nbdkit's C file plugin and by the tracker
(``nbdkit python nbd_plugins/tracker.py``, a fresh state directory each run).
``--snapshot first|copied`` compares instead the tracker with and without an
active scope-all snapshot (copy-before-write): ``first``, writes that each
touch a granule not copied yet; ``copied``, after every granule was copied.
Each fio run gets a freshly started server on a unix socket in a temporary
directory. Runs alternate between the servers and the order flips every run,
for ``--rounds`` rounds: noise on this kind of machine reaches ±20-40% between
runs, so only ratios within one invocation mean anything. The table shows
medians over the rounds and the ratio tracker/file, against the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import Outcome, Ratio, Target

GiB = 1 << 30
MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
TRACKER_PLUGIN = REPO / "nbd_plugins" / "tracker.py"
SERVER_START_TIMEOUT = 30.0
SERVER_STOP_TIMEOUT = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class FioTest:
    key: str
    title: str
    rw: str
    bs: str
    iodepth: int
    target: float | None  # tracker/file ratio to reach; None: no target
    extra: tuple[str, ...] = ()  # more fio options, e.g. ("--fsync=16",)
    once: bool = False  # fio's random map: no block written twice in a pass

    def fio_args(self) -> list[str]:
        args = [f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.iodepth}"]
        if self.rw.startswith("rand"):
            args += ["--randrepeat=0"] if self.once else ["--norandommap", "--randrepeat=0"]
        return [*args, *self.extra]


TESTS: tuple[FioTest, ...] = (
    FioTest("4k-qd1", "rand 4K QD1", "randwrite", "4k", 1, None),
    FioTest("4k-qd16", "rand 4K QD16", "randwrite", "4k", 16, 0.8),
    FioTest("64k-qd16", "rand 64K QD16", "randwrite", "64k", 16, 0.9),
    FioTest("1m-seq-qd16", "seq 1M QD16", "write", "1m", 16, 0.9),
)


# With --snapshot: the same writes, each block once in a pass over half the
# disk (a run ends before the pass does), so that with --snapshot first every
# write is the first to touch its 64 KiB granule.
SNAPSHOT_TESTS: tuple[FioTest, ...] = (
    FioTest("64k-qd16-once", "rand 64K QD16", "randwrite", "64k", 16, None, ("--size=50%",), True),
    FioTest("4k-qd16-once", "rand 4K QD16", "randwrite", "4k", 16, None, ("--size=50%",), True),
)


# A server: a label and the nbdkit arguments that follow the common options,
# given the disk and a fresh directory of its own for this run.
PluginArgs = Callable[[Path, Path], list[str]]


@dataclass(frozen=True)
class Server:
    label: str
    plugin_args: PluginArgs
    threads: int | None = None  # nbdkit --threads; None: nbdkit's default
    # Run once the server is ready, before fio (the rundir, the server's URI).
    after_start: Callable[[Path, str], None] | None = None


def file_server(threads: int | None = None, label: str = "nbdkit-file") -> Server:
    return Server(label, lambda disk, _run: ["file", f"file={disk}"], threads)


def tracker_server(
    plugin: Path = TRACKER_PLUGIN, threads: int | None = None, label: str = "tracker"
) -> Server:
    def args(disk: Path, run: Path) -> list[str]:
        state = run / "state"
        state.mkdir(mode=0o700)
        return ["python", str(plugin), f"file={disk}", f"state={state}"]

    return Server(label, args, threads)


def snapshot_tracker_server(
    plugin: Path = TRACKER_PLUGIN, threads: int | None = None, *, copied: bool = False
) -> Server:
    """The tracker with an active scope-all snapshot, taken once it listens;
    ``copied``: every granule then copied by one sequential pass."""

    def start_snapshot(rundir: Path, uri: str) -> None:
        # Imported here: the other benchmarks need none of the product.
        from dirtydiff import control  # noqa: PLC0415

        control.call(rundir / "state" / "tracker.sock", "checkpoint", name="bench",
                     snapshot={"scope": "all"})  # fmt: skip
        if copied:
            argv = ["fio", "--name=copy", "--ioengine=nbd", f"--uri={uri}", "--rw=write",
                    "--bs=1m", "--iodepth=16"]  # fmt: skip
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True)

    base = tracker_server(plugin, threads, label="tracker+snapshot")
    return Server(base.label, base.plugin_args, threads, start_snapshot)


@dataclass
class Result:
    server: str
    test: str
    round: int
    iops: float
    bw_bytes: float
    total_ios: int
    cpu_s: float | None


class ServerError(RuntimeError):
    pass


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of every thread of ``pid`` so far, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


class RunningServer:
    """An nbdkit started in the foreground on a unix socket in ``rundir``."""

    def __init__(self, server: Server, disk: Path, rundir: Path) -> None:
        self.server = server
        self.socket = rundir / "nbd.sock"
        self.pidfile = rundir / "nbdkit.pid"
        self.log = rundir / "nbdkit.log"
        argv = ["nbdkit", "-f", "-U", str(self.socket), "-P", str(self.pidfile)]
        if server.threads is not None:
            argv.append(f"--threads={server.threads}")
        argv += server.plugin_args(disk, rundir)
        env = dict(os.environ, DIRTYDIFF_LOG="WARNING")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.argv = argv

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT) -> None:
        """nbdkit writes its pidfile once it listens: wait for it, with a deadline."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.server.label}: nbdkit exited with status {self.proc.returncode}"
                    f" before it was ready: {' '.join(self.argv)}\n{self.log_tail()}"
                )
            if self.socket.exists() and self._pidfile_written():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.server.label}: nbdkit not ready after {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _pidfile_written(self) -> bool:
        try:
            return self.pidfile.read_text().strip() == str(self.proc.pid)
        except OSError:
            return False

    def cpu_seconds(self) -> float | None:
        return _cpu_seconds(self.proc.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(SERVER_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_disk(path: Path, size: int) -> None:
    """A raw file with every block written (no holes, no unwritten extents)."""
    chunk = bytes(4 * MiB)
    with path.open("wb") as f:
        left = size
        while left > 0:
            left -= f.write(chunk[: min(len(chunk), left)])
        f.flush()
        os.fsync(f.fileno())


def sync_file(path: Path) -> None:
    """Write the disk's dirty pages back so each run starts from a clean page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_fio(test: FioTest, uri: str, runtime: float, out: Path) -> dict[str, Any]:
    argv = [
        "fio",
        f"--name={test.key}",
        "--ioengine=nbd",
        f"--uri={uri}",
        *test.fio_args(),
        "--time_based",
        f"--runtime={runtime:g}s",
        "--output-format=json",
        f"--output={out}",
    ]
    done = subprocess.run(
        argv, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"fio failed ({done.returncode}): {' '.join(argv)}\n{done.stderr}")
    report: dict[str, Any] = json.loads(out.read_text())
    job: dict[str, Any] = report["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {' '.join(argv)}")
    write: dict[str, Any] = job["write"]
    return write


def run_one(
    server: Server, test: FioTest, disk: Path, workdir: Path, *, round_no: int, runtime: float
) -> Result:
    rundir = Path(tempfile.mkdtemp(prefix=f"{server.label}-{test.key}-", dir=workdir))
    running = RunningServer(server, disk, rundir)
    try:
        running.wait_ready()
        if server.after_start is not None:
            server.after_start(rundir, running.uri)
        cpu0 = running.cpu_seconds()
        write = run_fio(test, running.uri, runtime, rundir / "fio.json")
        cpu1 = running.cpu_seconds()
    finally:
        running.stop()
    if running.proc.returncode not in (0, -signal.SIGTERM):
        print(
            f"warning: {server.label} exited with {running.proc.returncode}\n{running.log_tail()}",
            file=sys.stderr,
        )
    shutil.rmtree(rundir, ignore_errors=True)
    sync_file(disk)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return Result(
        server.label,
        test.key,
        round_no,
        float(write["iops"]),
        float(write["bw_bytes"]),
        int(write["total_ios"]),
        cpu,
    )


@dataclass
class Suite:
    servers: Sequence[Server]
    tests: Sequence[FioTest]
    rounds: int
    runtime: float
    size: int = 2 * GiB
    tmpdir: str | None = None
    verbose: bool = True
    results: list[Result] = field(default_factory=list)

    def run(self) -> list[Result]:
        with tempfile.TemporaryDirectory(prefix="dirtydiff-bench-", dir=self.tmpdir) as tmp:
            workdir = Path(tmp)
            disk = workdir / "disk.raw"
            started = time.monotonic()
            make_disk(disk, self.size)
            self._say(f"made {self.size / GiB:g} GiB disk in {time.monotonic() - started:.1f}s")
            n = len(self.servers)
            for round_no in range(self.rounds):
                for t, test in enumerate(self.tests):
                    # Interleave, and rotate who goes first, to spread drift evenly.
                    shift = (round_no + t) % n
                    order = list(self.servers[shift:]) + list(self.servers[:shift])
                    for server in order:
                        r = run_one(
                            server, test, disk, workdir, round_no=round_no, runtime=self.runtime
                        )
                        self.results.append(r)
                        cpu = f"{r.cpu_s:6.2f}s cpu" if r.cpu_s is not None else ""
                        self._say(
                            f"round {round_no + 1}/{self.rounds} {test.title:14s} "
                            f"{server.label:16s} {r.iops:9.0f} IOPS {r.bw_bytes / 1e6:8.1f} MB/s "
                            f"{cpu}"
                        )
        return self.results

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    def of(self, server: str, test: str) -> list[Result]:
        return [r for r in self.results if r.server == server and r.test == test]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cpu_per_io_us(results: Sequence[Result]) -> float | None:
    per = [r.cpu_s / r.total_ios * 1e6 for r in results if r.cpu_s is not None and r.total_ios]
    return statistics.median(per) if per else None


@dataclass
class Row:
    test: FioTest
    base_iops: float
    base_mbs: float
    base_cpu_us: float | None
    cand_iops: float
    cand_mbs: float
    cand_cpu_us: float | None
    ratio: float
    paired: list[float]

    @property
    def met(self) -> bool | None:
        return None if self.test.target is None else self.ratio >= self.test.target


def compare(suite: Suite, base: str, cand: str) -> list[Row]:
    rows = []
    for test in suite.tests:
        b, c = suite.of(base, test.key), suite.of(cand, test.key)
        b_iops = _median([r.iops for r in b])
        c_iops = _median([r.iops for r in c])
        by_round = {r.round: r.iops for r in b}
        paired = sorted(r.iops / by_round[r.round] for r in c if by_round.get(r.round))
        rows.append(
            Row(
                test,
                b_iops,
                _median([r.bw_bytes for r in b]) / 1e6,
                _cpu_per_io_us(b),
                c_iops,
                _median([r.bw_bytes for r in c]) / 1e6,
                _cpu_per_io_us(c),
                c_iops / b_iops if b_iops else float("nan"),
                paired,
            )
        )
    return rows


def format_table(rows: Sequence[Row], base: str, cand: str) -> str:
    def us(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    head = (
        "test",
        f"{base} IOPS",
        f"{base} MB/s",
        f"{cand} IOPS",
        f"{cand} MB/s",
        "ratio",
        "per-round",
        "target",
        "met",
        f"{base} cpu us/io",
        f"{cand} cpu us/io",
    )
    body = []
    for r in rows:
        target = "-" if r.test.target is None else f">={r.test.target:.2f}"
        met = {None: "-", True: "yes", False: "NO"}[r.met]
        body.append(
            (
                r.test.title,
                f"{r.base_iops:.0f}",
                f"{r.base_mbs:.1f}",
                f"{r.cand_iops:.0f}",
                f"{r.cand_mbs:.1f}",
                f"{r.ratio:.2f}",
                "/".join(f"{p:.2f}" for p in r.paired),
                target,
                met,
                us(r.base_cpu_us),
                us(r.cand_cpu_us),
            )
        )
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench tracker",
        description="fio random/sequential writes: nbdkit's file plugin vs the dirtydiff tracker",
    )
    p.add_argument("--quick", action="store_true", help="2 s runs (default 6 s)")
    p.add_argument("--runtime", type=float, help="seconds per fio run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every test on both servers")
    p.add_argument(
        "--tests",
        default=",".join(t.key for t in TESTS),
        help=f"comma-separated subset of: {', '.join(t.key for t in TESTS)}",
    )
    p.add_argument("--size", type=int, default=2, help="disk size in GiB (default 2)")
    p.add_argument("--dir", help="where the temporary directory goes (default: $TMPDIR)")
    p.add_argument("--threads", type=int, help="nbdkit --threads for both servers")
    p.add_argument("--tracker-threads", type=int, help="nbdkit --threads for the tracker only")
    p.add_argument("--plugin", type=Path, default=TRACKER_PLUGIN, help="tracker plugin file")
    p.add_argument("--json", type=Path, help="also write every run's result here")
    p.add_argument(
        "--snapshot",
        choices=["first", "copied"],
        help="the tracker with an active snapshot against the tracker without one",
    )
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the table")
    args = p.parse_args(argv)
    if args.runtime is None:
        args.runtime = 2.0 if args.quick else 6.0
    if args.snapshot is not None and args.tests == ",".join(t.key for t in TESTS):
        args.tests = ",".join(t.key for t in SNAPSHOT_TESTS)
    keys = [k.strip() for k in args.tests.split(",") if k.strip()]
    known = {t.key: t for t in (*TESTS, *SNAPSHOT_TESTS)}
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        p.error(f"--tests: unknown {unknown}; choose from {', '.join(known)}")
    args.test_list = [known[k] for k in keys]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # Turn SIGTERM into SystemExit so that every ``finally`` runs: servers
    # stopped, temporary directory (2 GiB disk) removed.
    sys.exit(128 + signum)


def ratios(rows: Sequence[Row], base: str) -> list[Ratio]:
    """The summary's rows: tracker IOPS against the file plugin's, per fio test."""
    return [
        Ratio(
            "tracker",
            f"fio {r.test.title} vs {base}",
            "IOPS",
            r.cand_iops,
            r.base_iops,
            None if r.test.target is None else Target(">=", r.test.target),
        )
        for r in rows
    ]


def main(argv: Sequence[str]) -> int:
    return run(argv).status


def run(argv: Sequence[str]) -> Outcome:
    """Measure, print this benchmark's table, and give back its ratios."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            print(f"bench tracker: {tool} is not installed", file=sys.stderr)
            return Outcome(2)
    tracker_threads = args.tracker_threads if args.tracker_threads is not None else args.threads
    if args.snapshot is None:
        base = file_server(args.threads)
        cand = tracker_server(args.plugin, tracker_threads)
    else:  # what copy-before-write costs the VM's writes
        base = tracker_server(args.plugin, tracker_threads)
        cand = snapshot_tracker_server(
            args.plugin, tracker_threads, copied=args.snapshot == "copied"
        )
    suite = Suite(
        [base, cand],
        args.test_list,
        args.rounds,
        args.runtime,
        size=args.size * GiB,
        tmpdir=args.dir,
        verbose=not args.quiet,
    )
    started = time.monotonic()
    try:
        suite.run()
    except (ServerError, RuntimeError) as e:
        print(f"bench tracker: {e}", file=sys.stderr)
        return Outcome(1)
    rows = compare(suite, base.label, cand.label)
    threads = "default" if args.threads is None else str(args.threads)
    tthreads = threads if args.tracker_threads is None else str(args.tracker_threads)
    peers = "tracker vs nbdkit file"
    if args.snapshot is not None:
        peers = f"{cand.label} vs {base.label} " + (
            "(first touch)" if args.snapshot == "first" else "(all copied)"
        )
    print(
        f"\n{peers}: {args.size} GiB raw file, fio ioengine=nbd over a unix socket, "
        f"{args.runtime:g}s runs, medians of {args.rounds} interleaved rounds, "
        f"nbdkit --threads file={threads} tracker={tthreads} "
        f"({time.monotonic() - started:.0f}s)"
    )
    print(format_table(rows, base.label, cand.label))
    if args.json is not None:
        args.json.write_text(json.dumps([vars(r) for r in suite.results], indent=1))
    missed = [r.test.title for r in rows if r.met is False]
    if missed:
        print(f"targets missed: {', '.join(missed)}")
    else:
        print("all targets met")
    return Outcome(1 if args.check and missed else 0, ratios(rows, base.label))

"""What the sidecar's export costs, against ``qemu-nbd`` in the same run.

    python -m bench export [--quick] [--rounds N] [--extents N]

(a) ``nbdinfo --map=qemu:dirty-bitmap:b0`` over a 1 TiB sparse export whose
    bitmap has 100,000 dirty extents: qemu-nbd -B b0 serving a qcow2 image
    with that bitmap, and dirtydiff serving the same bitmap (imported from it)
    on a 1 TiB sparse raw file. The two outputs must be identical.
(b) ``nbdcopy URI null:`` of a 2 GiB raw disk full of data: qemu-nbd -r
    against dirtydiff serve, on the same file.
(c) Small requests: 32 MiB read in 4 KiB requests, one in flight
    (``nbdcopy --connections=1 --requests=1 --request-size=4096
    --no-extents``), from qemu-nbd -r on the file, the tracker alone, ``serve
    --disk FILE``, and ``serve --disk TRACKER-URI`` as deployed.
(d) ``nbdinfo --map`` (base:allocation) of a 15 TiB sparse disk with 20 MiB
    of data in 5 places, from the same four servers.
(e) ``nbdcopy nbds://127.0.0.1:PORT/?tls-certificates=DIR null:`` of the
    disk of (b), over TLS on loopback TCP: ``serve --tls-creds`` against
    ``qemu-nbd --tls-creds`` (one connection, qemu-nbd's default) and
    ``qemu-nbd -e 4 --tls-creds`` (multi-conn: nbdcopy's four connections,
    as it opens to dirtydiff), with the CPU seconds of nbdcopy and of each
    server. ``--tls-only`` runs just this part.

Runs alternate between the servers, the order flipping every round; the
tables show medians and the ratio dirtydiff / qemu-nbd. Targets: the bitmap
map at least as fast as qemu-nbd (time ratio <= 1.0); read throughput >= 0.8
of qemu-nbd's; deployed, small reads >= 0.6 of qemu-nbd's rate and the sparse
map at most 1.5 times its time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench.report import Outcome, Ratio, Target
from tests.tlspki import make_pki

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
MAP_SIZE = TiB
DIRTY_EXTENTS = 100_000
COPY_SIZE = 2 * GiB
SMALL_READS_SIZE = 32 * MiB
SPARSE_SIZE = 15 * TiB
SPARSE_DATA = [(i * 3 * TiB, 4 * MiB) for i in range(5)]  # (offset, length)
# The four servers of (c) and (d), in the order their rows are printed.
SIDE_BY_SIDE = {
    "qemu": "qemu-nbd -r on the file",
    "tracker": "the tracker alone",
    "file": "serve --disk FILE",
    "deployed": "serve --disk TRACKER-URI (deployed)",
}


def wait_for_socket(sock: Path, proc: subprocess.Popen[bytes], deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not sock.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > end:
            raise TimeoutError(f"{sock} not ready")
        time.sleep(0.02)


@contextlib.contextmanager
def server(argv: list[str], sock: Path) -> Iterator[str]:
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ours(state: Path, disk: Path | str, sock: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk",
            str(disk), "--socket", str(sock), *extra]  # fmt: skip


def tracker(disk: Path, state: Path, sock: Path, *extra: str) -> list[str]:
    return [
        "nbdkit", "-f", "-U", str(sock), "python",
        str(Path(__file__).resolve().parent.parent / "nbd_plugins" / "tracker.py"),
        f"file={disk}", f"state={state}", *extra,
    ]  # fmt: skip


def timed(argv: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=3600).stdout
    return time.monotonic() - started, out


def prepare_map(work: Path, extents: int) -> tuple[Path, Path, Path]:
    """A 1 TiB qcow2 with bitmap b0 of ``extents`` dirty extents, a 1 TiB
    sparse raw file, and a state dir with b0 imported."""
    qcow2, raw, state = work / "map.qcow2", work / "map.raw", work / "state"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(MAP_SIZE)], check=True
    )
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", str(qcow2), "b0"], check=True)
    stride = MAP_SIZE // extents
    # Zero writes mark the bitmap without allocating data clusters.
    commands = "".join(f"write -z {i * stride} 64k\n" for i in range(extents))
    subprocess.run(["qemu-io", "-f", "qcow2", str(qcow2)], input=commands.encode(), check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    with raw.open("wb") as f:
        f.truncate(MAP_SIZE)
    state.mkdir(mode=0o700)
    sock = work / "setup.sock"
    with server(tracker(raw, state, work / "t.sock"), work / "t.sock"):
        pass  # once, so that the state directory knows its disk
    with server(
        ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b0", "-k", str(sock), str(qcow2)], sock
    ) as uri:
        subprocess.run([sys.executable, "-m", "sidecar.cli", "bitmap", "import", "--state",
                        str(state), "--disabled", "b0", "--from", uri, "--context",
                        "qemu:dirty-bitmap:b0"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return qcow2, raw, state


def prepare_copy(work: Path, size: int, name: str = "copy") -> Path:
    disk = work / f"{name}.raw"
    with disk.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            f.write(block)
    return disk


def prepare_sparse(work: Path) -> Path:
    """SPARSE_SIZE bytes, holes but for SPARSE_DATA."""
    disk = work / "sparse.raw"
    with disk.open("wb") as f:
        f.truncate(SPARSE_SIZE)
        for offset, length in SPARSE_DATA:
            f.seek(offset)
            f.write(os.urandom(length))
    return disk


def side_by_side(work: Path, disk: Path, name: str, rounds: int,
                 measure: Callable[[str], list[str]],
                 *tracker_args: str) -> tuple[dict[str, list[float]], dict[str, str]]:  # fmt: skip
    """Seconds the command ``measure(URI)`` took in each round from each of
    SIDE_BY_SIDE's servers on ``disk``, and what each printed. The tracker and the deployed sidecar
    share a state directory; ``serve --disk FILE`` has one of its own."""
    tracked, served = work / f"{name}-state", work / f"{name}-file-state"
    for state in (tracked, served):
        state.mkdir(mode=0o700)
    qsock, tsock, osock = work / "q.sock", work / "t.sock", work / "o.sock"
    times: dict[str, list[float]] = {who: [] for who in SIDE_BY_SIDE}
    outputs: dict[str, str] = {}

    def run_on(who: str, uri: str) -> None:
        took, outputs[who] = timed(measure(uri))
        times[who].append(took)

    def qemu() -> None:
        with server(["qemu-nbd", "-r", "-t", "-f", "raw", "-k", str(qsock), str(disk)],
                    qsock) as uri:  # fmt: skip
            run_on("qemu", uri)

    def file() -> None:
        with server(ours(served, disk, osock), osock) as uri:
            run_on("file", uri)

    def through_tracker() -> None:
        with server(tracker(disk, tracked, tsock, *tracker_args), tsock) as turi:
            run_on("tracker", turi)
            with server(ours(tracked, turi, osock), osock) as uri:
                run_on("deployed", uri)

    order = [qemu, through_tracker, file]
    for r in range(rounds):
        for step in order if r % 2 == 0 else order[::-1]:
            step()
    return times, outputs


def print_side_by_side(title: str, times: dict[str, list[float]], unit: str, amount: float,
                       deployed_target: Target) -> dict[str, float]:  # fmt: skip
    """One row per server: its median time, its rate or time as a ratio
    to qemu-nbd's, and the deployed server's target; then the deployed
    ratio of each round. Gives back the medians."""
    rate = unit != "s"
    med = {who: statistics.median(t) for who, t in times.items()}
    print()
    print(title)
    print(f"{'server':40s} {'time (s)':>9s} {unit if rate else '':>8s} {'ratio':>7s} "
          f"{'target':>8s}")  # fmt: skip
    for who, label in SIDE_BY_SIDE.items():
        ratio = med["qemu"] / med[who] if rate else med[who] / med["qemu"]
        shown = f"{amount / med[who]:8.1f}" if rate else f"{'':8s}"
        verdict = ""
        if who == "deployed":
            verdict = f"{deployed_target!s:>8s} {'met' if deployed_target.met(ratio) else 'MISSED'}"
        print(f"{label:40s} {med[who]:9.3f} {shown} {ratio:7.2f} {verdict}".rstrip())
    what = "rate ratio, qemu-nbd's time / its time" if rate else "time ratio, its / qemu-nbd's"
    print(f"({what})")
    paired = zip(times["qemu"], times["deployed"], strict=True)
    rounds = (f"{q / d if rate else d / q:.2f}" for q, d in paired)
    print("per round (deployed ratio):", "  ".join(rounds))
    return med


def free_port() -> int:
    """A loopback port free now (qemu-nbd cannot take port 0 and say which)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def tcp_server(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        end = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv!r} exited with {proc.returncode}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > end:
                raise TimeoutError(f"port {port} not ready")
            time.sleep(0.02)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


TLS_PEERS = {
    "ours": "serve --tls-creds",
    "qemu": "qemu-nbd --tls-creds (1 connection)",
    "qemu-e4": "qemu-nbd -e 4 --tls-creds (multi-conn)",
}


def tls_copy(work: Path, disk: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """(e): for each of TLS_PEERS, per round: seconds, nbdcopy's CPU
    seconds, the server's CPU seconds."""
    pki = make_pki(work / "pki")
    state = work / "tls-state"
    state.mkdir(mode=0o700)
    tls_object = f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server"

    def argv(who: str, port: int) -> list[str]:
        if who == "ours":
            return ours(state, disk, work / "tls.sock", "--tcp", f"127.0.0.1:{port}",
                        "--tls-creds", str(pki.server))  # fmt: skip
        shared = ["-e", "4"] if who == "qemu-e4" else []
        return ["qemu-nbd", "-r", "-t", *shared, "-f", "raw", "--object", tls_object,
                "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(port), str(disk)]  # fmt: skip

    found: dict[str, dict[str, list[float]]] = {
        who: {"s": [], "client": [], "server": []} for who in TLS_PEERS
    }
    order = list(TLS_PEERS)
    for r in range(rounds):
        for who in order if r % 2 == 0 else order[::-1]:
            port = free_port()
            with tcp_server(argv(who, port), port) as proc:
                uri = f"nbds://127.0.0.1:{port}/?tls-certificates={pki.client}"
                client, server_cpu = children_cpu(), cpu_seconds(proc.pid)
                took, _ = timed(["nbdcopy", uri, "null:"])
                found[who]["server"].append(cpu_seconds(proc.pid) - server_cpu)
                found[who]["client"].append(children_cpu() - client)
                found[who]["s"].append(took)
    return found


def print_tls_copy(found: dict[str, dict[str, list[float]]], gib: float) -> Ratio:
    """The table of (e); the ratio against the faster qemu-nbd."""
    med = {who: {k: statistics.median(v) for k, v in m.items()} for who, m in found.items()}
    peer = min(("qemu", "qemu-e4"), key=lambda who: med[who]["s"])
    print()
    print(f"nbdcopy to null: over TLS (loopback TCP), {gib:.2f} GiB dense")
    print(f"{'server':40s} {'time (s)':>9s} {'GiB/s':>7s} {'ratio':>7s} {'client CPU':>11s} "
          f"{'server CPU':>11s}")  # fmt: skip
    for who, label in TLS_PEERS.items():
        m = med[who]
        ratio = med[peer]["s"] / m["s"]
        print(f"{label:40s} {m['s']:9.3f} {gib / m['s']:7.2f} {ratio:7.2f} "
              f"{m['client']:10.2f}s {m['server']:10.2f}s")  # fmt: skip
    print(f"(ratio: throughput against {TLS_PEERS[peer]}, the faster; target >= 0.8)")
    rounds = (f"{q / o:.2f}" for q, o in zip(found[peer]["s"], found["ours"]["s"], strict=True))
    print("per round (ratio):", "  ".join(rounds))
    return Ratio("export", f"nbdcopy {gib:.2f} GiB over TLS vs qemu-nbd --tls-creds", "GiB/s",
                 gib / med["ours"]["s"], gib / med[peer]["s"], Target(">=", 0.8))  # fmt: skip


def main(argv: Sequence[str]) -> int:
    return run(argv).status


def run(argv: Sequence[str]) -> Outcome:
    """Measure, print this benchmark's table, and give back its two ratios."""
    parser = argparse.ArgumentParser(
        prog="python -m bench export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer extents, smaller copy, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    # Preparing the bitmap (qemu-io marking every extent, then the import) is
    # most of a quick run: a smoke test asks for fewer extents.
    parser.add_argument(
        "--extents", type=int, help=f"dirty extents in the bitmap (default {DIRTY_EXTENTS:,})"
    )
    parser.add_argument("--tls-only", action="store_true", help="only (e), nbdcopy over TLS")
    args = parser.parse_args(argv)
    if args.extents is not None and not 1 <= args.extents <= MAP_SIZE // (64 << 10):
        parser.error("--extents: from 1 to one per 64 KiB granule of 1 TiB")
    extents = args.extents or (10_000 if args.quick else DIRTY_EXTENTS)
    copy_size = GiB // 4 if args.quick else COPY_SIZE
    small_size = SMALL_READS_SIZE // 4 if args.quick else SMALL_READS_SIZE
    rounds = 1 if args.quick else args.rounds
    for tool in ("qemu-nbd", "nbdinfo", "nbdcopy", "qemu-io", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"bench export: {tool} is missing (make setup)", file=sys.stderr)
            return Outcome(2)
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-bench-export."))
    try:
        if args.tls_only:
            print(f"preparing: {copy_size // (1 << 20)} MiB disk", flush=True)
            disk = prepare_copy(work, copy_size)
            return Outcome(0, [print_tls_copy(tls_copy(work, disk, rounds), copy_size / GiB)])
        print(
            f"preparing: 1 TiB bitmap with {extents} dirty extents, "
            f"{copy_size // (1 << 20)} MiB disk",
            flush=True,
        )
        qcow2, raw, state = prepare_map(work, extents)
        disk = prepare_copy(work, copy_size)
        qsock, osock = work / "q.sock", work / "o.sock"
        qemu_map = ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b0", "-k", str(qsock), str(qcow2)]
        ours_map = ours(state, raw, osock, "--bitmap", "b0")
        qemu_copy = ["qemu-nbd", "-r", "-t", "-f", "raw", "-k", str(qsock), str(disk)]
        ours_copy = ours(work / "copy-state", disk, osock)
        (work / "copy-state").mkdir(mode=0o700)
        times: dict[str, list[float]] = {
            "map qemu": [],
            "map ours": [],
            "copy qemu": [],
            "copy ours": [],
        }
        for r in range(rounds):
            order = [("qemu", qemu_map, qsock), ("ours", ours_map, osock)]
            outputs = {}
            for who, argv_, sock in order if r % 2 == 0 else order[::-1]:
                with server(argv_, sock) as uri:
                    took, outputs[who] = timed(["nbdinfo", "--map=qemu:dirty-bitmap:b0", uri])
                    times[f"map {who}"].append(took)
            if outputs["qemu"] != outputs["ours"]:
                print("bench export: the two maps differ!", file=sys.stderr)
                return Outcome(1)
            order = [("qemu", qemu_copy, qsock), ("ours", ours_copy, osock)]
            for who, argv_, sock in order if r % 2 == 0 else order[::-1]:
                with server(argv_, sock) as uri:
                    took, _ = timed(["nbdcopy", uri, "null:"])
                    times[f"copy {who}"].append(took)
        med = {k: statistics.median(v) for k, v in times.items()}
        map_ratio = med["map ours"] / med["map qemu"]
        copy_ratio = med["copy qemu"] / med["copy ours"]  # throughput ratio
        gib = copy_size / GiB
        print()
        print(
            f"{'benchmark':44s} {'qemu-nbd':>12s} {'dirtydiff':>12s} {'ratio':>7s} {'target':>8s}"
        )
        print(f"{'nbdinfo --map bitmap, 1 TiB, ' + str(extents) + ' extents (s)':44s} "
              f"{med['map qemu']:12.3f} {med['map ours']:12.3f} {map_ratio:7.2f} "
              f"{'<= 1.0':>8s} {'met' if map_ratio <= 1.0 else 'MISSED'}")  # fmt: skip
        print(f"{'nbdcopy to null:, ' + f'{gib:.2f}' + ' GiB dense (GiB/s)':44s} "
              f"{gib / med['copy qemu']:12.2f} {gib / med['copy ours']:12.2f} {copy_ratio:7.2f} "
              f"{'>= 0.8':>8s} {'met' if copy_ratio >= 0.8 else 'MISSED'}")  # fmt: skip
        print(
            f"(medians of {rounds} round(s); map ratio is time ours/qemu, copy ratio is throughput)"
        )
        # Each round runs both servers back to back: its own ratio shows how
        # much of the spread is the machine's noise.
        paired = zip(times["map ours"], times["map qemu"], strict=True)
        paired_copy = zip(times["copy qemu"], times["copy ours"], strict=True)
        ratios = (
            f"{mo / mq:.2f},{cq / co:.2f}"
            for (mo, mq), (cq, co) in zip(paired, paired_copy, strict=True)
        )
        print("per round (map ratio,copy ratio):", "  ".join(ratios))

        small = prepare_copy(work, small_size, "small")
        read_times, _ = side_by_side(work, small, "small", rounds, lambda uri: [
            "nbdcopy", "--connections=1", "--requests=1", "--request-size=4096", "--no-extents",
            uri, "null:",
        ])  # fmt: skip
        mib = small_size / MiB
        reads_target, map_target = Target(">=", 0.6), Target("<=", 1.5)
        reads = print_side_by_side(f"{mib:.0f} MiB in 4 KiB reads, one in flight (nbdcopy)",
                                   read_times, "MiB/s", mib, reads_target)  # fmt: skip
        sparse = prepare_sparse(work)
        # A coarse granularity: the tracker's bitmaps of 15 TiB stay small.
        map_times, outputs = side_by_side(work, sparse, "sparse", rounds,
                                          lambda uri: ["nbdinfo", "--map", uri],
                                          "granularity=1048576")  # fmt: skip
        if len(set(outputs.values())) != 1:
            print("bench export: the sparse maps differ!", file=sys.stderr)
            return Outcome(1)
        maps = print_side_by_side("nbdinfo --map, 15 TiB sparse, 20 MiB of data in 5 places",
                                  map_times, "s", 0.0, map_target)  # fmt: skip
        tls = print_tls_copy(tls_copy(work, disk, rounds), gib)
        return Outcome(
            0,
            [
                Ratio("export", f"nbdinfo --map, {extents} extents vs qemu-nbd", "s",
                      med["map ours"], med["map qemu"], Target("<=", 1.0)),
                Ratio("export", f"nbdcopy {gib:.2f} GiB dense vs qemu-nbd", "GiB/s",
                      gib / med["copy ours"], gib / med["copy qemu"], Target(">=", 0.8)),
                Ratio("export", f"{mib:.0f} MiB 4 KiB reads QD1, deployed vs qemu-nbd", "MiB/s",
                      mib / reads["deployed"], mib / reads["qemu"], reads_target),
                Ratio("export", "15 TiB sparse map, deployed vs qemu-nbd", "s",
                      maps["deployed"], maps["qemu"], map_target),
                tls,
            ],
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

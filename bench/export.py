"""What the sidecar's export costs, against ``qemu-nbd`` in the same run.

    python -m bench export [--quick] [--rounds N] [--extents N]

(a) ``nbdinfo --map=qemu:dirty-bitmap:b0`` over a 1 TiB sparse export whose
    bitmap has 100,000 dirty extents: qemu-nbd -B b0 serving a qcow2 image
    with that bitmap, and dirtydiff serving the same bitmap (imported from it)
    on a 1 TiB sparse raw file. The two outputs must be identical.
(b) ``nbdcopy URI null:`` of a 2 GiB raw disk full of data: qemu-nbd -r
    against dirtydiff serve, on the same file.

Runs alternate between the servers, the order flipping every round; the table
shows medians and the ratio dirtydiff / qemu-nbd. Targets: the map at least as
fast as qemu-nbd (time ratio <= 1.0); read throughput >= 0.8 of qemu-nbd's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.report import Outcome, Ratio, Target

GiB = 1 << 30
TiB = 1 << 40
MAP_SIZE = TiB
DIRTY_EXTENTS = 100_000
COPY_SIZE = 2 * GiB


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


def ours(state: Path, disk: Path, sock: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk",
            str(disk), "--socket", str(sock), *extra]  # fmt: skip


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
    tracker = [
        "nbdkit", "-f", "-U", str(work / "t.sock"), "python",
        str(Path(__file__).resolve().parent.parent / "nbd_plugins" / "tracker.py"),
        f"file={raw}", f"state={state}",
    ]  # fmt: skip
    with server(tracker, work / "t.sock"):
        pass  # once, so that the state directory knows its disk
    with server(
        ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-B", "b0", "-k", str(sock), str(qcow2)], sock
    ) as uri:
        subprocess.run([sys.executable, "-m", "sidecar.cli", "bitmap", "import", "--state",
                        str(state), "--disabled", "b0", "--from", uri, "--context",
                        "qemu:dirty-bitmap:b0"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return qcow2, raw, state


def prepare_copy(work: Path, size: int) -> Path:
    disk = work / "copy.raw"
    with disk.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            f.write(block)
    return disk


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
    args = parser.parse_args(argv)
    if args.extents is not None and not 1 <= args.extents <= MAP_SIZE // (64 << 10):
        parser.error("--extents: from 1 to one per 64 KiB granule of 1 TiB")
    extents = args.extents or (10_000 if args.quick else DIRTY_EXTENTS)
    copy_size = GiB // 4 if args.quick else COPY_SIZE
    rounds = 1 if args.quick else args.rounds
    for tool in ("qemu-nbd", "nbdinfo", "nbdcopy", "qemu-io", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"bench export: {tool} is missing (make setup)", file=sys.stderr)
            return Outcome(2)
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-bench-export."))
    try:
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
        return Outcome(
            0,
            [
                Ratio("export", f"nbdinfo --map, {extents} extents vs qemu-nbd", "s",
                      med["map ours"], med["map qemu"], Target("<=", 1.0)),
                Ratio("export", f"nbdcopy {gib:.2f} GiB dense vs qemu-nbd", "GiB/s",
                      gib / med["copy ours"], gib / med["copy qemu"], Target(">=", 0.8)),
            ],
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

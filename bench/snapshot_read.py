"""Reads of a snapshot's export, against QEMU's own fleecing in the same run.

    python -m bench snapshot-read [--quick] [--rounds N] [--size BYTES]

Two copies of one dense raw disk are served at once, side by side:

- ours, as deployed: the tracker on the first copy with snapshot c0
  (``dirtydiff checkpoint c0 --snapshot``, scope all) and the sidecar's export
  c0 (``serve --disk TRACKER-URI``), which reads through the tracker's
  ``@snapshot:c0``;
- the peer: ``qemu-storage-daemon`` (QEMU 7.2) on the second copy: a
  copy-before-write node whose target is a sparse raw fleecing image, a
  snapshot-access node on it exported over NBD, and the copy-before-write
  node exported writable for the VM's writes (libvirt's pull-mode backup).

``nbdcopy EXPORT null:`` reads the whole snapshot: (a) as taken, nothing
copied yet; (b) after the same writes through each one's writable side, 64
KiB at every fourth granule, so a quarter of what is read comes from the
store (ours) or the fleecing image (QEMU's). Runs alternate between the
two, the order flipping every round; medians. Target: at least 0.8 of
QEMU's rate (the issue's).
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
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench.export import ours, timed, tracker, wait_for_socket
from bench.report import Outcome, Ratio, Target

MiB = 1 << 20
GiB = 1 << 30
GRANULE = 64 * 1024
TARGET = Target(">=", 0.8)


def qsd(disk: Path, fleece: Path, sock: Path) -> list[str]:
    """qemu-storage-daemon fleecing ``disk`` into ``fleece``: export ``snap``
    is the snapshot view, export ``disk`` the writable disk."""
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,filename={disk},node-name=src",
        "--blockdev", f"driver=file,filename={fleece},node-name=tgt",
        "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
        "--blockdev", "driver=snapshot-access,node-name=acc,file=cbw",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=live,node-name=cbw,name=disk,writable=on",
        "--export", "type=nbd,id=snap,node-name=acc,name=snap",
    ]  # fmt: skip


def dense_disk(path: Path, size: int) -> None:
    with path.open("wb") as f:
        block = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(block)


def overwrite_quarter(uri: str, size: int) -> None:
    """64 KiB at every fourth granule, through qemu-io (the VM's side)."""
    commands = "".join(f"write -P 0x5a {g * GRANULE} 64k\n" for g in range(0, size // GRANULE, 4))
    subprocess.run(["qemu-io", "-f", "raw", uri], input=commands.encode(), check=True,
                   stdout=subprocess.DEVNULL, timeout=3600)  # fmt: skip


@contextlib.contextmanager
def server(argv: list[str], sock: Path, pids: list[int]) -> Iterator[str]:
    """``bench.export.server``, its pid added to ``pids`` (for its CPU time)."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_socket(sock, proc)
        pids.append(proc.pid)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of ``pids`` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def both(work: Path, size: int) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """Both servers up, each on its own copy: (snapshot URI, writable URI) by side."""
    ours_disk, qemu_disk, fleece = work / "ours.raw", work / "qemu.raw", work / "fleece.raw"
    dense_disk(ours_disk, size)
    shutil.copyfile(ours_disk, qemu_disk)
    with fleece.open("wb") as f:
        f.truncate(size)
    state = work / "state"
    state.mkdir(mode=0o700)
    tsock, osock, qsock = work / "t.sock", work / "o.sock", work / "q.sock"
    with contextlib.ExitStack() as stack:
        turi = stack.enter_context(server(tracker(ours_disk, state, tsock), tsock, PIDS["tracker"]))
        subprocess.run([sys.executable, "-m", "sidecar.cli", "checkpoint", "--state", str(state),
                        "c0", "--snapshot"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        stack.enter_context(server(ours(state, turi, osock), osock, PIDS["sidecar"]))
        stack.enter_context(server(qsd(qemu_disk, fleece, qsock), qsock, PIDS["qemu"]))
        yield (
            {
                "ours": f"nbd+unix:///c0?socket={osock}",
                "qemu": f"nbd+unix:///snap?socket={qsock}",
                # For the record: the tracker's own view, without the sidecar's hop.
                "tracker": f"nbd+unix:///%40snapshot%3Ac0?socket={tsock}",
            },
            {"ours": turi, "qemu": f"nbd+unix:///disk?socket={qsock}"},
        )


# The servers' pids, by side, for their CPU time ("ours" is the tracker and
# the sidecar together).
PIDS: dict[str, list[int]] = {"tracker": [], "sidecar": [], "qemu": []}
SERVERS = {"ours": ("tracker", "sidecar"), "qemu": ("qemu",), "tracker": ("tracker",)}


def rates(snapshots: dict[str, str], rounds: int, size: int) -> dict[str, float]:
    """Median GiB/s of ``nbdcopy URI null:`` from each side, alternating;
    also prints each side's servers' CPU seconds per GiB read (a figure the
    load of a shared machine changes less than a rate)."""
    times: dict[str, list[float]] = {who: [] for who in snapshots}
    cpu: dict[str, list[float]] = {who: [] for who in snapshots}
    order = list(snapshots)
    for r in range(rounds):
        for who in order if r % 2 == 0 else order[::-1]:
            pids = [pid for kind in SERVERS[who] for pid in PIDS[kind]]
            before = cpu_seconds(pids)
            took, _ = timed(["nbdcopy", snapshots[who], "null:"])
            times[who].append(took)
            cpu[who].append((cpu_seconds(pids) - before) / (size / GiB))
    for who, t in times.items():
        print(f"  {who:7s} {' '.join(f'{size / GiB / s:.2f}' for s in t)} GiB/s, "
              f"servers' CPU {statistics.median(cpu[who]):.2f} s/GiB")  # fmt: skip
    return {who: size / GiB / statistics.median(t) for who, t in times.items()}


def run(argv: Sequence[str]) -> Outcome:
    parser = argparse.ArgumentParser(prog="python -m bench snapshot-read")
    parser.add_argument("--quick", action="store_true", help="256 MiB, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1 * GiB, help="disk size in bytes")
    args = parser.parse_args(argv)
    size, rounds = (256 * MiB, 1) if args.quick else (args.size, args.rounds)
    if shutil.which("qemu-storage-daemon") is None:
        print("qemu-storage-daemon is missing (Debian's qemu-system-common): not measured")
        return Outcome(1)
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-bench-snapshot."))
    for pids in PIDS.values():
        pids.clear()
    ratios: list[Ratio] = []
    try:
        with both(work, size) as (snapshots, writable):
            print(f"nbdcopy of a {size / GiB:.2f} GiB snapshot to null:, {rounds} round(s)")
            print("(a) as taken: nothing copied")
            fresh = rates(snapshots, rounds, size)
            for uri in writable.values():
                overwrite_quarter(uri, size)
            print("(b) a quarter of the granules overwritten since: read from the store")
            copied = rates(snapshots, rounds, size)
        print()
        print("case                 ours GiB/s  qemu GiB/s  ratio  target  (tracker alone GiB/s)")
        for case, found in (("(a) as taken", fresh), ("(b) a quarter copied", copied)):
            ratio = found["ours"] / found["qemu"]
            print(
                f"{case:20s} {found['ours']:10.2f}  {found['qemu']:10.2f}  {ratio:5.2f}  {TARGET}"
            )
            ratios.append(Ratio("snapshot-read", f"nbdcopy snapshot {case} vs qemu fleecing",
                                "GiB/s", found["ours"], found["qemu"], TARGET))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Outcome(0, ratios)


def main(argv: Sequence[str]) -> int:
    return run(argv).status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

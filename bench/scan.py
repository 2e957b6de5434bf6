"""What the diff scan costs, against the read limit and ``qemu-img compare``.

    python -m bench scan [--quick] [--rounds N]

A 2 GiB disk and its backup with about 1% of 64 KiB granules differing,
dense (all data) and 50% sparse (half the granules holes on both sides), both
served by ``qemu-nbd -r`` on unix sockets. In the same run, alternating:
- ``dirtydiff scan`` of the pair (offline, a fresh state directory each time);
- ``nbdcopy`` of both exports to ``null:`` at the same time: the two-sided
  read limit of this machine;
- ``qemu-img compare`` of two identical images, which reads everything (it
  stops at the first difference, so it cannot produce a map of them). They
  are the backup image served by two ``qemu-nbd``, as the scan's pair is:
  the same export given twice is served by one process, which on 2 cores
  is a different contest (dense, warm: ~1.1-1.4 GiB/s against ~0.4-0.5
  from two servers).
Each command first runs once untimed: ``qemu-nbd``'s cost per request
depends on the sizes it has served before (glibc's malloc grows its mmap
threshold as it frees larger buffers; until then each read's buffer is
fresh, faulted-in pages), and the first command on fresh servers paid for
that, the scan most often.
Printed: GiB/s of disk compared, the ratios, and CPU seconds per GiB of disk
for the clients (scan process, nbdcopy, qemu-img) and for the qemu-nbd
servers (from /proc: on a busy machine CPU per GiB varies less than wall
time). The scan's rate is of the whole command, process start included; the
line "alone" shows its rate over its own elapsed time (from its --json).
Targets: >= 0.9 of the nbdcopy limit, and faster than qemu-img compare.
``--profile`` adds one scan run under cProfile and prints its top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.report import Outcome, Ratio, Target

GiB = 1 << 30
GRANULE = 65536


def make_pair(work: Path, size: int, sparse: bool, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    backup, disk = work / f"backup-{sparse}.raw", work / f"disk-{sparse}.raw"
    granules = size // GRANULE
    holes = set(rng.sample(range(granules), granules // 2)) if sparse else set()
    changed = set(rng.sample(sorted(set(range(granules)) - holes), granules // 100))
    block = os.urandom(GRANULE * 64)
    with backup.open("wb") as b, disk.open("wb") as d:
        b.truncate(size)
        d.truncate(size)
        for g in range(granules):
            if g in holes:
                continue
            data = block[(g % 64) * GRANULE : (g % 64 + 1) * GRANULE]
            b.seek(g * GRANULE)
            b.write(data)
            d.seek(g * GRANULE)
            d.write(os.urandom(GRANULE) if g in changed else data)
    # Write the images back before anything is timed: left dirty, their
    # gigabytes were flushed during the first runs, and the first fsync of a
    # scan's state directory waited seconds for them (nbdcopy and qemu-img
    # never fsync), which is the bench's doing, not the scan's.
    os.sync()
    return backup, disk


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path) -> Iterator[tuple[str, int]]:
    """Serve image on sock: (URI, server pid)."""
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-t", "-e", "4", "-f", "raw", "-k", str(sock), str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > end or proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd on {image} did not start")
            time.sleep(0.02)
        yield f"nbd+unix:///?socket={sock}", proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a running process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    wall: float  # seconds
    client: float  # CPU seconds of the commands
    server: float  # CPU seconds of the qemu-nbd servers meanwhile
    stdout: str  # of the first command


def timed(servers: Sequence[int], *commands: list[str]) -> Timing:
    """Run commands at once, the servers (pids) answering them."""
    cpu, server = children_cpu(), sum(process_cpu(pid) for pid in servers)
    started = time.monotonic()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode not in (0, 1):  # qemu-img compare: 1 = differ
            raise RuntimeError(f"{p.args!r} failed: {err.decode()}")
        outputs.append(out.decode())
    wall = time.monotonic() - started
    server = sum(process_cpu(pid) for pid in servers) - server
    return Timing(wall, children_cpu() - cpu, server, outputs[0])


Medians = dict[str, tuple[float, float]]  # run -> (wall seconds, client CPU seconds)


def summary(rows: Sequence[tuple[bool, Medians]], gib: float) -> list[Ratio]:
    """Two ratios per pair: scan rate against the read limit and against qemu-img."""
    found = []
    for sparse, med in rows:
        rate = {k: gib / w for k, (w, _) in med.items()}
        pair = "50% sparse" if sparse else "dense"
        found += [
            Ratio("scan", f"{pair} {gib:.2f} GiB vs nbdcopy x2 (limit)", "GiB/s",
                  rate["scan"], rate["limit"], Target(">=", 0.9)),
            Ratio("scan", f"{pair} {gib:.2f} GiB vs qemu-img compare", "GiB/s",
                  rate["scan"], rate["compare"], Target(">", 1.0)),
        ]  # fmt: skip
    return found


def main(argv: Sequence[str]) -> int:
    return run(argv).status


def run(argv: Sequence[str]) -> Outcome:
    """Measure, print this benchmark's table, and give back its ratios."""
    parser = argparse.ArgumentParser(
        prog="python -m bench scan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB, 1 round")
    # Five: on this shared 2-core machine one bench run's median of three
    # moved by up to 0.2 in scan/limit from one run to the next.
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each side by side (5)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one scan of each pair (cProfile)"
    )
    args = parser.parse_args(argv)
    size = GiB // 4 if args.quick else 2 * GiB
    rounds = 1 if args.quick else args.rounds
    for tool in ("qemu-nbd", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"bench scan: {tool} is missing (make setup)", file=sys.stderr)
            return Outcome(2)
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-bench-scan."))
    gib = size / GiB
    rows: list[tuple[bool, Medians]] = []
    scan_alone: dict[bool, float] = {}  # sparse -> seconds the scan itself reported
    servers_cpu: dict[bool, dict[str, float]] = {}
    try:
        for sparse in (False, True):
            backup, disk = make_pair(work, size, sparse, seed=7)
            results: dict[str, list[Timing]] = {"scan": [], "limit": [], "compare": []}
            with (
                qemu_nbd(backup, work / "b.sock") as (b_uri, b_pid),
                qemu_nbd(disk, work / "d.sock") as (d_uri, d_pid),
                qemu_nbd(backup, work / "b2.sock") as (b2_uri, b2_pid),
            ):
                for r in range(-1, rounds):  # round -1 warms the servers up, untimed
                    state = work / f"state-{sparse}-{r}"
                    state.mkdir(mode=0o700)
                    runs = {
                        "scan": [
                            [
                                sys.executable,
                                "-m",
                                "sidecar.cli",
                                "scan",
                                "--state",
                                str(state),
                                "--disk",
                                d_uri,
                                "--backup",
                                b_uri,
                                "--bitmap",
                                "b",
                                "--json",  # its own elapsed time, for "scan alone"
                            ]
                        ],
                        "limit": [["nbdcopy", d_uri, "null:"], ["nbdcopy", b_uri, "null:"]],
                        "compare": [
                            ["qemu-img", "compare", "-f", "raw", "-F", "raw", b_uri, b2_uri]
                        ],
                    }
                    order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                    for name in order:
                        timing = timed((b_pid, d_pid, b2_pid), *runs[name])
                        if r >= 0:
                            results[name].append(timing)
                if args.profile:
                    profile(work, sparse, runs["scan"][0])
            med = {
                k: (statistics.median(t.wall for t in v), statistics.median(t.client for t in v))
                for k, v in results.items()
            }
            rows.append((sparse, med))
            scan_alone[sparse] = statistics.median(
                json.loads(t.stdout)["progress"]["elapsed"] for t in results["scan"]
            )
            servers_cpu[sparse] = {
                k: statistics.median(t.server for t in v) for k, v in results.items()
            }
        print()
        print(
            f"{'pair':10s} {'':8s} {'scan':>8s} {'nbdcopy x2':>11s} {'qemu-img':>9s} "
            f"{'scan/limit':>11s} {'scan/compare':>13s}"
        )
        for sparse, med in rows:
            rate = {k: gib / w for k, (w, _) in med.items()}
            cpu = {k: c / gib for k, (_, c) in med.items()}
            label = "50% sparse" if sparse else "dense"
            speeds = f"{rate['scan']:8.2f} {rate['limit']:11.2f} {rate['compare']:9.2f}"
            ratios = f"{rate['scan'] / rate['limit']:11.2f} {rate['scan'] / rate['compare']:13.2f}"
            print(f"{label:10s} {'GiB/s':8s} {speeds} {ratios}")
            costs = f"{cpu['scan']:8.2f} {cpu['limit']:11.2f} {cpu['compare']:9.2f}"
            print(f"{'':10s} {'CPU s/GiB':8s} {costs}")
            srv = {k: c / gib for k, c in servers_cpu[sparse].items()}
            costs = f"{srv['scan']:8.2f} {srv['limit']:11.2f} {srv['compare']:9.2f}"
            print(f"{'':10s} {'server':8s} {costs}")
            own = gib / scan_alone[sparse]
            print(f"{'':10s} {'alone':8s} {own:8.2f} {'':21s} {own / rate['limit']:11.2f}")
        print(
            f"(size {gib:.2f} GiB, medians of {rounds} round(s); targets: scan/limit >= 0.9, "
            "scan/compare > 1; CPU s/GiB: the clients' (scan process, nbdcopy, qemu-img); "
            "server: the qemu-nbd servers' meanwhile; alone: the scan's own GiB/s, without "
            "its process start-up, for information only)"
        )
        one_sided = manifest_bench(work, size, rounds)
        return Outcome(0, summary(rows, gib) + one_sided)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile(work: Path, sparse: bool, command: list[str]) -> None:
    """One more scan of the pair under cProfile: where its client CPU goes."""
    state = work / f"state-{sparse}-profile"
    state.mkdir(mode=0o700)
    command = [*command[:1], "-m", "cProfile", "-s", "tottime", *command[1:]]
    command[command.index("--state") + 1] = str(state)
    command.remove("--json")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    print(f"\n== profile of one scan, {'50% sparse' if sparse else 'dense'}")
    print("\n".join(out.splitlines()[:28]))


def manifest_bench(work: Path, size: int, rounds: int) -> list[Ratio]:
    """The one-sided scan and ``digest``, on the same pairs, side by side.

    For each pair (left in ``work`` by the two-sided runs), with fresh
    ``qemu-nbd`` servers and one untimed round first, alternating:
    - ``scan --manifest`` of the disk against the backup's manifest;
    - ``nbdcopy`` of both exports at once: the two-sided limit it beats by
      not reading the backup (target >= 1.8);
    - ``nbdcopy`` of the disk alone: the one-sided limit (target >= 0.9);
    - ``dirtydiff digest`` of the backup against ``nbdcopy`` of the backup
      alone (target >= 0.9).
    Printed: GiB/s, the ratios, and the clients' CPU seconds per GiB."""
    gib = size / GiB
    found: list[Ratio] = []
    print("\n== one-sided scan and digest (same pairs)")
    print(f"{'pair':10s} {'':9s} {'manifest':>9s} {'nbdcopy x2':>11s} {'nbdcopy disk':>13s} "
          f"{'digest':>7s} {'nbdcopy backup':>15s}")  # fmt: skip
    for sparse in (False, True):
        backup, disk = work / f"backup-{sparse}.raw", work / f"disk-{sparse}.raw"
        manifest = work / f"manifest-{sparse}.ddm"
        results: dict[str, list[Timing]] = {
            k: [] for k in ("manifest", "limit2", "limit1", "digest", "backup1")
        }
        with (
            qemu_nbd(backup, work / "mb.sock") as (b_uri, b_pid),
            qemu_nbd(disk, work / "md.sock") as (d_uri, d_pid),
        ):
            cli = [sys.executable, "-m", "sidecar.cli"]
            for r in range(-1, rounds):  # round -1 warms the servers up, untimed
                state = work / f"mstate-{sparse}-{r}"
                state.mkdir(mode=0o700)
                runs = {
                    "digest": [[*cli, "digest", "--backup", b_uri, "-o", str(manifest)]],
                    "manifest": [[*cli, "scan", "--state", str(state), "--disk", d_uri,
                                  "--manifest", str(manifest), "--bitmap", "b", "--json"]],
                    "limit2": [["nbdcopy", d_uri, "null:"], ["nbdcopy", b_uri, "null:"]],
                    "limit1": [["nbdcopy", d_uri, "null:"]],
                    "backup1": [["nbdcopy", b_uri, "null:"]],
                }  # fmt: skip
                if r == -1:  # the scan's manifest, before anything else
                    timed((b_pid, d_pid), *runs["digest"])
                order = list(runs) if r % 2 == 0 else list(runs)[::-1]
                for name in order:
                    timing = timed((b_pid, d_pid), *runs[name])
                    if r >= 0:
                        results[name].append(timing)
        med = {
            k: (statistics.median(t.wall for t in v), statistics.median(t.client for t in v))
            for k, v in results.items()
        }
        rate = {k: gib / w for k, (w, _) in med.items()}
        cpu = {k: c / gib for k, (_, c) in med.items()}
        label = "50% sparse" if sparse else "dense"
        keys = ("manifest", "limit2", "limit1", "digest", "backup1")
        widths = (9, 11, 13, 7, 15)
        for unit, values in (("GiB/s", rate), ("CPU s/GiB", cpu)):
            cells = " ".join(f"{values[k]:{w}.2f}" for k, w in zip(keys, widths, strict=True))
            print(f"{label if unit == 'GiB/s' else '':10s} {unit:9s} {cells}")
        pair = f"{label} {gib:.2f} GiB"
        found += [
            Ratio("scan", f"{pair} --manifest vs nbdcopy x2 (limit)", "GiB/s",
                  rate["manifest"], rate["limit2"], Target(">=", 1.8)),
            Ratio("scan", f"{pair} --manifest vs nbdcopy disk", "GiB/s",
                  rate["manifest"], rate["limit1"], Target(">=", 0.9)),
            Ratio("scan", f"{pair} digest vs nbdcopy backup", "GiB/s",
                  rate["digest"], rate["backup1"], Target(">=", 0.9)),
        ]  # fmt: skip
    print(f"(medians of {rounds} round(s); whole commands, process start included; "
          "CPU s/GiB: the clients')")  # fmt: skip
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

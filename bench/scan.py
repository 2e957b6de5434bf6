"""What the diff scan costs, against the read limit and ``qemu-img compare``.

    python -m bench scan [--quick] [--rounds N] [--profile]

Pairs of a disk and its backup with about 1% of 64 KiB granules differing:
1 GiB and 2 GiB dense (all data), 2 GiB 50% sparse (half the granules holes
on both sides), each side served by its own ``qemu-nbd -r -e 4`` on a unix
socket. In the same run, alternating, each measurement on fresh servers:
- ``dirtydiff scan`` of the pair (offline, a fresh state directory each time),
  as a user runs it: the whole command, process start included;
- ``nbdcopy`` of both exports to ``null:`` at the same time: the two-sided
  read limit of this machine;
- ``qemu-img compare`` of two identical images, which reads everything (it
  stops at the first difference, so it cannot produce a map of them). They
  are the backup image served by two ``qemu-nbd``, as the scan's pair is:
  the same export given twice is served by one process, which on 2 cores
  is a different contest.
Fresh servers for every measurement: qemu-nbd's cost per request depends on
the sizes it has served before (glibc's malloc grows its mmap threshold as
it frees larger buffers; until then each read's buffer is fresh, faulted-in
pages), so a command run after another on the same servers measured the
first one's doing as well.

Then a 15 TiB sparse pair holding 20 MiB of data in 5 places (``qemu-img
create``, then writes): the scan's time against nbdcopy of both exports; the
scan's own target is at most 3 s.

Printed: GiB/s of disk compared, the ratios, and CPU seconds per GiB of disk
for the clients (scan process, nbdcopy, qemu-img) and for the qemu-nbd
servers (from /proc: on a busy machine CPU per GiB varies less than wall
time). The line "alone" shows the scan's rate over its own elapsed time
(from its --json), without the process start. The load average is printed
before and after: other work on the machine moves every figure.
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

# (sparse, GiB) of each pair, in the order measured; --quick: 0.25 GiB each.
PAIRS = [(False, 1.0), (False, 2.0), (True, 2.0)]
HUGE = 15 << 40  # the sparse pair whose cost must follow its data, not its size
HUGE_DATA = [(i * (HUGE // 5) + (i << 30), 4 << 20) for i in range(5)]  # (offset, length)


def label(sparse: bool) -> str:
    return "50% sparse" if sparse else "dense"


def summary(rows: Sequence[tuple[bool, float, Medians]]) -> list[Ratio]:
    """Two ratios per pair: scan rate against the read limit and against qemu-img."""
    found = []
    for sparse, gib, med in rows:
        rate = {k: gib / w for k, (w, _) in med.items()}
        pair = label(sparse)
        found += [
            Ratio("scan", f"{pair} {gib:.2f} GiB vs nbdcopy x2 (limit)", "GiB/s",
                  rate["scan"], rate["limit"], Target(">=", 0.9)),
            Ratio("scan", f"{pair} {gib:.2f} GiB vs qemu-img compare", "GiB/s",
                  rate["scan"], rate["compare"], Target(">", 1.0)),
        ]  # fmt: skip
    return found


def scan_command(state: Path, disk: str, backup: str) -> list[str]:
    return [
        sys.executable, "-m", "sidecar.cli", "scan", "--state", str(state), "--disk", disk,
        "--backup", backup, "--bitmap", "b",
        "--json",  # its own elapsed time, for "scan alone"
    ]  # fmt: skip


def measure(
    work: Path, backup: Path, disk: Path, rounds: int, *, compare: bool = True
) -> dict[str, list[Timing]]:
    """Every command of the pair ``rounds`` times, alternating, each on fresh
    servers: the disk's, the backup's, and a second one of the backup (for
    qemu-img compare; idle for the others)."""
    names = ["scan", "limit", "compare"] if compare else ["scan", "limit"]
    results: dict[str, list[Timing]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            with (
                qemu_nbd(backup, work / "b.sock") as (b_uri, b_pid),
                qemu_nbd(disk, work / "d.sock") as (d_uri, d_pid),
                qemu_nbd(backup, work / "b2.sock") as (b2_uri, b2_pid),
            ):
                state = work / f"state-{name}-{r}"
                state.mkdir(mode=0o700)
                runs = {
                    "scan": [scan_command(state, d_uri, b_uri)],
                    "limit": [["nbdcopy", d_uri, "null:"], ["nbdcopy", b_uri, "null:"]],
                    "compare": [["qemu-img", "compare", "-f", "raw", "-F", "raw", b_uri, b2_uri]],
                }
                results[name].append(timed((b_pid, d_pid, b2_pid), *runs[name]))
                shutil.rmtree(state)
    return results


def make_huge_pair(work: Path) -> tuple[Path, Path]:
    """15 TiB sparse, 20 MiB of data in 5 places, one granule differing in each."""
    backup, disk = work / "huge-backup.raw", work / "huge-disk.raw"
    for path in (backup, disk):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(HUGE)], check=True)
    with backup.open("r+b") as b, disk.open("r+b") as d:
        for offset, length in HUGE_DATA:
            data = bytearray(os.urandom(length))
            b.seek(offset)
            b.write(data)
            data[length // 2] ^= 0xFF
            d.seek(offset)
            d.write(data)
    return backup, disk


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str]) -> int:
    return run(argv).status


def run(argv: Sequence[str]) -> Outcome:
    """Measure, print this benchmark's table, and give back its ratios."""
    parser = argparse.ArgumentParser(
        prog="python -m bench scan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="0.25 GiB pairs, 1 round")
    # Three, as the targets are stated: a median of 3 runs on fresh servers.
    # On this shared 2-core machine one run's median of three moved by up to
    # 0.2 in scan/limit from one run to the next: compare more rounds then.
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each side by side (3)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one scan of each pair (cProfile)"
    )
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    pairs = [(False, 0.25), (True, 0.25)] if args.quick else PAIRS
    for tool in ("qemu-nbd", "nbdcopy", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"bench scan: {tool} is missing (make setup)", file=sys.stderr)
            return Outcome(2)
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-bench-scan."))
    rows: list[tuple[bool, float, Medians]] = []
    scan_alone: list[float] = []  # per pair, seconds the scan itself reported
    servers_cpu: list[dict[str, float]] = []
    load_before = load()
    try:
        # Each pair is left in ``work`` under its kind's name (the last of a
        # kind, the 2 GiB one, stays) for what is measured on it after these.
        for sparse, gib in pairs:
            backup, disk = make_pair(work, int(gib * GiB), sparse, seed=7)
            results = measure(work, backup, disk, rounds)
            if args.profile:
                with (
                    qemu_nbd(backup, work / "b.sock") as (b_uri, _),
                    qemu_nbd(disk, work / "d.sock") as (d_uri, _),
                ):
                    profile(work, sparse, scan_command(work / "profiled", d_uri, b_uri))
            med = {
                k: (statistics.median(t.wall for t in v), statistics.median(t.client for t in v))
                for k, v in results.items()
            }
            rows.append((sparse, gib, med))
            scan_alone.append(
                statistics.median(
                    json.loads(t.stdout)["progress"]["elapsed"] for t in results["scan"]
                )
            )
            servers_cpu.append(
                {k: statistics.median(t.server for t in v) for k, v in results.items()}
            )
        backup, disk = make_huge_pair(work)
        huge = measure(work, backup, disk, rounds, compare=False)
        print()
        print(
            f"{'pair':20s} {'':9s} {'scan':>8s} {'nbdcopy x2':>11s} {'qemu-img':>9s} "
            f"{'scan/limit':>11s} {'scan/compare':>13s}"
        )
        for (sparse, gib, med), alone, server in zip(rows, scan_alone, servers_cpu, strict=True):
            rate = {k: gib / w for k, (w, _) in med.items()}
            cpu = {k: c / gib for k, (_, c) in med.items()}
            pair = f"{label(sparse)} {gib:g} GiB"
            speeds = f"{rate['scan']:8.2f} {rate['limit']:11.2f} {rate['compare']:9.2f}"
            shares = f"{rate['scan'] / rate['limit']:11.2f} {rate['scan'] / rate['compare']:13.2f}"
            print(f"{pair:20s} {'GiB/s':9s} {speeds} {shares}")
            costs = f"{cpu['scan']:8.2f} {cpu['limit']:11.2f} {cpu['compare']:9.2f}"
            print(f"{'':20s} {'CPU s/GiB':9s} {costs}")
            srv = {k: c / gib for k, c in server.items()}
            costs = f"{srv['scan']:8.2f} {srv['limit']:11.2f} {srv['compare']:9.2f}"
            print(f"{'':20s} {'server':9s} {costs}")
            own = gib / alone
            print(f"{'':20s} {'alone':9s} {own:8.2f} {'':21s} {own / rate['limit']:11.2f}")
        huge_wall = {k: statistics.median(t.wall for t in v) for k, v in huge.items()}
        huge_cpu = {k: statistics.median(t.client for t in v) for k, v in huge.items()}
        print(
            f"{'15 TiB sparse':20s} {'seconds':9s} {huge_wall['scan']:8.2f} "
            f"{huge_wall['limit']:11.2f} {'':9s} {huge_wall['scan'] / huge_wall['limit']:11.2f}"
        )
        print(
            f"{'(20 MiB data)':20s} {'CPU s':9s} {huge_cpu['scan']:8.2f} {huge_cpu['limit']:11.2f}"
        )
        print(
            f"(medians of {rounds} round(s), fresh servers for each measurement; targets: "
            "scan/limit >= 0.9, scan/compare > 1, 15 TiB sparse scan <= 3 s; CPU s/GiB: the "
            "clients' (scan process, nbdcopy, qemu-img); server: the qemu-nbd servers' "
            "meanwhile; alone: the scan's own GiB/s, without its process start-up, for "
            f"information only; load average {load_before} before, {load()} after)"
        )
        ratios = summary(rows)
        ratios.append(
            Ratio("scan", "15 TiB sparse, 20 MiB data vs nbdcopy x2 (time)", "s",
                  huge_wall["scan"], huge_wall["limit"], Target("<=", 1.0)),
        )  # fmt: skip
        one_sided = manifest_bench(work, int(pairs[-1][1] * GiB), rounds)
        return Outcome(0, ratios + one_sided)
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

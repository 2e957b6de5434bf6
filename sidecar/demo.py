"""``make demo``: dirtydiff's main job on built-in sample images.

1. makes a 256 MiB sample disk and starts ``dirtydiff track`` on it, as a VM's
   disk server, and ``dirtydiff serve`` beside it (the sidecar: the export,
   the control API and Prometheus metrics);
2. takes a full backup with nbdcopy, the way another tool would: no bitmap;
3. the VM writes (qemu-io: writes, write-zeroes, trims) -- and we have no
   bitmap to say where;
4. ``dirtydiff scan`` rebuilds one against the backup (served by qemu-nbd)
   as a job of the sidecar while the VM keeps writing; its progress is read
   from the sidecar's /metrics as Prometheus would;
5. the incremental backup uses stock tools only: ``nbdinfo --map`` of
   ``qemu:dirty-bitmap:since-full`` on the sidecar's export for the dirty
   extents, libnbd reads of those extents applied on the full backup;
6. checks that the restored image equals the disk byte for byte;
7. a point-in-time incremental: the rebuilt bitmap joins the open interval,
   ``dirtydiff checkpoint inc1 --snapshot --snapshot-scope dirty`` freezes it
   and the data at one instant (a copy of the disk then is the reference),
   and the backup reads export inc1 while the VM rewrites those very
   extents: the restore equals the disk at the checkpoint, not the live one;
   then prints a summary.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nbd

MiB = 1 << 20
DISK_SIZE = 256 * MiB


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sh(*argv: str, shown: str | None = None) -> str:
    print("$ " + (shown or " ".join(argv)), flush=True)
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout


def dirtydiff(*args: str) -> str:
    return sh(sys.executable, "-m", "sidecar.cli", *args, shown="dirtydiff " + " ".join(args))


def start(
    argv: list[str], sock: Path, shown: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    print(f"$ {shown} &", flush=True)
    stderr = log.open("wb") if log is not None else None
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
    )
    end = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit(f"{shown} exited with {proc.returncode}")
        if time.monotonic() > end:
            raise SystemExit(f"{shown} did not listen on {sock} within 30s")
        time.sleep(0.05)  # polling for the socket under a deadline
    return proc


def metrics_port(log: Path) -> int:
    """The port the sidecar chose for /metrics (it prints it)."""
    end = time.monotonic() + 30
    while True:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", log.read_text())
        if found:
            return int(found.group(1))
        if time.monotonic() > end:
            raise SystemExit("the sidecar did not print its metrics address")
        time.sleep(0.05)  # polling the log under a deadline


def scan_progress(port: int, bitmap: str) -> tuple[float, str]:
    """(dirtydiff_scan_progress_ratio, state) of a scan, from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    ratio, state = 0.0, "running"
    for line in text.splitlines():
        if f'bitmap="{bitmap}"' not in line:
            continue
        if line.startswith("dirtydiff_scan_progress_ratio{"):
            ratio = float(line.rsplit(" ", 1)[1])
        elif line.startswith("dirtydiff_scan_state{") and line.endswith(" 1.0"):
            state = re.search(r'state="(\w+)"', line).group(1)  # type: ignore[union-attr]
    return ratio, state


def vm_writes(uri: str, rng: random.Random, count: int) -> None:
    argv = ["qemu-io", "-f", "raw"]
    for _ in range(count):
        offset = rng.randrange(0, DISK_SIZE - 256 * 1024)
        length = rng.choice([512, 4096, 65536, 200_000])
        kind = rng.choices(["write", "write -z", "discard"], weights=[8, 1, 1])[0]
        pattern = f" -P {rng.randrange(1, 255)}" if kind == "write" else ""
        argv += ["-c", f"{kind}{pattern} {offset} {length}"]
    subprocess.run([*argv, uri], check=True, capture_output=True, timeout=300)


def vm_writes_into(
    uri: str, rng: random.Random, count: int, extents: list[tuple[int, int]]
) -> None:
    """Writes aimed at ``extents`` (offset, length): the granules a backup reads."""
    argv = ["qemu-io", "-f", "raw"]
    for _ in range(count):
        start, length = rng.choice(extents)
        offset = start + rng.randrange(length)
        argv += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {min(4096, DISK_SIZE - offset)}"]
    subprocess.run([*argv, uri], check=True, capture_output=True, timeout=300)


def read_extents(
    uri: str, extents: list[tuple[int, int]], out: Path, halfway: Callable[[], None]
) -> int:
    """Read ``extents`` from export ``uri`` onto the image ``out`` with
    libnbd; ``halfway`` runs after half of them. The bytes read."""
    h = nbd.NBD()
    h.connect_uri(uri)
    read = 0
    try:
        with out.open("r+b") as f:
            for i, (offset, length) in enumerate(extents):
                if i == len(extents) // 2:
                    halfway()
                for pos in range(offset, offset + length, 32 * MiB):
                    chunk = min(32 * MiB, offset + length - pos)
                    f.seek(pos)
                    f.write(h.pread(chunk, pos))
                    read += chunk
    finally:
        h.shutdown()
    return read


def point_in_time(
    work: Path, state: Path, vm_uri: str, export_sock: Path, full: Path, rng: random.Random
) -> str:
    """Step 7; the summary's line about it."""
    step("a point-in-time incremental: freeze the changes and the data at one instant")
    # What the scan found joins the open interval, which the checkpoint freezes.
    dirtydiff("bitmap", "merge", "--state", str(state), "@open", "since-full")
    print(dirtydiff("checkpoint", "--state", str(state), "inc1", "--snapshot",
                    "--snapshot-scope", "dirty"), end="")  # fmt: skip
    at_checkpoint, restored = work / "disk-at-inc1.raw", work / "restored-inc1.raw"
    shutil.copyfile(work / "vm-disk.raw", at_checkpoint)  # nothing writes now: the reference
    snapshot_uri = f"nbd+unix:///inc1?socket={export_sock}"
    print(sh("nbdinfo", "--list", f"nbd+unix:///?socket={export_sock}"), end="")
    extents = [
        (int(e["offset"]), int(e["length"]))
        for e in json.loads(sh("nbdinfo", "--json", "--map=qemu:dirty-bitmap:inc1", snapshot_uri))
        if e["type"] == 1
    ]
    batches = 0
    batch_done = threading.Condition()
    stop = threading.Event()

    def vm() -> None:
        nonlocal batches
        while not stop.is_set():
            vm_writes_into(vm_uri, rng, 20, extents)  # the very extents the backup reads
            with batch_done:
                batches += 1
                batch_done.notify_all()

    def halfway() -> None:
        # Half the backup is read: the batch under way ends, and one more,
        # begun after the read began, lands whole before the rest is read.
        with batch_done:
            seen = batches
            if not batch_done.wait_for(lambda: batches >= seen + 2, timeout=60):
                raise SystemExit("the VM's writes did not go on")

    step("read export inc1 (qemu:dirty-bitmap:inc1, then its data) while the VM rewrites it")
    shutil.copyfile(full, restored)
    writer = threading.Thread(target=vm)
    writer.start()
    try:
        with batch_done:
            batch_done.wait_for(lambda: batches > 0, timeout=60)
        before = batches
        read = read_extents(snapshot_uri, extents, restored, halfway)
        # Batches begun after the read began and done before it ended: all
        # completed since, but the one under way at its start.
        during = (batches - before - 1) * 20
    finally:
        stop.set()
        writer.join()

    step("verify: full backup + incremental == the disk at checkpoint inc1, byte for byte")
    sh("cmp", str(at_checkpoint), str(restored))
    print("identical")
    changed = subprocess.run(["cmp", "-s", str(work / "vm-disk.raw"), str(restored)], check=False)
    if changed.returncode == 0:
        raise SystemExit("the VM's writes changed nothing: nothing was shown")
    line = (
        f"point in time: the backup of inc1 is the disk at the checkpoint, though at least "
        f"{during} VM writes hit the extents it read while it read them "
        f"({read / MiB:.1f} MiB from export inc1)"
    )
    print(line)
    print(dirtydiff("snapshot", "list", "--state", str(state)), end="")
    dirtydiff("snapshot", "release", "--state", str(state), "inc1")
    return line


def main() -> int:
    for tool in ("nbdkit", "qemu-io", "qemu-nbd", "nbdcopy", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make setup` first")
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-demo."))
    servers: list[subprocess.Popen[bytes]] = []
    try:
        disk, state = work / "vm-disk.raw", work / "state"
        full, restored = work / "backup-full.raw", work / "restored.raw"
        vm_sock, backup_sock, export_sock = (
            work / "vm.sock",
            work / "backup.sock",
            work / "export.sock",
        )
        state.mkdir(mode=0o700)
        vm_uri = f"nbd+unix:///?socket={vm_sock}"

        step(f"a sample VM disk of {DISK_SIZE // MiB} MiB with some data, in {work}")
        with disk.open("wb") as f:
            f.truncate(DISK_SIZE)
        sh(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 32M",
            "-c",
            "write -P 0x62 100M 16M",
            str(disk),
        )

        step("the VM's disk server: the tracker records every write from now on")
        servers.append(start(
            [sys.executable, "-m", "sidecar.cli", "track", str(disk), "--state", str(state),
             "--socket", str(vm_sock)],
            vm_sock, f"dirtydiff track {disk.name} --state state --socket vm.sock",
        ))  # fmt: skip

        step("the sidecar: export, control API (state/sidecar.sock) and Prometheus metrics")
        sidecar_log = work / "sidecar.log"
        servers.append(start(
            [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state), "--disk", vm_uri,
             "--socket", str(export_sock), "--metrics", "127.0.0.1:0"],
            export_sock,
            "dirtydiff serve --state state --disk VM --socket export.sock --metrics 127.0.0.1:0",
            log=sidecar_log,
        ))  # fmt: skip
        port = metrics_port(sidecar_log)
        print(f"metrics on http://127.0.0.1:{port}/metrics")

        step("a full backup taken by another tool: no bitmap anywhere")
        sh("nbdcopy", vm_uri, str(full))
        servers.append(start(
            ["qemu-nbd", "-r", "-t", "-e", "4", "-f", "raw", "-k", str(backup_sock), str(full)],
            backup_sock, "qemu-nbd -r -t -f raw -k backup.sock backup-full.raw",
        ))  # fmt: skip
        backup_uri = f"nbd+unix:///?socket={backup_sock}"

        step("the VM writes 300 times: writes, write-zeroes, trims")
        rng = random.Random(2026)
        vm_writes(vm_uri, rng, 300)

        step("rebuild the lost bitmap: diff the live disk against the backup, while the VM writes")
        stop = threading.Event()

        def keep_writing() -> None:
            while not stop.is_set():
                vm_writes(vm_uri, rng, 20)

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            started = time.monotonic()
            # The sidecar runs the scan as a job: the command returns at once.
            dirtydiff("scan", "--state", str(state), "--backup", backup_uri,
                      "--bitmap", "since-full", "--max-rate", str(150 * MiB))  # fmt: skip
            shown = -1.0
            while True:
                ratio, scan_state = scan_progress(port, "since-full")
                if ratio >= shown + 0.2 or scan_state not in ("running", "waiting"):
                    print(f"  dirtydiff_scan_progress_ratio {ratio:.2f}  state {scan_state}")
                    shown = ratio
                if scan_state not in ("running", "waiting"):
                    break
                time.sleep(0.25)  # a scrape interval
            scan_time = time.monotonic() - started
        finally:
            stop.set()
            writer.join()
        if scan_state != "done":
            raise SystemExit(f"the scan ended {scan_state}: {sidecar_log.read_text()}")
        print(dirtydiff("status", "--state", str(state)), end="")

        step("an incremental backup from the sidecar's export, with stock tools")
        export_uri = f"nbd+unix:///?socket={export_sock}"
        extents = json.loads(
            sh("nbdinfo", "--json", "--map=qemu:dirty-bitmap:since-full", export_uri)
        )
        dirty = [e for e in extents if e["type"] == 1]
        print(f"{len(dirty)} dirty extents; the first ones:")
        for e in dirty[:4]:
            print(f"  offset {e['offset']:>10}  length {e['length']:>8}  {e['description']}")
        started = time.monotonic()
        shutil.copyfile(full, restored)
        h = nbd.NBD()
        h.connect_uri(export_uri)
        read = 0
        with restored.open("r+b") as out:
            for e in dirty:
                offset, length = int(e["offset"]), int(e["length"])
                for pos in range(offset, offset + length, 32 * MiB):
                    chunk = min(32 * MiB, offset + length - pos)
                    out.seek(pos)
                    out.write(h.pread(chunk, pos))
                    read += chunk
        h.shutdown()
        backup_time = time.monotonic() - started

        step("verify: full backup + incremental == the disk, byte for byte")
        sh("cmp", str(disk), str(restored))
        print("identical")

        pit = point_in_time(work, state, vm_uri, export_sock, full, rng)

        step("summary")
        print(f"disk size:              {DISK_SIZE // MiB} MiB")
        print(f"scan time:              {scan_time:.1f}s (while the VM kept writing)")
        print(f"dirty since the backup: {read / MiB:.1f} MiB in {len(dirty)} extents")
        print(f"incremental read:       {read / MiB:.1f} MiB instead of {DISK_SIZE // MiB} MiB "
              f"({100 * read / DISK_SIZE:.1f}% of a full backup) "
              f"in {backup_time:.2f}s")  # fmt: skip
        print(pit)
        return 0
    finally:
        for proc in reversed(servers):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: the tracker at work on built-in sample images.

1. makes a 256 MiB sample disk with some data on it;
2. starts ``dirtydiff track`` on it, as a VM's disk server;
3. takes a full backup: ``dirtydiff checkpoint full``, then a copy with nbdcopy;
4. writes through the tracker as a VM would (qemu-io: writes, zeroes, trims);
5. ``dirtydiff checkpoint inc1`` freezes what changed;
6. takes an incremental backup: only the dirty extents of ``inc1``, read from
   the tracker with libnbd, applied on top of the full backup;
7. checks that the restored image equals the disk, byte for byte, and prints
   a summary.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

from dirtydiff.bitmapfile import DEFAULT_GRANULARITY

MiB = 1 << 20
DISK_SIZE = 256 * MiB


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def sh(*argv: str, shown: str | None = None) -> str:
    print("$ " + (shown or " ".join(argv)), flush=True)
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=300).stdout
    return out


def dirtydiff(*args: str) -> str:
    return sh(sys.executable, "-m", "sidecar.cli", *args, shown="dirtydiff " + " ".join(args))


def wait_for_socket(sock: Path, proc: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the tracker exited with {proc.returncode}")
        if time.monotonic() > end:
            raise SystemExit(f"the tracker did not listen on {sock} within {deadline}s")
        time.sleep(0.05)


def vm_writes(uri: str, rng: random.Random) -> list[str]:
    commands = []
    for _ in range(200):
        offset = rng.randrange(0, DISK_SIZE - 256 * 1024)
        length = rng.choice([512, 4096, 65536, 200_000])
        kind = rng.choices(["write", "write -z", "discard"], weights=[8, 1, 1])[0]
        if kind == "write":
            commands.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
        else:
            commands.append(f"{kind} {offset} {length}")
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    subprocess.run([*argv, uri], check=True, capture_output=True, timeout=300)
    return commands


def main() -> int:
    for tool in ("nbdkit", "qemu-io", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run `make setup` first")
    work = Path(tempfile.mkdtemp(prefix="dirtydiff-demo."))
    tracker: subprocess.Popen[bytes] | None = None
    try:
        disk, state, sock = work / "vm-disk.raw", work / "state", work / "tracker.sock"
        full, restored = work / "backup-full.raw", work / "restored.raw"
        state.mkdir(mode=0o700)

        step(f"a sample VM disk of {DISK_SIZE // MiB} MiB with some data, in {work}")
        disk.write_bytes(b"")
        with disk.open("r+b") as f:
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

        step("start the tracker: the VM's disk server, recording every write")
        argv = [
            sys.executable,
            "-m",
            "sidecar.cli",
            "track",
            str(disk),
            "--state",
            str(state),
            "--socket",
            str(sock),
        ]
        print("$ dirtydiff " + " ".join(argv[3:]), flush=True)
        tracker = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        wait_for_socket(sock, tracker)
        uri = f"nbd+unix:///?socket={sock}"

        step("full backup: freeze the interval so far, then copy the whole disk")
        print(dirtydiff("checkpoint", "--state", str(state), "full"), end="")
        sh("nbdcopy", uri, str(full))

        step("the VM writes: 200 writes, zeroes and trims at random places")
        vm_writes(uri, random.Random(2026))

        step("incremental checkpoint: freeze what changed since the full backup")
        print(dirtydiff("checkpoint", "--state", str(state), "inc1"), end="")
        print(dirtydiff("status", "--state", str(state)), end="")
        extents = json.loads(dirtydiff("bitmap", "show", "--state", str(state), "--json", "inc1"))
        dirty = [e for e in extents if e["type"] == 1]
        print(f"inc1 has {len(dirty)} dirty extents; the first ones:")
        print(
            "\n".join(dirtydiff("bitmap", "show", "--state", str(state), "inc1").splitlines()[:6])
        )

        step("incremental backup: read only the dirty extents, apply them to the full backup")
        started = time.monotonic()
        shutil.copyfile(full, restored)
        h = nbd.NBD()
        h.connect_uri(uri)
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
        elapsed = time.monotonic() - started

        step("verify: the restored image equals the disk")
        sh("cmp", str(disk), str(restored))
        print("identical")

        step("summary")
        print(f"disk size:                {DISK_SIZE // MiB} MiB")
        print(f"granularity:              {DEFAULT_GRANULARITY // 1024} KiB")
        print(f"dirty since full backup:  {read / MiB:.1f} MiB in {len(dirty)} extents")
        print(
            f"incremental read:         {read / MiB:.1f} MiB vs {DISK_SIZE // MiB} MiB full "
            f"({100 * read / DISK_SIZE:.1f}%) in {elapsed:.2f}s"
        )
        return 0
    finally:
        if tracker is not None and tracker.poll() is None:
            tracker.terminate()
            tracker.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

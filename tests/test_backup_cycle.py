"""A backup tool's whole cycle against the tracker and the sidecar's export.

The VM writes through the tracker; the backup tool sees only the sidecar's
export and the CLI: ``checkpoint``, block status of ``qemu:dirty-bitmap:NAME``,
reads of the dirty extents, ``bitmap remove`` of the checkpoint it no longer
needs. The full backup pairs with the checkpoint taken just *before* it: every
write after ``c0`` is in ``c1`` whether or not the full copy saw it. Had the
copy been taken before ``c0``, a write between the copy and ``c0`` would be in
``c0`` only, which no incremental reads: silently lost.

Restores are compared byte for byte with copies of the disk file taken at each
checkpoint while nothing writes (the checkpoint answers only once the frozen
interval's writes have completed, so the file then holds them all).
"""

from __future__ import annotations

import json
import random
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from tests.conftest import (
    GRANULE,
    Processes,
    Server,
    dirtydiff,
    make_disk,
    qemu_io,
    run,
)

MiB = 1 << 20
SIZE = 64 * MiB
# Reads stay within the block size any NBD server accepts (32 MiB), and small
# enough that a restore never holds much more than one extent in memory.
READ_CHUNK = 4 * MiB
# Incremental backups must read a small part of the disk, or the cycle proves
# nothing: the writes below touch at most a few MiB.
INCREMENTAL_LIMIT = SIZE // 8


@dataclass
class Cycle:
    """The VM's side (tracker) and the backup tool's side (export) of one disk."""

    disk: Path
    state: Path
    tracker: Server
    export: Server
    work: Path

    def checkpoint(self, name: str) -> None:
        dirtydiff("checkpoint", "--state", str(self.state), name)

    def remove(self, name: str) -> None:
        dirtydiff("bitmap", "remove", "--state", str(self.state), name)

    def snapshot(self) -> bytes:
        """The disk as it is now; call only while nothing writes."""
        return self.disk.read_bytes()

    def contexts(self) -> list[str]:
        listed = json.loads(run(["nbdinfo", "--list", "--json", self.export.uri]).stdout)
        found: list[str] = listed["exports"][0]["contexts"]
        return found


def start_cycle(procs: Processes, tmp_path: Path, state: Path) -> Cycle:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    # Data that was there before tracking began: the full backup must carry it.
    qemu_io(str(disk), "write -P 0x61 0 8M", "write -P 0x62 40M 6M", f"write -P 0x63 {SIZE - 1} 1")
    tracker = procs.tracker(state, disk=disk)
    sock = tmp_path / "export.sock"
    export = procs.start(
        [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
         "--disk", tracker.uri, "--socket", str(sock)],
        sock,
    )  # fmt: skip
    return Cycle(disk, state, tracker, export, tmp_path)


def granules(offset: int, length: int) -> set[int]:
    return set(range(offset // GRANULE, (offset + length - 1) // GRANULE + 1))


@dataclass
class Touched:
    """Every granule a write, write-zeroes or trim touched, for the bound on over-reporting."""

    granules: set[int] = field(default_factory=set)

    def add(self, offset: int, length: int) -> None:
        self.granules |= granules(offset, length)


def random_request(rng: random.Random) -> tuple[str, int, int]:
    kind = rng.choices(["write", "zero", "trim"], weights=[6, 2, 2])[0]
    length = rng.choice([1, 512, 4096, 65536, 100_000, 200_000])
    return kind, rng.randrange(0, SIZE - length), length


def qemu_io_writes(uri: str, rng: random.Random, count: int, touched: Touched) -> None:
    """Writes as a VM makes them: qemu-io's write, write -z and discard."""
    commands = []
    for _ in range(count):
        kind, offset, length = random_request(rng)
        touched.add(offset, length)
        if kind == "write":
            commands.append(f"write -P {rng.randrange(1, 256)} {offset} {length}")
        elif kind == "zero":
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"discard {offset} {length}")
    qemu_io(uri, *commands)


def libnbd_writes(uri: str, rng: random.Random, count: int, touched: Touched) -> None:
    """Writes from another client: libnbd pwrite, zero (may trim) and trim, unaligned."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for _ in range(count):
            kind, offset, length = random_request(rng)
            touched.add(offset, length)
            if kind == "write":
                h.pwrite(rng.randbytes(length), offset)
            elif kind == "zero":
                h.zero(length, offset)
            else:
                h.trim(length, offset)
        h.flush()
    finally:
        h.shutdown()


def full_backup(cycle: Cycle, name: str) -> Path:
    """nbdcopy of the whole export, as a backup tool makes its first copy."""
    target = cycle.work / name
    run(["nbdcopy", cycle.export.uri, str(target)])
    assert target.stat().st_size == SIZE
    return target


@dataclass
class Incremental:
    checkpoint: str
    dirty: list[tuple[int, int]]  # (offset, length) of every dirty extent
    data: list[tuple[int, bytes]]  # what was read, where it goes

    @property
    def dirty_bytes(self) -> int:
        return sum(length for _, length in self.dirty)

    @property
    def bytes_read(self) -> int:
        return sum(len(chunk) for _, chunk in self.data)

    def dirty_granules(self) -> set[int]:
        found: set[int] = set()
        for offset, length in self.dirty:
            found |= granules(offset, length)
        return found


def dirty_extents(h: Any, context: str, size: int) -> list[tuple[int, int]]:
    """Every dirty (offset, length) of ``context``, asking until the whole disk is described
    (a server may answer a block status request for less than was asked)."""
    dirty: list[tuple[int, int]] = []
    answered: list[int] = []

    def collect(name: str, start: int, entries: list[int], err: Any) -> int:
        if name == context:
            answered.extend(entries)
        return 0

    offset = 0
    while offset < size:
        answered.clear()
        h.block_status(size - offset, offset, collect)
        assert answered, f"no extent at {offset}"
        for described, flags in zip(answered[::2], answered[1::2], strict=True):
            length = min(described, size - offset)
            if flags & 1:  # NBD_STATE_DIRTY
                if dirty and dirty[-1][0] + dirty[-1][1] == offset:
                    dirty[-1] = (dirty[-1][0], dirty[-1][1] + length)
                else:
                    dirty.append((offset, length))
            offset += length
            if offset >= size:
                break
    return dirty


def incremental_backup(cycle: Cycle, checkpoint: str, uri: str | None = None) -> Incremental:
    """Block status of ``qemu:dirty-bitmap:CHECKPOINT``, then reads of only those extents,
    from the live export or from ``uri`` (a snapshot's export).

    A fresh connection each time: a backup tool connects per backup.
    """
    context = f"qemu:dirty-bitmap:{checkpoint}"
    uri = uri or cycle.export.uri
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    try:
        assert h.can_meta_context(context), f"{context} is not offered"
        size = h.get_size()
        assert size == SIZE
        dirty = dirty_extents(h, context, size)
        data = []
        for offset, length in dirty:
            for pos in range(offset, offset + length, READ_CHUNK):
                count = min(READ_CHUNK, offset + length - pos)
                data.append((pos, h.pread(count, pos)))
    finally:
        h.shutdown()
    # The same map as nbdinfo prints, the tool most scripts use.
    mapped = json.loads(run(["nbdinfo", "--json", f"--map={context}", uri]).stdout)
    assert [(e["offset"], e["length"]) for e in mapped if e["type"] == 1] == dirty
    return Incremental(checkpoint, dirty, data)


def restore(full: Path, *incrementals: Incremental) -> bytes:
    image = bytearray(full.read_bytes())
    for inc in incrementals:
        for offset, chunk in inc.data:
            image[offset : offset + len(chunk)] = chunk
    return bytes(image)


def changed_granules(before: bytes, after: bytes) -> set[int]:
    return {
        g
        for g in range(SIZE // GRANULE)
        if before[g * GRANULE : (g + 1) * GRANULE] != after[g * GRANULE : (g + 1) * GRANULE]
    }


def check_incremental(inc: Incremental, before: bytes, after: bytes, touched: Touched) -> None:
    # Never under-report: every granule whose bytes changed is dirty; and
    # over-report only where a request touched (a trim may change nothing).
    changed = changed_granules(before, after)
    assert changed, "the writes changed nothing: the test would prove nothing"
    assert changed <= inc.dirty_granules()
    assert inc.dirty_granules() <= touched.granules
    assert inc.bytes_read <= inc.dirty_bytes
    assert inc.dirty_bytes <= INCREMENTAL_LIMIT, (inc.dirty_bytes, SIZE)


def test_full_and_two_incrementals_restore_each_checkpoint(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    cycle = start_cycle(procs, tmp_path, state)
    rng = random.Random(5)
    qemu_io_writes(cycle.tracker.uri, rng, 10, Touched())  # before c0: only the full has them
    cycle.checkpoint("c0")
    at_c0 = cycle.snapshot()
    full = full_backup(cycle, "full.raw")
    assert full.read_bytes() == at_c0

    touched1 = Touched()
    qemu_io_writes(cycle.tracker.uri, rng, 30, touched1)
    libnbd_writes(cycle.tracker.uri, rng, 15, touched1)
    cycle.checkpoint("c1")
    at_c1 = cycle.snapshot()
    inc1 = incremental_backup(cycle, "c1")
    check_incremental(inc1, at_c0, at_c1, touched1)
    assert restore(full, inc1) == at_c1
    cycle.remove("c0")
    assert "qemu:dirty-bitmap:c0" not in cycle.contexts()
    assert "qemu:dirty-bitmap:c1" in cycle.contexts()

    touched2 = Touched()
    libnbd_writes(cycle.tracker.uri, rng, 15, touched2)
    qemu_io_writes(cycle.tracker.uri, rng, 30, touched2)
    cycle.checkpoint("c2")
    at_c2 = cycle.snapshot()
    inc2 = incremental_backup(cycle, "c2")
    check_incremental(inc2, at_c1, at_c2, touched2)
    assert restore(full, inc1, inc2) == at_c2
    cycle.remove("c1")
    assert cycle.contexts() == [
        "base:allocation",
        "qemu:dirty-bitmap:@open",
        "qemu:dirty-bitmap:c2",
    ]


def test_removed_checkpoint_is_refused_to_a_new_client(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    cycle = start_cycle(procs, tmp_path, state)
    qemu_io(cycle.tracker.uri, "write -P 0x71 1M 64k")
    cycle.checkpoint("c0")
    cycle.remove("c0")
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:c0")
    h.connect_uri(cycle.export.uri)
    try:
        assert not h.can_meta_context("qemu:dirty-bitmap:c0")
    finally:
        h.shutdown()
    asked = run(["nbdinfo", "--map=qemu:dirty-bitmap:c0", cycle.export.uri], check=False)
    assert asked.returncode != 0


class Writer(threading.Thread):
    """The VM writing through the tracker until told to stop.

    ``running`` is set once some writes are done, so the backup step started
    after it overlaps writes for certain; ``writes`` lets the test show that
    some happened during that step.
    """

    def __init__(self, uri: str, targets: list[tuple[int, int]], seed: int) -> None:
        super().__init__(name="vm-writer")
        self.uri = uri
        self.targets = targets  # (offset, length) ranges most writes go to
        self.rng = random.Random(seed)
        self.writes = 0
        self.running = threading.Event()
        self.halt = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            while not self.halt.is_set():
                if self.rng.random() < 0.8:
                    start, length = self.rng.choice(self.targets)
                    offset = start + self.rng.randrange(length)
                else:
                    offset = self.rng.randrange(SIZE)
                count = min(self.rng.choice([512, 4096, 65536]), SIZE - offset)
                h.pwrite(bytes([self.rng.randrange(1, 256)]) * count, offset)
                self.writes += 1
                if self.writes == 20:
                    self.running.set()
            h.shutdown()
        except Exception as e:  # re-raised in the test's thread by check()
            self.error = e
            self.running.set()

    def __enter__(self) -> Writer:
        self.start()
        assert self.running.wait(20), "the writer did not get going"
        self.check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(20)
        assert not self.is_alive(), "the writer did not stop"
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the VM's writes failed: {self.error}") from self.error


def test_incremental_read_while_the_vm_writes_chains_to_the_next(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """Pull mode with a snapshot: c1 is taken with ``--snapshot --snapshot-scope
    dirty``, and the backup reads c1's dirty extents from export c1 while the VM
    rewrites exactly those granules. Every byte it reads is from the instant of
    c1, so full + inc1 equals the disk at c1 exactly (the live export would
    give newer data there), and the chain goes on: full + inc1 + inc2 is c2."""
    cycle = start_cycle(procs, tmp_path, state)
    rng = random.Random(11)
    cycle.checkpoint("c0")
    full = full_backup(cycle, "full.raw")
    touched1 = Touched()
    qemu_io_writes(cycle.tracker.uri, rng, 30, touched1)
    libnbd_writes(cycle.tracker.uri, rng, 10, touched1)
    dirtydiff("checkpoint", "--state", str(state), "c1", "--snapshot", "--snapshot-scope", "dirty")
    at_c1 = cycle.snapshot()
    c1 = export_uri(cycle, "c1")
    assert "c1" in exports(cycle)

    # Aim the VM's writes at c1's dirty extents, the granules the backup reads.
    context = "qemu:dirty-bitmap:c1"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(c1)
    c1_extents = dirty_extents(h, context, SIZE)
    h.shutdown()
    with Writer(cycle.tracker.uri, c1_extents, seed=12) as writer:
        before = writer.writes
        inc1 = incremental_backup(cycle, "c1", c1)
        during = writer.writes - before
    assert during > 0, "no write overlapped the incremental read"
    assert cycle.snapshot() != at_c1, "the writes changed nothing"
    at_c0 = full.read_bytes()
    check_incremental(inc1, at_c0, at_c1, touched1)
    assert restore(full, inc1) == at_c1  # exactly c1: one instant
    dirtydiff("snapshot", "release", "--state", str(state), "c1")
    assert "c1" not in exports(cycle)
    cycle.remove("c0")

    cycle.checkpoint("c2")
    at_c2 = cycle.snapshot()
    inc2 = incremental_backup(cycle, "c2")
    assert restore(full, inc1, inc2) == at_c2
    assert changed_granules(at_c1, at_c2) <= inc2.dirty_granules()
    assert at_c0 != at_c1 != at_c2


def export_uri(cycle: Cycle, name: str) -> str:
    return f"nbd+unix:///{name}?socket={cycle.export.sock}"


def exports(cycle: Cycle) -> list[str]:
    listed = json.loads(run(["nbdinfo", "--list", "--json", cycle.export.uri]).stdout)
    return [e["export-name"] for e in listed["exports"]]


def test_full_backup_while_the_vm_writes_pairs_with_the_checkpoint_before_it(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    """The full copy starts after c0 and the VM writes during it: whatever the
    copy caught, c1 holds every one of those writes, so full + inc1 is c1."""
    cycle = start_cycle(procs, tmp_path, state)
    cycle.checkpoint("c0")
    with Writer(cycle.tracker.uri, [(0, SIZE)], seed=13) as writer:
        before = writer.writes
        full = full_backup(cycle, "full.raw")
        during = writer.writes - before
    assert during > 0, "no write overlapped the full copy"
    cycle.checkpoint("c1")
    at_c1 = cycle.snapshot()
    inc1 = incremental_backup(cycle, "c1")
    assert restore(full, inc1) == at_c1
    assert full.read_bytes() != at_c1  # the copy missed writes that inc1 brings

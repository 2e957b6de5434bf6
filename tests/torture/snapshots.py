"""The torture suite's snapshot actions (a part of ``Scenario``).

- ``snapshot``: the VM stops, the disk file is copied (the disk at the
  instant), ``checkpoint NAME`` with a snapshot (scope all, or dirty), the VM
  runs again; the snapshot is read whole from the tracker's
  ``@snapshot:NAME`` while the writers go on, sometimes with the tracker
  killed -9 part way (and restarted): every read must equal the copy, or fail
  with EIO if the snapshot says it is broken. Then part of it is released by
  TRIM (its store shrinks, and the rest still reads exact), and the snapshot
  is released (the bitmap stays).
- ``snapshot-limit``: a snapshot with a store limit of a few granules, the
  writers go on past it: it breaks with its reason, reads fail, and no write
  of the VM failed (the pool counts failures on live connections).

A scope-dirty snapshot protects NAME's dirty granules only: those are
compared, and a read of another granule must fail.
"""

from __future__ import annotations

import contextlib
import errno
import random
import shutil
import threading
from typing import TYPE_CHECKING, Any

import nbd

from dirtydiff import control
from dirtydiff.bitmapfile import BitmapFile

if TYPE_CHECKING:
    from tests.torture.model import Model
    from tests.torture.scenario import Outcome
    from tests.torture.world import World
    from tests.torture.writers import WriterPool

READ_CHUNK = 1 << 20


class SnapshotActions:
    world: World
    pool: WriterPool
    model: Model
    outcome: Outcome
    rng: random.Random

    def expect(self, ok: bool, problem: str) -> None:
        raise NotImplementedError  # Scenario's

    def _call(self, op: str, **args: object) -> Any:
        return control.call(self.world.state / "tracker.sock", op, **args)

    def _snapshot_info(self, name: str) -> dict[str, Any]:
        found: dict[str, dict[str, Any]] = {
            s["name"]: s for s in self._call("snapshot.list")["snapshots"]
        }
        return found[name]

    def _start_snapshot(self, scope: str, limit: int | None = None) -> tuple[str, bytes]:
        """The VM stops; the disk is copied; checkpoint with a snapshot; the VM goes on."""
        world, pool = self.world, self.pool
        name = self.model.fresh("snap")
        pool.hold()  # nothing in flight, no connection: the copy is the instant
        reference = world.tmp / "instant.raw"
        # Not in the state directory: its small tmpfs is for filling up.
        stores = world.tmp / "stores"
        stores.mkdir(mode=0o700, exist_ok=True)
        try:
            shutil.copyfile(world.disk, reference)
            snapshot = {"scope": scope, "limit": limit, "dir": str(stores)}
            self._call("checkpoint", name=name, snapshot=snapshot)
            self.model.checkpointed(name)
            image = reference.read_bytes()
        finally:
            reference.unlink(missing_ok=True)
            pool.release()
        return name, image

    def _protected(self, name: str, size: int) -> list[bool]:
        """Per granule: protected (scope all: every one; dirty: NAME's bits,
        which no longer change)."""
        info = self._snapshot_info(name)
        count = -(-size // info["granularity"])
        if info["scope"] == "all":
            return [True] * count
        with BitmapFile(self.world.state / "bitmaps" / f"{name}.bitmap", writable=False) as b:
            bits = bytes(b.bits)
        return [bool(bits[g >> 3] >> (g & 7) & 1) for g in range(count)]

    def _read_snapshot(
        self, name: str, image: bytes, protected: list[bool], granularity: int, *,
        dying: bool = False,
    ) -> bool:  # fmt: skip
        """Read the whole snapshot, granule run by granule run; compare with
        the instant. False if the snapshot failed the read (EIO), or the
        tracker went away (``dying``); a wrong byte is always a problem."""
        h = nbd.NBD()
        h.set_export_name(f"@snapshot:{name}")
        try:
            h.connect_unix(str(self.world.tracker_sock))
        except nbd.Error:
            if not dying:
                self.expect(False, f"snapshot {name}: the tracker refused its export")
            return False
        try:
            size = len(image)
            for offset in range(0, size, READ_CHUNK):
                length = min(READ_CHUNK, size - offset)
                first, last = offset // granularity, (offset + length - 1) // granularity
                if not all(protected[first : last + 1]):
                    for g in range(first, last + 1):
                        if protected[g]:
                            start = g * granularity
                            n = min(granularity, size - start)
                            self._compare(name, h.pread(n, start), image, start)
                    continue
                self._compare(name, h.pread(length, offset), image, offset)
            return True
        except nbd.Error as e:
            if not dying and e.errnum != errno.EIO:
                self.expect(False, f"snapshot {name}: a read failed with {e}")
            return False
        finally:
            with contextlib.suppress(nbd.Error):
                h.shutdown()

    def _compare(self, name: str, got: bytes, image: bytes, offset: int) -> None:
        if got != image[offset : offset + len(got)]:
            self.expect(False, f"snapshot {name}: read at {offset} differs from the instant")
            self.outcome.faults["snapshot-wrong-data"] += 1

    def _snapshot(self) -> None:
        world, rng = self.world, self.rng
        scope = rng.choice(["all", "all", "dirty"])
        name, image = self._start_snapshot(scope)
        info = self._snapshot_info(name)
        granularity = info["granularity"]
        protected = self._protected(name, len(image))
        self.pool.wait_completed(rng.randint(20, 200))  # the VM changes what was
        if rng.random() < 0.4:
            # The tracker dies part way through a backup's read.
            reader = threading.Thread(
                target=self._read_snapshot,
                args=(name, image, protected, granularity),
                kwargs={"dying": True},
            )
            reader.start()
            world.kill_tracker()
            reader.join()
            world.start_tracker()
            self.outcome.faults["snapshot-tracker-killed"] += 1
            self.pool.wait_completed(rng.randint(10, 50))
        whole = self._read_snapshot(name, image, protected, granularity)
        state = self._snapshot_info(name)["state"]
        self.expect(whole or state == "broken", f"snapshot {name}: a read failed, yet {state}")
        self.expect(state == "active", f"snapshot {name} broke without a cause")
        self.outcome.faults[f"snapshot-read-{scope}"] += 1
        # The backup is done with the first half: its store space goes.
        before = self._snapshot_info(name)
        h = nbd.NBD()
        h.set_export_name(f"@snapshot:{name}")
        h.connect_unix(str(world.tracker_sock))
        half = len(image) // 2
        h.trim(half, 0)
        after = self._snapshot_info(name)
        size = len(image)
        kept = [p and (g + 1) * granularity > half for g, p in enumerate(protected)]
        expected = sum(min(granularity, size - g * granularity) for g, p in enumerate(kept) if p)
        self.expect(
            after["copied_bytes"] <= before["copied_bytes"]
            and after["protected_bytes"] == expected,
            f"snapshot {name}: a trim of [0, {half}) left {after} (was {before})",
        )
        h.shutdown()
        self.pool.wait_completed(rng.randint(10, 100))
        self._read_snapshot(name, image, kept, granularity)
        released = self._call("snapshot.release", name=name)
        self.expect(released["name"] == name, f"snapshot.release answered {released}")
        self.outcome.faults["snapshot-released"] += 1

    def _snapshot_limit(self) -> None:
        rng = self.rng
        name, image = self._start_snapshot("all", limit=rng.randint(1, 4) * 65536)
        self.pool.wait_completed(rng.randint(100, 300))
        info = self._snapshot_info(name)
        if info["state"] == "active":  # the writers copied too little yet
            self.outcome.notes.append(f"snapshot {name} stayed under its limit")
        else:
            self.expect(
                str(info["reason"]).startswith("store limit of"),
                f"snapshot {name} broke for {info['reason']!r}",
            )
            whole = [True] * -(-len(image) // info["granularity"])
            self.expect(not self._read_snapshot(name, image, whole, info["granularity"]),
                        f"broken snapshot {name} served a whole read")  # fmt: skip
            self.outcome.faults["snapshot-limit-broke"] += 1
        self._call("snapshot.release", name=name)

"""Point-in-time snapshots served as exports of their own, end to end.

The VM writes through the tracker; ``dirtydiff checkpoint NAME --snapshot``
freezes bitmap NAME and the data; the backup tool reads export NAME of the
sidecar (nbdcopy, libnbd, qemu-img) while the VM goes on writing, and gets
the disk exactly as it was at the checkpoint. The reference is a copy of the
disk file taken at the checkpoint while nothing writes.
"""

from __future__ import annotations

import errno
import json
import re
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nbd
import pytest

from dirtydiff import control, errors
from sidecar.export.snapshots import snapshot_uri
from tests.conftest import (
    GRANULE,
    Processes,
    Server,
    dirtydiff,
    make_disk,
    qemu_io,
    run,
    stop,
)
from tests.test_backup_cycle import (
    READ_CHUNK,
    SIZE,
    Incremental,
    Writer,
    changed_granules,
    dirty_extents,
    granules,
)

MiB = 1 << 20


@dataclass
class Rig:
    """A disk, its tracker and its sidecar."""

    procs: Processes
    tmp: Path
    disk: Path
    state: Path
    tracker: Server
    sidecar: Server

    def cli(self, *args: str, check: bool = True) -> Any:
        return dirtydiff(*args, "--state", str(self.state), check=check)

    def checkpoint(self, name: str, *extra: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(
            dirtydiff("checkpoint", "--state", str(self.state), "--json", name, *extra).stdout
        )
        return found

    def status(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(
            dirtydiff("status", "--state", str(self.state), "--json").stdout
        )
        return found

    def snapshot(self, name: str) -> dict[str, Any]:
        listed = json.loads(dirtydiff("snapshot", "list", "--state", str(self.state),
                                      "--json").stdout)  # fmt: skip
        (found,) = [s for s in listed if s["name"] == name]
        assert isinstance(found, dict)
        return found

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{quote(export, safe='')}?socket={self.sidecar.sock}"

    def start_sidecar(self) -> Server:
        sock = self.tmp / "export.sock"
        self.sidecar = self.procs.start(
            [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(self.state),
             "--disk", self.tracker.uri, "--socket", str(sock)],
            sock,
        )  # fmt: skip
        return self.sidecar

    def start_tracker(self) -> Server:
        self.tracker = self.procs.tracker(self.state, disk=self.disk, sock=self.tmp / "vm.sock")
        return self.tracker


@pytest.fixture
def rig(procs: Processes, tmp_path: Path, state: Path) -> Iterator[Rig]:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    qemu_io(str(disk), "write -P 0x61 0 8M", "write -P 0x62 40M 6M", f"write -P 0x63 {SIZE - 1} 1")
    r = Rig(procs, tmp_path, disk, state, None, None)  # type: ignore[arg-type]
    r.start_tracker()
    r.start_sidecar()
    yield r


def read_export(uri: str, length: int = SIZE) -> bytes:
    """The whole export read with libnbd, READ_CHUNK at a time."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return b"".join(
            h.pread(min(READ_CHUNK, length - pos), pos) for pos in range(0, length, READ_CHUNK)
        )
    finally:
        h.shutdown()


def read_errno(uri: str, offset: int, length: int) -> int | None:
    """None if the read succeeds, else its errno."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pread(length, offset)
        return None
    except nbd.Error as e:
        return int(e.errnum)
    finally:
        h.shutdown()


def incremental_from(uri: str, checkpoint: str) -> Incremental:
    """Block status of ``qemu:dirty-bitmap:CHECKPOINT`` on the snapshot export, then its reads."""
    context = f"qemu:dirty-bitmap:{checkpoint}"
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    try:
        assert h.can_meta_context(context)
        dirty = dirty_extents(h, context, SIZE)
        data = []
        for offset, length in dirty:
            for pos in range(offset, offset + length, READ_CHUNK):
                count = min(READ_CHUNK, offset + length - pos)
                data.append((pos, h.pread(count, pos)))
    finally:
        h.shutdown()
    return Incremental(checkpoint, dirty, data)


def restore(full: bytes, *incrementals: Incremental) -> bytes:
    image = bytearray(full)
    for inc in incrementals:
        for offset, chunk in inc.data:
            image[offset : offset + len(chunk)] = chunk
    return bytes(image)


def listed(uri: str) -> dict[str, dict[str, Any]]:
    exports = json.loads(run(["nbdinfo", "--list", "--json", uri]).stdout)["exports"]
    return {e["export-name"]: e for e in exports}


def test_the_tracker_export_of_a_snapshot_is_named_in_its_uri() -> None:
    assert snapshot_uri("nbd+unix:///?socket=/run/d/vda.sock", "inc 7") == (
        "nbd+unix:///%40snapshot%3Ainc%207?socket=/run/d/vda.sock"
    )
    assert snapshot_uri("nbd://host:10809", "c0/?#") == "nbd://host:10809/%40snapshot%3Ac0%2F%3F%23"
    assert snapshot_uri("nbds+unix:///?socket=/s&tls-certificates=/c", "c") == (
        "nbds+unix:///%40snapshot%3Ac?socket=/s&tls-certificates=/c"
    )


def test_full_backup_from_the_snapshot_while_the_vm_writes_is_the_disk_at_the_checkpoint(
    rig: Rig,
) -> None:
    qemu_io(rig.tracker.uri, "write -P 0x71 1M 3M", "write -P 0x72 20M 64k")
    reference = rig.disk.read_bytes()  # nothing writes now
    taken = rig.checkpoint("c0", "--snapshot")
    assert taken["snapshot"]["name"] == "c0" and taken["snapshot"]["state"] == "active"
    assert taken["snapshot"]["scope"] == "all"
    assert taken["snapshot"]["export"] == "@snapshot:c0"
    copy = rig.tmp / "full.raw"
    with Writer(rig.tracker.uri, [(0, SIZE)], seed=21) as writer:
        before = writer.writes
        run(["nbdcopy", rig.uri("c0"), str(copy)])
        during = writer.writes - before
        again = read_export(rig.uri("c0"))  # libnbd, as the writes go on
    assert during > 0, "no write overlapped the backup"
    assert rig.disk.read_bytes() != reference, "the writes changed nothing"
    assert copy.read_bytes() == reference
    assert again == reference
    # The live export still serves the live disk.
    assert read_export(rig.uri()) == rig.disk.read_bytes()
    shown = rig.snapshot("c0")
    assert shown["copied_bytes"] > 0 and shown["store_bytes"] > 0


def test_incremental_from_the_snapshot_while_the_vm_writes_its_extents_restores_c1(
    rig: Rig,
) -> None:
    rig.checkpoint("c0")
    full = rig.disk.read_bytes()
    qemu_io(rig.tracker.uri, "write -P 0x41 2M 1M", "write -z 9M 200k", "write -P 0x42 33M 70000",
            "discard 41M 128k", f"write -P 0x43 {SIZE - 5000} 5000")  # fmt: skip
    at_c1 = rig.disk.read_bytes()
    taken = rig.checkpoint("c1", "--snapshot", "--snapshot-scope", "dirty")
    assert taken["snapshot"]["scope"] == "dirty"
    assert 0 < taken["snapshot"]["protected_bytes"] < SIZE
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:c1")
    h.connect_uri(rig.uri("c1"))
    targets = dirty_extents(h, "qemu:dirty-bitmap:c1", SIZE)
    h.shutdown()
    # The VM rewrites exactly the granules the backup reads, as it reads them.
    with Writer(rig.tracker.uri, targets, seed=22) as writer:
        before = writer.writes
        inc1 = incremental_from(rig.uri("c1"), "c1")
        during = writer.writes - before
    assert during > 0, "no write overlapped the incremental"
    assert changed_granules(full, at_c1) <= set().union(*(granules(o, n) for o, n in inc1.dirty))
    assert restore(full, inc1) == at_c1
    assert rig.disk.read_bytes() != at_c1


def test_the_snapshot_export_is_listed_described_and_mapped(rig: Rig) -> None:
    qemu_io(rig.tracker.uri, "write -P 0x51 5M 128k", "write -P 0x52 50M 1")
    rig.checkpoint("c0", "--snapshot")
    exports = listed(rig.uri())
    assert set(exports) == {"", "c0"}
    assert exports["c0"]["description"].startswith("dirtydiff snapshot c0 of state ")
    assert exports["c0"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:c0"]
    assert not exports["c0"]["is_read_only"] and exports["c0"]["can_trim"]
    assert exports[""]["is_read_only"]
    # base:allocation calls everything data: never a hole where data was.
    allocation = json.loads(run(["nbdinfo", "--json", "--map", rig.uri("c0")]).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in allocation] == [(0, SIZE, 0)]
    dirty = json.loads(run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:c0",
                            rig.uri("c0")]).stdout)  # fmt: skip
    assert [(e["offset"], e["length"]) for e in dirty if e["type"] == 1] == [
        (5 * MiB, 128 * 1024), (50 * MiB, GRANULE),
    ]  # fmt: skip
    # qemu-img with x-dirty-bitmap, as oVirt and libvirt's tooling read it.
    opts = (
        f"driver=nbd,server.type=unix,server.path={rig.sidecar.sock},export=c0,"
        "x-dirty-bitmap=qemu:dirty-bitmap:c0"
    )
    mapped = json.loads(run(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout)
    assert [(m["start"], m["length"]) for m in mapped if not m["data"]] == [
        (5 * MiB, 128 * 1024), (50 * MiB, GRANULE),
    ]  # fmt: skip
    # A name no snapshot has is refused.
    assert run(["nbdinfo", rig.uri("c9")], check=False).returncode != 0


def test_writes_to_the_snapshot_export_are_refused_and_change_nothing(rig: Rig) -> None:
    reference = rig.disk.read_bytes()
    rig.checkpoint("c0", "--snapshot")
    h = nbd.NBD()
    h.set_strict_mode(0)  # send WRITE_ZEROES though it is not advertised
    h.connect_uri(rig.uri("c0"))
    try:
        with pytest.raises(nbd.Error) as refused:
            h.pwrite(b"x" * 4096, 0)
        assert refused.value.errnum == errno.EPERM
        with pytest.raises(nbd.Error) as refused:
            h.zero(65536, 0)
        assert refused.value.errnum == errno.EPERM
        assert h.pread(4096, 0) == reference[:4096]
    finally:
        h.shutdown()
    assert rig.disk.read_bytes() == reference


def test_trim_through_the_sidecar_releases_the_range(rig: Rig) -> None:
    rig.checkpoint("c0", "--snapshot")
    qemu_io(rig.tracker.uri, "write -P 0x31 0 4M")  # 4 MiB copied to the store
    first = rig.snapshot("c0")
    assert first["copied_bytes"] >= 4 * MiB and first["store_bytes"] >= 4 * MiB
    h = nbd.NBD()
    h.connect_uri(rig.uri("c0"))
    try:
        h.trim(8 * MiB, 0)  # the backup is done with the first 8 MiB
        # No longer protected: a read there would mix instants, so it fails.
        with pytest.raises(nbd.Error) as released:
            h.pread(4096, 0)
        assert released.value.errnum == errno.EIO
        h.pread(4096, 16 * MiB)  # the rest is still served
    finally:
        h.shutdown()
    after = rig.snapshot("c0")
    assert after["store_bytes"] < first["store_bytes"]
    assert after["protected_bytes"] == first["protected_bytes"] - 8 * MiB
    qemu_io(rig.tracker.uri, "write -P 0x32 0 8M")  # released: nothing to copy
    assert rig.snapshot("c0")["copied_bytes"] == after["copied_bytes"]


def test_the_store_limit_breaks_the_snapshot_never_the_vm(rig: Rig) -> None:
    rig.checkpoint("c0")
    qemu_io(rig.tracker.uri, "write -P 0x21 3M 64k")
    rig.checkpoint("c1", "--snapshot", "--snapshot-limit", "1m")
    # 4 MiB of new data over a 1 MiB store: every write must still succeed.
    qemu_io(rig.tracker.uri, *(f"write -P 0x22 {m}M 1M" for m in range(10, 14)))
    assert read_errno(rig.uri("c1"), 10 * MiB, 4096) == errno.EIO
    assert read_errno(rig.uri("c1"), 30 * MiB, 4096) == errno.EIO  # broken as a whole
    snapshot = rig.snapshot("c1")
    assert snapshot["state"] == "broken"
    assert "limit" in snapshot["reason"]
    status = rig.status()
    assert [s["state"] for s in status["snapshots"]] == ["broken"]
    shown = dirtydiff("status", "--state", str(rig.state)).stdout
    assert "BROKEN" in shown and "limit" in shown
    # The bitmaps lost nothing: c1 has its write, @open every later one.
    bitmaps = {b["name"]: b for b in status["bitmaps"]}
    assert bitmaps["c1"]["dirty_bytes"] == GRANULE
    assert bitmaps["@open"]["dirty_bytes"] == 4 * MiB
    assert rig.disk.read_bytes()[10 * MiB : 14 * MiB] == b"\x22" * (4 * MiB)


def test_snapshot_release_removes_the_export_and_keeps_the_bitmap(rig: Rig) -> None:
    rig.checkpoint("c0", "--snapshot")
    assert "c0" in listed(rig.uri())
    released = json.loads(rig.cli("snapshot", "release", "--json", "c0").stdout)
    assert released["name"] == "c0"
    assert not Path(released["store"]).exists()
    assert set(listed(rig.uri())) == {""}
    assert rig.status()["snapshots"] == []
    assert "qemu:dirty-bitmap:c0" in listed(rig.uri())[""]["contexts"]
    again = rig.cli("snapshot", "release", "c0", check=False)
    assert again.returncode == 1 and "c0" in again.stderr


def test_a_restarted_sidecar_serves_the_snapshot_again(rig: Rig) -> None:
    reference = rig.disk.read_bytes()
    rig.checkpoint("c0", "--snapshot")
    with Writer(rig.tracker.uri, [(0, SIZE)], seed=23):
        h = nbd.NBD()
        h.connect_uri(rig.uri("c0"))
        assert h.pread(READ_CHUNK, 0) == reference[:READ_CHUNK]
        stop(rig.sidecar.proc, signal.SIGKILL)  # mid-backup
        with pytest.raises(nbd.Error):
            h.pread(READ_CHUNK, READ_CHUNK)
        del h
        rig.start_sidecar()
        assert read_export(rig.uri("c0")) == reference


def test_a_killed_tracker_leaves_the_snapshot_exact_or_failing_never_wrong(rig: Rig) -> None:
    reference = rig.disk.read_bytes()
    rig.checkpoint("c0", "--snapshot")
    writer = Writer(rig.tracker.uri, [(0, SIZE)], seed=24)
    writer.start()
    try:
        assert writer.running.wait(20)
        assert read_export(rig.uri("c0"), 8 * MiB) == reference[: 8 * MiB]
        stop(rig.tracker.proc, signal.SIGKILL)  # mid-backup, mid-write
    finally:
        writer.halt.set()
        writer.join(20)
    assert writer.writes > 0
    stop(rig.sidecar.proc, signal.SIGKILL)
    rig.start_tracker()
    rig.start_sidecar()
    qemu_io(rig.tracker.uri, "write -P 0x11 0 16M")  # copied first, if still active
    h = nbd.NBD()
    h.connect_uri(rig.uri("c0"))
    served = 0
    try:
        for pos in range(0, SIZE, READ_CHUNK):
            try:
                chunk = h.pread(READ_CHUNK, pos)
            except nbd.Error as e:
                assert e.errnum == errno.EIO
                continue
            assert chunk == reference[pos : pos + READ_CHUNK], f"wrong data at {pos}"
            served += 1
    finally:
        h.shutdown()
    snapshot = rig.snapshot("c0")
    assert (served == SIZE // READ_CHUNK) == (snapshot["state"] == "active"), snapshot


def test_without_a_tracker_there_is_no_snapshot(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", SIZE)
    tracker = procs.tracker(state, disk=disk)
    stop(tracker.proc)
    refused = dirtydiff("checkpoint", "--state", str(state), "c0", "--snapshot", check=False)
    assert refused.returncode != 0 and "tracker" in refused.stderr
    assert "c0" not in dirtydiff("bitmap", "list", "--state", str(state)).stdout
    usage = dirtydiff("checkpoint", "--state", str(state), "c0", "--snapshot-scope", "dirty",
                      check=False)  # fmt: skip
    assert usage.returncode == 2 and "--snapshot" in usage.stderr
    # A sidecar serving the file itself serves no snapshot, whatever the state holds.
    sock = tmp_path / "file.sock"
    procs.start([sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state),
                 "--disk", str(disk), "--socket", str(sock)], sock)  # fmt: skip
    assert set(listed(f"nbd+unix:///?socket={sock}")) == {""}


def test_a_tracker_restarted_under_the_sidecar_serves_the_same_snapshot_or_fails(
    rig: Rig,
) -> None:
    """The sidecar stays; its client stays connected across the tracker's
    kill -9 and restart, and its connection moves to the new tracker: every
    read after is the snapshot's data or EIO."""
    reference = rig.disk.read_bytes()
    rig.checkpoint("c0", "--snapshot")
    qemu_io(rig.tracker.uri, "write -P 0x17 0 32M")
    h = nbd.NBD()
    h.connect_uri(rig.uri("c0"))
    try:
        assert h.pread(READ_CHUNK, 0) == reference[:READ_CHUNK]
        stop(rig.tracker.proc, signal.SIGKILL)
        rig.start_tracker()
        qemu_io(rig.tracker.uri, "write -P 0x18 0 64M")  # over everything, after the restart
        served = 0
        for pos in range(0, SIZE, READ_CHUNK):
            try:
                chunk = h.pread(READ_CHUNK, pos)
            except nbd.Error as e:
                assert e.errnum == errno.EIO
                continue
            assert chunk == reference[pos : pos + READ_CHUNK], f"wrong data at {pos}"
            served += 1
    finally:
        h.shutdown()
    active = rig.snapshot("c0")["state"] == "active"
    assert (served == SIZE // READ_CHUNK) == active
    if active:
        assert read_export(rig.uri("c0")) == reference


def test_a_client_never_reads_a_snapshot_taken_again_under_its_name(rig: Rig) -> None:
    """c0 released, its bitmap removed, and c0 taken again of other data: a
    client still connected to the first c0 gets EIO, before and after a
    tracker restart moves its connection, never the second c0's data."""
    first = rig.disk.read_bytes()
    rig.checkpoint("c0", "--snapshot")
    h = nbd.NBD()
    h.connect_uri(rig.uri("c0"))
    try:
        assert h.pread(READ_CHUNK, 0) == first[:READ_CHUNK]
        rig.cli("snapshot", "release", "c0")
        rig.cli("bitmap", "remove", "c0")
        qemu_io(rig.tracker.uri, "write -P 0x19 0 8M")
        second = rig.disk.read_bytes()
        rig.checkpoint("c0", "--snapshot")
        assert read_export(rig.uri("c0"), 8 * MiB) == second[: 8 * MiB]  # a new client: the new c0
        for _ in range(2):
            with pytest.raises(nbd.Error) as stale:
                h.pread(READ_CHUNK, 0)
            assert stale.value.errnum == errno.EIO
            stop(rig.tracker.proc, signal.SIGKILL)
            rig.start_tracker()
    finally:
        h.shutdown()
    # The second refusal is the sidecar's: the new tracker serves another c0.
    assert "is not the one this connection chose any more" in rig.sidecar.stderr()


def test_two_snapshots_serve_two_instants(rig: Rig) -> None:
    at_c0 = rig.disk.read_bytes()
    rig.checkpoint("c0", "--snapshot")
    qemu_io(rig.tracker.uri, "write -P 0x27 0 16M", "write -P 0x28 48M 1M")
    at_c1 = rig.disk.read_bytes()
    rig.checkpoint("c1", "--snapshot", "--snapshot-scope", "dirty")
    with Writer(rig.tracker.uri, [(0, 16 * MiB), (48 * MiB, MiB)], seed=25) as writer:
        before = writer.writes
        assert read_export(rig.uri("c0")) == at_c0
        inc = incremental_from(rig.uri("c1"), "c1")
        during = writer.writes - before
    assert during > 0
    assert [(o, n) for o, n in inc.dirty] == [(0, 16 * MiB), (48 * MiB, MiB)]
    assert restore(at_c0, inc) == at_c1
    assert set(listed(rig.uri())) == {"", "c0", "c1"}
    # c1 protects only its dirty granules: the rest of it is not served.
    assert read_errno(rig.uri("c1"), 32 * MiB, 4096) == errno.EIO
    shown = dirtydiff("status", "--state", str(rig.state)).stdout
    assert re.search(r"^c0 +active +all ", shown, re.M), shown
    assert re.search(r"^c1 +active +dirty +17\.0 MiB ", shown, re.M), shown


def test_a_store_directory_is_asked_of_the_tracker_never_the_sidecar(rig: Rig) -> None:
    store_dir = rig.tmp / "stores"
    store_dir.mkdir(mode=0o700)
    taken = rig.checkpoint("c0", "--snapshot", "--snapshot-dir", str(store_dir))
    assert Path(taken["snapshot"]["store"]).parent == store_dir
    assert "c0" in listed(rig.uri())
    # A client of the sidecar's socket may not choose where the tracker writes.
    with pytest.raises(errors.PermissionDenied) as refused:
        control.call(rig.state / "sidecar.sock", "checkpoint", name="c1",
                     snapshot={"scope": "all", "dir": str(store_dir), "limit": None})  # fmt: skip
    assert refused.value.code == "snapshot-dir-not-allowed"
    assert "c1" not in dirtydiff("bitmap", "list", "--state", str(rig.state)).stdout


def test_snapshot_list_without_the_tracker_tells_the_last_state(rig: Rig) -> None:
    rig.checkpoint("c0", "--snapshot", "--snapshot-limit", "2m")
    stop(rig.sidecar.proc)
    stop(rig.tracker.proc)
    (found,) = json.loads(rig.cli("snapshot", "list", "--json").stdout)
    assert found["name"] == "c0" and found["limit"] == 2 * MiB
    assert found["state"] in ("active", "broken")
    assert rig.status()["snapshots"] == [found]
    assert "c0" in rig.cli("status").stdout
    refused = rig.cli("checkpoint", "c1", "--snapshot", check=False)
    assert refused.returncode != 0 and "tracker" in refused.stderr


def test_bad_snapshot_flags_are_usage_errors(state: Path) -> None:
    for flags, said in (
        (["--snapshot", "--snapshot-limit", "0"], "must be positive"),
        (["--snapshot", "--snapshot-limit", "12x"], "bad byte count"),
        (["--snapshot", "--snapshot-scope", "some"], "invalid choice"),
        (["--snapshot-limit", "1g"], "--snapshot-limit needs --snapshot"),
        (["--snapshot-dir", "/tmp"], "--snapshot-dir needs --snapshot"),
    ):
        bad = dirtydiff("checkpoint", "--state", str(state), "c0", *flags, check=False)
        assert bad.returncode == 2, (flags, bad.stderr)
        assert said in bad.stderr, (flags, bad.stderr)
        assert len(bad.stderr.strip().splitlines()[-1]) < 200
    assert "release" in dirtydiff("snapshot", "--help").stdout
    # A state never tracked has no snapshot to release: one line says why.
    unknown = dirtydiff("snapshot", "release", "--state", str(state), "c9", check=False)
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1

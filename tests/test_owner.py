"""The owner of a state directory: who serves a request, and the typed replies.

Routing is asked of real servers (nbdkit with the tracker, ``dirtydiff
serve``) where a server is the point; the files' route and a stale socket
need none. The replies are parsed from what a store answers, and from maps
a peer of another version (or a broken one) could send.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dirtydiff import errors
from dirtydiff.bitmapfile import BOOT_ID_ENV, Reason
from dirtydiff.control import replies
from dirtydiff.owner import Route, StateOwner
from dirtydiff.state import REASONS_BY_CODE, BitmapInfo, StateDir, reason_code
from dirtydiff.store import BitmapStore
from sidecar.scan.engine import Progress
from sidecar.scan.job import ScanOptions
from sidecar.scan.jobs import Job, JobStatus
from tests.conftest import Processes, make_disk
from tests.test_sidecar_api import start_sidecar

BOOT_A = "8a5bd0c4-6a8e-4f3c-9d1e-0f6f2b7e1a01"
DISK = 1 << 24


@pytest.fixture(autouse=True)
def boot_a(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)


@pytest.fixture
def tracked(state: Path) -> StateDir:
    """A state directory a tracker ran on once (its disk is recorded)."""
    found = StateDir(state)
    found.record_disk(DISK, "file:disk.raw", ("file", 1, 2))
    return found


# -- routes ------------------------------------------------------------------------


def test_with_nobody_running_the_files_are_served_under_the_lock(tracked: StateDir) -> None:
    owner = StateOwner(tracked)
    with owner.acting() as actor:
        assert actor.route is Route.FILES
        assert tracked.try_lock() is None  # no tracker may start meanwhile
        assert actor.call("bitmap.add", name="b")["name"] == "b"
        assert [b["name"] for b in actor.call("bitmap.list")] == ["@open", "b"]
    lock = tracked.try_lock()
    assert lock is not None  # released with the block
    lock.release()
    assert [b.name for b in owner.bitmaps()] == ["@open", "b"]


def test_a_state_never_tracked_is_refused_on_the_files(state: Path) -> None:
    owner = StateOwner(StateDir(state))
    with pytest.raises(errors.NotFound, match="has never been tracked") as e:
        owner.request("status")
    assert e.value.code == "never-tracked"
    with (
        pytest.raises(errors.NotFound, match="no scan here"),
        owner.acting(never_tracked="no scan here") as actor,
    ):
        actor.call("scan.abort", name="x")


def stale_socket(path: Path) -> None:
    """What a tracker killed with -9 leaves: a socket nobody listens on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_locked_with_nobody_answering_is_state_busy(tracked: StateDir) -> None:
    """The lock is held (an offline scan, a tracker starting), and the
    tracker's socket is stale: the request is refused, nothing is opened."""
    stale_socket(tracked.socket_path)
    lock = tracked.try_lock()
    assert lock is not None
    try:
        owner = StateOwner(tracked)
        with owner.acting() as actor:
            assert actor.route is Route.TRACKER
        with pytest.raises(errors.Unavailable) as e:
            owner.request("bitmap.list")
        assert e.value.code == "state-busy"
        with pytest.raises(errors.Unavailable) as e, owner.acting() as actor:
            actor.call("bitmap.list")  # a scan's own calls: the socket's error
        assert e.value.code == "unavailable"
    finally:
        lock.release()
    assert not tracked.bitmaps_dir.exists()


def test_a_stale_sidecar_socket_is_passed_over(tracked: StateDir) -> None:
    stale_socket(tracked.sidecar_socket_path)
    owner = StateOwner(tracked)
    assert owner.sidecar() is None
    assert owner.info("@open").consistent


def test_the_tracker_then_the_sidecar_serve_while_they_run(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = make_disk(tmp_path / "disk.raw", DISK)
    tracker = procs.tracker(state, disk=disk)
    owner = StateOwner(StateDir(state))
    assert owner.tracker_runs() and owner.sidecar() is None
    with owner.acting() as actor:
        assert actor.route is Route.TRACKER
    info = owner.info("@open")
    assert info.recording and info.why is Reason.NONE
    with pytest.raises(errors.BadRequest) as e:
        owner.request("scan.list")  # the sidecar's own op: the tracker has none
    assert e.value.code == "unknown-op"

    start_sidecar(procs, tmp_path, state, tracker.uri)
    with owner.acting() as actor:
        assert actor.route is Route.SIDECAR
    assert owner.request("scan.list") == []
    assert owner.info("@open").recording  # sent on to the tracker by the sidecar
    itself = StateOwner(StateDir(state), ask_sidecar=False)  # how the sidecar asks
    assert itself.sidecar() is None
    with pytest.raises(errors.BadRequest):
        itself.request("scan.list")


def test_one_tracker_and_one_sidecar_per_state(tracked: StateDir) -> None:
    owner = StateOwner(tracked)
    tracker, sidecar = owner.become_tracker(), owner.become_sidecar()
    try:
        with pytest.raises(errors.Conflict, match=f"another tracker \\(pid {os.getpid()}\\)"):
            StateOwner(tracked).become_tracker()
        with pytest.raises(errors.Conflict, match=f"another sidecar \\(pid {os.getpid()}\\)"):
            StateOwner(tracked).become_sidecar()
        assert owner.tracker_runs()
        with owner.acting() as actor:
            assert actor.route is Route.TRACKER  # the lock says who, not the socket
    finally:
        tracker.release()
        sidecar.release()
    assert not owner.tracker_runs()
    owner.become_sidecar().release()


# -- typed replies ---------------------------------------------------------------------


@pytest.fixture
def store(tracked: StateDir) -> Iterator[BitmapStore]:
    lock = tracked.try_lock()
    assert lock is not None
    store = BitmapStore(tracked, DISK, recording=False)
    try:
        yield store
    finally:
        store.close()
        lock.release()


def test_a_bitmap_info_crosses_the_wire_unchanged(store: BitmapStore) -> None:
    store.add("b", backup="nbd://backup/b")
    sent = store.info("b")
    assert replies.bitmap_info(sent.as_dict()) == sent
    assert replies.bitmap_infos([b.as_dict() for b in store.list()]) == store.list()


def test_every_reason_has_a_code_that_names_it_back() -> None:
    codes = {reason_code(r) for r in Reason}
    assert len(codes) == len(Reason)
    assert all(REASONS_BY_CODE[reason_code(r)] is r for r in Reason)
    assert reason_code(Reason.SCAN_IN_PROGRESS) == "scan-in-progress"


def test_the_reason_is_decided_by_code_and_told_in_words(store: BitmapStore) -> None:
    store.add("imp", importing=True)
    wire = store.info("imp").as_dict()
    assert wire["reason_code"] == "import-in-progress"
    assert wire["reason"] == Reason.IMPORT_IN_PROGRESS.describe()  # for people, as before
    assert replies.bitmap_info(wire).why is Reason.IMPORT_IN_PROGRESS


def test_a_tracker_of_before_is_understood(store: BitmapStore) -> None:
    """No reason code, no creation time: what a tracker started before
    replies carried them answers (it may run on under its VM across an
    upgrade)."""
    store.add("imp", importing=True)
    old = store.info("imp").as_dict()
    del old["reason_code"], old["created_ns"]
    info = replies.bitmap_info(old)
    assert info.why is Reason.IMPORT_IN_PROGRESS and info.created_ns == 0


def malformed(store: BitmapStore) -> list[object]:
    good = store.info("@open").as_dict()
    return [
        None,
        [],
        {k: v for k, v in good.items() if k != "granularity"},
        {**good, "granularity": True},  # a bool is not an int
        {**good, "consistent": 1},  # nor an int a bool
        {**good, "name": b"@open"},
        {**good, "reason_code": "cosmic-ray"},
        {**{k: v for k, v in good.items() if k != "reason_code"}, "consistent": False,
         "reason": "a reason nobody wrote"},
    ]  # fmt: skip


def test_a_reply_without_its_shape_is_a_protocol_error(store: BitmapStore) -> None:
    for reply in malformed(store):
        with pytest.raises(errors.ProtocolError) as e:
            replies.bitmap_info(reply)
        assert e.value.code == "malformed-reply"
    with pytest.raises(errors.ProtocolError):
        replies.bitmap_infos({"not": "a list"})
    with pytest.raises(errors.ProtocolError):
        replies.StoreStatus.from_wire({"disk_size": DISK, "recording": False, "inflight": 0})


def test_status_checkpoint_and_scan_begin_are_typed(store: BitmapStore) -> None:
    status = replies.StoreStatus.from_wire(
        {"disk_size": DISK, "recording": False, "inflight": 0,
         "bitmaps": [b.as_dict() for b in store.list()]}
    )  # fmt: skip
    assert status.bitmaps == store.list() and status.disk_size == DISK
    result = store.checkpoint("cp1")
    assert replies.checkpoint_result(dataclasses.asdict(result)) == result
    begun = replies.ScanBegun.from_wire({"resume": False, "granularity": 65536, "created_ns": 7})
    assert begun.as_dict() == {"resume": False, "granularity": 65536, "created_ns": 7}


def test_bitmap_info_is_what_describe_makes(store: BitmapStore) -> None:
    info = store.info("@open")
    assert isinstance(info, BitmapInfo)
    assert info.why is Reason.NONE and info.reason_code == "consistent"


# -- scan jobs ---------------------------------------------------------------------


def test_a_scan_job_status_crosses_the_wire_unchanged() -> None:
    options = ScanOptions(disk="disk.raw", backup="nbd://b", name="s")
    job = Job(options)
    job.progress = Progress(total=DISK, position=4096, compared=4096, differing_granules=1)
    wire = job.as_dict()
    assert list(wire) == ["bitmap", "backup", "rebuild", "state", "error", "progress", "estimate"]
    status = JobStatus.from_wire(wire)
    assert status.as_dict() == wire and status.active
    shown = status.seen_progress()
    assert shown is not None and (shown.position, shown.differing_granules) == (4096, 1)
    assert JobStatus.from_wire({**wire, "later": 1}) == status  # a newer sidecar's extra field
    no_error = {k: v for k, v in wire.items() if k != "error"}
    broken = [{**wire, "state": "lost"}, {**wire, "rebuild": 1}, {**wire, "progress": {}}]
    for bad in [None, no_error, *broken]:
        with pytest.raises(errors.ProtocolError):
            JobStatus.from_wire(bad)

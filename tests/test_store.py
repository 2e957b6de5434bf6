"""BitmapStore: generations, the write hot path, operations, drain and recovery.

Threads stand in for the VM's requests in flight. They synchronise through
events only. The short bounded waits on a thread that must stay blocked
(``join(0.2)``, ``wait(0.2)``) can only let a broken drain pass by luck, never
make a working one fail.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dirtydiff import errors
from dirtydiff.bitmapfile import BOOT_ID_ENV, BitmapFile, Flag, Reason, inconsistency
from dirtydiff.state import OPEN_CHECKPOINT, DiskSeen, StateDir
from dirtydiff.store import BitmapStore, CheckpointResult, Generation

BOOT_A = "8a5bd0c4-6a8e-4f3c-9d1e-0f6f2b7e1a01"
BOOT_B = "1c0ffee0-0000-4000-8000-00000000000b"

G = 65536
DISK = 64 * G + 4096  # a partial last granule
WAIT = 10.0  # bound for events that must come; reaching it is a failure
FILE = ("file", 1, 2)  # the disk file's identity, as the state records it
SEEN = DiskSeen("disk.raw", DISK, file=FILE)  # what a scan of that file finds


@pytest.fixture(autouse=True)
def boot_a(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDir]:
    state = StateDir(tmp_path)
    lock = state.try_lock()
    assert lock is not None
    state.record_disk(DISK, "file:disk.raw", FILE)
    try:
        yield state
    finally:
        lock.release()


@pytest.fixture
def store(state: StateDir) -> Iterator[BitmapStore]:
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        yield store
    finally:
        store.close()


def write(store: BitmapStore, offset: int, length: int) -> None:
    """A whole request: marked, forwarded (nothing to do here), completed."""
    gen, token = store.begin_write(offset, length)
    store.end_write(gen, token)


def dirty(store: BitmapStore, name: str) -> set[int]:
    return granules_set(store.bitmaps[name])


def granules_set(bitmap: BitmapFile) -> set[int]:
    value = int.from_bytes(bitmap.bits, "little")
    return {i for i in range(value.bit_length()) if value >> i & 1}


def on_disk(state: StateDir, name: str) -> set[int]:
    """What another process mapping the file sees."""
    with state.open_bitmap(name) as bitmap:
        return granules_set(bitmap)


def granules(offset: int, length: int, granularity: int = G) -> set[int]:
    return set(range(offset // granularity, (offset + length - 1) // granularity + 1))


def snapshot(store: BitmapStore) -> dict[str, tuple[bytes, Flag, int]]:
    return {
        name: (bytes(b.bits), b.header.flags & ~Flag.IN_USE, b.header.generation)
        for name, b in store.bitmaps.items()
    }


class Writer(threading.Thread):
    """A request that began and waits, in flight, until ``finish``."""

    def __init__(self, store: BitmapStore, offset: int, length: int) -> None:
        super().__init__(name=f"writer-{offset}", daemon=True)
        self.store = store
        self.offset, self.length = offset, length
        self.began = threading.Event()
        self._release = threading.Event()
        self.ending = threading.Event()  # set just before end_write is called

    def run(self) -> None:
        gen, token = self.store.begin_write(self.offset, self.length)
        self.began.set()
        self._release.wait(WAIT)
        self.ending.set()
        self.store.end_write(gen, token)

    def start_in_flight(self) -> Writer:
        self.start()
        assert self.began.wait(WAIT)
        return self

    def finish(self) -> None:
        self._release.set()
        self.join(WAIT)
        assert not self.is_alive()


def spy_drain(store: BitmapStore, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set when an operation starts waiting for the old generation."""
    draining = threading.Event()
    drain: Callable[[Generation, float], bool] = store._drain

    def spy(old: Generation, timeout: float) -> bool:
        draining.set()
        return drain(old, timeout)

    monkeypatch.setattr(store, "_drain", spy)
    return draining


# -- the hot path -------------------------------------------------------------------


def test_open_creates_the_open_interval(store: BitmapStore, state: StateDir) -> None:
    assert state.names() == [OPEN_CHECKPOINT]
    info = store.info(OPEN_CHECKPOINT)
    assert (info.enabled, info.recording, info.consistent) == (True, True, True)
    assert (info.granularity, info.disk_size, info.generation) == (G, DISK, 1)
    assert store.bitmaps[OPEN_CHECKPOINT].header.flags & Flag.IN_USE


def test_begin_write_marks_every_enabled_bitmap_before_returning(
    store: BitmapStore, state: StateDir
) -> None:
    store.add("fine", 4096)
    store.add("coarse", 1 << 20)
    store.add("off", enabled=False)
    gen, token = store.begin_write(3 * G - 1, 2)
    # Before the request would be forwarded: visible in memory and to readers.
    for name, granularity in ((OPEN_CHECKPOINT, G), ("fine", 4096), ("coarse", 1 << 20)):
        expected = granules(3 * G - 1, 2, granularity)
        assert dirty(store, name) == expected
        assert on_disk(state, name) == expected
    assert dirty(store, "off") == set()
    assert store.inflight() == 1
    store.end_write(gen, token)
    assert store.inflight() == 0
    assert dirty(store, OPEN_CHECKPOINT) == {2, 3}, "bits are never unmarked"


def test_disabled_bitmap_is_not_marked(store: BitmapStore) -> None:
    store.add("b")
    write(store, 0, 1)
    info = store.disable("b")
    assert (info.enabled, info.recording) == (False, False)
    assert not store.bitmaps["b"].header.flags & Flag.IN_USE
    write(store, 5 * G, 1)
    assert dirty(store, "b") == {0}
    assert dirty(store, OPEN_CHECKPOINT) == {0, 5}
    store.enable("b")
    write(store, 7 * G, 1)
    assert dirty(store, "b") == {0, 7}


def test_write_past_the_end_is_clipped(store: BitmapStore) -> None:
    write(store, DISK - 1, 10 * G)
    write(store, DISK + G, G)
    assert dirty(store, OPEN_CHECKPOINT) == {64}


def test_offline_store_records_nothing(state: StateDir) -> None:
    store = BitmapStore(state, DISK, recording=False, granularity=G)
    try:
        write(store, 0, G)
        assert dirty(store, OPEN_CHECKPOINT) == set()
        assert not store.info(OPEN_CHECKPOINT).recording
        assert not store.bitmaps[OPEN_CHECKPOINT].header.flags & Flag.IN_USE
    finally:
        store.close()


# -- checkpoint ---------------------------------------------------------------------


def test_checkpoint_freezes_the_open_interval(store: BitmapStore, state: StateDir) -> None:
    write(store, 0, 1)
    write(store, 10 * G, 3 * G)
    result = store.checkpoint("cp1")
    assert result == CheckpointResult("cp1", 1, True, 4 * G)
    frozen = store.info("cp1")
    assert (frozen.enabled, frozen.recording, frozen.consistent) == (False, False, True)
    assert dirty(store, "cp1") == {0, 10, 11, 12}
    header = state.read_header("cp1")
    assert not header.flags & (Flag.ENABLED | Flag.IN_USE)
    assert inconsistency(header) is Reason.NONE
    following = store.info(OPEN_CHECKPOINT)
    assert (following.enabled, following.recording, following.generation) == (True, True, 2)
    assert dirty(store, OPEN_CHECKPOINT) == set()

    write(store, 20 * G, 1)
    assert dirty(store, OPEN_CHECKPOINT) == {20}
    assert dirty(store, "cp1") == {0, 10, 11, 12}
    assert on_disk(state, "cp1") == {0, 10, 11, 12}
    assert store.checkpoint("cp2").generation == 2
    assert store.info(OPEN_CHECKPOINT).generation == 3
    assert sorted(state.names()) == [OPEN_CHECKPOINT, "cp1", "cp2"]
    assert not list(state.bitmaps_dir.glob(".*")), "staging file left behind"


def test_checkpoint_drains_a_write_in_flight(
    store: BitmapStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    draining = spy_drain(store, monkeypatch)
    writer = Writer(store, 7 * G + 100, 2 * G).start_in_flight()  # granules 7, 8, 9
    outcome: list[tuple[CheckpointResult, bool]] = []

    def checkpoint() -> None:
        result = store.checkpoint("cp1", timeout=WAIT)
        outcome.append((result, writer.ending.is_set()))

    checkpointer = threading.Thread(target=checkpoint, name="checkpoint", daemon=True)
    checkpointer.start()
    try:
        assert draining.wait(WAIT)
        # Switched: the frozen bitmap and the next interval both have the write
        # in flight, since its data may land after the checkpoint.
        assert dirty(store, "cp1") == {7, 8, 9}
        assert dirty(store, OPEN_CHECKPOINT) == {7, 8, 9}
        # A write that starts now goes to the next interval only, and is not
        # waited for.
        write(store, 30 * G, 1)
        assert dirty(store, OPEN_CHECKPOINT) == {7, 8, 9, 30}
        assert dirty(store, "cp1") == {7, 8, 9}
        checkpointer.join(0.2)
        assert checkpointer.is_alive(), "checkpoint answered before the write completed"
        assert outcome == []
    finally:
        writer.finish()
        checkpointer.join(WAIT)
    assert not checkpointer.is_alive()
    [(result, write_was_ending)] = outcome
    assert write_was_ending, "checkpoint answered before end_write"
    assert result.drained
    assert result.dirty_bytes == 3 * G
    assert not store.bitmaps["cp1"].header.flags & Flag.IN_USE
    assert store.info("cp1").consistent


def test_checkpoint_drain_timeout_reports_not_drained(store: BitmapStore) -> None:
    gen, token = store.begin_write(4 * G, 1)
    try:
        result = store.checkpoint("cp1", timeout=0.01)
    finally:
        store.end_write(gen, token)
    assert not result.drained
    assert dirty(store, "cp1") == {4}
    assert dirty(store, OPEN_CHECKPOINT) == {4}, "the late write is in the next interval too"
    assert store.info("cp1").consistent
    assert store.inflight() == 0


def test_disable_drains_a_write_in_flight(
    store: BitmapStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add("b")
    draining = spy_drain(store, monkeypatch)
    writer = Writer(store, 0, 1).start_in_flight()
    done = threading.Event()

    def disable() -> None:
        store.disable("b", timeout=WAIT)
        done.set()

    disabler = threading.Thread(target=disable, name="disable", daemon=True)
    disabler.start()
    try:
        assert draining.wait(WAIT)
        assert not done.wait(0.2)
    finally:
        writer.finish()
        disabler.join(WAIT)
    assert done.is_set()
    assert dirty(store, "b") == {0}
    assert not store.bitmaps["b"].header.flags & Flag.IN_USE


# -- operations with writes in flight ---------------------------------------------------


def test_clear_keeps_writes_in_flight_marked(store: BitmapStore, state: StateDir) -> None:
    store.add("b", backup="nbd://backup/b0")
    write(store, 0, 1)
    gen, token = store.begin_write(3 * G + 5, 2 * G)  # granules 3, 4, 5
    before = store.info("b")
    info = store.clear("b")
    assert dirty(store, "b") == {3, 4, 5}
    assert info.dirty_bytes == 3 * G
    store.end_write(gen, token)
    assert dirty(store, "b") == {3, 4, 5}
    assert on_disk(state, "b") == {3, 4, 5}
    # Another bitmap under the name: it counts from the clear, not from b0.
    assert info.backup == "" and info.created_ns > before.created_ns
    assert store.bitmaps["b"].inode != store.bitmaps[OPEN_CHECKPOINT].inode
    info = store.clear("b", backup="nbd://backup/b1")
    assert dirty(store, "b") == set() and info.backup == "nbd://backup/b1"
    assert store.info("b").recording
    write(store, 7 * G, 1)
    assert on_disk(state, "b") == {7}


def test_the_open_interval_is_never_cleared_disabled_or_removed(store: BitmapStore) -> None:
    """Each would make the next checkpoint claim less than what changed
    since the last one."""
    write(store, 0, 1)
    for change in (
        lambda: store.clear(OPEN_CHECKPOINT),
        lambda: store.disable(OPEN_CHECKPOINT),
        lambda: store.remove(OPEN_CHECKPOINT),
    ):
        with pytest.raises(errors.BadRequest) as refused:
            change()
        assert refused.value.code == "reserved-name"
    assert store.info(OPEN_CHECKPOINT).recording
    assert store.checkpoint("cp").dirty_bytes == G


def test_bitmaps_joining_during_a_write_get_its_range(store: BitmapStore) -> None:
    store.add("later", enabled=False)
    gen, token = store.begin_write(2 * G - 1, 2)  # granules 1, 2
    try:
        store.add("added")
        store.add("added-off", enabled=False)
        store.enable("later")
        assert dirty(store, "added") == {1, 2}
        assert dirty(store, "later") == {1, 2}
        assert dirty(store, "added-off") == set()
    finally:
        store.end_write(gen, token)
    assert store.info("added").recording
    assert store.bitmaps["added"].header.flags & Flag.IN_USE


def test_mark_ranges_marks_granules_touched_or_nothing(store: BitmapStore) -> None:
    store.add("imported", 4096, enabled=False)
    info = store.mark_ranges("imported", [(1, 1), (3 * 4096 - 1, 2), (DISK - 1, 1)])
    assert dirty(store, "imported") == {0, 2, 3, (DISK - 1) // 4096}
    assert info.dirty_bytes == 4 * 4096
    for bad in ([(0, 1), (DISK, 1)], [(-1, 1)], [(0, 0)], [(DISK - 1, 2)]):
        expect(errors.BadRequest, "bad-range", lambda: store.mark_ranges("imported", bad))  # noqa: B023
    assert dirty(store, "imported") == {0, 2, 3, (DISK - 1) // 4096}
    assert dirty(store, OPEN_CHECKPOINT) == set()


def test_merge_ors_sources_into_target(store: BitmapStore) -> None:
    store.add("a", enabled=False)
    store.add("b", enabled=False)
    store.enable("a")
    write(store, 1 * G, 1)
    store.disable("a")
    store.enable("b")
    write(store, 2 * G, 1)
    store.disable("b")
    store.add("sum", enabled=False)
    info = store.merge("sum", ["a", "b"])
    assert dirty(store, "sum") == {1, 2}
    assert info.dirty_bytes == 2 * G
    assert info.consistent


def test_merge_of_an_inconsistent_source_makes_target_inconsistent(store: BitmapStore) -> None:
    store.add("broken", enabled=False)
    store.bitmaps["broken"].mark_inconsistent(Reason.DISK_RESIZED)
    store.add("sum", enabled=False)
    info = store.merge("sum", ["broken"])
    assert not info.consistent
    assert info.reason == Reason.DISK_RESIZED.describe()


# -- errors ------------------------------------------------------------------------------


def expect(
    cls: type[errors.DirtydiffError], code: str, call: Callable[[], object]
) -> errors.DirtydiffError:
    with pytest.raises(cls) as failed:
        call()
    assert failed.value.code == code
    return failed.value


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", ":x", "+x", "a/b", "../x", "a b", "x" * 201, "@open", "é"]
)
def test_bad_names(store: BitmapStore, state: StateDir, name: str) -> None:
    expect(errors.BadRequest, "bad-name", lambda: store.add(name))
    expect(errors.BadRequest, "bad-name", lambda: store.checkpoint(name))
    assert state.names() == [OPEN_CHECKPOINT]


def test_good_names(store: BitmapStore) -> None:
    for name in ("b0", "_x", "a.b:c+d-e", "x" * 200):
        store.add(name)
    assert len(store.list()) == 5


def test_name_in_use(store: BitmapStore) -> None:
    store.add("b")
    write(store, 0, 1)
    expect(errors.Conflict, "name-in-use", lambda: store.add("b"))
    expect(errors.Conflict, "name-in-use", lambda: store.checkpoint("b"))
    assert dirty(store, "b") == {0}
    assert store.info(OPEN_CHECKPOINT).generation == 1


@pytest.mark.parametrize(
    "operation",
    ["info", "remove", "clear", "enable", "disable", "merge-target", "merge-source"],
)
def test_unknown_bitmap(store: BitmapStore, operation: str) -> None:
    calls: dict[str, Callable[[], object]] = {
        "info": lambda: store.info("nope"),
        "remove": lambda: store.remove("nope"),
        "clear": lambda: store.clear("nope"),
        "enable": lambda: store.enable("nope"),
        "disable": lambda: store.disable("nope"),
        "merge-target": lambda: store.merge("nope", [OPEN_CHECKPOINT]),
        "merge-source": lambda: store.merge(OPEN_CHECKPOINT, ["nope"]),
    }
    error = expect(errors.NotFound, "unknown-bitmap", calls[operation])
    assert "nope" in error.message


def test_open_interval_cannot_be_removed(store: BitmapStore, state: StateDir) -> None:
    write(store, 0, 1)
    expect(errors.BadRequest, "reserved-name", lambda: store.remove(OPEN_CHECKPOINT))
    assert state.names() == [OPEN_CHECKPOINT]
    write(store, G, 1)
    assert dirty(store, OPEN_CHECKPOINT) == {0, 1}


def test_remove(store: BitmapStore, state: StateDir) -> None:
    store.add("b")
    store.remove("b")
    assert state.names() == [OPEN_CHECKPOINT]
    write(store, 0, 1)
    expect(errors.NotFound, "unknown-bitmap", lambda: store.info("b"))
    store.add("b")  # the name is free again
    assert dirty(store, "b") == set()


def test_merge_of_other_granularity_is_refused(store: BitmapStore) -> None:
    write(store, 0, 1)
    store.add("fine", 4096)
    write(store, 5 * G, 1)
    expect(errors.BadRequest, "geometry-mismatch", lambda: store.merge(OPEN_CHECKPOINT, ["fine"]))
    expect(errors.BadRequest, "geometry-mismatch", lambda: store.merge("fine", [OPEN_CHECKPOINT]))
    assert dirty(store, OPEN_CHECKPOINT) == {0, 5}
    assert dirty(store, "fine") == {5 * 16}


@pytest.mark.parametrize("granularity", [0, 2048, 4095, 65537, 128 << 20])
def test_add_refuses_bad_granularity(store: BitmapStore, state: StateDir, granularity: int) -> None:
    expect(errors.BadRequest, "bad-granularity", lambda: store.add("b", granularity))
    assert state.names() == [OPEN_CHECKPOINT]
    assert not list(state.bitmaps_dir.glob(".*"))


def test_full_filesystem_fails_checkpoint_and_add_before_anything_changes(
    store: BitmapStore, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(store, 0, 1)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    expect(errors.StorageError, "state-dir-full", lambda: store.checkpoint("cp1"))
    expect(errors.StorageError, "state-dir-full", lambda: store.add("b"))
    assert state.names() == [OPEN_CHECKPOINT]
    assert not list(state.bitmaps_dir.glob(".*"))
    info = store.info(OPEN_CHECKPOINT)
    assert (info.recording, info.generation) == (True, 1)
    write(store, G, 1)
    assert dirty(store, OPEN_CHECKPOINT) == {0, 1}
    monkeypatch.undo()
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)
    assert store.checkpoint("cp1").dirty_bytes == 2 * G


# -- persistence ----------------------------------------------------------------------------


def test_restart_keeps_every_bit(state: StateDir) -> None:
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    store.add("fine", 4096)
    store.add("off", enabled=False)
    write(store, 0, 1)
    store.checkpoint("cp1")
    write(store, 9 * G + 1, 5 * G)
    store.enable("off")
    write(store, DISK - 1, 1)
    before = snapshot(store)
    assert all(bits.strip(b"\0") for bits, _, _ in before.values())
    store.close()

    for recording in (True, False, True):
        store = BitmapStore(state, DISK, recording=recording, granularity=G)
        try:
            assert snapshot(store) == before
            for info in store.list():
                assert info.consistent
                assert info.recording == (recording and info.enabled)
                assert bool(store.bitmaps[info.name].header.flags & Flag.IN_USE) == (
                    recording and info.enabled
                )
        finally:
            store.close()
    for name in before:
        assert not state.read_header(name).flags & Flag.IN_USE


def test_killed_tracker_restarts_with_its_bits(state: StateDir) -> None:
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    write(store, 3 * G, 1)
    store.close(clean=False)  # as kill -9 leaves it: IN_USE, same boot
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert dirty(store, OPEN_CHECKPOINT) == {3}
        assert store.info(OPEN_CHECKPOINT).consistent
    finally:
        store.close()


def crash_host(state: StateDir, monkeypatch: pytest.MonkeyPatch, *, disabled: str) -> None:
    """Record in boot A, then die with the host; the next calls run in boot B.

    ``disabled`` is left IN_USE but no longer ENABLED: a disable whose header
    write reached the disk, but whose end_recording did not.
    """
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    store.add(disabled)
    write(store, 2 * G, 1)
    bitmap = store.bitmaps[disabled]
    bitmap.header.flags &= ~Flag.ENABLED
    bitmap.write_header()
    store.close(clean=False)
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_B)


@pytest.mark.parametrize("recording", [False, True])
def test_host_crash_stays_inconsistent_across_opens(
    state: StateDir, monkeypatch: pytest.MonkeyPatch, recording: bool
) -> None:
    crash_host(state, monkeypatch, disabled="d")
    # Two opens: the first (a `status` before the tracker starts, say) must
    # not launder the evidence of the crash when it closes.
    for _ in range(2):
        store = BitmapStore(state, DISK, recording=recording, granularity=G)
        try:
            for name in (OPEN_CHECKPOINT, "d"):
                info = store.info(name)
                assert not info.consistent, f"{name} after a host crash"
                assert info.reason == Reason.HOST_CRASH.describe()
                assert dirty(store, name) == {2}
        finally:
            store.close()
    for name in (OPEN_CHECKPOINT, "d"):
        assert inconsistency(state.read_header(name)) is Reason.HOST_CRASH


def test_clear_makes_a_crashed_bitmap_a_new_consistent_one(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleared bitmap counts from the clear: it no longer speaks for the
    backup it counted from before the crash."""
    crash_host(state, monkeypatch, disabled="d")
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        with pytest.raises(errors.BadRequest):
            store.clear(OPEN_CHECKPOINT)  # rebuild it, or checkpoint
        store.clear("d")
        assert store.info("d").consistent and store.info("d").backup == ""
        assert not store.info(OPEN_CHECKPOINT).consistent
    finally:
        store.close()
    store = BitmapStore(state, DISK, recording=False, granularity=G)
    try:
        assert store.info("d").consistent
        assert not store.info(OPEN_CHECKPOINT).consistent
    finally:
        store.close()


def stage_next_interval(state: StateDir, generation: int) -> None:
    """What checkpoint does before its renames: the next interval, durable."""
    BitmapFile.create(
        state.bitmaps_dir / ".@open.staging",
        granularity=G,
        disk_size=DISK,
        flags=Flag.ENABLED | Flag.IN_USE,
        generation=generation,
    ).close()


def test_checkpoint_interrupted_between_renames_is_undone(state: StateDir) -> None:
    """The frozen file under its new name is still ENABLED: it goes back
    under @open with every bit it got, and the checkpoint can be taken again."""
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    write(store, 6 * G, 1)
    frozen = store.bitmaps[OPEN_CHECKPOINT]
    store.close(clean=False)  # the tracker dies mid-checkpoint, host up
    stage_next_interval(state, generation=2)
    os.rename(frozen.path, state.bitmap_path("cp1"))
    # ... and the crash comes before the staging file is renamed to @open.

    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert sorted(state.names()) == [OPEN_CHECKPOINT]
        assert not list(state.bitmaps_dir.glob(".*"))
        info = store.info(OPEN_CHECKPOINT)
        assert (info.recording, info.consistent, info.generation) == (True, True, 1)
        assert dirty(store, OPEN_CHECKPOINT) == {6}
        write(store, 8 * G, 1)
        assert store.checkpoint("cp1").dirty_bytes == 2 * G
    finally:
        store.close()


def test_checkpoint_interrupted_between_renames_by_an_older_tracker_stands(
    state: StateDir,
) -> None:
    """An older tracker wrote the frozen header before its renames, and died
    holding the lock: nothing was marked since, and the checkpoint stands."""
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    write(store, 6 * G, 1)
    frozen = store.bitmaps[OPEN_CHECKPOINT]
    store.close(clean=False)
    stage_next_interval(state, generation=2)
    with state.open_bitmap(OPEN_CHECKPOINT, writable=True) as bitmap:
        bitmap.header.flags &= ~Flag.ENABLED
        bitmap.write_header(durable=False)
    os.rename(frozen.path, state.bitmap_path("cp1"))

    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert sorted(state.names()) == [OPEN_CHECKPOINT, "cp1"]
        assert not list(state.bitmaps_dir.glob(".*"))
        following = store.info(OPEN_CHECKPOINT)
        assert (following.recording, following.consistent, following.generation) == (
            True,
            True,
            2,
        )
        frozen_info = store.info("cp1")
        assert (frozen_info.enabled, frozen_info.consistent) == (False, True)
        assert dirty(store, "cp1") == {6}
        assert dirty(store, OPEN_CHECKPOINT) == set()
        write(store, 8 * G, 1)
        assert dirty(store, OPEN_CHECKPOINT) == {8}
        assert store.checkpoint("cp2").generation == 2
    finally:
        store.close()


def test_checkpoint_interrupted_before_renames_keeps_the_open_interval(
    state: StateDir,
) -> None:
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    write(store, 6 * G, 1)
    store.close(clean=False)
    stage_next_interval(state, generation=2)

    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert state.names() == [OPEN_CHECKPOINT]
        assert not list(state.bitmaps_dir.glob(".*"))
        assert store.info(OPEN_CHECKPOINT).generation == 1
        assert dirty(store, OPEN_CHECKPOINT) == {6}
        assert store.info(OPEN_CHECKPOINT).consistent
    finally:
        store.close()


def test_bitmap_for_another_disk_size_is_a_conflict(state: StateDir) -> None:
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    store.add("b")
    write(store, 0, 1)
    store.close()
    files = {p.name: p.read_bytes() for p in state.bitmaps_dir.iterdir()}
    fds = len(os.listdir("/proc/self/fd"))

    for size in (DISK + G, DISK - 1, 0):
        for recording in (True, False):
            error = expect(
                errors.Conflict,
                "disk-size-mismatch",
                lambda: BitmapStore(state, size, recording=recording, granularity=G),  # noqa: B023
            )
            assert str(DISK) in error.message
            assert str(size) in error.message
    assert {p.name: p.read_bytes() for p in state.bitmaps_dir.iterdir()} == files
    assert len(os.listdir("/proc/self/fd")) == fds

    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert dirty(store, OPEN_CHECKPOINT) == dirty(store, "b") == {0}
    finally:
        store.close()


def test_corrupt_bitmap_refuses_to_open_the_store(state: StateDir) -> None:
    BitmapStore(state, DISK, recording=False, granularity=G).close()
    path = state.bitmap_path(OPEN_CHECKPOINT)
    with path.open("r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(errors.Corrupt, match=str(path)):
        BitmapStore(state, DISK, recording=True, granularity=G)


def test_a_bitmap_a_scan_is_filling_cannot_be_made_to_look_complete(store: BitmapStore) -> None:
    """Regression guard: clear/enable/merge on a half-built bitmap would make
    it consistent and exported while it misses differences."""
    store.scan_begin("half", disk=SEEN)
    changes: list[Callable[[], object]] = [
        lambda: store.clear("half"),
        lambda: store.enable("half"),
        lambda: store.disable("half"),
        lambda: store.merge("half", [OPEN_CHECKPOINT]),
    ]
    for change in changes:
        with pytest.raises(errors.Conflict) as failed:
            change()
        assert failed.value.code == "scan-in-progress"
    scratch: list[Callable[[], object]] = [
        lambda: store.clear("@scan:half"),
        lambda: store.disable("@scan:half"),
        lambda: store.remove("@scan:half"),
    ]
    for change in scratch:
        with pytest.raises(errors.BadRequest) as refused:
            change()
        assert refused.value.code == "reserved-name"
    info = store.info("half")
    assert not info.consistent and not info.enabled
    store.remove("half")  # removing it forgets its scan too
    assert "half" not in store.bitmaps and "@scan:half" not in store.bitmaps


def headers_written(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Reason]:
    """Every header written for bitmap ``name`` from now on, as the
    inconsistency a reader of the file would see right after that write."""
    seen: list[Reason] = []
    original = BitmapFile.write_header

    def spy(self: BitmapFile, *, durable: bool = True) -> None:
        original(self, durable=durable)
        if self.path.name == f"{name}.bitmap":
            seen.append(inconsistency(self.header))

    monkeypatch.setattr(BitmapFile, "write_header", spy)
    return seen


def test_restarting_a_scan_never_writes_a_consistent_header_over_cleared_bits(
    store: BitmapStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted scan clears what the interrupted one found; a kill between
    a header saying "consistent" and the next one would leave an empty
    bitmap that every backup trusts."""
    first = store.scan_begin("s", G, disk=SEEN)
    store.mark_ranges("s", [(0, G)])
    seen = headers_written(monkeypatch, "s")
    again = store.scan_begin("s", G, disk=SEEN, restart=True)
    assert again == {"resume": False, "granularity": G, "created_ns": first["created_ns"]}
    assert Reason.NONE not in seen
    assert dirty(store, "s") == set()
    assert not store.info("s").consistent


def test_rebuild_turns_an_inconsistent_bitmap_into_a_scan_and_keeps_writes(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a host crash: the bitmap's backup reference survives, the
    rebuild records writes from before it clears the bits, and at no moment
    does the file say consistent until the scan completes."""
    first = BitmapStore(state, DISK, recording=True, granularity=G)
    first.checkpoint("full", backup="nbd://backup/full")
    write(first, 0, G)
    first.close(clean=False)  # the tracker dies with @open recording...
    monkeypatch.setenv(BOOT_ID_ENV, "00000000-0000-0000-0000-00000000000b")  # ...and the host
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert not store.info(OPEN_CHECKPOINT).consistent
        assert store.info(OPEN_CHECKPOINT).backup == "nbd://backup/full"
        with pytest.raises(errors.Conflict, match="nothing to rebuild"):
            store.scan_begin("full", G, disk=SEEN, rebuild=True)  # consistent: nothing to rebuild
        seen = headers_written(monkeypatch, OPEN_CHECKPOINT)
        gen, token = store.begin_write(5 * G, 1)  # in flight across the start
        begun = store.scan_begin(OPEN_CHECKPOINT, G, disk=SEEN, rebuild=True)
        store.end_write(gen, token)
        write(store, 9 * G, 1)
        assert Reason.NONE not in seen
        assert dirty(store, OPEN_CHECKPOINT) == set()  # the old bits went
        with pytest.raises(errors.Conflict):
            store.checkpoint("during")  # half a rebuild is not an interval
        store.mark_ranges(OPEN_CHECKPOINT, [(2 * G, 1)])  # what the scan found
        info = store.scan_complete(OPEN_CHECKPOINT, begun["created_ns"])
        assert info.consistent and info.recording
        assert dirty(store, OPEN_CHECKPOINT) == {2, 5, 9}
        assert store.info(OPEN_CHECKPOINT).backup == "nbd://backup/full"
        result = store.checkpoint("next", backup="nbd://backup/next")
        assert result.dirty_bytes == 3 * G
        assert store.info("next").backup == "nbd://backup/full"
        assert store.info(OPEN_CHECKPOINT).backup == "nbd://backup/next"
    finally:
        store.close()


def test_aborting_a_rebuild_of_the_open_interval_keeps_it_recording(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = BitmapStore(state, DISK, recording=True, granularity=G)
    first.checkpoint("full", backup="nbd://backup/full")
    first.close(clean=False)
    monkeypatch.setenv(BOOT_ID_ENV, "00000000-0000-0000-0000-00000000000c")
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        store.scan_begin(OPEN_CHECKPOINT, G, disk=SEEN, rebuild=True)
        store.scan_abort(OPEN_CHECKPOINT)
        info = store.info(OPEN_CHECKPOINT)
        assert info.recording and not info.consistent
        assert "aborted" in info.reason
        write(store, 3 * G, 1)
        assert 3 in dirty(store, OPEN_CHECKPOINT)
        assert store.checkpoint("after").dirty_bytes >= G  # and checkpoints go on
    finally:
        store.close()


# -- a checkpoint failing inside its locked section -------------------------------------


def failing_rename(
    monkeypatch: pytest.MonkeyPatch, *fail: tuple[str, str]
) -> list[tuple[str, str]]:
    """os.rename that fails with EIO for these (source name, target name)."""
    real = os.rename
    calls: list[tuple[str, str]] = []

    def rename(src: str | Path, dst: str | Path) -> None:
        pair = (Path(src).name, Path(dst).name)
        calls.append(pair)
        if pair in fail:
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    return calls


STAGED = (".@open.staging", "@open.bitmap")
UNDO = ("cp1.bitmap", "@open.bitmap")


def test_a_checkpoint_whose_second_rename_fails_is_undone(
    store: BitmapStore, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(store, 6 * G, 1)
    failing_rename(monkeypatch, STAGED)
    with pytest.raises(errors.StorageError, match="checkpoint cp1 failed"):
        store.checkpoint("cp1")
    monkeypatch.undo()
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)
    assert state.names() == [OPEN_CHECKPOINT]
    write(store, 9 * G, 1)
    assert on_disk(state, OPEN_CHECKPOINT) == {6, 9}
    assert store.checkpoint("cp1").dirty_bytes == 2 * G


def test_a_checkpoint_that_cannot_undo_its_first_rename_loses_no_write(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both the rename and its undo fail: the frozen file stays under the
    checkpoint's name and goes on recording (an over-report); no clean
    @open is left for the export, and the next start puts it back."""
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        write(store, 6 * G, 1)
        failing_rename(monkeypatch, STAGED, UNDO)
        with pytest.raises(errors.StorageError):
            store.checkpoint("cp1")
        monkeypatch.undo()
        monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)
        assert not state.bitmap_path(OPEN_CHECKPOINT).exists()
        write(store, 9 * G, 1)
        assert on_disk(state, "cp1") == {6, 9}
    finally:
        store.close()
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert state.names() == [OPEN_CHECKPOINT]
        assert store.info(OPEN_CHECKPOINT).consistent
        assert dirty(store, OPEN_CHECKPOINT) == {6, 9}
    finally:
        store.close()


def test_a_checkpoint_whose_directory_fsync_fails_marks_the_file_it_names(
    store: BitmapStore, state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both renames stood: the store follows them (the tracker marks what
    the export serves as @open), and the frozen bitmap stays IN_USE, so a
    host crash before the directory is durable makes it inconsistent."""
    write(store, 6 * G, 1)

    def fsync_fails(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("dirtydiff.checkpoints.fsync_dir", fsync_fails)
    with pytest.raises(errors.StorageError, match="could not make it durable"):
        store.checkpoint("cp1")
    monkeypatch.undo()
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)
    write(store, 9 * G, 1)
    assert on_disk(state, OPEN_CHECKPOINT) == {9}
    assert on_disk(state, "cp1") == {6}
    assert state.read_header("cp1").flags & Flag.IN_USE
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_B)
    assert inconsistency(state.read_header("cp1")) is Reason.HOST_CRASH


# -- scans left behind ------------------------------------------------------------------


def test_a_tracker_records_for_every_unfinished_scan_and_reaps_finished_ones(
    state: StateDir,
) -> None:
    """An offline scan (no @scan:NAME: nothing wrote meanwhile) and an
    offline rebuild of @open are left unfinished; a tracker that starts
    records into a @scan:NAME for each before its first write, so that
    either resumes with every write since. A @scan:NAME left by a kill
    right after its scan completed goes."""
    offline = BitmapStore(state, DISK, recording=False, granularity=G)
    offline.scan_begin("s", G, disk=SEEN)
    offline.add("done")
    offline.close()
    BitmapFile.create(
        state.bitmap_path("@scan:done"), granularity=G, disk_size=DISK, flags=Flag.ENABLED
    ).close()

    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        assert "@scan:done" not in store.bitmaps
        assert store.info("@scan:s").recording
        write(store, 0, 1)
    finally:
        store.close()

    offline = BitmapStore(state, DISK, recording=False, granularity=G)
    try:
        begun = offline.scan_begin("s", G, disk=SEEN)
        assert begun["resume"]
        info = offline.scan_complete("s", begun["created_ns"])
        assert info.consistent and dirty(offline, "s") == {0}
        assert "@scan:s" not in offline.bitmaps
    finally:
        offline.close()


def test_an_offline_rebuild_of_the_open_interval_resumes_with_a_trackers_writes(
    state: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_host(state, monkeypatch, disabled="d")
    offline = BitmapStore(state, DISK, recording=False, granularity=G)
    offline.checkpoint("c1", backup="nbd://backup/c1")  # @open: consistent again
    offline.close()
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    store.close(clean=False)  # recording at a second crash
    monkeypatch.setenv(BOOT_ID_ENV, BOOT_A)
    offline = BitmapStore(state, DISK, recording=False, granularity=G)
    offline.scan_begin(OPEN_CHECKPOINT, G, disk=SEEN, rebuild=True)
    offline.close()  # killed half way

    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        write(store, 4 * G, 1)
    finally:
        store.close()
    offline = BitmapStore(state, DISK, recording=False, granularity=G)
    try:
        begun = offline.scan_begin(OPEN_CHECKPOINT, G, disk=SEEN, rebuild=True)
        assert begun["resume"]
        info = offline.scan_complete(OPEN_CHECKPOINT, begun["created_ns"])
        assert info.consistent and 4 in dirty(offline, OPEN_CHECKPOINT)
    finally:
        offline.close()


def test_a_scan_completes_only_the_bitmap_it_began(store: BitmapStore) -> None:
    first = store.scan_begin("s", G, disk=SEEN)
    store.remove("s")
    store.scan_begin("s", G, disk=SEEN)
    with pytest.raises(errors.Conflict) as other:
        store.scan_complete("s", first["created_ns"])
    assert other.value.code == "other-bitmap"
    assert not store.info("s").consistent


def test_a_scan_of_a_disk_not_proven_to_be_this_one_prepares_nothing(
    store: BitmapStore,
) -> None:
    for seen, code in (
        (DiskSeen("small.raw", G, file=FILE), "disk-size-mismatch"),
        (DiskSeen("other.raw", DISK, file=("file", 1, 3)), "wrong-disk"),
        (DiskSeen("nbd://x", DISK, tracker="0" * 32), "wrong-disk"),
        (DiskSeen("nbd://x", DISK), "unproven-disk"),
    ):
        with pytest.raises(errors.Conflict) as refused:
            store.scan_begin("s", G, disk=seen)
        assert refused.value.code == code
        assert "s" not in store.bitmaps and "@scan:s" not in store.bitmaps
    tracker_id = store.state.disk().id  # type: ignore[union-attr]
    assert store.scan_begin("s", G, disk=DiskSeen("nbd://t", DISK, tracker=tracker_id))


def test_an_open_interval_found_not_recording_records_and_is_inconsistent(
    state: StateDir,
) -> None:
    """What an older dirtydiff let `bitmap disable @open` leave: writes were
    missed while it did not record, and the next checkpoint would have
    claimed they did not happen."""
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    store.bitmaps[OPEN_CHECKPOINT].header.flags &= ~Flag.ENABLED
    store.bitmaps[OPEN_CHECKPOINT].write_header()
    store.close()
    store = BitmapStore(state, DISK, recording=True, granularity=G)
    try:
        info = store.info(OPEN_CHECKPOINT)
        assert info.recording and not info.consistent
        assert info.reason == Reason.NOT_RECORDING.describe()
        write(store, 0, 1)
        assert dirty(store, OPEN_CHECKPOINT) == {0}
        assert not store.info(store.checkpoint("cp").name).consistent
        assert store.info(OPEN_CHECKPOINT).consistent
    finally:
        store.close()

"""Target: the tracker's control socket (``ControlServer`` over a live,
recording ``BitmapStore``), a stream of frames per input.

Every whole frame gets one reply, ok or a structured error; only a framing
error ends the connection; a request that failed leaves every file of the
state directory as it was; and a client connected since the start, and a new
one, are still answered.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import control
from dirtydiff.store import BitmapStore
from nbd_plugins.control_server import ControlServer
from tests.fuzz.harness import (
    SIZE,
    Memory,
    control_exchange,
    control_socket,
    make_state,
    ping,
)


@dataclass
class ControlTarget:
    path: Path
    state: Path | None  # set: failed requests must change nothing there
    bystander: socket.socket
    memory: Memory | None = None
    # The request that shows the server still serves. The sidecar's "ping"
    # goes on to the tracker (or the state lock) and fails while a scan some
    # input started holds the lock; "scan.list" is its own.
    probe: str = "ping"

    def run(self, data: bytes) -> list[control.Message]:
        replies = control_exchange(self.path, data, self.state)
        ping(self.path, self.bystander, self.probe)
        ping(self.path, op=self.probe)
        if self.memory is not None:
            self.memory.sample()
        return replies


class InProcessTracker:
    """The tracker's control server and store, without nbdkit."""

    def __init__(self, state_path: Path) -> None:
        state = make_state(state_path)
        lock = state.try_lock()
        assert lock is not None
        self.lock = lock
        self.store = BitmapStore(state, SIZE, recording=True)
        self.server = ControlServer(state.socket_path, self.store)
        self.server.start()
        self.path = state.socket_path

    def close(self) -> None:
        self.server.close()
        self.store.close()
        self.lock.release()


# The one target of an atheris run, made once by _setup (libFuzzer calls
# one_input with nothing but the bytes).
_targets: list[ControlTarget] = []


def _setup() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-control-"))
    tracker = InProcessTracker(tmp / "state")
    _targets.append(
        ControlTarget(
            tracker.path, tmp / "state", control_socket(tracker.path), Memory(os.getpid())
        )
    )


def one_input(data: bytes) -> None:
    _targets[0].run(data)


if __name__ == "__main__":
    from tests.fuzz.atheris_main import fuzz

    fuzz(one_input, _setup)

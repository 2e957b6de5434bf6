"""Target: the sidecar's NBD server, a whole client session per input.

Each input is sent to a live server while its replies are read; with the
hostile client still connected, a client connected since the start and a new
one must read the same data and block status as before; then the hostile
client hangs up and the server must close its side within the deadline.
Memory is sampled after every input.

Under atheris the server runs in this process (``InProcessNbd``) so that
libFuzzer sees its branches; tests/test_fuzz.py also runs the same check
against ``dirtydiff serve``. With ``DIRTYDIFF_FUZZ_TLS=1`` the server
requires TLS (certificates made at start), so the inputs exercise the option
phase before STARTTLS, and STARTTLS followed by whatever comes; the
bystander reads over TLS (tests/test_fuzz_tls.py runs the same).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dirtydiff import nbdproto as proto
from sidecar.export.tls import TlsCreds
from tests.fuzz.harness import (
    SESSION_DEADLINE,
    Bystander,
    InProcessNbd,
    Memory,
    Outcome,
    RawSession,
    make_disk,
    make_state,
)

GREETING = proto.SERVER_GREETING.pack(
    proto.NBDMAGIC, proto.IHAVEOPT, proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES
)


@dataclass
class NbdTarget:
    sock: Path
    bystander: Bystander
    memory: Memory

    def run(self, data: bytes) -> Outcome:
        with RawSession(self.sock) as hostile:
            hostile.pump(data, SESSION_DEADLINE)
            self.bystander.check()  # while the hostile client is still connected
            outcome = hostile.finish()
        assert outcome.head.startswith(GREETING) or (
            outcome.received < len(GREETING) and GREETING.startswith(outcome.head)
        ), bytes(outcome.head[:32])
        self.memory.sample()
        return outcome


# The one target of an atheris run, made once by _setup (libFuzzer calls
# one_input with nothing but the bytes).
_targets: list[NbdTarget] = []


def _setup() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-nbd-"))
    disk = make_disk(tmp / "disk.raw")
    if os.environ.get("DIRTYDIFF_FUZZ_TLS"):
        from tests.tlspki import make_pki  # noqa: PLC0415

        pki = make_pki(tmp / "pki")
        server = InProcessNbd(disk, make_state(tmp / "state"), tmp / "nbd.sock",
                              TlsCreds(pki.server), pki.client)  # fmt: skip
    else:
        server = InProcessNbd(disk, make_state(tmp / "state"), tmp / "nbd.sock")
    _targets.append(NbdTarget(server.sock, Bystander(server.uri), Memory(os.getpid())))


def one_input(data: bytes) -> None:
    _targets[0].run(data)


if __name__ == "__main__":
    from tests.fuzz.atheris_main import fuzz

    fuzz(one_input, _setup)

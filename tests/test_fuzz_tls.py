"""The NBD fuzz target with TLS configured: ``dirtydiff serve --tls-creds
--tls-unix``, so that every input meets the option phase before STARTTLS
(all of it refused with NBD_REP_ERR_TLS_REQD, EXPORT_NAME closing), or a
STARTTLS followed by whatever the input holds where a ClientHello belongs.

The same checks as tests/test_fuzz.py: a bystander connected over TLS since
the start and a new TLS client read the same disk and block status after
every input, the hostile client is closed within the deadline, memory stays
flat. And one more: nothing an input gets back before TLS names the export,
its size or its bitmap.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Opt
from sidecar.export.tls import TlsCreds
from tests.conftest import Processes, Server
from tests.fuzz.harness import (
    BITMAP,
    SIZE,
    Bystander,
    InProcessNbd,
    Memory,
    make_disk,
    make_state,
    mutated,
    seeds,
)
from tests.fuzz.nbd_server import NbdTarget
from tests.test_fuzz import _session, fuzz_settings
from tests.tlspki import Pki, make_pki

NBD_SEEDS = seeds("nbd")
FLAGS = proto.CLIENT_FLAGS.pack(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)
STARTTLS = proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.STARTTLS, 0)
# What a session may hold where the ClientHello belongs: a real one's first
# bytes, a record header announcing too much, plain NBD options.
AFTER_STARTTLS = [
    b"\x16\x03\x01\x00\xa0\x01\x00\x00\x9c\x03\x03" + bytes(32),
    b"\x16\x03\x03\xff\xff",
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert first
    proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, 0),
]

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


@dataclass
class TlsServe:
    server: Server
    target: NbdTarget


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("fuzz-pki"))


@pytest.fixture(scope="module")
def serve_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServe]:
    tmp = tmp_path_factory.mktemp("serve-tls")
    procs = Processes(tmp)
    bystander = None
    try:
        disk = make_disk(tmp / "disk.raw")
        state = make_state(tmp / "state")
        sock = tmp / "serve.sock"
        server = procs.start(
            [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state.path),
             "--disk", str(disk), "--socket", str(sock), "--bitmap", BITMAP,
             "--tls-creds", str(pki.server), "--tls-unix"], sock,
        )  # fmt: skip
        bystander = Bystander(f"nbds+unix:///?socket={sock}&tls-certificates={pki.client}")
        yield TlsServe(server, NbdTarget(sock, bystander, Memory(server.proc.pid)))
        assert server.proc.poll() is None, server.stderr()
    finally:
        if bystander is not None:
            bystander.close()
        procs.stop_all()


def reveals_nothing(data: bytes) -> None:
    assert struct.pack("!Q", SIZE) not in data
    assert b"dirty-bitmap:" not in data


def run_checked(serve: TlsServe, data: bytes) -> None:
    outcome = serve.target.run(data)
    reveals_nothing(bytes(outcome.head))


@pytest.mark.parametrize("data", [d for _, d in NBD_SEEDS], ids=[n for n, _ in NBD_SEEDS])
def test_nbd_corpus_replays_before_tls(serve_tls: TlsServe, data: bytes) -> None:
    run_checked(serve_tls, data)


@pytest.mark.parametrize("after", AFTER_STARTTLS)
def test_starttls_then_anything(serve_tls: TlsServe, after: bytes) -> None:
    run_checked(serve_tls, FLAGS + STARTTLS + after)


@fuzz_settings(40)
@given(mutated([d for _, d in NBD_SEEDS]))
def test_nbd_mutated_sessions_with_tls(serve_tls: TlsServe, data: bytes) -> None:
    run_checked(serve_tls, data)


@fuzz_settings(40)
@given(_session(), st.sampled_from(AFTER_STARTTLS), st.booleans())
def test_nbd_generated_sessions_with_tls(
    serve_tls: TlsServe, session: bytes, after: bytes, upgrade: bool
) -> None:
    """A generated session, or its client flags then STARTTLS and a bad
    ClientHello before the rest of it."""
    data = session[:4] + STARTTLS + after + session[4:] if upgrade else session
    run_checked(serve_tls, data)


def test_in_process_server_with_tls_replays_the_corpus(pki: Pki, tmp_path: Path) -> None:
    """The atheris target's setup with DIRTYDIFF_FUZZ_TLS=1."""
    server = InProcessNbd(make_disk(tmp_path / "disk.raw"), make_state(tmp_path / "s"),
                          tmp_path / "nbd.sock", TlsCreds(pki.server), pki.client)  # fmt: skip
    bystander = None
    try:
        bystander = Bystander(server.uri)
        target = NbdTarget(server.sock, bystander, Memory(os.getpid()))
        for _, data in NBD_SEEDS[:20]:
            reveals_nothing(bytes(target.run(data).head))
        target.run(FLAGS + STARTTLS + AFTER_STARTTLS[0])
    finally:
        if bystander is not None:
            bystander.close()
        server.close()

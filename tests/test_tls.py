"""NBD over TLS: x509 certificates made by openssl (tests/tlspki.py), real
clients (nbdinfo, nbdcopy, qemu-img, libnbd's Python bindings) and
``qemu-nbd --tls-creds`` as the reference.

Two sidecars serve the same disk and bitmap: ``tcp`` on 127.0.0.1 with
``--tls-authz`` (so a client certificate of the CA with the listed DN is
required), and ``unix`` with ``--tls-unix`` and a short handshake limit (a
client certificate is asked for, not required). Every refusal must reveal
nothing (no export name, size or bitmap before TLS) and leave the server
serving a good client.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import nbd
import pytest

from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Opt, Rep
from sidecar.export.tls import Authz, TlsCreds, distinguished_name
from tests.conftest import DIRTYDIFF, ROOT, Processes, Server, qemu_bitmap_pair, run, stop
from tests.rawnbd import Outcome, RawClient, info_payload, meta_payload
from tests.tlspki import CLIENT_DN, INTRUDER_DN, Pki, make_pki

MiB = 1 << 20
SIZE = 16 * MiB
WRITES = ["write -P 0x11 1M 64k", "write -P 0x22 5M 1", "write -P 0x33 9M 3M", "write -z 14M 64k"]
HANDSHAKE_LIMIT = 4.0  # the unix sidecar's: what a stalled client waits, ample under load
BITMAP_CONTEXT = "qemu:dirty-bitmap:b0"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Served:
    raw: Path
    size: int
    port: int  # the tcp sidecar's, TLS with --tls-authz CLIENT_DN
    tcp: Server
    unix: Server  # --tls-unix, no --tls-verify-peer
    qemu: Server  # qemu-nbd --tls-creds -B b0 of the qcow2 twin, on a unix socket
    qemu_raw: Server  # qemu-nbd --tls-creds of the raw disk
    pki: Pki

    def nbds(self, client: Path, port: int | None = None) -> str:
        return f"nbds://127.0.0.1:{port or self.port}/?tls-certificates={client}"

    def nbds_unix(self, server: Server, client: Path) -> str:
        return f"nbds+unix:///?socket={server.sock}&tls-certificates={client}"


def serve_argv(state: Path, disk: Path, sock: Path, *extra: str) -> list[str]:
    return [*DIRTYDIFF, "serve", "--state", str(state), "--disk", str(disk),
            "--socket", str(sock), *extra]  # fmt: skip


def tcp_port(server: Server, deadline: float = 20.0) -> int:
    """The port the sidecar printed (it prints once it listens)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for line in server.stderr().splitlines():
            if "listening on tcp 127.0.0.1:" in line:
                return int(line.split("127.0.0.1:")[1].split()[0])
        assert server.proc.poll() is None, server.stderr()
        time.sleep(0.02)  # polling interval while waiting on a deadline
    raise TimeoutError(f"no tcp port printed: {server.stderr()}")


def qemu_tls_object(directory: Path, endpoint: str) -> str:
    return f"tls-creds-x509,id=tls0,dir={directory},endpoint={endpoint}"


@pytest.fixture(scope="module")
def served(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("tls")
    procs = Processes(tmp)
    try:
        raw, state, plain_reference = qemu_bitmap_pair(procs, tmp, SIZE, WRITES)
        stop(plain_reference.proc)  # the one below serves the same image over TLS
        qemu = procs.qemu_nbd(
            tmp / "ref.qcow2", "-r", "-B", "b0", "--object", qemu_tls_object(pki.server, "server"),
            "--tls-creds", "tls0", fmt="qcow2",
        )  # fmt: skip
        qemu_raw = procs.qemu_nbd(
            raw, "-r", "--object", qemu_tls_object(pki.server, "server"), "--tls-creds", "tls0"
        )
        authz = tmp / "authz.txt"
        authz.write_text(f"# the backup server\n{CLIENT_DN}\n")
        tcp = procs.start(serve_argv(
            state, raw, tmp / "tcp.sock", "--bitmap", "b0", "--tcp", "127.0.0.1:0",
            "--tls-creds", str(pki.server), "--tls-authz", str(authz),
            "--metrics", "127.0.0.1:0",
        ), tmp / "tcp.sock")  # fmt: skip
        # A second sidecar on the same disk needs its own state: copy the bitmap.
        state2 = tmp / "state2"
        state2.mkdir(mode=0o700)
        run([*DIRTYDIFF, "bitmap", "import", "--state", str(state2), "--disabled", "b0",
             "--from", tcp.uri, "--context", BITMAP_CONTEXT], cwd=ROOT)  # fmt: skip
        unix = procs.start(serve_argv(
            state2, raw, tmp / "unix.sock", "--bitmap", "b0", "--tls-creds", str(pki.server),
            "--tls-unix", "--handshake-limit", str(HANDSHAKE_LIMIT),
        ), tmp / "unix.sock")  # fmt: skip
        yield Served(raw, SIZE, tcp_port(tcp), tcp, unix, qemu, qemu_raw, pki)
    finally:
        procs.stop_all()


def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["nbdinfo", *args], check=check)


def assert_serves(served: Served) -> None:
    """The tcp sidecar still serves a good client: its data and bitmap."""
    h = nbd.NBD()
    try:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(served.pki.client))
        h.connect_tcp("127.0.0.1", str(served.port))
        assert h.get_tls_negotiated()
        assert h.pread(64 * 1024, 1 * MiB) == b"\x11" * 64 * 1024
    finally:
        h.shutdown()


def assert_reveals_nothing(text: str | bytes) -> None:
    """Nothing of the export is in ``text``: its size, its bitmap's name."""
    data = text.encode() if isinstance(text, str) else text
    assert struct.pack("!Q", SIZE) not in data
    assert str(SIZE).encode() not in data
    assert b"b0" not in data
    assert b"dirty-bitmap" not in data


# -- real clients ----------------------------------------------------------------


def test_nbdinfo_lists_the_export_over_tls(served: Served) -> None:
    found = json.loads(nbdinfo("--list", "--json", served.nbds(served.pki.client)).stdout)
    export = found["exports"][0]
    assert export["export-size"] == SIZE
    assert export["contexts"] == ["base:allocation", BITMAP_CONTEXT]
    assert found["TLS"] is True


def test_nbdcopy_over_tls_copies_the_disk(served: Served, tmp_path: Path) -> None:
    copy = tmp_path / "copy.raw"
    run(["nbdcopy", served.nbds(served.pki.client), str(copy)])
    assert copy.read_bytes() == served.raw.read_bytes()


def qemu_img_opts(served: Served, bitmap: bool = False) -> list[str]:
    opts = f"driver=nbd,host=127.0.0.1,port={served.port},tls-creds=tls0"
    if bitmap:
        opts += f",x-dirty-bitmap={BITMAP_CONTEXT}"
    return ["--object", qemu_tls_object(served.pki.client, "client"), "--image-opts", opts]


def test_qemu_img_reads_and_maps_over_tls(served: Served, tmp_path: Path) -> None:
    copy = tmp_path / "copy.raw"
    run(["qemu-img", "convert", "-O", "raw", *qemu_img_opts(served), str(copy)])
    assert copy.read_bytes() == served.raw.read_bytes()
    ours = json.loads(run(["qemu-img", "map", "--output=json",
                           *qemu_img_opts(served, bitmap=True)]).stdout)  # fmt: skip
    # qemu-nbd's, over TLS on its unix socket (QEMU wants a name to check there).
    opts = (f"driver=nbd,server.type=unix,server.path={served.qemu.sock},tls-creds=tls0,"
            f"tls-hostname=localhost,x-dirty-bitmap={BITMAP_CONTEXT}")  # fmt: skip
    theirs = json.loads(run(["qemu-img", "map", "--output=json", "--object",
                             qemu_tls_object(served.pki.client, "client"), "--image-opts",
                             opts]).stdout)  # fmt: skip
    assert any(not e["data"] for e in theirs)  # dirty extents show as data: false
    assert ours == theirs


def test_libnbd_python_reads_and_maps_over_tls(served: Served) -> None:
    h = nbd.NBD()
    try:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(served.pki.client))
        h.add_meta_context(BITMAP_CONTEXT)
        h.connect_tcp("127.0.0.1", str(served.port))
        assert h.get_tls_negotiated()
        assert h.get_size() == SIZE
        assert h.pread(3 * MiB, 9 * MiB) == b"\x33" * 3 * MiB
        dirty: list[tuple[int, int]] = []

        def collect(meta: str, offset: int, entries: list[int], err: int) -> int:
            position = offset
            for length, flags in zip(entries[::2], entries[1::2], strict=True):
                if meta == BITMAP_CONTEXT and flags & 1:
                    dirty.append((position, length))
                position += length
            return 0

        h.block_status(SIZE, 0, collect)
        assert (9 * MiB, 3 * MiB) in dirty
    finally:
        h.shutdown()


@pytest.mark.parametrize("context", ["base:allocation", BITMAP_CONTEXT])
def test_maps_over_tls_equal_qemu_nbd_tls(served: Served, context: str) -> None:
    ours = nbdinfo("--json", f"--map={context}", served.nbds(served.pki.client)).stdout
    reference = served.qemu if context == BITMAP_CONTEXT else served.qemu_raw
    theirs = nbdinfo(
        "--json", f"--map={context}", served.nbds_unix(reference, served.pki.client)
    ).stdout
    assert len(json.loads(theirs)) > 3
    assert ours == theirs


def test_tls_on_the_unix_socket(served: Served) -> None:
    # No client certificate: asked for, not required without --tls-verify-peer.
    found = json.loads(
        nbdinfo("--json", "--list", served.nbds_unix(served.unix, served.pki.nocert)).stdout
    )
    assert found["exports"][0]["export-size"] == SIZE
    plain = nbdinfo("--list", served.unix.uri, check=False)
    assert plain.returncode != 0
    assert_reveals_nothing(plain.stdout + plain.stderr)


# -- refusals --------------------------------------------------------------------


@pytest.mark.parametrize("client", ["plain", "otherca", "nocert", "intruder"], ids=str)
def test_refused_clients_learn_nothing_and_others_are_served(served: Served, client: str) -> None:
    """A plain client; one that trusts another CA (and has that CA's
    certificate); one with no certificate (verify-peer, implied by the authz
    list); one whose DN the authz list lacks."""
    if client == "plain":
        uri = f"nbd://127.0.0.1:{served.port}/"
    else:
        uri = served.nbds(getattr(served.pki, client))
    for argv in (["--list", "--json", uri], ["--map", uri]):
        refused = nbdinfo(*argv, check=False)
        assert refused.returncode != 0, refused.stdout
        assert_reveals_nothing(refused.stdout + refused.stderr)
    assert_serves(served)


def test_refusals_are_counted_in_metrics(served: Served) -> None:
    def refused() -> float:
        with urllib.request.urlopen(metrics_url(served.tcp), timeout=30) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("dirtydiff_nbd_errors_total{") and 'kind="tls"' in line:
                    return float(line.split()[-1])
        return 0.0

    before = refused()
    assert nbdinfo("--size", served.nbds(served.pki.intruder), check=False).returncode != 0
    assert refused() == before + 1


class TcpRawClient(RawClient):
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)


BEFORE_TLS = [
    (Opt.LIST, b""),
    (Opt.INFO, info_payload("", (proto.Info.NAME, proto.Info.BLOCK_SIZE))),
    (Opt.GO, info_payload("")),
    (Opt.STRUCTURED_REPLY, b""),
    (Opt.LIST_META_CONTEXT, meta_payload("", ())),
    (Opt.SET_META_CONTEXT, meta_payload("", (BITMAP_CONTEXT,))),
    (Opt.EXTENDED_HEADERS, b""),
    (99, b"some payload"),
    (Opt.STARTTLS, b"x"),  # STARTTLS with a payload: invalid
]


def pre_tls_session(c: RawClient) -> list[Outcome]:
    c.greet()
    return [tuple(kind for kind, *_ in c.option(o, p)) for o, p in BEFORE_TLS]


def test_options_before_starttls_get_tls_reqd_as_from_qemu_nbd(served: Served) -> None:
    outcomes = []
    for server in (served.qemu, served.unix):
        with RawClient(server.sock) as c:
            outcomes.append(pre_tls_session(c))
    theirs, ours = outcomes
    assert ours == theirs
    assert ours[:-1] == [(Rep.ERR_TLS_REQD,)] * (len(BEFORE_TLS) - 1)
    assert ours[-1] == (Rep.ERR_INVALID,)


def test_nothing_before_starttls_reveals_the_export(served: Served) -> None:
    with TcpRawClient(served.port) as c:
        c.greet()
        for option, payload in BEFORE_TLS:
            for reply in c.option(option, payload):
                assert reply[0] in (Rep.ERR_TLS_REQD, Rep.ERR_INVALID), reply
                said = reply[1]
                assert isinstance(said, bytes)
                assert_reveals_nothing(said)
        # An option too large to hold is still refused for want of TLS.
        c.send(proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.INFO, proto.MAX_OPTION + 1))
        c.send(bytes(proto.MAX_OPTION + 1))
        assert c.option_replies()[0][0] == Rep.ERR_TLS_REQD
    assert_serves(served)


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_export_name_before_tls_closes_the_connection(served: Served, where: str) -> None:
    client = TcpRawClient(served.port) if where == "tcp" else RawClient(served.unix.sock)
    with client as c:
        c.greet()
        c.send_option(Opt.EXPORT_NAME, b"")
        assert c.recv(1) is None  # closed, nothing sent
    assert_serves(served)


def test_abort_before_tls_ends_the_connection(served: Served) -> None:
    with TcpRawClient(served.port) as c:
        c.greet()
        replies = c.option(Opt.ABORT)
        assert replies[0][0] in (Rep.ACK, Rep.ERR_TLS_REQD)  # qemu-nbd: TLS_REQD
        assert c.closed()


def starttls(c: RawClient) -> None:
    c.greet()
    assert c.option(Opt.STARTTLS)[0][0] == Rep.ACK


def test_garbage_after_starttls_ends_the_connection(served: Served) -> None:
    with TcpRawClient(served.port) as c:
        starttls(c)
        c.send(os.urandom(4096))
        # An alert at most, then the end; never an option reply in the clear.
        received = b""
        while (chunk := c.sock.recv(4096)) != b"":
            received += chunk
        assert proto.OPTION_REPLY_MAGIC.to_bytes(8, "big") not in received
        assert_reveals_nothing(received)
    assert_serves(served)


def client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    context.load_cert_chain(str(pki.client / "client-cert.pem"),
                            str(pki.client / "client-key.pem"))  # fmt: skip
    return context


def test_options_sent_in_the_clear_after_starttls_are_never_served(served: Served) -> None:
    """STARTTLS and a GO in one packet, then a real TLS handshake: the GO
    came in the clear (anyone on the path could have put it there), so it
    must never be answered as if it had come inside TLS."""
    with TcpRawClient(served.port) as c:
        c.greet()
        c.send(proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.STARTTLS, 0)
               + proto.OPTION_HEADER.pack(proto.IHAVEOPT, Opt.GO, len(info_payload("")))
               + info_payload(""))  # fmt: skip
        assert c.option_replies() == [(Rep.ACK, b"")]
        try:
            c.sock = client_context(served.pki).wrap_socket(c.sock, server_hostname="127.0.0.1")
            c.sock.settimeout(5)
            answered = c.recv(proto.OPTION_REPLY.size)
        except (ssl.SSLError, OSError):
            answered = None  # refused before or in the TLS handshake
        assert answered is None
    assert_serves(served)


def test_a_second_starttls_is_invalid(served: Served) -> None:
    """Inside TLS, with Python's ssl on the client side."""
    with TcpRawClient(served.port) as c:
        starttls(c)
        c.sock = client_context(served.pki).wrap_socket(c.sock, server_hostname="127.0.0.1")
        assert c.option(Opt.STARTTLS)[0][0] == Rep.ERR_INVALID
        assert c.option(Opt.STRUCTURED_REPLY)[0][0] == Rep.ACK
        c.send_option(Opt.GO, info_payload("", ()))
        replies = c.option_replies()
        assert replies[0][0] == Rep.INFO
        assert replies[-1][0] == Rep.ACK


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_tls_client_that_reads_no_replies_holds_little(served: Served) -> None:
    """Reads of the local file over TLS are read into memory only as the TLS
    transport takes them: a client that never reads its replies makes the
    server hold a few MiB, not what it asked for, and others go on."""
    context = ssl.create_default_context(cafile=str(served.pki.client / "ca-cert.pem"))
    context.load_cert_chain(str(served.pki.client / "client-cert.pem"),
                            str(served.pki.client / "client-key.pem"))  # fmt: skip
    before = rss(served.tcp.proc.pid)
    with TcpRawClient(served.port) as c:
        starttls(c)
        c.sock = context.wrap_socket(c.sock, server_hostname="127.0.0.1")
        c.go("", ())
        for cookie in range(32):  # the whole disk each: 256 MiB in flight at a time
            c.request(proto.Cmd.READ, 0, SIZE, flags=proto.CmdFlag.DF, cookie=cookie)
        assert_serves(served)
        assert_serves(served)
        grown = rss(served.tcp.proc.pid) - before
        assert grown < 64 * MiB, grown
        # When it reads again, every reply comes, whole: the queue stopped
        # and started again as often as the transport asked.
        for _ in range(32):
            assert c.structured_reply() == [(proto.ReplyType.OFFSET_DATA, 8 + SIZE)]
    assert_serves(served)


def test_a_client_stalling_in_the_tls_handshake_is_dropped_at_the_limit(
    served: Served,
) -> None:
    with RawClient(served.unix.sock, timeout=30) as stalled:
        starttls(stalled)
        stalled.send(b"\x16\x03\x01\x02\x00\x01")  # the first bytes of a ClientHello
        started = time.monotonic()
        # Meanwhile another client is served, TLS and all.
        found = json.loads(
            nbdinfo("--json", "--list", served.nbds_unix(served.unix, served.pki.client)).stdout
        )
        assert found["exports"][0]["export-size"] == SIZE
        assert stalled.closed()
        waited = time.monotonic() - started
    assert HANDSHAKE_LIMIT * 0.5 <= waited <= HANDSHAKE_LIMIT + 10, waited


# -- the DN and the authz list ------------------------------------------------------


@pytest.mark.parametrize("name", ["client", "intruder", "otherca"])
def test_the_dn_is_the_one_openssl_prints(pki: Pki, name: str) -> None:
    cert = getattr(pki, name) / "client-cert.pem"
    printed = run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in",
                   str(cert)]).stdout.strip().removeprefix("subject=")  # fmt: skip
    decoded: Any = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    assert distinguished_name(decoded["subject"]) == printed
    assert printed in (CLIENT_DN, INTRUDER_DN)


def test_dn_escapes_as_rfc_4514() -> None:
    subject = ((("countryName", "GB"),), (("organizationName", "A, B+C"),),
               (("commonName", " #lead"), ("userId", "x=y ")))  # fmt: skip
    assert distinguished_name(subject) == "CN=\\ #lead+UID=x\\=y\\ ,O=A\\, B\\+C,C=GB"


def test_authz_lists(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text(f"# comment\n\n{CLIENT_DN}\n")
    assert Authz.load(plain).allows(CLIENT_DN)
    assert not Authz.load(plain).allows(INTRUDER_DN)
    qemu = tmp_path / "qemu.json"
    qemu.write_text(json.dumps({"policy": "deny", "rules": [
        {"match": INTRUDER_DN, "policy": "deny"},
        {"match": "CN=*,O=Dirtydiff Test", "policy": "allow", "format": "glob"},
    ]}))  # fmt: skip
    rules = Authz.load(qemu)
    assert rules.allows(CLIENT_DN)
    assert not rules.allows(INTRUDER_DN)
    assert not rules.allows("CN=backup1,O=Elsewhere")
    for bad in ('{"rules": [{"policy": "allow"}]}', '{"policy": "maybe"}', "{nope"):
        qemu.write_text(bad)
        with pytest.raises(Exception, match="--tls-authz"):
            Authz.load(qemu)


def test_verify_peer_is_implied_by_an_authz_list(pki: Pki, tmp_path: Path) -> None:
    authz = tmp_path / "authz"
    authz.write_text(CLIENT_DN)
    assert TlsCreds(pki.server, authz=authz).context.verify_mode == ssl.CERT_REQUIRED
    assert TlsCreds(pki.server).context.verify_mode == ssl.CERT_OPTIONAL


# -- serve's refusals at start ------------------------------------------------------


def serve_once(tmp_path: Path, *extra: str, timeout: float = 60) -> CompletedProcess[str]:
    tmp_path.mkdir(exist_ok=True)
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    return subprocess.run(serve_argv(state, disk, tmp_path / "s.sock", *extra),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          check=False)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("tcp", ["0.0.0.0:0", "[::]:0"])
def test_tcp_beyond_loopback_without_tls_is_refused(tmp_path: Path, tcp: str) -> None:
    line = one_line_error(serve_once(tmp_path, "--tcp", tcp))
    assert "--tls-creds" in line
    assert "--insecure-tcp" in line


def test_insecure_tcp_runs_with_a_warning(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\x5a" * MiB)
    sock = tmp_path / "s.sock"
    server = procs.start(serve_argv(state, disk, sock, "--tcp", "0.0.0.0:0", "--insecure-tcp"),
                         sock)  # fmt: skip
    end = time.monotonic() + 20
    while "listening on tcp" not in server.stderr() and time.monotonic() < end:
        time.sleep(0.02)  # polling interval while waiting on a deadline
    log = server.stderr()
    assert "--insecure-tcp" in log
    assert "no TLS" in log
    port = int(log.split("listening on tcp 0.0.0.0:")[1].split()[0])
    # Plain NBD, as asked, reached through loopback only.
    assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/"]).stdout.strip() == str(MiB)


def test_loopback_tcp_needs_no_tls(procs: Processes, tmp_path: Path, state: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    sock = tmp_path / "s.sock"
    server = procs.start(serve_argv(state, disk, sock, "--tcp", "localhost:0"), sock)
    end = time.monotonic() + 20
    while "listening on tcp" not in server.stderr() and time.monotonic() < end:
        time.sleep(0.02)  # polling interval while waiting on a deadline
    assert "no TLS" not in server.stderr()


def break_file(directory: Path, name: str, how: str) -> None:
    path = directory / name
    if how == "missing":
        path.unlink()
    elif how == "garbage":
        path.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:  # another certificate's key
        path.write_bytes((directory / "other-key.pem").read_bytes())


@pytest.mark.parametrize(
    ("name", "how"),
    [
        ("ca-cert.pem", "missing"),
        ("server-cert.pem", "missing"),
        ("server-key.pem", "missing"),
        ("ca-cert.pem", "garbage"),
        ("server-cert.pem", "truncated"),
        ("server-key.pem", "truncated"),
        ("server-key.pem", "another"),
    ],
)
def test_bad_credentials_are_refused_naming_the_file(
    pki: Pki, tmp_path: Path, name: str, how: str
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (creds / f).write_bytes((pki.server / f).read_bytes())
    (creds / "other-key.pem").write_bytes((pki.client / "client-key.pem").read_bytes())
    break_file(creds, name, how)
    line = one_line_error(serve_once(tmp_path, "--tls-creds", str(creds), "--tcp", "127.0.0.1:0"))
    assert str(creds / name) in line


def test_verify_peer_refuses_a_revoked_certificate_or_none(
    procs: Processes, pki: Pki, tmp_path: Path, state: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (creds / f).write_bytes((pki.server / f).read_bytes())
    (creds / "ca-crl.pem").write_bytes(pki.crl.read_bytes())
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    sock = tmp_path / "s.sock"
    procs.start(serve_argv(state, disk, sock, "--tls-creds", str(creds), "--tls-unix",
                           "--tls-verify-peer"), sock)  # fmt: skip
    uri = f"nbds+unix:///?socket={sock}&tls-certificates="
    assert nbdinfo("--size", uri + str(pki.client)).stdout.strip() == str(MiB)
    revoked = nbdinfo("--size", uri + str(pki.intruder), check=False)
    assert revoked.returncode != 0
    assert str(MiB) not in revoked.stdout
    # --tls-verify-peer alone (no authz list): no certificate, no entry.
    anonymous = nbdinfo("--size", uri + str(pki.nocert), check=False)
    assert anonymous.returncode != 0
    assert str(MiB) not in anonymous.stdout
    # A CRL that is no CRL stops the start, naming the file.
    (creds / "ca-crl.pem").write_text("-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
    line = one_line_error(serve_once(tmp_path / "again", "--tls-creds", str(creds), "--tls-unix"))
    assert str(creds / "ca-crl.pem") in line


def test_a_psk_directory_is_refused_clearly(tmp_path: Path) -> None:
    creds = tmp_path / "psk"
    creds.mkdir()
    (creds / "keys.psk").write_text("backup:0123456789abcdef\n")
    line = one_line_error(serve_once(tmp_path, "--tls-creds", str(creds), "--tcp", "0.0.0.0:0"))
    assert "TLS-PSK" in line
    assert "3.13" in line


@pytest.mark.parametrize("flag", [["--tls-verify-peer"], ["--tls-unix"], ["--tls-authz", "f"]])
def test_tls_options_need_tls_creds(tmp_path: Path, flag: list[str]) -> None:
    assert "--tls-creds" in one_line_error(serve_once(tmp_path, *flag))


# -- /metrics ------------------------------------------------------------------------


def metrics_url(server: Server) -> str:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        for line in server.stderr().splitlines():
            if line.startswith("dirtydiff serve: metrics on "):
                return line.split("metrics on ")[1].strip()
        time.sleep(0.02)  # polling interval while waiting on a deadline
    raise TimeoutError(server.stderr())


def test_metrics_over_https_want_a_client_certificate(
    procs: Processes, pki: Pki, tmp_path: Path, state: Path
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    sock = tmp_path / "s.sock"
    server = procs.start(serve_argv(state, disk, sock, "--metrics", "127.0.0.1:0",
                                    "--metrics-tls-creds", str(pki.server)), sock)  # fmt: skip
    url = metrics_url(server).replace("127.0.0.1", "localhost")
    assert url.startswith("https://")
    context = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    context.load_cert_chain(str(pki.client / "client-cert.pem"),
                            str(pki.client / "client-key.pem"))  # fmt: skip
    with urllib.request.urlopen(url, context=context, timeout=30) as reply:
        assert b"dirtydiff_" in reply.read()
    anonymous = ssl.create_default_context(cafile=str(pki.client / "ca-cert.pem"))
    with (
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        urllib.request.urlopen(url, context=anonymous, timeout=30) as reply,
    ):
        reply.read()
    # Plain HTTP on the https port gets no metrics.
    with (
        pytest.raises((ConnectionError, OSError, http.client.HTTPException)),
        urllib.request.urlopen(url.replace("https", "http"), timeout=30) as reply,
    ):
        assert b"dirtydiff_" not in reply.read()


def test_metrics_beyond_loopback_warn_without_tls(
    procs: Processes, tmp_path: Path, state: Path
) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(MiB))
    sock = tmp_path / "s.sock"
    server = procs.start(serve_argv(state, disk, sock, "--metrics", "0.0.0.0:0"), sock)
    url = metrics_url(server)
    assert "/metrics on 0.0.0.0:0 has no TLS" in server.stderr()
    port = url.rsplit(":", 1)[1].split("/")[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert b"dirtydiff_" in reply.read()


def test_cli_help_names_the_tls_options() -> None:
    out = run([sys.executable, "-m", "sidecar.cli", "serve", "--help"], cwd=ROOT).stdout
    for flag in ("--tls-creds", "--tls-verify-peer", "--tls-authz", "--tls-unix",
                 "--insecure-tcp", "--metrics-tls-creds"):  # fmt: skip
        assert flag in out


# -- the systemd drop-in -------------------------------------------------------------


def start_notified(argv: list[str], tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    """tests/test_systemd.py's, but running this checkout's code: the
    ``dirtydiff`` on PATH may be another checkout's editable install."""
    notify = tmp / f"{name}.notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(30)
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "NOTIFY_SOCKET": str(notify),
            "PYTHONPATH": str(ROOT),
        }
        log = (tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
        log.close()
        try:
            message = listener.recv(4096).decode()
        except BaseException:
            stop(proc)
            raise AssertionError((tmp / f"{name}.log").read_text()) from None
    return proc, message


def test_the_systemd_tls_drop_in_serves_tls(pki: Pki, tmp_path: Path) -> None:
    """The sidecar unit's ExecStart with the TLS_ARGS of
    systemd/dirtydiff-sidecar@.service.d/tls.conf (its directories moved
    into the test's): only a listed client reads the export."""
    from tests.test_systemd import UNITS, exec_start  # noqa: PLC0415

    drop_in = (UNITS / "dirtydiff-sidecar@.service.d" / "tls.conf").read_text()
    (tls_args,) = re.findall(r'^Environment="TLS_ARGS=(.*)"$', drop_in, flags=re.M)
    clients = tmp_path / "etc" / "vm1-clients"
    clients.parent.mkdir()
    clients.write_text(f"{CLIENT_DN}\n")
    tls_args = tls_args.replace("%i", "vm1").replace("/etc/pki/dirtydiff", str(pki.server))
    tls_args = tls_args.replace("/etc/dirtydiff", str(clients.parent))
    for d in ("lib/vm1", "run"):
        (tmp_path / d).mkdir(parents=True, mode=0o700)
    disk = tmp_path / "vm1.raw"
    disk.write_bytes(b"\x42" * MiB)
    # --tls-unix: the export's socket then wants TLS too, which needs no port here.
    conf = {"DISK": str(disk), "SERVE_ARGS": "--tls-unix", "TLS_ARGS": tls_args}
    tracker, _ = start_notified(
        exec_start("dirtydiff-track@.service", "vm1", conf, tmp_path), tmp_path, "track"
    )
    try:
        argv = exec_start("dirtydiff-sidecar@.service", "vm1", conf, tmp_path)
        assert "--tls-authz" in argv
        sidecar, message = start_notified(argv, tmp_path, "sidecar")
        try:
            assert message.startswith("READY=1")
            sock = tmp_path / "run" / "vm1-backup.sock"
            uri = f"nbds+unix:///?socket={sock}&tls-certificates="
            assert run(["nbdinfo", "--size", uri + str(pki.client)]).stdout.strip() == str(MiB)
            assert nbdinfo("--size", uri + str(pki.intruder), check=False).returncode != 0
            assert nbdinfo("--size", f"nbd+unix:///?socket={sock}", check=False).returncode != 0
        finally:
            assert stop(sidecar) == 0
    finally:
        assert stop(tracker) == 0

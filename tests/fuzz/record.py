"""Rebuild the fuzz corpus: ``python -m tests.fuzz.record``.

NBD seeds are recorded: real clients (nbdinfo, qemu-img, qemu-io, nbdcopy,
qemu-nbd --list, libnbd) talk to ``dirtydiff serve`` through a proxy that
writes down every byte the client sent. Then hand-made sessions for what no
well-behaved client sends. Control seeds are the exact frames the CLI sends
(``control.encode(control.request(...))``) for every op of both sockets, and
malformed frames. Entries named ``crash-*`` are regression seeds found by the
fuzzers: this script never removes them.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import nbd

from dirtydiff import control
from dirtydiff import nbdproto as proto
from dirtydiff.nbdproto import Cmd, CmdFlag, Opt
from tests.conftest import ROOT, Processes
from tests.fuzz.harness import BITMAP, CORPUS, DIRTY_CONTEXT, SIZE, make_disk, make_state
from tests.rawnbd import info_payload, meta_payload


class Recorder:
    """A unix-socket proxy that keeps what its one client sends upstream."""

    def __init__(self, listen: Path, upstream: Path) -> None:
        self.listen, self.upstream = listen, upstream
        self.sent = bytearray()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client, _ = self._server.accept()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(str(self.upstream))

        def pump(src: socket.socket, dst: socket.socket, keep: bool) -> None:
            with contextlib.suppress(OSError):
                while chunk := src.recv(1 << 20):
                    if keep:
                        self.sent += chunk
                    dst.sendall(chunk)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pump, args=(server, client, False), daemon=True)
        back.start()
        pump(client, server, True)
        back.join(30)
        client.close()
        server.close()

    def done(self) -> bytes:
        self._thread.join(30)
        self._server.close()
        self.listen.unlink(missing_ok=True)
        return bytes(self.sent)


def record(tmp: Path, upstream: Path, name: str, client: Callable[[str, Path], None]) -> None:
    sock = tmp / "record.sock"
    recorder = Recorder(sock, upstream)
    client(f"nbd+unix:///?socket={sock}", sock)
    (CORPUS / "nbd" / name).write_bytes(recorder.done())


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def image_opts(sock: Path, bitmap: bool = False) -> str:
    opts = f"driver=nbd,server.type=unix,server.path={sock}"
    return opts + (f",x-dirty-bitmap={DIRTY_CONTEXT}" if bitmap else "")


def libnbd_simple(uri: str, sock: Path) -> None:
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(uri)
    h.pread(4096, 0)
    h.pread(1000, SIZE - 1000)
    h.flush()
    h.cache(65536, 0)
    h.shutdown()


def libnbd_export_name(uri: str, sock: Path) -> None:
    h = nbd.NBD()
    h.set_handshake_flags(0)  # not fixed newstyle: NBD_OPT_EXPORT_NAME
    h.connect_uri(uri)
    h.pread(512, 0)
    h.shutdown()


def libnbd_opt_mode(uri: str, sock: Path) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.opt_list(lambda name, description: 0)
    h.opt_info()
    h.opt_list_meta_context(lambda name: 0)
    h.add_meta_context(proto.BASE_ALLOCATION)
    h.add_meta_context(DIRTY_CONTEXT)
    h.opt_go()
    h.block_status(SIZE, 0, lambda ctx, off, entries, err: 0)
    h.block_status(SIZE, 0, lambda ctx, off, entries, err: 0, nbd.CMD_FLAG_REQ_ONE)
    h.pread_structured(SIZE, 0, lambda buf, off, status, err: 0, nbd.CMD_FLAG_DF)
    h.shutdown()


def libnbd_abort(uri: str, sock: Path) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    h.opt_abort()


QEMU_IO_READS = ("-c", "read 0 64k", "-c", "read 1000 5000", "-c", "read 1044480 4096")
RECORDED: list[tuple[str, Callable[[str, Path], None]]] = [
    ("nbdinfo-map-allocation", lambda uri, sock: run("nbdinfo", "--map", uri)),
    ("nbdinfo-map-bitmap", lambda uri, sock: run("nbdinfo", f"--map={DIRTY_CONTEXT}", uri)),
    ("nbdinfo-info", lambda uri, sock: run("nbdinfo", uri)),
    ("nbdinfo-list", lambda uri, sock: run("nbdinfo", "--list", uri)),
    ("nbdcopy-to-null", lambda uri, sock: run("nbdcopy", "-C", "1", uri, "null:")),
    (
        "qemu-img-map-bitmap",
        lambda uri, sock: run(
            "qemu-img", "map", "--output=json", "--image-opts", image_opts(sock, bitmap=True)
        ),
    ),
    (
        "qemu-io-reads",
        lambda uri, sock: run("qemu-io", "-r", "--image-opts", image_opts(sock), *QEMU_IO_READS),
    ),
    ("qemu-nbd-list", lambda uri, sock: run("qemu-nbd", "--list", "-k", str(sock))),
    ("libnbd-simple-replies", libnbd_simple),
    ("libnbd-export-name", libnbd_export_name),
    ("libnbd-opt-mode", libnbd_opt_mode),
    ("libnbd-abort", libnbd_abort),
]


# -- hand-made NBD sessions ------------------------------------------------------

FLAGS = proto.CLIENT_FLAGS.pack(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)


def option(kind: int, payload: bytes = b"", magic: int = proto.IHAVEOPT) -> bytes:
    return proto.OPTION_HEADER.pack(magic, kind, len(payload)) + payload


def request(kind: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1) -> bytes:
    return proto.REQUEST.pack(proto.REQUEST_MAGIC, flags, kind, cookie, offset, length)


GO = (
    FLAGS
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.SET_META_CONTEXT, meta_payload("", (proto.BASE_ALLOCATION, DIRTY_CONTEXT)))
    + option(Opt.GO, info_payload(""))
)
DISC = request(Cmd.DISC)

MADE: dict[str, bytes] = {
    "made-unknown-client-flags": proto.CLIENT_FLAGS.pack(0x80 | 1),
    "made-bad-option-magic": FLAGS + option(Opt.LIST, magic=0x1234),
    "made-option-haggling": FLAGS
    + option(Opt.EXTENDED_HEADERS)
    + option(Opt.PEEK_EXPORT, b"xy")
    + option(0x7FFFFFFF, b"?")
    + option(Opt.STARTTLS)
    + option(Opt.LIST, b"x")
    + option(Opt.STRUCTURED_REPLY, b"zz")
    + option(Opt.SET_META_CONTEXT, meta_payload("", ("base:",)))
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.STRUCTURED_REPLY)
    + option(Opt.LIST_META_CONTEXT, meta_payload("", ("qemu:", "base:", "nope:")))
    + option(Opt.LIST_META_CONTEXT, meta_payload("nope", ()))
    + option(Opt.LIST_META_CONTEXT, b"\0\0")
    + option(Opt.INFO, info_payload("", (proto.Info.NAME, proto.Info.DESCRIPTION, 99)))
    + option(Opt.INFO, b"\0\0\0\x40\0\0")
    + option(Opt.INFO, info_payload("nope"))
    + option(Opt.GO, info_payload("nope"))
    + option(Opt.ABORT),
    "made-oversize-option": FLAGS + option(Opt.LIST)[:12] + struct.pack("!I", 0xFFFFFFFF),
    "made-option-just-over-limit": FLAGS
    + option(Opt.INFO, bytes(proto.MAX_OPTION + 1))
    + option(Opt.LIST),
    "made-export-name-unknown": FLAGS + option(Opt.EXPORT_NAME, b"nope"),
    "made-export-name-zeroes": proto.CLIENT_FLAGS.pack(proto.FLAG_C_FIXED_NEWSTYLE)
    + option(Opt.EXPORT_NAME)
    + request(Cmd.READ, 0, 512)
    + DISC,
    "made-truncated-go": FLAGS + option(Opt.GO, info_payload(""))[:20],
    "made-requests-every-kind": GO
    + b"".join(
        request(kind, offset, length, flags, cookie)
        for cookie, (kind, offset, length, flags) in enumerate(
            [
                (Cmd.READ, SIZE - 10, 20, 0),
                (Cmd.READ, SIZE, 0, 0),
                (Cmd.READ, 0, 33 << 20, 0),
                (Cmd.READ, 2**64 - 1, 1, 0),
                (Cmd.READ, 0, 4096, 0x8000),
                (Cmd.READ, 0, 4096, CmdFlag.DF | CmdFlag.FUA),
                (Cmd.BLOCK_STATUS, 0, 0, 0),
                (Cmd.BLOCK_STATUS, 0, 2**32 - 1, 0),
                (Cmd.BLOCK_STATUS, SIZE - 1, 1, CmdFlag.REQ_ONE),
                (Cmd.BLOCK_STATUS, 0, SIZE, CmdFlag.DF),
                (Cmd.TRIM, 0, 4096, 0),
                (Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.FAST_ZERO),
                (Cmd.FLUSH, 0, 0, 0),
                (Cmd.CACHE, 0, SIZE, 0),
                (Cmd.CACHE, SIZE, 1, 0),
                (Cmd.RESIZE, 0, 0, 0),
                (42, 0, 0, 0),
            ]
        )
    )
    + DISC,
    "made-write-to-read-only": GO
    + request(Cmd.WRITE, 0, 4096, CmdFlag.FUA)
    + b"\xab" * 4096
    + request(Cmd.READ, 0, 512, cookie=2)
    + DISC,
    "made-write-cut-short": GO + request(Cmd.WRITE, 0, 65536) + b"\xcd" * 1000,
    "made-many-in-flight": GO
    + b"".join(
        request(Cmd.READ if c % 2 else Cmd.BLOCK_STATUS, (c * 4096) % SIZE, 65536, cookie=c)
        for c in range(64)
    ),
    "made-bad-request-magic": GO
    + struct.pack("!IHHQQI", 0xDEADBEEF, 0, Cmd.READ, 1, 0, 512)
    + request(Cmd.READ, 0, 512, cookie=2),
    "made-disc-with-reads-in-flight": GO
    + b"".join(request(Cmd.READ, 0, SIZE, cookie=c) for c in range(8))
    + DISC
    + request(Cmd.READ, 0, 512, cookie=99),
    "made-simple-block-status": FLAGS
    + option(Opt.GO, info_payload(""))
    + request(Cmd.BLOCK_STATUS, 0, 512)
    + request(Cmd.READ, 0, SIZE)
    + DISC,
    "made-go-then-export-name": GO + option(Opt.EXPORT_NAME),
}


# -- control seeds ---------------------------------------------------------------


def req(op: str, **args: object) -> bytes:
    return control.encode(control.request(op, **args))


def raw(message: object) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return struct.pack("!I", len(payload)) + payload


CONTROL: dict[str, bytes] = {
    # Every op of the tracker's socket, as the CLI sends them.
    "ping-status-list": req("ping") + req("status") + req("bitmap.list"),
    "bitmap-lifecycle": req("bitmap.add", name="c1", granularity=4096, enabled=True)
    + req("bitmap.info", name="c1")
    + req("bitmap.mark", name="c1", ranges=[[0, 1], [4096, 8192]])
    + req("bitmap.disable", name="c1", timeout=5)
    + req("bitmap.enable", name="c1")
    + req("bitmap.clear", name="c1")
    + req("bitmap.remove", name="c1"),
    "merge": req("bitmap.add", name="m1", enabled=False)
    + req("bitmap.mark", name=BITMAP, ranges=[[65536, 1]])
    + req("bitmap.merge", target="m1", sources=[BITMAP, "@open"])
    + req("bitmap.remove", name="m1"),
    "checkpoint": req("checkpoint", name="cp1", timeout=5)
    + req("bitmap.info", name="cp1")
    + req("bitmap.remove", name="cp1"),
    "scan": req("scan.begin", name="s1", granularity=65536, restart=False)
    + req("bitmap.mark", name="s1", ranges=[[0, SIZE]])
    + req("scan.complete", name="s1")
    + req("scan.begin", name="s2")
    + req("scan.abort", name="s2")
    + req("bitmap.remove", name="s1"),
    "failing-requests": req("bitmap.add", name=BITMAP)
    + req("bitmap.add", name="g", granularity=3)
    + req("bitmap.add", name="../x")
    + req("bitmap.remove", name="nope")
    + req("bitmap.mark", name=BITMAP, ranges=[[SIZE, 1], [-1, 5]])
    + req("bitmap.merge", target=BITMAP, sources=[])
    + req("checkpoint", name=BITMAP, timeout=0)
    + req("scan.complete", name=BITMAP)
    + req("bitmap.disable", name=BITMAP, timeout=True)
    + req("ping"),
    # The sidecar's socket.
    "sidecar-scans": req("scan.status", name="nope")
    + req("scan.cancel", name="nope")
    + req(
        "scan.start",
        disk="/nonexistent/disk",
        backup="nbd+unix:///?socket=/nonexistent.sock",
        name="s9",
        granularity=65536,
        max_rate=1e6,
        chunk=1 << 20,
        in_flight=2,
    )
    + req("scan.status", name="s9")
    + req("scan.cancel", name="s9"),
    # Malformed.
    "bad-version-op-args": raw({"version": 2, "op": "ping"})
    + raw({"version": True, "op": "ping"})
    + raw({"version": 1.0, "op": "ping"})
    + raw({"version": 1, "op": "nope"})
    + raw({"version": 1, "op": 7})
    + raw({"version": 1, "op": "ping", "args": [1, 2]})
    + raw({"version": 1, "op": "bitmap.add", "args": {"name": 5, "granularity": "x"}})
    + raw({"version": 1})
    + raw({}),
    "not-a-map": raw([1, 2, 3]),
    "not-msgpack": struct.pack("!I", 3) + b"\xc1\xc1\xc1",
    "empty-frame": struct.pack("!I", 0),
    "int-keys": struct.pack("!I", 3) + b"\x81\x01\x02",
    "deep-nesting": struct.pack("!I", 2001) + b"\x91" * 2000 + b"\xc0",
    "oversize-length": struct.pack("!I", control.MAX_MESSAGE + 1),
    "huge-length": b"\xff\xff\xff\xff",
    "truncated-prefix": b"\0\0",
    "truncated-payload": req("ping")[:-3],
    "array-header-lies": struct.pack("!I", 6) + b"\xdd\xff\xff\xff\xff\xc0",
    "ext-and-timestamp": raw({"version": 1, "op": "ping", "args": {"x": msgpack.ExtType(5, b"x")}})
    + struct.pack("!I", 9)
    + b"\x81\xa1t\xd6\xff\x00\x00\x00\x00",
}


def main() -> None:
    for kind in ("nbd", "control"):
        directory = CORPUS / kind
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            if not old.name.startswith("crash-"):
                old.unlink()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        disk = make_disk(tmp / "disk.raw")
        state = make_state(tmp / "state")
        procs = Processes(tmp)
        try:
            sock = tmp / "serve.sock"
            procs.start(
                [sys.executable, "-m", "sidecar.cli", "serve", "--state", str(state.path),
                 "--disk", str(disk), "--socket", str(sock), "--bitmap", BITMAP], sock,
            )  # fmt: skip
            for seed, client in RECORDED:
                record(tmp, sock, seed, client)
        finally:
            procs.stop_all()
    for seed, data in MADE.items():
        (CORPUS / "nbd" / seed).write_bytes(data)
    for seed, data in CONTROL.items():
        (CORPUS / "control" / seed).write_bytes(data)
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"corpus: {total} bytes in {CORPUS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""The tracker's control socket: a thread serving msgpack requests.

Requests run one at a time (``_ops``): bitmap operations do file I/O outside
the store's hot-path lock, and two of them at once (two checkpoints, say)
would race on file names. A client that breaks framing gets an error reply and
is disconnected; other clients and the VM's I/O are not affected.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from pathlib import Path

from dirtydiff import control, errors, sockets
from dirtydiff.store import BitmapStore

log = logging.getLogger(__name__)


class ControlServer:
    def __init__(
        self,
        path: Path,
        store: BitmapStore,
        *,
        mode: int = 0o600,
        extra: dict[str, control.Extra] | None = None,
    ) -> None:
        self.path = path
        self.store = store
        self.extra = extra or {}  # requests of the tracker's own (stats)
        self._ops = threading.Lock()
        self._stopping = False
        # Born with its mode (no chmod on a path that may be swapped); a
        # socket left by a killed tracker is replaced, anything else refused.
        self._sock, self._file = sockets.bind(path, mode & 0o777)
        self._sock.listen(16)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="control", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    message = control.read_message(conn)
                except errors.ProtocolError as e:
                    log.warning("control client broke the protocol: %s", e.message)
                    self._send(conn, control.reply_error(e))
                    return
                except OSError:
                    return
                if message is None:
                    return
                with self._ops:
                    try:
                        reply = control.dispatch(self.store, message, self.extra)
                    except Exception as e:  # a bug must not kill the tracker
                        log.exception("control request failed")
                        reply = control.reply_error(errors.DirtydiffError("internal", str(e)))
                if not self._send(conn, reply):
                    return

    @staticmethod
    def _send(conn: socket.socket, reply: control.Message) -> bool:
        try:
            conn.sendall(control.encode_reply(reply))
            return True
        except OSError:
            return False

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):  # not connected: nothing to shut down
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._file.remove()  # only if the path still names our socket

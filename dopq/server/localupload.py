"""Uploads from this host through a Unix socket: an archive's bytes without TLS or Pyro.

Most users sit on the GPU server itself. Their ``dopq submit`` still begins and
finishes an upload through the API (signed in, judged, as from anywhere), but
may send the bytes in between through ``<state>/local/upload.sock``, which the
kernel copies at memory speed, where TLS and a call per 2 MiB chunk manage
about 100 MB/s on this kind of machine (a 1 GB checkpoint: 11 s).

The conversation, after ``connect``:

- the client sends one line, ``DOPQ-UPLOAD 1 <upload id>``, within
  ``server.handshake_timeout``, then exactly the bytes ``submit_begin``
  announced, then shuts down its sending side. With `` open`` after the id,
  the announced size is a bound and the end of the stream is the end: the
  client zips a folder straight into the socket, with no zip file between
  (``dopq.client.localsend``);
- the server answers one line, ``ok <bytes received>`` or ``error <why>``, and
  closes. The client then calls ``submit_finish`` as after chunks.

Who may call it: anyone who can reach the socket (0666, in a folder of
root's, 0711). The upload id is the key: 128 random bits that only the
signed-in user who began the upload got, over TLS; an upload takes one
stream, only before any chunk, and a wrong id changes nothing. Nothing is
decoded before the id is known but that one ASCII line of at most
``MAX_LINE`` bytes. The peer's uid (``SO_PEERCRED``) goes to the log.

Bounds: ``MAX_CONNECTIONS`` at once (one more is answered ``error busy``); a
read that waits longer than ``server.idle_timeout`` ends the stream; a stream
slower than ``MIN_RATE`` bytes a second overall is cut; a byte beyond the
announced size discards the upload (as chunks do). A stream that fails leaves
the upload empty again, so the client can send it in chunks instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from dopq.core.errors import DopqError
from dopq.core.settings import Settings
from dopq.server.hostfs import ensure_dir
from dopq.server.uploads import Uploads
from dopq.wire.localsocket import MAGIC, MAX_LINE, address, parse_request

log = logging.getLogger("dopq.server.localupload")

MAX_CONNECTIONS = 8
MIN_RATE = 1 << 20  # bytes a second, over the whole stream, after a minute's grace


def socket_path(settings: Settings) -> Path:
    return settings.state_path / "local" / "upload.sock"


class LocalUploads:
    """The socket's accept loop and one short-lived thread per connection."""

    def __init__(self, settings: Settings, uploads: Uploads) -> None:
        self.settings = settings
        self.uploads = uploads
        self.path = socket_path(settings)
        self.sock: socket.socket | None = None
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen on the socket; a failure is logged and local uploads are off."""
        try:
            ensure_dir(self.path.parent, 0o711)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a socket left by a crash: the folder is root's
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with address(str(self.path)) as where:
                sock.bind(where)
            os.chmod(self.path, 0o666)
            sock.listen(16)
        except (OSError, DopqError) as exc:
            log.warning("local uploads are off: %s: %s", self.path, exc)
            return
        self.sock = sock
        self._thread = threading.Thread(target=self._accept, name="dopq-local-uploads",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(5)

    @property
    def address(self) -> str:
        """The socket's path for clients, or '' while there is none."""
        return str(self.path) if self.sock is not None else ""

    def _accept(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)  # out of file descriptors, say: never a busy loop
                continue
            if not self.slots.acquire(blocking=False):
                _answer(conn, "error busy: too many local uploads at once")
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="dopq-local-upload",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _answer(conn, self._receive(conn))
        except Exception:  # never a dead thread's traceback as the only trace
            log.exception("local upload failed")
            _answer(conn, "error internal error; see the server log")
        finally:
            conn.close()
            self.slots.release()

    def _receive(self, conn: socket.socket) -> str:
        s = self.settings.server
        begun = time.monotonic()
        try:
            upload_id, open_ended = _read_line(conn, begun + s.handshake_timeout)
        except (OSError, ValueError) as exc:
            return f"error {exc or 'bad request'}"
        uid = _peer_uid(conn)
        conn.settimeout(s.idle_timeout)
        done = [0]

        def read(buf: memoryview) -> int:
            elapsed = time.monotonic() - begun
            if elapsed > 60 and done[0] < elapsed * MIN_RATE:
                raise TimeoutError("too slow")
            n = conn.recv_into(buf)
            done[0] += n
            return n

        try:
            received = self.uploads.receive(upload_id, read, open_ended)
        except DopqError as exc:
            log.info("local upload %s from uid %s refused: %s", upload_id[:8], uid, exc)
            return f"error {exc}"
        except OSError as exc:  # TimeoutError included
            log.info("local upload %s from uid %s cut: %s", upload_id[:8], uid, exc)
            return f"error stream cut: {exc.strerror or exc}"
        log.info("local upload %s from uid %s: %d bytes", upload_id[:8], uid, received)
        return f"ok {received}"


def _read_line(conn: socket.socket, deadline: float) -> tuple[str, bool]:
    """The request line's (upload id, open-ended), read a byte at a time (no byte of
    the data with it)."""
    line = bytearray()
    while len(line) <= MAX_LINE:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ValueError("no request line in time")
        conn.settimeout(left)
        try:
            byte = conn.recv(1)
        except TimeoutError:
            raise ValueError("no request line in time") from None
        if not byte:
            raise ValueError("closed before the request line")
        if byte == b"\n":
            request = parse_request(bytes(line))
            if request is None:
                raise ValueError(f"bad request line (expected '{MAGIC} <upload id>')")
            return request
        line += byte
    raise ValueError("request line too long")


def _peer_uid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    except OSError:
        return None


def _answer(conn: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):
        conn.settimeout(2.0)
        conn.sendall(" ".join(line.split())[:300].encode("utf-8", "replace") + b"\n")

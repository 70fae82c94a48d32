"""An upload's bytes through the server's local socket, when client and server share a host.

The server side and the conversation are ``dopq.server.localupload``. The client
uses the socket only when the server's API address is a loopback one, and
only when the socket's folder cannot have been planted by another user (not
writable by group or others; the socket and its folder of one owner, or of
root). Any failure leaves the upload empty and ``send`` says so: the caller
sends the same bytes in chunks through the API instead.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from dopq.core.context import zip_bound, zip_folder
from dopq.core.errors import DopqError, LimitExceeded
from dopq.wire.localsocket import address, request

SLICE = 32 << 20  # bytes per sendfile call, between progress reports


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_socket(path: str) -> bool:
    """True for a socket at an absolute ``path`` that no other user could have put there."""
    if not path or not os.path.isabs(path):
        return False
    try:
        sock = os.lstat(path)
        folder = os.lstat(os.path.dirname(path))
    except OSError:
        return False
    return (stat.S_ISSOCK(sock.st_mode) and stat.S_ISDIR(folder.st_mode)
            and not folder.st_mode & 0o022
            and folder.st_uid in (0, sock.st_uid))


def send(path: str, upload_id: str, src: BinaryIO, size: int,
         progress: Callable[[int, int], None] | None = None, timeout: float = 60.0) -> bool:
    """Send ``size`` bytes of ``src`` (from its start) as upload ``upload_id``; True when the
    server took them all, False when it did not (nothing of the upload is kept then)."""

    def write(conn: socket.socket) -> int:
        sent = 0
        while sent < size:
            n = conn.sendfile(src, sent, min(SLICE, size - sent))
            if not n:
                raise ValueError("the file shrank")
            sent += n
            if progress:
                progress(sent, size)
        return sent

    try:
        return _converse(path, request(upload_id), write, timeout) is not None
    finally:
        with contextlib.suppress(OSError):
            src.seek(0)


def stream_zip(path: str, upload_id: str, folder: Path,
               files: list[tuple[str, Path, os.stat_result]], bound: int,
               progress: Callable[[int, int], None] | None = None,
               timeout: float = 60.0) -> int | None:
    """Zip ``files`` of ``folder`` straight into the socket as the open-ended upload
    ``upload_id`` (announced as ``bound`` bytes at most); the bytes the server took,
    or None when it did not take them (the upload is empty again then)."""

    def write(conn: socket.socket) -> int:
        out = _SocketWriter(conn, bound, progress)
        with io.BufferedWriter(out, SLICE // 8) as buffered:
            zip_folder(folder, cast(BinaryIO, buffered), files)
        if progress:
            progress(out.sent, out.sent)
        return out.sent

    return _converse(path, request(upload_id, open_ended=True), write, timeout)


def _converse(path: str, line: bytes, write: Callable[[socket.socket], int],
              timeout: float) -> int | None:
    """Connect, send ``line``, let ``write`` send the bytes (their count), and return
    the count when the server's answer agrees; None on any failure."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            with address(path) as where:
                conn.connect(where)
            conn.sendall(line)
            sent = write(conn)
            conn.shutdown(socket.SHUT_WR)
            answer = _line(conn)
    except (OSError, ValueError):
        return None
    return sent if answer == f"ok {sent}" else None


class _SocketWriter(io.RawIOBase):
    """A socket as a file ``zipfile`` writes to (no seeking: it writes data descriptors)."""

    def __init__(self, conn: socket.socket, total: int,
                 progress: Callable[[int, int], None] | None) -> None:
        self.conn, self.total, self.progress, self.sent = conn, total, progress, 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.conn.sendall(data)
        n = len(data)
        self.sent += n
        if self.progress:
            self.progress(self.sent, max(self.total, self.sent))
        return n


def _line(conn: socket.socket, limit: int = 512) -> str:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = conn.recv(limit)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def socket_for(call: Callable[..., Any], host: Callable[[], str]) -> str:
    """The server's local socket when it may be used from here, else '' (a server not on
    a loopback address, ``DOPQ_LOCAL_UPLOADS=0``, an older server, a socket that could
    have been planted). ``call``: the client's API call; ``host``: the server's address."""
    if os.environ.get("DOPQ_LOCAL_UPLOADS", "1") == "0":
        return ""
    try:
        if not is_loopback(host()):
            return ""
        path = str(call("upload_socket") or "")
    except Exception:  # noqa: BLE001  no server found, or an older one: chunks, as before
        return ""
    return path if trusted_socket(path) else ""


def try_send(call: Callable[..., Any], host: Callable[[], str], upload_id: str,
             src: BinaryIO, size: int,
             progress: Callable[[int, int], None] | None = None) -> bool:
    """Send through the server's local socket when it may be used; whether it was."""
    path = socket_for(call, host)
    return bool(path) and send(path, upload_id, src, size, progress)


def submit_folder(call: Callable[..., Any], host: Callable[[], str], folder: Path,
                  files: list[tuple[str, Path, os.stat_result]], options: dict[str, Any],
                  check: dict[str, Any] | None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any] | None:
    """Submit ``folder`` zipped straight into the local socket: no zip file is written.
    The new job; None when the socket cannot be used (then nothing was left begun)."""
    path = socket_for(call, host)
    if not path:
        return None
    bound = zip_bound(files)
    try:
        upload = call("submit_begin", bound, options, check)
    except LimitExceeded:
        return None  # the bound may be over the limit where the zip is not: a zip file
    try:
        if stream_zip(path, upload, folder, files, bound, progress) is None:
            call("submit_abort", upload)
            return None
        job: dict[str, Any] = call("submit_finish", upload)
        return job
    except BaseException:
        with contextlib.suppress(DopqError):
            call("submit_abort", upload)
        raise

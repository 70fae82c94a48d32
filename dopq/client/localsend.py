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
import ipaddress
import os
import socket
import stat
from collections.abc import Callable
from typing import Any, BinaryIO

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
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            with address(path) as where:
                conn.connect(where)
            conn.sendall(request(upload_id))
            sent = 0
            while sent < size:
                n = conn.sendfile(src, sent, min(SLICE, size - sent))
                if not n:
                    return False  # the file shrank under us
                sent += n
                if progress:
                    progress(sent, size)
            conn.shutdown(socket.SHUT_WR)
            answer = _line(conn)
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            src.seek(0)
    return answer == f"ok {size}"


def _line(conn: socket.socket, limit: int = 512) -> str:
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = conn.recv(limit)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def try_send(call: Callable[..., Any], host: str, upload_id: str, src: BinaryIO, size: int,
             progress: Callable[[int, int], None] | None = None) -> bool:
    """Ask the server (``call``: the client's API call) for its socket and send through it
    when it may be used from here (``DOPQ_LOCAL_UPLOADS=0`` turns it off); whether it was."""
    if os.environ.get("DOPQ_LOCAL_UPLOADS", "1") == "0" or not is_loopback(host):
        return False
    try:
        path = str(call("upload_socket") or "")
    except Exception:  # noqa: BLE001  an older server has no such call: chunks, as before
        return False
    return trusted_socket(path) and send(path, upload_id, src, size, progress)

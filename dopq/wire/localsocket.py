"""The local upload socket's conversation, as both ends speak it.

The server's end is ``dopq.server.localupload`` (where the conversation is
told), the client's ``dopq.client.localsend``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

MAGIC = "DOPQ-UPLOAD 1"
MAX_LINE = 128  # bytes of the request line, its newline not counted
_REQUEST = re.compile(r"DOPQ-UPLOAD 1 ([0-9a-f]{32})( open)?")
OPEN = " open"  # after the id: the announced size is a bound, the stream's end is the end
_SUN_PATH = 100  # a Unix socket's address holds 107 bytes; longer paths go through /proc


def request(upload_id: str, open_ended: bool = False) -> bytes:
    return f"{MAGIC} {upload_id}{OPEN if open_ended else ''}\n".encode("ascii")


def parse_request(line: bytes) -> tuple[str, bool] | None:
    """(upload id, open-ended) of a request line (without its newline), or None."""
    match = _REQUEST.fullmatch(line.decode("ascii", "replace"))
    return (match.group(1), bool(match.group(2))) if match else None


@contextlib.contextmanager
def address(path: str) -> Iterator[str]:
    """``path`` as a socket address: itself, or when too long for one (a deep state
    folder) the same name through ``/proc/self/fd`` of its folder, held open meanwhile."""
    if len(os.fsencode(path)) < _SUN_PATH:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)

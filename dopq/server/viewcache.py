"""Encode once, send many: the delta snapshots as msgpack bytes, shared by every poller.

Fifty clients that hold the same version and poll while nothing changes ask
for the same reply. ``EncodedReplies`` keeps that reply encoded (an LRU keyed
by the from-version, the to-version and the history limit), so the server
neither rebuilds nor re-serializes the rows for each of them: a poll then
costs the same whether the queue holds ten jobs or ten thousand.

Visibility: the shared views (queued, running, finished, users, system,
timeline) are the same for every principal: they hold no private field (a
job's spec and image travel only in ``job``, for its owner and admins). The
key carries the visibility class all the same (``SHARED``), so a view that
one day differs per principal must name its own class and cannot be served
from another's bytes. What differs per call (the clock, ``whoami``) travels
beside the bytes, never inside them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dopq.wire.protocol import encode_reply

SHARED = "shared"  # the visibility class of the five views: every principal sees the same
KEEP = 64  # encoded replies kept: (from, to, limit) for the few versions clients hold

Key = tuple[str, int | None, int, int]


class EncodedReplies:
    """A bounded LRU of encoded replies; ``encodes`` counts the encodings done."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self.encodes = 0
        self._lru: OrderedDict[Key, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key, make: Callable[[], Any]) -> bytes:
        """The bytes for ``key``; ``make()`` builds the reply when they are not kept."""
        with self._lock:
            blob = self._lru.get(key)
            if blob is not None:
                self._lru.move_to_end(key)
                return blob
        blob = encode_reply(make())  # outside the lock: two racing callers encode twice, once
        with self._lock:
            self.encodes += 1
            self._lru[key] = blob
            self._lru.move_to_end(key)
            while len(self._lru) > self.keep:
                self._lru.popitem(last=False)
        return blob

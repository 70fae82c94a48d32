"""What the GUI and the CLI see, built once and shared by every client.

Fifty clients polling a queue of 10,000 jobs must not make the server read
and convert 10,000 rows fifty times a second. A background thread rebuilds
the views every ``ttl`` when the database or the queue's decision changed;
calls are served the newest version, and only a client that has just changed
something waits for a version that includes its change.
Versions are numbered, and the last few are kept, so a client that says which
version it has (``snapshot(since=V)``) gets only the queued jobs that changed,
the ids that left, and the queue order when it moved. Rows that did not change
are the very same objects in consecutive versions, so the diff is a pointer
comparison.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The fields of a queued job in the snapshot (small: they cross the wire often).
QUEUE_FIELDS = (
    "id", "name", "user", "state", "num_gpus", "gpu_memory", "submitted_at", "submitted_ts",
    "time_limit", "priority", "nice", "held", "array_index", "reason", "priority_value",
    "expected_start", "preemptible", "restarts",
)


@dataclass
class Version:
    number: int
    built_at: float
    key: Any
    queued: dict[int, dict[str, Any]]  # id -> row (no position, no wait: those move)
    order: list[int]  # queued ids in queue order
    rest: dict[str, Any] = field(default_factory=dict)  # running, finished, users, system
    generation: int = 0  # writes through the API seen by this version
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> row
    finished_order: list[int] = field(default_factory=list)  # newest first


class ViewCache:
    """Numbered, shared versions of the views, rebuilt at most once per ``ttl``."""

    def __init__(
        self,
        build: Callable[[Version | None], Version],
        key: Callable[[], Any],
        ttl: float = 0.5,
        keep: int = 16,
    ) -> None:
        self._build = build
        self._key = key
        self.ttl = ttl
        self._versions: deque[Version] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._building = threading.Lock()
        self._generation = 0
        # Numbers start from the clock, so a restarted server never reuses one
        # a client still holds.
        self._numbers = int(time.time() * 1000)

    def next_number(self) -> int:
        self._numbers += 1
        return self._numbers

    def invalidate(self) -> int:
        """A client changed something; returns the generation its reads must see."""
        with self._lock:
            self._generation += 1
            return self._generation

    def _newest(self) -> Version | None:
        with self._lock:
            return self._versions[-1] if self._versions else None

    def current(self, min_generation: int = 0) -> Version:
        """The newest version; built here only if none is new enough for this caller.

        Only a client that has just written waits for a rebuild (so that it
        reads its own write); everyone else gets the shared version, which the
        background ``refresh`` keeps at most ``ttl`` old.
        """
        last = self._newest()
        if last is not None and last.generation >= min_generation:
            return last
        with self._building:
            newest = self._newest()
            if newest is not None and newest.generation >= min_generation:
                return newest
            return self._rebuild(newest)

    def refresh(self) -> None:
        """Rebuild if the data changed (called every ``ttl`` by a background thread)."""
        last = self._newest()
        with self._lock:
            generation = self._generation
        if last is not None and last.generation >= generation and self._key() == last.key:
            return
        with self._building:
            self._rebuild(self._newest())

    def _rebuild(self, prev: Version | None) -> Version:
        with self._lock:
            generation = self._generation
        key = self._key()
        version = self._build(prev)
        version.key = key
        version.generation = generation
        version.built_at = time.monotonic()
        with self._lock:
            self._versions.append(version)
        return version

    def find(self, number: int) -> Version | None:
        with self._lock:
            for v in self._versions:
                if v.number == number:
                    return v
        return None


def keyed_delta(
    old: dict[int, dict[str, Any]] | None, old_order: list[int] | None,
    new: dict[int, dict[str, Any]], new_order: list[int],
) -> dict[str, Any]:
    """Rows keyed by job id as a change from ``old`` (in full when ``old`` is None)."""
    if old is None:
        return {"full": True, "rows": list(new.values()), "removed": [], "order": new_order}
    changed = [row for jid, row in new.items() if old.get(jid) is not row]
    removed = [jid for jid in old if jid not in new]
    return {"full": False, "rows": changed, "removed": removed,
            "order": None if new_order == old_order else new_order}


def queue_delta(old: Version | None, new: Version) -> dict[str, Any]:
    """The queued jobs as a change from ``old`` (or in full when ``old`` is None)."""
    return keyed_delta(old.queued if old else None, old.order if old else None,
                       new.queued, new.order)


def finished_delta(old: Version | None, new: Version) -> dict[str, Any]:
    """The finished jobs (newest first) as a change from ``old``."""
    return keyed_delta(old.finished if old else None, old.finished_order if old else None,
                       new.finished, new.finished_order)


def full_queue(version: Version, server_now: float) -> list[dict[str, Any]]:
    """The queue as a plain list in queue order, with position and waiting time."""
    out = []
    for pos, jid in enumerate(version.order, 1):
        row = dict(version.queued[jid])
        row["position"] = pos if row["state"] == "queued" else None
        row["wait_s"] = round(server_now - row["submitted_ts"], 3)
        out.append(row)
    return out

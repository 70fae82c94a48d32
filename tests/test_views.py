"""The shared view cache and the queue deltas (pure: no server)."""

from __future__ import annotations

import threading
from typing import Any

from dopq.client.remote import SnapshotFollower
from dopq.server.views import Version, ViewCache, full_queue, queue_delta


def _row(jid: int, state: str = "queued", prio: float = 1.0) -> dict[str, Any]:
    return {"id": jid, "name": f"j{jid}", "user": "alice", "state": state, "num_gpus": 1,
            "submitted_at": "x", "submitted_ts": 100.0 + jid, "time_limit": None,
            "priority": 0, "nice": 0, "held": False, "array_index": None,
            "reason": "Priority", "priority_value": prio}


class Source:
    """A queue that a test changes; builds versions the way the platform does."""

    def __init__(self) -> None:
        self.rows = {i: _row(i) for i in range(1, 6)}
        self.key = 0
        self.builds = 0
        self.numbers = 1000

    def build(self, prev: Version | None) -> Version:
        self.builds += 1
        old = prev.queued if prev else {}
        queued = {}
        for jid, row in self.rows.items():
            o = old.get(jid)
            queued[jid] = o if o == row else dict(row)
        self.numbers += 1
        return Version(self.numbers, 0.0, None, queued, sorted(queued), {})


def test_rebuilt_in_the_background_and_for_a_writer() -> None:
    src = Source()
    cache = ViewCache(src.build, lambda: src.key)
    v1 = cache.current()  # the first call builds
    src.key = 1
    assert cache.current() is v1 and src.builds == 1  # readers never wait for a rebuild
    cache.refresh()
    v2 = cache.current()
    assert v2 is not v1 and src.builds == 2
    cache.refresh()
    assert src.builds == 2  # nothing changed
    generation = cache.invalidate()  # a client wrote
    assert cache.current() is v2  # others: the shared version
    v3 = cache.current(generation)  # the writer: a version that includes the write
    assert v3 is not v2 and v3.generation >= generation


def test_readers_are_not_blocked_by_a_rebuild() -> None:
    src = Source()
    gate = threading.Event()
    entered = threading.Event()

    def slow_build(prev: Version | None) -> Version:
        if prev is not None:
            entered.set()
            gate.wait(5)
        return src.build(prev)

    cache = ViewCache(slow_build, lambda: src.key)
    first = cache.current()
    src.key = 1
    t = threading.Thread(target=cache.refresh)
    t.start()
    assert entered.wait(5)
    assert cache.current() is first  # not blocked by the rebuild
    gate.set()
    t.join(5)
    assert src.builds == 2 and cache.current() is not first


def test_delta_and_follower_rebuild_the_whole_queue() -> None:
    src = Source()
    cache = ViewCache(src.build, lambda: src.key, ttl=0.0)
    versions: dict[int, Version] = {}

    class Fake:
        def call(self, method: str, limit: int, since: int) -> dict[str, Any]:
            v = cache.current()
            versions[v.number] = v
            return {"version": v.number, "now": 200.0,
                    "queued_delta": queue_delta(versions.get(since), v)}

    follower = SnapshotFollower(Fake())
    snap = follower.update()
    assert [q["id"] for q in snap["queued"]] == [1, 2, 3, 4, 5]
    assert snap["queued"][0]["position"] == 1 and snap["queued"][0]["wait_s"] == 99.0
    src.rows[3] = _row(3, prio=7.0)
    del src.rows[1]
    src.rows[9] = _row(9, state="building")
    src.key += 1
    cache.refresh()
    v_before = max(versions)
    snap = follower.update()
    delta = queue_delta(versions[v_before], versions[max(versions)])
    assert not delta["full"] and delta["removed"] == [1]
    assert sorted(r["id"] for r in delta["rows"]) == [3, 9]  # unchanged rows do not travel
    expected = full_queue(versions[max(versions)], 200.0)
    assert snap["queued"] == expected
    assert [q["position"] for q in snap["queued"]] == [1, 2, 3, 4, None]

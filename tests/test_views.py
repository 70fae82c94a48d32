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


# -- GPU use in the views (issue #13): the sampler's report, read defensively --------------
G = 2**30


class _Info:
    def __init__(self, index: int, memory: int = 16 * G) -> None:
        self.index, self.name, self.uuid, self.memory_total = index, "GPU", f"GPU-{index}", memory


class _Workers:
    def __init__(self, report: Any) -> None:
        self.report = report

    def gpu_report(self) -> Any:
        if isinstance(self.report, Exception):
            raise self.report
        return self.report


def _running(jid: int, user: str, gpus: list[int], gpu_memory: int = 0) -> Any:
    from dopq.server.schema import JobRow

    return JobRow(id=jid, user=user, gpus=gpus, gpu_memory=gpu_memory)


def test_gpu_report_is_read_defensively() -> None:
    from dopq.server.viewbuilder import gpu_report

    jobs = {"7": {"gpu_memory_used": G, "gpu_utilisation": 3.0, "idle_since": None}}
    devices = [{"index": 0, "holders": [], "foreign": []}]
    assert gpu_report(_Workers({"jobs": jobs, "devices": devices})) == (
        {7: jobs["7"]}, {0: devices[0]})
    assert gpu_report(_Workers((jobs, devices)))[0] == {7: jobs["7"]}
    for nothing in ({}, None, RuntimeError("sampler broke"), "junk"):
        assert gpu_report(_Workers(nothing)) == ({}, {})
    assert gpu_report(object()) == ({}, {})  # a supervisor from before the sampler


def test_job_gpu_use_from_the_report_or_a_whole_jobs_devices() -> None:
    from dopq.server.viewbuilder import job_gpu_use

    samples = {0: {"utilization": 50.0, "memory_used": 2 * G},
               1: {"utilization": 70.0, "memory_used": 4 * G}}
    whole = _running(1, "alice", [0, 1])
    assert job_gpu_use(whole, None, samples) == {
        "gpu_memory_used": 6 * G, "gpu_utilisation": 60.0, "idle_since": None}
    shared = _running(2, "bob", [0], gpu_memory=4 * G)  # its part of GPU 0 is not known
    assert job_gpu_use(shared, None, samples) == {
        "gpu_memory_used": None, "gpu_utilisation": None, "idle_since": None}
    got = job_gpu_use(shared, {"gpu_memory_used": G, "gpu_utilisation": 0.0,
                               "idle_since": 0.0}, samples)
    assert got == {"gpu_memory_used": G, "gpu_utilisation": 0.0,
                   "idle_since": "1970-01-01T00:00:00.000Z"}


def test_device_rows_name_holders_from_the_store_and_use_from_the_report() -> None:
    from dopq.server.viewbuilder import device_rows

    running = [_running(1, "alice", [0], 4 * G), _running(2, "bob", [0], 6 * G),
               _running(3, "carl", [1])]
    reported = {0: {"index": 0, "uuid": "GPU-0", "memory": 16 * G, "used": 9 * G,
                    "holders": [{"job": 1, "user": "alice", "memory": 3 * G},
                                {"job": 99, "user": "gone", "memory": G}],  # ended since
                    "foreign": [{"pid": 42, "user": "dave", "memory": 2 * G}]},
                1000: {"index": 1000, "uuid": "MIG-x", "memory": 5 * G, "used": 0,
                       "holders": [], "foreign": []}}
    rows = device_rows([_Info(0), _Info(1), _Info(2)], running, {}, reported, {2})
    by = {r["index"]: r for r in rows}
    assert sorted(by) == [0, 1, 2, 1000]
    assert by[0]["holders"] == [
        {"job": 1, "user": "alice", "declared": 4 * G, "memory": 3 * G},
        {"job": 2, "user": "bob", "declared": 6 * G, "memory": None}]
    assert by[0]["foreign"] == [{"pid": 42, "user": "dave", "memory": 2 * G}]
    assert (by[0]["job"], by[0]["user"], by[0]["external"], by[0]["used"]) == (
        1, "alice", True, 9 * G)
    assert by[1]["holders"] == [{"job": 3, "user": "carl", "declared": 0, "memory": None}]
    assert (by[1]["memory"], by[1]["used"], by[1]["external"]) == (16 * G, None, False)
    assert (by[2]["job"], by[2]["holders"], by[2]["external"]) == (None, [], True)
    assert (by[1000]["uuid"], by[1000]["memory"], by[1000]["holders"]) == ("MIG-x", 5 * G, [])

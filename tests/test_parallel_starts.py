"""The starts of one decision run together (dopq.server.starter), with a fake engine.

Each start is still committed (queued -> running) before its container is
created; a failed start among them goes back to the scheduler; the
scheduler is only fed on the queue thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from test_scheduler_driver import FakeEngine

from dopq.core import settings as settings_mod
from dopq.core.errors import Conflict, EngineUnavailable
from dopq.core.jobs import JobState
from dopq.server.queue import PriorityQueueThread
from dopq.server.runtime import ContainerSpec
from dopq.server.starter import Starter
from dopq.server.store import Store


class GatedEngine(FakeEngine):
    """``run`` blocks until ``want`` calls are in flight at once (or a deadline passes)."""

    def __init__(self, owner: str, store: Store, want: int) -> None:
        super().__init__(owner)
        self.store, self.want = store, want
        self.barrier = threading.Barrier(want, timeout=10)
        self.lock = threading.Lock()
        self.in_flight = self.peak = 0
        self.states_at_run: dict[int, str] = {}
        self.threads: set[str] = set()
        self.fail: dict[int, Exception] = {}

    def run(self, spec: ContainerSpec) -> str:
        job_id = int(spec.labels["dopq.job"])
        self.states_at_run[job_id] = self.store.job(job_id)["state"]
        self.threads.add(threading.current_thread().name)
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            self.barrier.wait()  # raises BrokenBarrierError if they came one by one
            if job_id in self.fail:
                raise self.fail[job_id]
            return super().run(spec)
        finally:
            with self.lock:
                self.in_flight -= 1


def make_rig(tmp_path: Path, want: int) -> Any:
    settings = settings_mod.from_dict(make_config(tmp_path))
    store = Store(settings.db_path)
    engine = GatedEngine(store.owner_id(), store, want)
    q = PriorityQueueThread(settings, store, engine, [0, 1, 2, 3], "env")  # type: ignore[arg-type]
    q.starter.shutdown()
    q.starter = Starter(q, workers=4)  # the default is 1 (see START_WORKERS)
    q.container_spec = lambda row, gpus: ContainerSpec(  # type: ignore[method-assign]
        name=q.container_name(row["id"]), image="img",
        labels={"dopq.job": str(row["id"])}, gpus=gpus)
    fed: list[str] = []
    real = q.scheduler.handle

    def handle(event: Any, now: float) -> Any:
        fed.append(threading.current_thread().name)
        return real(event, now)

    q.scheduler.handle = handle  # type: ignore[method-assign]
    q.recover()

    def add(n: int) -> list[int]:
        return [store.add_job(name="job", user="alice", state=JobState.QUEUED, num_gpus=1,
                              submitted_at=q.clock()) for _ in range(n)]

    return q, store, engine, add, fed


@pytest.fixture
def rig4(tmp_path: Path) -> Any:
    q, store, *_ = r = make_rig(tmp_path, 4)
    yield r
    q._workers.shutdown(wait=True)
    q.starter.shutdown()
    store.close()


def test_four_starts_run_at_once_each_committed_first(rig4: Any) -> None:
    q, store, engine, add, fed = rig4
    jobs = add(4)
    q.step()
    q.scheduler.validate()
    assert engine.peak == 4  # the barrier let them through only together
    assert all(engine.states_at_run[j] == "running" for j in jobs)  # committed before run
    assert all(store.job(j)["state"] == "running" and store.job(j)["container"] for j in jobs)
    assert sorted(g for j in jobs for g in store.job(j)["gpus"]) == [0, 1, 2, 3]
    assert all(t.startswith("dopq-start") for t in engine.threads)
    assert not any(t.startswith("dopq-start") for t in fed)  # the scheduler: caller only


def test_a_failed_start_among_them_goes_back(rig4: Any) -> None:
    q, store, engine, add, fed = rig4
    jobs = add(4)
    engine.fail[jobs[1]] = RuntimeError("no such image")
    q.step()
    q.scheduler.validate()
    assert store.job(jobs[1])["state"] == "failed"
    assert "no such image" in store.job(jobs[1])["error"]
    assert [store.job(j)["state"] for j in (jobs[0], jobs[2], jobs[3])] == ["running"] * 3
    assert jobs[1] not in q.scheduler.running and len(q.pool.free()) == 1
    assert not any(t.startswith("dopq-start") for t in fed)


def test_an_engine_lost_mid_batch_requeues_and_raises(rig4: Any) -> None:
    q, store, engine, add, fed = rig4
    jobs = add(4)
    engine.fail[jobs[2]] = EngineUnavailable("engine down (fake)")
    with pytest.raises(EngineUnavailable):
        q.step()
    q.scheduler.validate()
    assert [store.job(j)["state"] for j in (jobs[0], jobs[1], jobs[3])] == ["running"] * 3
    assert store.job(jobs[2])["state"] == "queued"  # a start the engine never got
    assert jobs[2] not in q.scheduler.running


def test_a_held_job_is_refused_and_the_others_start(tmp_path: Path) -> None:
    q, store, engine, add, fed = make_rig(tmp_path, 3)
    try:
        jobs = add(4)
        real = store.transition

        def hold_one(job_id: int, to: JobState, **kw: Any) -> Any:
            if job_id == jobs[0] and to == JobState.RUNNING:
                raise Conflict(f"job {job_id} is held")  # as a hold just made would
            return real(job_id, to, **kw)

        store.transition = hold_one  # type: ignore[method-assign]
        q.step()
        q.scheduler.validate()
        assert store.job(jobs[0])["state"] == "queued" and engine.peak == 3
        assert [store.job(j)["state"] for j in jobs[1:]] == ["running"] * 3
    finally:
        q._workers.shutdown(wait=True)
        q.starter.shutdown()
        store.close()


# -- the queue thread does not wait for a start (its loop: step(wait=False)) -----------
class HeldEngine(FakeEngine):
    """``run`` makes the container, then blocks while its job is in ``held``."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.held: dict[int, threading.Event] = {}

    def run(self, spec: ContainerSpec) -> str:
        job_id = int(spec.labels["dopq.job"])
        name = super().run(spec)
        if job_id in self.held:
            assert self.held[job_id].wait(10), "never let go"
        return name


@pytest.fixture
def held(tmp_path: Path) -> Any:
    q, store, _, add, fed = make_rig(tmp_path, 1)
    engine = HeldEngine(store.owner_id())
    q.runtime = engine
    q.starter.shutdown()
    q.starter = Starter(q, workers=2)
    yield q, store, engine, add
    for gate in engine.held.values():
        gate.set()
    q._workers.shutdown(wait=True)
    q.starter.shutdown()
    store.close()


def held_start(q: PriorityQueueThread, engine: HeldEngine, add: Any) -> int:
    """A job whose start is in flight until ``engine.held[job].set()``."""
    (job,) = add(1)
    engine.held[job] = threading.Event()
    q.step(wait=False)
    return job


def test_a_start_in_flight_does_not_hold_up_the_next_decision(held: Any) -> None:
    q, store, engine, add = held
    a = held_start(q, engine, add)
    assert store.job(a)["state"] == "running" and q.starter.in_flight(a)
    (b,) = add(1)  # a device still free: its job starts while a's start hangs
    q.step(wait=False)
    settle_until(q, lambda: not q.starter.in_flight(b))
    assert store.job(b)["container"] and store.job(a)["container"] is None
    engine.held[a].set()
    q.starter.settle(wait=True)
    assert store.job(a)["container"] and not q.starter.in_flight()
    q.scheduler.validate()


def test_an_exit_seen_before_its_start_is_recorded_waits_for_it(held: Any) -> None:
    q, store, engine, add = held
    a = held_start(q, engine, add)
    name = q.container_name(a)
    wait_until(lambda: name in engine.containers)
    engine.exit(name, 0, q.clock())  # a job that ends at once: its die event comes first
    q.step([name], wait=False)
    assert q._exited == [name] and store.job(a)["state"] == "running"  # held back
    engine.held[a].set()
    q.starter.settle(wait=True)
    assert store.job(a)["container"] == name
    exited, q._exited = q._exited, []
    q.step(exited)
    assert store.job(a)["state"] == "succeeded"
    q.scheduler.validate()


def test_reconciling_lets_starts_in_flight_land_first(held: Any) -> None:
    q, store, engine, add = held
    a = held_start(q, engine, add)
    threading.Timer(0.2, engine.held[a].set).start()
    q.reconcile()  # without waiting, a running job without its container is requeued
    assert store.job(a)["state"] == "running" and store.job(a)["container"]
    assert store.job(a)["restarts"] == 0
    q.scheduler.validate()


def settle_until(q: PriorityQueueThread, cond: Any) -> None:
    """Settle the launches that landed (as the loop does when one wakes it) until ``cond``."""
    def settled() -> bool:
        q.starter.settle()
        return bool(cond())

    wait_until(settled)


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.01)

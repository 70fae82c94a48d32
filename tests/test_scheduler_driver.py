"""The queue thread's wiring without Docker: a real SQLite store, a fake engine.

``PriorityQueueThread.step`` is called by hand on a clock the test moves, so
each test reads as a sequence of events. What the scheduler decides is
tested in test_scheduler.py; here it is that the driver carries it out.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config, wait_for

from dopq.core import settings as settings_mod
from dopq.core.errors import Conflict, EngineUnavailable
from dopq.core.jobs import JobState
from dopq.server.queue import PriorityQueueThread
from dopq.server.runtime import ContainerSpec, ContainerStatus
from dopq.server.store import Store


class FakeEngine:
    """The part of ``ContainerRuntime`` the queue thread uses, in memory."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.containers: dict[str, ContainerStatus] = {}
        self.up = True
        self.stopped: list[str] = []
        self.removed: list[str] = []

    def _check(self) -> None:
        if not self.up:
            raise EngineUnavailable("engine down (fake)")

    def ping(self) -> bool:
        return self.up

    def run(self, spec: ContainerSpec) -> str:
        self._check()
        job_id = int(spec.labels["dopq.job"])
        self.containers[spec.name] = ContainerStatus(
            spec.name, spec.name, job_id, True, None, False, 1.0, None, owner=self.owner)
        return spec.name

    def exit(self, name: str, code: int, at: float, oom: bool = False) -> None:
        c = self.containers[name]
        c.running, c.exit_code, c.finished_at, c.oom_killed = False, code, at, oom

    def status(self, ref: str) -> ContainerStatus | None:
        self._check()
        return self.containers.get(ref)

    def list(self, instance: str, owner: str | None = None) -> list[ContainerStatus]:
        self._check()
        return list(self.containers.values())

    def stop(self, ref: str, grace: float, *, owner: str) -> None:
        self._check()
        self.stopped.append(ref)

    def remove(self, ref: str, *, owner: str) -> None:
        self.removed.append(ref)
        self.containers.pop(ref, None)

    def save_logs(self, ref: str, path: Path, cap: int) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("log\n")
        return 4

    def untag(self, tag: str) -> None:
        pass

    def tags_matching(self, pattern: str) -> list[str]:
        return []


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    settings = settings_mod.from_dict(make_config(tmp_path, docker={"stop_grace": 1.0}))
    store = Store(settings.db_path)
    clock = Clock()
    engine = FakeEngine(store.owner_id())
    q = PriorityQueueThread(settings, store, engine, [0, 1], "env", clock=clock)  # type: ignore[arg-type]
    q.container_spec = lambda row, gpus: ContainerSpec(  # type: ignore[method-assign]
        name=q.container_name(row["id"]), image="img",
        labels={"dopq.job": str(row["id"])}, gpus=gpus)

    class Rig:
        pass

    r = Rig()
    r.settings, r.store, r.clock, r.engine, r.q = settings, store, clock, engine, q  # type: ignore[attr-defined]

    def add(user: str = "alice", gpus: int = 1, **kw: Any) -> int:
        return store.add_job(name="job", user=user, state=JobState.QUEUED, num_gpus=gpus,
                             submitted_at=clock.now, **kw)

    def step(advance: float = 0.0, exited: list[str] | None = None) -> None:
        clock.now += advance
        q.step(exited)
        q.scheduler.validate()

    r.add, r.step = add, step  # type: ignore[attr-defined]
    yield r
    q._workers.shutdown(wait=True)
    store.close()


def test_jobs_start_exit_and_free_their_gpus(rig: Any) -> None:
    rig.q.recover()
    a, b, c = rig.add(gpus=1), rig.add(gpus=1), rig.add(gpus=1)
    rig.step()
    assert [rig.store.job(j)["state"] for j in (a, b, c)] == ["running", "running", "queued"]
    assert rig.store.job(a)["gpus"] == [0] and rig.store.job(a)["container"]
    assert rig.q.last_decision is not None and rig.q.decision_seq >= 1
    rig.engine.exit(rig.q.container_name(a), 0, rig.clock.now)
    rig.step(1.0, [rig.q.container_name(a)])
    assert rig.store.job(a)["state"] == "succeeded"
    assert rig.store.job(c)["state"] == "running" and rig.store.job(c)["gpus"] == [0]
    wait_for(rig.q.run_log_path(a).exists, 10)  # the log is collected on a worker
    assert rig.q.run_log_path(a).read_text() == "log\n"


def test_time_limit_stops_then_fails(rig: Any) -> None:
    rig.q.recover()
    job = rig.add(time_limit=60.0)
    rig.step()
    rig.step(61.0)
    assert rig.store.job(job)["error"] == "timeout"
    name = rig.q.container_name(job)
    wait_for(lambda: name in rig.engine.stopped, 10)  # stopped on a worker
    rig.engine.exit(name, 137, rig.clock.now)
    rig.step(1.0, [name])
    assert rig.store.job(job)["state"] == "failed" and rig.store.job(job)["error"] == "timeout"


def test_cancel_queued_and_running(rig: Any) -> None:
    rig.q.recover()
    running, queued, waiting = rig.add(gpus=2), rig.add(gpus=2), rig.add(gpus=2)
    rig.step()
    row = rig.q.cancel(queued, "alice")
    assert row["state"] == "cancelled" and row["error"] == "cancelled by alice"
    with pytest.raises(Conflict):
        rig.q.cancel(queued, "alice")
    assert rig.q.cancel(running, "root")["error"] == "cancelled by root"
    name = rig.q.container_name(running)
    rig.engine.exit(name, 143, rig.clock.now)
    rig.step(1.0, [name])  # asked for: classified at once
    assert rig.store.job(running)["state"] == "cancelled"
    assert rig.store.job(waiting)["state"] == "running"


def test_engine_restart_fails_or_requeues(rig: Any) -> None:
    rig.q.recover()
    job = rig.add(gpus=1)
    rig.step()
    name = rig.q.container_name(job)
    rig.engine.up = False
    rig.engine.exit(name, 137, rig.clock.now)
    with pytest.raises(EngineUnavailable):
        rig.step(3.0, [name])
    rig.q.engine_lost()
    assert not rig.q.engine_up
    rig.clock.now += 10
    rig.engine.up = True
    rig.step(3.0)  # the reconcile finds the engine back and the container ended
    assert rig.q.engine_up
    row = rig.store.job(job)
    assert row["state"] == "failed" and "killed by a Docker engine restart" in row["error"]


def test_recovery_requeues_a_start_cut_off_and_adopts_the_rest(rig: Any) -> None:
    alive, cut = rig.add(gpus=1), rig.add(gpus=1)
    for job, gpu in ((alive, 0), (cut, 1)):
        rig.store.transition(job, JobState.RUNNING, expect=[JobState.QUEUED], gpus=[gpu],
                             started_at=rig.clock.now)
    name = rig.q.container_name(alive)
    rig.store.update_job(alive, container=name)
    rig.engine.containers[name] = ContainerStatus(name, name, alive, True, None, False, 1.0,
                                                  None, owner=rig.engine.owner)
    rig.q.recover()
    rig.q.scheduler.validate()
    assert rig.store.job(cut)["state"] == "queued"
    assert rig.q.pool.held() == {0: alive}
    rig.step()
    assert rig.store.job(cut)["state"] == "running" and rig.store.job(cut)["gpus"] == [1]


def test_usage_is_saved_and_reset(rig: Any) -> None:
    rig.q.recover()
    rig.add(gpus=2)
    rig.step()
    rig.step(3600.0)
    assert rig.q.ledger.value("alice", rig.clock.now) > 0
    assert any(r["user"] == "alice" for r in rig.store.load_usage())
    rig.q.reset_usage("alice")
    assert rig.q.ledger.value("alice", rig.clock.now) == 0.0


def test_a_store_failure_at_start_leaves_no_gpu_held(rig: Any) -> None:
    rig.q.recover()
    job = rig.add(gpus=2)
    real = rig.store.transition

    def failing(job_id: int, to: JobState, **kw: Any) -> Any:
        if to == JobState.RUNNING:
            raise sqlite3.OperationalError("database is locked")
        return real(job_id, to, **kw)

    rig.store.transition = failing
    with pytest.raises(sqlite3.OperationalError):
        rig.step()
    assert rig.q.pool.free() == {0, 1} and job not in rig.q.scheduler.running
    rig.store.transition = real
    rig.step(1.0)
    assert rig.store.job(job)["state"] == "running"

"""The scheduler state machine, without Docker: events in, instructions out.

Every event goes through ``fakes.Driver``, which validates the books (no GPU
held twice, free + held + external == total, running jobs match the pool)
after each one.
"""

from __future__ import annotations

import pytest
from fakes import Driver, FakeContainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopq.core import events as ev
from dopq.core import scheduler as sc
from dopq.core.capacity import Capacity, GpuPool
from dopq.core.errors import Conflict
from dopq.core.fairshare import PolicyConfig
from dopq.core.jobs import JobState
from dopq.core.policy import QueuedJob
from dopq.core.simulate import TraceJob, simulate
from dopq.server import outputs


def state(d: Driver, job_id: int) -> JobState:
    return d.store.state(job_id)


# -- order, placement ------------------------------------------------------------------
def test_order_follows_the_policy() -> None:
    d = Driver(gpus=1)
    d.sched.ledger.advance(d.now, {})
    d.sched.ledger.load_rows([{"user": "heavy", "value": 50_000.0, "updated_at": d.now}])
    d.submit(1, "ana", 1)
    d.submit(2, "heavy", 1, submitted=d.now - 10)
    d.submit(3, "ana", 1)
    assert d.started(d.tick()) == [1]
    assert d.sched.running[1].gpus == (0,) and state(d, 1) == JobState.RUNNING
    d.exit(1, 0)
    assert d.started(d.tick(5)) == [3]  # ana's usage is still below heavy's
    d.exit(3, 0)
    assert d.started(d.tick(5)) == [2]


def test_start_instructions_name_node_and_devices() -> None:
    d = Driver(gpus=4)
    d.submit(1, gpus=2)
    (start,) = [i for i in d.tick() if isinstance(i, ev.StartJob)]
    assert start.node == "local" and start.gpus == (0, 1) and start.started_at == d.now
    assert d.store.jobs[1]["gpus"] == [0, 1]


def test_reservation_and_backfill() -> None:
    d = Driver(gpus=4)
    d.submit(1, "ana", 3, time_limit=1000.0)
    assert d.started(d.tick()) == [1]
    d.submit(2, "ben", 4, submitted=d.now - 1)  # the head of the line: reserves
    d.submit(3, "cyd", 1, time_limit=100.0)  # ends before the reservation: backfills
    d.submit(4, "dan", 1)  # no limit: could delay job 2, waits
    assert d.started(d.tick(1)) == [3]
    d.exit(3, 0)
    assert d.started(d.tick(1)) == []
    assert d.sched.next_wakeup() is not None


def test_cpu_only_jobs_need_no_gpu() -> None:
    d = Driver(gpus=1)
    d.submit(1, gpus=1)
    d.submit(2, gpus=0)
    assert sorted(d.started(d.tick())) == [1, 2]
    assert d.sched.running[2].gpus == ()


def test_dependencies_fail_or_release_waiters() -> None:
    d = Driver(gpus=2)
    d.submit(1, gpus=1)
    d.submit(2, gpus=1, after=(1,))
    d.submit(3, gpus=1, after_any=(1,))
    assert d.started(d.tick()) == [1]
    d.exit(1, 2)
    out = d.tick(1)
    assert state(d, 2) == JobState.FAILED and d.store.jobs[2]["error"] == "dependency 1 failed"
    assert ev.Untag(2) in d.done  # only after the commit
    assert d.started(out) == [3]


def test_dependencies_from_the_store_are_passed_in() -> None:
    d = Driver(gpus=1, remember_finished=False)
    d.submit(2, gpus=1, after=(1,))
    assert d.sched.dependencies() == {1}
    assert d.started(d.handle(ev.Tick({}, []))) == []
    assert d.started(d.handle(ev.Tick({1: JobState.SUCCEEDED}, []))) == [2]


def test_array_elements_run_in_order_within_the_user_limit() -> None:
    d = Driver(gpus=4, policy=PolicyConfig(max_running_per_user=2))
    for i in range(10, 15):
        d.submit(i, "ana", 1, submitted=d.now)
    assert d.started(d.tick()) == [10, 11]
    d.exit(10, 0)
    assert d.started(d.tick(1)) == [12]
    d.exit(11, 0)
    d.exit(12, 0)
    assert d.started(d.tick(1)) == [13, 14]


def test_starts_not_tried_go_back_to_the_queue() -> None:
    d = Driver(gpus=2)
    d.submit(1)
    d.submit(2)
    decided = d.sched.handle(ev.Tick(), d.now)  # then the engine fails before any start
    assert [i.job_id for i in decided if isinstance(i, ev.StartJob)] == [1, 2]
    d.handle(ev.StartRefused(1, retry=True))
    d.handle(ev.StartRefused(2, retry=True))
    assert set(d.sched.queued) == {1, 2} and d.sched.pool.free() == {0, 1}
    assert sorted(d.started(d.tick())) == [1, 2]


def test_held_job_refused_at_commit_goes_back() -> None:
    d = Driver(gpus=1)
    d.submit(1)
    d.block_starts.add(1)  # the store says it is held now
    d.tick()
    assert 1 not in d.sched.running and d.sched.pool.free() == {0}


# -- exits ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "oom", "want", "error"), [
    (0, False, JobState.SUCCEEDED, None),
    (3, False, JobState.FAILED, "exit code 3"),
    (137, True, JobState.FAILED, sc.OOM),
])
def test_exit_classification(code: int, oom: bool, want: JobState, error: str | None) -> None:
    d = Driver()
    d.submit(1)
    d.tick()
    out = d.exit(1, code, oom=oom, deferrable=False)
    assert state(d, 1) == want and d.store.jobs[1]["error"] == error
    assert d.store.jobs[1]["exit_code"] == code and d.store.jobs[1]["finished_at"] == d.now
    assert [type(i) for i in out if not isinstance(i, ev.SaveUsage)] == [
        ev.CommitJob, ev.SealOutputs, ev.CollectContainer]
    assert d.sched.running == {} and d.sched.pool.free() == {0, 1, 2, 3}


def test_a_signal_from_outside_is_looked_at_again() -> None:
    d = Driver()
    d.submit(1)
    d.tick()
    assert d.exit(1, 137) == []  # deferred: the engine may be going down
    assert state(d, 1) == JobState.RUNNING
    assert d.sched.next_wakeup() == d.now + sc.DEFER_SIGNAL_EXIT
    assert ev.RecheckContainer(1, "c-1") in d.tick(sc.DEFER_SIGNAL_EXIT)
    d.exit(1, 137, deferrable=False)  # the driver found the engine up
    assert d.store.jobs[1]["error"] == "exit code 137 (killed by signal 9 from outside DoPQ)"


def test_vanished_container_fails_the_job() -> None:
    d = Driver()
    d.submit(1)
    d.tick()
    d.handle(ev.ContainerMissing(1, ran=True))
    assert state(d, 1) == JobState.FAILED and d.store.jobs[1]["error"] == "container vanished"


def test_output_limit_stops_at_once_and_fails() -> None:
    d = Driver()
    d.submit(1)
    d.tick()
    reason = f"{outputs.OUTPUT_LIMIT}=1 GiB"
    assert ev.StopContainer(1, "c-1", 0.0) in d.handle(ev.OutputLimitReached(1, reason))
    d.exit(1, 137)  # asked for: not deferred
    assert state(d, 1) == JobState.FAILED and d.store.jobs[1]["error"] == reason
    assert sc.OUTPUT_LIMIT == outputs.OUTPUT_LIMIT


def test_start_failure_fails_the_job_and_frees_its_gpus() -> None:
    d = Driver(gpus=1)
    d.submit(1)
    d.runtime.fail_next_run = "no such image"
    d.tick()
    assert state(d, 1) == JobState.FAILED
    assert d.store.jobs[1]["error"] == "start failed: no such image"
    assert d.sched.pool.free() == {0} and d.runtime.removed == ["c-1"]


# -- cancels -----------------------------------------------------------------------------------
def test_cancel_of_a_queued_job_commits_and_untags() -> None:
    d = Driver()
    d.submit(1)
    d.handle(ev.CancelRequested(1, JobState.QUEUED, "ana"))
    assert state(d, 1) == JobState.CANCELLED and d.store.jobs[1]["error"] == "cancelled by ana"
    assert d.done[-1] == ev.Untag(1)
    d.handle(ev.JobLeftQueue(1))
    assert d.started(d.tick()) == []


def test_cancel_racing_a_start_loses_or_wins_cleanly() -> None:
    d = Driver(gpus=1)
    d.submit(1)
    # The API thread cancels in the store between the decision and the commit.
    decided = d.sched.handle(ev.Tick(), d.now)
    d.handle(ev.CancelRequested(1, JobState.QUEUED, "ana"))
    d.carry_out(decided)  # the start's compare-and-set is refused
    assert state(d, 1) == JobState.CANCELLED
    assert 1 not in d.sched.running and d.sched.pool.free() == {0}
    d.sched.validate()


def test_cancel_during_container_create_stops_it_once_started() -> None:
    d = Driver(gpus=1)
    d.submit(1)
    decided = d.sched.handle(ev.Tick(), d.now)
    assert [i.job_id for i in decided if isinstance(i, ev.StartJob)] == [1]
    d.store.transition(1, JobState.RUNNING, (JobState.QUEUED,), gpus=[0])
    out = d.handle(ev.CancelRequested(1, JobState.RUNNING, "ana"))
    assert ev.StopContainer(1, None) in out  # no container yet: by its name
    name = d.runtime.run(1)
    out = d.handle(ev.ContainerStarted(1, name, d.store.jobs[1]["error"]))
    assert out == [ev.StopContainer(1, name)]
    d.exit(1, 137)
    assert state(d, 1) == JobState.CANCELLED


def test_a_stop_that_did_not_take_is_asked_again() -> None:
    d = Driver(stop_grace=2.0)
    d.submit(1)
    d.tick()
    d.handle(ev.CancelRequested(1, JobState.RUNNING, "root"))
    assert [i for i in d.tick(6.0) if isinstance(i, ev.StopContainer)] == []
    assert ev.StopContainer(1, "c-1") in d.tick(1.0)
    assert d.runtime.containers["c-1"].stops == 2


def test_cancel_of_an_ended_job_is_a_conflict() -> None:
    d = Driver()
    with pytest.raises(Conflict):
        d.sched.handle(ev.CancelRequested(1, JobState.SUCCEEDED, "ana"), d.now)


# -- time limits -------------------------------------------------------------------------------
def test_time_limit_stops_the_job_and_fails_it() -> None:
    d = Driver()
    d.submit(1, time_limit=100.0)
    d.tick()
    assert d.sched.next_wakeup() == d.now + 100.0
    assert [i for i in d.tick(99.0) if isinstance(i, ev.StopContainer)] == []
    out = d.tick(1.0)
    assert ev.CommitJob(1, None, fields={"error": sc.TIMEOUT}) in out
    assert ev.StopContainer(1, "c-1") in out
    d.exit(1, 143)
    assert state(d, 1) == JobState.FAILED and d.store.jobs[1]["error"] == sc.TIMEOUT


# -- the engine ------------------------------------------------------------------------------
@pytest.mark.parametrize("requeue", [False, True])
def test_engine_outage(requeue: bool) -> None:
    d = Driver(requeue_on_engine_restart=requeue)
    d.submit(1)
    d.submit(2)
    d.tick()
    d.handle(ev.EngineDown())
    assert not d.sched.engine_up
    assert d.exit(1, 137) == []  # deferred ...
    d.exit(1, 137, deferrable=False)  # ... and reported again, the engine still down
    d.now += 20
    d.handle(ev.EngineUp())
    assert d.sched.engine_up and d.sched.last_outage == (d.now - 20, d.now)
    d.now += 2
    d.exit(2, 143, deferrable=False)  # ended just after: still the outage's doing
    for job in (1, 2):
        if requeue:
            assert state(d, job) == JobState.QUEUED and d.store.jobs[job]["gpus"] == []
        else:
            assert state(d, job) == JobState.FAILED
            assert "killed by a Docker engine restart" in d.store.jobs[job]["error"]
    assert d.sched.running == {}
    if requeue:
        assert {"c-1", "c-2"} <= set(d.runtime.removed)


def test_engine_down_at_start_requeues_a_failed_start() -> None:
    d = Driver(gpus=1)
    d.submit(1)
    decided = d.sched.handle(ev.Tick(), d.now)
    d.store.transition(1, JobState.RUNNING, (JobState.QUEUED,))
    d.carry_out(d.sched.handle(ev.StartFailed(1, "engine unavailable", engine_down=True), d.now))
    assert decided and state(d, 1) == JobState.QUEUED and not d.sched.engine_up
    assert d.sched.pool.free() == {0}


# -- recovery ----------------------------------------------------------------------------------
def test_recovery_reconciles_stored_jobs_with_the_runtime() -> None:
    d = Driver(gpus=4)
    rows = {
        1: ev.Running(1, "ana", 1, (0,), 900.0, container="c-1"),  # still running
        2: ev.Running(2, "ana", 1, (1,), 900.0, container="c-2"),  # exited meanwhile
        3: ev.Running(3, "ben", 1, (2,), 900.0, container="c-3"),  # removed by hand
        4: ev.Running(4, "ben", 1, (3,), None),  # cut off before its create
        5: ev.Running(5, "cyd", 0, (), 950.0, container="c-5"),  # created, never started
    }
    for job_id, r in rows.items():
        d.store.add(job_id, user=r.user, state=JobState.RUNNING)
    d.handle(ev.EngineUp())
    for r in rows.values():
        d.handle(ev.JobAdopted(r))
    assert d.sched.pool.free() == frozenset()
    d.handle(ev.ContainerExited(2, "c-2", 0, 990.0, deferrable=False))
    d.handle(ev.ContainerMissing(3, ran=True))
    d.handle(ev.ContainerMissing(4, ran=False))
    d.handle(ev.ContainerNeverStarted(5, "c-5"))
    out = d.handle(ev.StrayContainer(9, "c-9", running=True, state=JobState.FAILED))
    assert out == [ev.StopContainer(None, "c-9")]
    assert d.handle(ev.StrayContainer(8, "c-8", running=False, state=None)) == [
        ev.CollectContainer(8, "c-8")]
    assert d.store.jobs[2]["state"] == JobState.SUCCEEDED
    assert d.store.jobs[3]["error"] == "container vanished"
    assert d.store.jobs[4]["state"] == JobState.QUEUED == d.store.jobs[5]["state"]
    assert "c-5" in d.runtime.removed
    assert set(d.sched.running) == {1} and d.sched.pool.free() == {1, 2, 3}


def test_adopting_twice_or_on_taken_gpus_keeps_the_books() -> None:
    d = Driver(gpus=2)
    d.handle(ev.JobAdopted(ev.Running(1, "ana", 1, (0,), 900.0)))
    d.handle(ev.JobAdopted(ev.Running(1, "ana", 1, (0,), 900.0)))
    d.handle(ev.JobAdopted(ev.Running(2, "ben", 1, (0,), 900.0)))  # a corrupt row
    assert d.sched.pool.held() == {0: 1}


def test_stored_stop_reason_survives_a_restart() -> None:
    d = Driver()
    d.store.add(1, user="ana", state=JobState.RUNNING)
    d.handle(ev.JobAdopted(ev.Running(1, "ana", 1, (0,), 900.0, container="c-1",
                                      error="cancelled by root")))
    d.runtime.containers["c-1"] = FakeContainer(1)
    assert d.exit(1, 137) == []  # not a stop of this run: looked at again
    d.exit(1, 137, deferrable=False)
    assert state(d, 1) == JobState.CANCELLED


# -- capacity ----------------------------------------------------------------------------------
def test_gpus_busy_from_outside_are_not_placed_on() -> None:
    d = Driver(gpus=2)
    d.handle(ev.CapacityChanged(external=frozenset({0})))
    d.submit(1, gpus=1)
    d.submit(2, gpus=1)
    assert d.started(d.tick()) == [1] and d.sched.running[1].gpus == (1,)


def test_removed_gpu_leaves_when_its_job_ends() -> None:
    d = Driver(gpus=2)
    d.submit(1, gpus=2)
    d.tick()
    d.handle(ev.CapacityChanged(devices=[1, 2]))
    assert d.sched.pool.total == {0, 1, 2}  # 0 is still held
    d.exit(1, 0)
    assert d.sched.pool.total == {1, 2} and d.sched.pool.free() == {1, 2}


def test_capacity_names_its_node() -> None:
    cap = Capacity.single(range(2), name="gpu-box")
    assert cap.default.name == "gpu-box" and isinstance(cap.node("gpu-box").pool, GpuPool)
    cap.validate()


def test_usage_is_charged_and_saved() -> None:
    d = Driver(gpus=1)
    d.submit(1, "ana", 1)
    d.tick()
    out = d.tick(3600.0)
    assert d.sched.ledger.value("ana", d.now) > 3000
    assert ev.SaveUsage() in out
    assert d.handle(ev.UsageReset("ana")) == [ev.SaveUsage()]
    assert d.sched.ledger.value("ana", d.now) == 0.0


# -- properties --------------------------------------------------------------------------------
ops = st.lists(st.tuples(
    st.sampled_from(["submit", "tick", "exit", "cancel", "engine_down", "engine_up", "external",
                     "missing", "refuse"]),
    st.integers(0, 12), st.integers(0, 3), st.sampled_from([0, 1, 137, 143])),
    max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans())
def test_books_balance_after_every_event(steps: list[tuple[str, int, int, int]],
                                         requeue: bool) -> None:
    """Whatever happens in whatever order, no GPU is held twice and
    free + held + external == total (the Driver validates after each event)."""
    d = Driver(gpus=3, requeue_on_engine_restart=requeue, stop_grace=1.0)
    for op, job, n, code in steps:
        if op == "submit" and job not in d.store.jobs:
            d.submit(job, f"u{job % 3}", n, time_limit=50.0 if code else None)
        elif op == "tick":
            d.tick(float(n * 20))
        elif op == "exit" and job in d.sched.running and d.sched.running[job].container:
            d.exit(job, code, deferrable=bool(n % 2))
        elif op == "cancel" and job in d.store.jobs:
            st_ = d.store.state(job)
            if st_ in (JobState.QUEUED, JobState.RUNNING):
                d.handle(ev.CancelRequested(job, st_, "root"))
                if st_ == JobState.QUEUED:
                    d.handle(ev.JobLeftQueue(job))
        elif op == "engine_down":
            d.handle(ev.EngineDown())
        elif op == "engine_up":
            d.handle(ev.EngineUp())
        elif op == "external":
            d.handle(ev.CapacityChanged(external=frozenset(range(n))))
        elif op == "missing" and job in d.sched.running:
            d.handle(ev.ContainerMissing(job, ran=bool(code)))
        elif op == "refuse":
            d.block_starts ^= {job}
        # Requeued jobs come back the way the store's events bring them.
        for job_id, row in d.store.jobs.items():
            if row["state"] == JobState.QUEUED and job_id not in d.sched.queued \
                    and job_id not in d.sched.running:
                d.handle(ev.JobQueued(QueuedJob(job_id, row["user"], row["want"], d.now)))
    held = d.sched.pool.held()
    for job_id, r in d.sched.running.items():
        assert all(held.get(g) == job_id for g in r.gpus)


# -- the same properties over whole traces (the simulator drives this scheduler) -------
users = st.sampled_from(["ana", "Ana", "ben", "cyd"])


@st.composite
def traces(draw: st.DrawFn, with_limits: bool) -> list[TraceJob]:
    jobs = []
    for i in range(draw(st.integers(1, 20))):
        duration = draw(st.floats(30, 7200))
        limit = duration * draw(st.floats(0.5, 2.0)) if with_limits else draw(
            st.one_of(st.none(), st.floats(30, 9000)))
        jobs.append(TraceJob(i + 1, draw(st.floats(0, 20000)), draw(users),
                             draw(st.integers(0, 4)), duration, limit,
                             draw(st.sampled_from([0, 0, 100]))))
    return jobs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(with_limits=False), st.sampled_from(["fairshare", "recency"]))
def test_a_gpu_is_never_held_twice(jobs, policy):
    # simulate() drives the Scheduler and validates its books after every event;
    # check again from outside.
    result = simulate(jobs, 4, PolicyConfig(policy=policy, half_life=3600, max_age=1800))
    spans = [(r.start, r.end, g) for r in result.jobs for g in r.gpu_ids]
    assert all(r.start is not None for r in result.jobs)
    for a_start, a_end, g in spans:
        overlapping = [s for s in spans if s[2] == g and s[0] < a_end and a_start < s[1]]
        assert len(overlapping) == 1
    assert all(len(r.gpu_ids) == r.gpus for r in result.jobs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traces(with_limits=True), st.floats(600, 20000))
def test_every_job_starts_within_the_age_bound(jobs, max_age):
    # See the policy docstring: wait <= max_age + (k + 2) * L, where k jobs were
    # submitted before this one and L is the longest time limit.
    cfg = PolicyConfig(half_life=3600, max_age=max_age, w_fairshare=1e6)
    result = simulate(jobs, 4, cfg)
    longest = max(j.time_limit or 0.0 for j in jobs)
    ahead = sorted((j.submit, j.id) for j in jobs)
    for rec in result.jobs:
        k = ahead.index((rec.submit, rec.id))
        assert rec.wait is not None
        assert rec.wait <= max_age + (k + 2) * longest + 1e-6

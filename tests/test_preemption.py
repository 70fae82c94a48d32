"""Preemption (``[policy] preemption = "fairshare"``) without Docker.

The pure choice of victims (:mod:`dopq.core.preemption`) through the
scheduler on the fake store and runtime (``fakes.Driver``, which validates
the books after every event), the explanation, and properties over random
workloads: a preempted job runs again, no job is preempted twice within its
minimum runtime, and with preemption off nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from fakes import Driver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopq.core import events as ev
from dopq.core.errors import ConfigError
from dopq.core.eta import estimate
from dopq.core.fairshare import PolicyConfig
from dopq.core.jobs import JobState
from dopq.core.policy import ClusterState, QueuedJob, RunningJob, decide
from dopq.core.preemption import plan

MIN = 600.0  # min_runtime in these tests
GRACE = 30.0


def on(**kw: Any) -> PolicyConfig:
    return PolicyConfig(preemption="fairshare", min_runtime=MIN, preempt_grace=GRACE,
                        **kw).validate()


def driver(gpus: int = 1, usage: dict[str, float] | None = None, **kw: Any) -> Driver:
    d = Driver(gpus=gpus, policy=on(**kw))
    if usage:
        d.sched.ledger.advance(d.now, {})
        d.sched.ledger.load_rows([{"user": u, "value": v, "updated_at": d.now}
                                  for u, v in usage.items()])
    return d


def preempts(out: list[ev.Instruction]) -> list[ev.PreemptJob]:
    return [i for i in out if isinstance(i, ev.PreemptJob)]


def victims(out: list[ev.Instruction]) -> list[int]:
    return sorted(i.job_id for i in preempts(out))


# -- settings -----------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value"), [
    ("preemption", "always"), ("min_runtime", -1.0), ("preempt_grace", float("inf")),
    ("max_preemptions", -1), ("max_preemptions", 1.5), ("preemptible_default", "yes"),
])
def test_bad_preemption_settings_name_their_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        PolicyConfig(**{key: value}).validate("policy.")


def test_preemption_is_off_by_default() -> None:
    cfg = PolicyConfig()
    assert (cfg.preemption, cfg.preemptible_default, cfg.min_runtime, cfg.preempt_grace,
            cfg.max_preemptions) == ("off", False, 1800.0, 120.0, 3)


# -- who is chosen ------------------------------------------------------------------------
def test_the_furthest_above_their_share_then_the_youngest_go_first() -> None:
    d = driver(gpus=4, usage={"alice": 60_000.0, "carol": 40_000.0})
    d.submit(1, "alice", preemptible=True)
    d.submit(2, "carol", preemptible=True)
    d.tick()
    d.submit(3, "alice", preemptible=True)
    d.submit(4, "carol", preemptible=True)
    d.tick(10)
    assert len(d.sched.running) == 4
    d.submit(5, "bob")
    out = d.tick(MIN)
    # bob (no usage) is under his share; alice is furthest above it; job 3 is her youngest.
    (p,) = preempts(out)
    assert (p.job_id, p.by_job, p.grace, p.container) == (3, 5, GRACE, "c-3")
    assert p.reason == "preempted by job 5 of bob (bob under fair share; alice above)"
    assert d.store.jobs[3]["error"] == p.reason and d.sched.running[3].error == p.reason
    assert d.sched.last_decision is not None and d.sched.last_decision.preempt == [(3, 5)]


def test_the_fewest_jobs_that_make_room() -> None:
    d = driver(gpus=4, usage={"alice": 60_000.0, "carol": 40_000.0})
    d.submit(1, "alice", 1, preemptible=True)
    d.submit(2, "alice", 1, preemptible=True)
    d.submit(3, "carol", 2, preemptible=True)
    d.tick()
    d.submit(4, "bob", 2)
    # Alice is further above her share, but two of her jobs would go for one of carol's.
    assert victims(d.tick(MIN)) == [3]


def test_no_more_than_needed_and_none_for_nothing() -> None:
    d = driver(gpus=3, usage={"alice": 60_000.0})
    d.submit(1, "alice", 1, preemptible=True)
    d.submit(2, "alice", 1, preemptible=True)
    d.submit(3, "carol", 1)  # not preemptible
    d.tick()
    d.submit(4, "bob", 3)  # would need carol's GPU too: nobody is stopped
    assert victims(d.tick(MIN)) == []
    d.submit(5, "dave", 2, submitted=d.now - MIN - 100)  # ahead of bob's job (older)
    assert victims(d.tick(1)) == [1, 2]


def test_only_preemptible_jobs_of_users_above_their_share() -> None:
    d = driver(gpus=2, usage={"alice": 60_000.0})
    d.submit(1, "alice")  # not preemptible
    d.submit(2, "carol", preemptible=True)  # no usage: not above her share
    d.tick()
    d.submit(3, "bob")
    assert victims(d.tick(MIN)) == []


def test_a_head_user_above_their_share_preempts_nobody() -> None:
    d = driver(gpus=1, usage={"alice": 60_000.0, "bob": 80_000.0})
    d.submit(1, "alice", preemptible=True)
    d.tick()
    d.submit(2, "bob")
    assert victims(d.tick(MIN)) == []


def test_never_for_a_job_of_the_same_user() -> None:
    d = driver(gpus=1, usage={"alice": 60_000.0})
    d.submit(1, "alice", preemptible=True)
    d.tick()
    d.submit(2, "Alice")
    assert victims(d.tick(MIN)) == []


def test_never_for_a_job_of_lower_priority() -> None:
    d = driver(gpus=1, usage={"alice": 60_000.0})
    d.submit(1, "alice", preemptible=True, priority=10)
    d.tick()
    d.submit(2, "bob", priority=5)
    assert victims(d.tick(MIN)) == []
    d.submit(3, "carol", priority=10, submitted=d.now - 1000)  # equal priority: may
    assert victims(d.tick(1)) == [1]


def test_not_before_the_minimum_runtime_and_the_decision_wakes_up_for_it() -> None:
    d = driver(gpus=1, usage={"alice": 60_000.0})
    d.submit(1, "alice", preemptible=True)
    d.tick()
    started = d.now
    d.submit(2, "bob")
    assert victims(d.tick(MIN - 60)) == []
    decision = d.sched.last_decision
    assert decision is not None and decision.plan is not None
    assert (decision.plan.victims, decision.plan.at) == ((1,), started + MIN)
    assert d.sched.next_wakeup() == started + MIN
    assert victims(d.tick(60)) == [1]


def test_a_job_preempted_max_preemptions_times_is_not_preempted_again() -> None:
    d = driver(gpus=1, usage={"alice": 60_000.0}, max_preemptions=2)
    d.submit(1, "alice", preemptible=True, restarts=2)
    d.tick()
    d.submit(2, "bob")
    assert victims(d.tick(MIN)) == []


def test_the_explanation_says_whom_and_when() -> None:
    d = driver(gpus=1, usage={"alice": 60_000.0})
    d.submit(12, "alice", preemptible=True)
    d.tick()
    started = d.now
    d.submit(17, "bob")
    d.tick(60)
    decision = d.sched.last_decision
    assert decision is not None and decision.inputs is not None
    state, now, cfg = decision.inputs
    est = estimate(state, now, cfg, decision=decision, when=lambda ts, _: f"t{ts:.0f}")
    assert est[17].reason == f"will preempt job 12 of alice at ~t{started + MIN:.0f}"
    assert est[17].start == started + MIN + GRACE


# -- how: grace, requeue, usage -----------------------------------------------------------
def preempted_once() -> tuple[Driver, float]:
    d = driver(gpus=1, usage={"alice": 60_000.0})
    d.submit(1, "alice", preemptible=True, submitted=d.now - 50)
    d.tick()
    d.submit(2, "bob")
    assert victims(d.tick(MIN)) == [1]
    return d, d.now


def test_the_victim_gets_the_grace_then_is_asked_again_not_preempted_twice() -> None:
    d, _ = preempted_once()
    c = d.runtime.containers["c-1"]
    assert (c.stops, c.graces) == (1, [GRACE])
    assert victims(d.tick(1)) == [] and c.stops == 1  # being stopped: not chosen again
    assert d.sched.next_wakeup() is not None and d.sched.next_wakeup() <= d.now + GRACE + 5
    # The stop did not take (the engine was busy): asked again, with the same grace.
    out = d.tick(GRACE + 5)
    assert preempts(out) == [] and c.stops == 2 and c.graces == [GRACE, GRACE]


def test_the_victim_is_queued_again_keeping_its_submit_time() -> None:
    d, _ = preempted_once()
    submitted = d.sched.running[1].queued.submitted_at  # type: ignore[union-attr]
    d.now += GRACE  # SIGKILL at the end of the grace
    out = d.exit(1, 137)
    commit = next(i for i in out if isinstance(i, ev.CommitJob) and i.state == JobState.QUEUED)
    assert commit.fields == {"gpus": [], "container": None, "started_at": None, "error": None,
                             "restarts": 1, "preempted_by": 2}
    assert commit.detail.startswith("preempted by job 2 of bob")
    assert not any(isinstance(i, ev.SealOutputs) for i in out)  # it runs again into /outdir
    assert d.store.state(1) == JobState.QUEUED and d.store.jobs[1]["restarts"] == 1
    assert d.sched.queued[1].submitted_at == submitted and d.sched.queued[1].restarts == 1
    assert d.started(d.tick()) == [2]  # the freed GPU goes to the job that preempted
    d.exit(2, 0)
    assert d.started(d.tick(5)) == [1]  # and the preempted job runs again
    assert d.sched.running[1].restarts == 1


def test_a_victim_that_saves_its_state_and_exits_0_is_queued_again() -> None:
    d, _ = preempted_once()
    d.exit(1, 0)
    assert d.store.state(1) == JobState.QUEUED


def test_usage_is_charged_for_the_time_it_ran() -> None:
    d = driver(gpus=1)
    d.submit(1, "alice", preemptible=True)
    d.tick()
    d.submit(2, "bob")
    assert victims(d.tick(MIN)) == [1]
    d.now += 10.0
    d.exit(1, 143)
    used = d.sched.ledger.snapshot(d.now)["alice"]
    assert used == pytest.approx(MIN + 10.0, rel=1e-3)


def test_a_cancel_during_the_grace_wins() -> None:
    d, _ = preempted_once()
    d.handle(ev.CancelRequested(1, JobState.RUNNING, "alice"))
    d.exit(1, 143)
    assert d.store.state(1) == JobState.CANCELLED


def test_the_pure_choice_counts_shared_memory() -> None:
    gib = 2**30
    running = [
        RunningJob(1, "alice", 1, (0,), 0.0, gpu_memory=30 * gib, preemptible=True),
        RunningJob(2, "alice", 1, (0,), 10.0, gpu_memory=30 * gib, preemptible=True),
        RunningJob(3, "carol", 1, (1,), 0.0, gpu_memory=20 * gib, preemptible=True),
    ]
    head = QueuedJob(7, "bob", 1, 5.0, gpu_memory=40 * gib)
    state = ClusterState([head], running, free_gpus=frozenset(), usage={"alice": 5.0,
                         "carol": 5.0}, memory={0: 80 * gib, 1: 40 * gib})
    factors = {"alice": 0.1, "carol": 0.2, "bob": 1.0}
    now = MIN + 10
    p = plan(state, now, on(), head, [], factors)
    # Device 0 has 20 GiB left: one 30 GiB job of alice's (her youngest) makes 50.
    assert p is not None and p.victims == (2,) and p.at == now
    # Ten seconds earlier job 2 had not run its minimum: job 1 instead.
    early = plan(state, MIN, on(), head, [], factors)
    assert early is not None and early.victims == (1,)
    assert decide(state, now, on()).preempt == [(2, 7)]
    # With job 2 already being stopped, nobody else is chosen.
    running[1] = RunningJob(2, "alice", 1, (0,), 10.0, gpu_memory=30 * gib,
                            preemptible=True, stopping=True)
    state = ClusterState([head], running, free_gpus=frozenset(), memory=state.memory)
    assert plan(state, now, on(), head, [], factors) is None


# -- properties ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    id: int
    user: str
    gpus: int
    submit: float
    duration: float
    preemptible: bool


def run(jobs: list[Job], cfg: PolicyConfig,
        gpus: int = 2) -> tuple[Driver, list[tuple[int, float]]]:
    """Jobs on the fake driver until all end; (job, how long it had run) per preemption."""
    d = Driver(gpus=gpus, policy=cfg)
    d.now = 0.0
    d.sched.ledger.advance(0.0, {})
    d.sched.ledger.load_rows([{"user": "heavy", "value": 20_000.0, "updated_at": 0.0}])
    arrivals = sorted(jobs, key=lambda j: (j.submit, j.id))
    by_id = {j.id: j for j in jobs}
    ends: dict[int, tuple[float, int]] = {}  # job -> (its container exits, exit code)
    started: dict[int, float] = {}
    preempted: list[tuple[int, float]] = []
    seen = 0
    for _ in range(5000):
        for ins in d.done[seen:]:
            if isinstance(ins, ev.StartJob):
                started[ins.job_id] = d.now
                ends[ins.job_id] = (d.now + by_id[ins.job_id].duration, 0)
            elif isinstance(ins, ev.PreemptJob):
                preempted.append((ins.job_id, d.now - started[ins.job_id]))
                ends[ins.job_id] = (min(ends[ins.job_id][0], d.now + 5.0), 143)
        seen = len(d.done)
        times = [e for e, _ in ends.values()]
        if arrivals:
            times.append(arrivals[0].submit)
        wake = d.sched.next_wakeup()
        if wake is not None and wake > d.now:
            times.append(wake)
        if not times:
            break
        d.now = max(d.now, min(times))
        for job_id, (end, code) in sorted(ends.items()):
            if end <= d.now:
                del ends[job_id]
                d.exit(job_id, code)
        while arrivals and arrivals[0].submit <= d.now:
            j = arrivals.pop(0)
            d.submit(j.id, j.user, j.gpus, preemptible=j.preemptible)
        d.tick()
    return d, preempted


jobs_strategy = st.lists(
    st.tuples(st.sampled_from(["heavy", "heavy", "light", "mid"]), st.integers(1, 2),
              st.floats(0, 20_000), st.floats(60, 20_000), st.booleans()),
    min_size=1, max_size=12,
).map(lambda rows: [Job(i, *row) for i, row in enumerate(rows, 1)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=jobs_strategy)
def test_preempted_jobs_run_again_and_never_within_their_minimum_runtime(
        jobs: list[Job]) -> None:
    cfg = on(max_preemptions=2)
    d, preempted = run(jobs, cfg)
    assert all(d.store.state(j.id) == JobState.SUCCEEDED for j in jobs)
    assert all(ran >= MIN for _, ran in preempted)
    for job_id in {j for j, _ in preempted}:
        assert d.store.jobs[job_id]["restarts"] == sum(1 for j, _ in preempted if j == job_id)
        assert d.store.jobs[job_id]["restarts"] <= 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=jobs_strategy)
def test_with_preemption_off_the_instructions_are_as_before(jobs: list[Job]) -> None:
    plain = [Job(j.id, j.user, j.gpus, j.submit, j.duration, False) for j in jobs]
    before, none = run(plain, PolicyConfig())
    after, none_either = run(jobs, PolicyConfig(min_runtime=0.0, max_preemptions=9))
    assert none == none_either == []
    assert before.done == after.done


def test_a_day_long_heavy_job_makes_room_for_a_light_user_and_runs_again() -> None:
    jobs = [Job(1, "heavy", 2, 0.0, 86_400.0, True), Job(2, "light", 1, 3_600.0, 600.0, False)]
    d, preempted = run(jobs, on())
    assert preempted == [(1, 3_600.0)]
    assert d.store.state(1) == JobState.SUCCEEDED and d.store.jobs[1]["restarts"] == 1
    ends = [i for i in d.done if isinstance(i, ev.CommitJob) and i.state == JobState.SUCCEEDED]
    assert [c.job_id for c in ends] == [2, 1]


def test_nobody_backfills_onto_a_victims_devices_while_the_others_drain() -> None:
    d = driver(gpus=2, usage={"alice": 60_000.0})
    d.submit(1, "alice", preemptible=True, time_limit=36_000.0)
    d.submit(2, "alice", preemptible=True, time_limit=36_000.0)
    d.tick()
    d.submit(3, "bob", 2)
    assert victims(d.tick(MIN)) == [1, 2]
    d.submit(4, "carol", 1, time_limit=3_600.0)  # would end long before jobs 1, 2's limits
    d.exit(1, 143)
    assert d.started(d.tick(1)) == []  # the head's reservation ends with the grace
    d.submit(5, "dan", 1, time_limit=GRACE / 2)  # ends by then: may borrow the GPU
    assert d.started(d.tick()) == [5]
    d.exit(5, 0)
    d.exit(2, 143)
    assert d.started(d.tick(1)) == [3]

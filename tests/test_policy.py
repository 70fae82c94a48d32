"""The scheduling policy: order, placement, reasons, and its invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopq.core.capacity import GpuPool
from dopq.core.errors import ConfigError, Conflict
from dopq.core.jobs import JobState, WaitReason
from dopq.core.policy import (
    ClusterState,
    PolicyConfig,
    QueuedJob,
    RunningJob,
    decide,
    explain,
    fairshare_factors,
    job_term,
    recency_penalties,
    validate_gpus,
)
from dopq.core.usage import UsageLedger

NOW = 1_000_000.0
CFG = PolicyConfig()


def q(id: int, user: str = "ana", gpus: int = 1, sub: float = NOW - 100, **kw) -> QueuedJob:
    return QueuedJob(id, user, gpus, sub, kw.pop("time_limit", None), **kw)


def running(id: int, user: str, gpus: tuple[int, ...], started: float = NOW - 100,
            limit: float | None = 3600.0) -> RunningJob:
    return RunningJob(id, user, len(gpus), gpus, started, limit)


def state(queued, run=(), free=(), **kw) -> ClusterState:
    return ClusterState(list(queued), list(run), frozenset(free), **kw)


def order(st_: ClusterState, cfg: PolicyConfig = CFG) -> list[int]:
    return [e.id for e in decide(st_, NOW, cfg).entries]


def reasons(st_: ClusterState, cfg: PolicyConfig = CFG) -> dict[int, WaitReason]:
    return {e.id: e.reason for e in decide(st_, NOW, cfg).entries}


# ------------------------------------------------------------------ order


def test_less_used_user_goes_first():
    s = state([q(1, "ana"), q(2, "ben")], usage={"ana": 5000.0, "ben": 10.0})
    assert order(s) == [2, 1]


def test_f_is_half_at_exactly_the_used_share():
    f = fairshare_factors({"ana": 100.0, "ben": 100.0}, ["ana", "ben"], {})
    assert f["ana"] == pytest.approx(0.5)
    weighted = fairshare_factors({"ana": 300.0, "ben": 100.0}, ["ana", "ben"], {"Ana": 3})
    assert weighted["ana"] == pytest.approx(0.5)
    assert fairshare_factors({}, ["ana"], {}) == {"ana": 1.0}


def test_users_are_case_insensitive():
    s = state([q(1, "Ana"), q(2, "ben")], usage={"ANA": 5000.0, "ana": 5000.0})
    entries = decide(s, NOW, CFG).entries
    assert [e.id for e in entries] == [2, 1]
    assert entries[1].factors["F"] == pytest.approx(2 ** (-1 / 0.5))


def test_ties_by_submit_then_id_and_older_first():
    s = state([q(3, sub=NOW - 10), q(2, sub=NOW - 10), q(1, sub=NOW - 5), q(4, sub=NOW - 50)])
    assert order(s) == [4, 2, 3, 1]


def test_job_priority_and_nice():
    s = state([q(1), q(2, priority=1000), q(3, nice=600), q(4, priority=-1000)])
    assert order(s) == [2, 1, 4, 3]
    assert job_term(0, 1000) == 500 and job_term(5000, 1000) == 1000


def test_aged_jobs_go_first_in_submit_order():
    cfg = PolicyConfig(max_age=3600)
    s = state(
        [q(1, "heavy", sub=NOW - 4000), q(2, "heavy", sub=NOW - 7200), q(3, "light")],
        usage={"heavy": 1e6},
    )
    assert order(s, cfg) == [2, 1, 3]
    assert order(s) == [3, 2, 1]  # default max_age: light user first


def test_topped_jobs_first():
    s = state([q(1), q(2, top=1), q(3, top=5), q(4)])
    assert order(s) == [3, 2, 1, 4]


def test_priority_and_factors_reported():
    e = decide(state([q(1, sub=NOW - CFG.max_age / 2)]), NOW, CFG).entries[0]
    assert e.position == 1
    assert e.factors == pytest.approx({"fairshare": 10000, "age": 500, "job": 500, "nice": 0,
                                       "F": 1.0})
    assert e.priority == pytest.approx(11000)


def test_recency_matches_the_original_formula():
    history = ["ana", "ben", "ANA", "cyd"]
    pen = recency_penalties(history)
    assert pen["ana"] == pytest.approx(1 + math.exp(-2))
    assert pen["ben"] == pytest.approx(math.exp(-1))
    cfg = PolicyConfig(policy="recency")
    s = state([q(1, "ana", sub=1), q(2, "ben", sub=2), q(3, "cyd", sub=3), q(4, "dan", sub=4),
               q(5, "ben", sub=0)], history=history)
    assert order(s, cfg) == [4, 3, 5, 2, 1]
    entries = decide(s, NOW, cfg).entries
    assert entries[-1].factors == {"penalty": pytest.approx(1 + math.exp(-2))}


# -------------------------------------------------------------- placement


def test_gpus_lowest_first_and_cpu_jobs_get_none():
    d = decide(state([q(1, gpus=2), q(2, gpus=0)], free={3, 1, 2}), NOW, CFG)
    assert d.starts == [(1, (1, 2)), (2, ())]


def test_backfill_rules():
    run = [running(9, "zed", (0, 1), started=NOW - 100, limit=3700)]  # ends at NOW + 3600
    queued = [
        q(1, gpus=4, sub=NOW - 500),  # head: reserves, shadow NOW + 3600
        q(2, gpus=1, sub=NOW - 400),  # no time limit: may not pass
        q(3, gpus=1, sub=NOW - 300, time_limit=7200),  # ends after the shadow
        q(4, gpus=3, sub=NOW - 250, time_limit=60),  # does not fit
        q(5, gpus=1, sub=NOW - 200, time_limit=1800),  # ends before: backfills
        q(6, gpus=0, sub=NOW - 100),  # CPU only: never waits
    ]
    d = decide(state(queued, run, free={2, 3}, total_gpus=4), NOW, CFG)
    assert d.starts == [(5, (2,)), (6, ())]
    assert reasons(state(queued, run, free={2, 3}, total_gpus=4)) == {
        1: WaitReason.RESOURCES, 2: WaitReason.RESERVED, 3: WaitReason.RESERVED,
        4: WaitReason.PRIORITY, 5: WaitReason.NONE, 6: WaitReason.NONE,
    }


def test_no_backfill_behind_an_unknown_shadow():
    run = [running(9, "zed", (0, 1), limit=None)]
    queued = [q(1, gpus=4), q(2, gpus=1, sub=NOW, time_limit=60), q(3, gpus=0, sub=NOW)]
    d = decide(state(queued, run, free={2, 3}), NOW, CFG)
    assert d.starts == [(3, ())]


def test_oversized_job_does_not_block():
    d = decide(state([q(1, gpus=8), q(2, gpus=1, sub=NOW)], free={0, 1}), NOW, CFG)
    assert d.starts == [(2, (0,))]
    assert reasons(state([q(1, gpus=8)], free={0}))[1] == WaitReason.RESOURCES


def test_held_dependency_and_failure():
    fin = {10: JobState.SUCCEEDED, 11: JobState.FAILED, 12: JobState.CANCELLED}
    queued = [
        q(1, held=True),
        q(2, after=(10,)),
        q(3, after=(10, 13)),
        q(4, after=(11,)),
        q(5, after=(12,)),
        q(6, after_any=(11, 12)),
        q(7, after_any=(13,)),
    ]
    s = state(queued, free=range(8), finished_states=fin)
    d = decide(s, NOW, CFG)
    assert sorted(i for i, _ in d.starts) == [2, 6]
    assert d.fail == [(4, "dependency 11 failed"), (5, "dependency 12 cancelled")]
    r = reasons(s)
    assert r[1] == WaitReason.HELD
    assert r[3] == r[4] == r[7] == WaitReason.DEPENDENCY


def test_user_limits_count_running_and_new_starts():
    cfg = PolicyConfig(max_running_per_user=2, max_gpus_per_user=3)
    run = [running(9, "ana", (0,))]
    queued = [q(1, gpus=1), q(2, gpus=0, sub=NOW - 50), q(3, gpus=1, sub=NOW - 10),
              q(4, "ben", gpus=2, sub=NOW)]
    s = state(queued, run, free=range(1, 8))
    assert decide(s, NOW, cfg).starts == [(1, (1,)), (4, (2, 3))]
    assert reasons(s, cfg) == {1: WaitReason.NONE, 2: WaitReason.USER_LIMIT,
                               3: WaitReason.USER_LIMIT, 4: WaitReason.NONE}
    gpu_cap = PolicyConfig(max_gpus_per_user=2)
    s = state([q(1, gpus=2), q(2, gpus=1, sub=NOW)], run, free=range(1, 8))
    assert decide(s, NOW, gpu_cap).starts == [(2, (1,))]  # 1 + 2 GPUs would pass the cap


def test_next_wakeup():
    cfg = PolicyConfig(max_age=7200)
    run = [running(9, "zed", (0,), started=NOW - 100, limit=1000)]
    d = decide(state([q(1, gpus=2, sub=NOW - 7000)], run, free={1}), NOW, cfg)
    assert d.next_wakeup == pytest.approx(NOW + 200)
    d = decide(state([q(1, gpus=2, sub=NOW - 7000)], run, free={1}), NOW, CFG)
    assert d.next_wakeup == pytest.approx(NOW + 900)
    assert decide(state([]), NOW, CFG).next_wakeup is None


def test_config_validation_names_the_key():
    for bad, key in [
        ({"half_life": 60}, "half_life"),
        ({"policy": "fifo"}, "policy"),
        ({"w_age": -1}, "w_age"),
        ({"max_running_per_user": -1}, "max_running_per_user"),
        ({"shares": {"ana": 0}}, "shares.ana"),
        ({"max_age": 0}, "max_age"),
        ({"bogus": 1}, "bogus"),
    ]:
        with pytest.raises(ConfigError) as err:
            PolicyConfig.from_dict(bad)
        assert err.value.key == key
    assert PolicyConfig(shares={"Ana": 2}).weight("ANA") == 2


def test_gpu_pool_books():
    pool = GpuPool(range(4))
    pool.acquire(1, (0, 1))
    with pytest.raises(Conflict):
        pool.acquire(2, (1, 2))
    pool.validate()
    assert pool.free() == {2, 3} and pool.release(1) == (0, 1) and pool.free() == {0, 1, 2, 3}
    with pytest.raises(AssertionError, match="held by jobs"):
        validate_gpus(frozenset(range(4)), [running(1, "a", (0,))], [(2, (0,))])
    with pytest.raises(AssertionError, match="neither free nor held"):
        validate_gpus(frozenset(range(4)), [running(1, "a", (0,))], free=frozenset({1}))


def test_large_queue_is_fast_enough_to_run():
    queued = [q(i, f"u{i % 200}", gpus=1 + i % 3, sub=NOW - i) for i in range(20_000)]
    d = decide(state(queued, free={0}), NOW, CFG)
    assert len(d.starts) == 1


# --------------------------------------------------------------- properties

users = st.sampled_from(["ana", "Ana", "ben", "cyd"])


@st.composite
def cluster_states(draw):
    total = draw(st.integers(1, 6))
    gpus = list(range(total))
    run, used = [], 0
    for i in range(draw(st.integers(0, 3))):
        n = draw(st.integers(1, 2))
        if used + n > total:
            break
        run.append(RunningJob(100 + i, draw(users), n, tuple(gpus[used:used + n]),
                              NOW - draw(st.floats(0, 5000)),
                              draw(st.one_of(st.none(), st.floats(60, 9000)))))
        used += n
    queued = [
        QueuedJob(
            i, draw(users), draw(st.integers(0, total + 1)), NOW - draw(st.floats(0, 1e6)),
            draw(st.one_of(st.none(), st.floats(60, 9000))),
            priority=draw(st.integers(-2000, 2000)), nice=draw(st.integers(0, 100)),
            held=draw(st.booleans()), top=draw(st.sampled_from([0, 0, 0, 1, 2])),
            after=draw(st.sampled_from([(), (), (100,), (101,)])),
        )
        for i in range(draw(st.integers(0, 25)))
    ]
    usage = draw(st.dictionaries(users, st.floats(0, 1e7)))
    fin = draw(st.dictionaries(st.sampled_from([100, 101]),
                               st.sampled_from(list(JobState)[4:])))
    cfg = PolicyConfig(
        policy=draw(st.sampled_from(["fairshare", "recency"])), max_age=draw(st.floats(60, 1e6)),
        max_running_per_user=draw(st.sampled_from([None, 1, 3])),
        max_gpus_per_user=draw(st.sampled_from([None, 2])),
    )
    s = ClusterState(queued, run, frozenset(gpus[used:]), usage, fin,
                     draw(st.lists(users, max_size=6)), total)
    return s, cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_states())
def test_decide_agrees_with_explain(case):
    s, cfg = case
    d = decide(s, NOW, cfg)
    entries = explain(s, NOW, cfg)
    assert sorted(e.id for e in entries) == sorted(j.id for j in s.queued)
    assert [e.position for e in entries] == list(range(1, len(entries) + 1))
    assert {e.id for e in entries if e.reason is WaitReason.NONE} == {i for i, _ in d.starts}
    total = frozenset(range(s.total_gpus or 0))
    validate_gpus(total, s.running, d.starts)
    assert all(len(g) == next(j.num_gpus for j in s.queued if j.id == i) for i, g in d.starts)


usage_maps = st.dictionaries(st.sampled_from(["ana", "ben", "cyd", "dan"]), st.floats(0, 1e8),
                             min_size=1)


@settings(max_examples=200, deadline=None)
@given(usage_maps, st.sampled_from(["ana", "ben", "cyd", "dan"]), st.floats(0, 1e8),
       st.dictionaries(st.sampled_from(["ana", "ben"]), st.floats(0.1, 10)))
def test_f_never_rises_when_usage_rises(usage, user, extra, shares):
    active = ["ana", "ben", "cyd", "dan"]
    before = fairshare_factors(usage, active, shares)[user]
    more = dict(usage)
    more[user] = more.get(user, 0.0) + extra
    after = fairshare_factors(more, active, shares)[user]
    assert after <= before * (1 + 1e-12)
    assert 0.0 <= after <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e7), st.floats(0, 8), st.floats(0, 86400 * 10), st.floats(3600, 30 * 86400))
def test_two_steps_of_dt_equal_one_of_2dt(h0, rate, dt, half_life):
    one = UsageLedger.from_rows([{"user": "ana", "value": h0, "updated_at": 0.0}], half_life)
    two = UsageLedger.from_rows(one.to_rows(), half_life)
    one.advance(2 * dt, {"ana": rate})
    two.advance(dt, {"ana": rate})
    two.advance(2 * dt, {"ana": rate})
    assert math.isclose(one.value("ana", 2 * dt), two.value("ana", 2 * dt),
                        rel_tol=1e-9, abs_tol=1e-6)


def test_submit_time_in_the_future_counts_as_no_age():
    s = state([q(1, sub=NOW + 50), q(2, sub=NOW - 10), q(3, "ben", sub=NOW + 10)])
    entries = decide(s, NOW, CFG).entries
    assert [e.id for e in entries] == [2, 3, 1]  # 1 and 3 tie: submit order
    assert entries[1].factors["age"] == 0.0 and entries[2].factors["age"] == 0.0


# ------------------------------------------------- properties with shared devices

GIB = 1 << 30


@st.composite
def shared_states(draw):
    """Devices of 16g with a 1g reserve; running and queued jobs whole or shared."""
    total = draw(st.integers(1, 4))
    memory = {g: 16 * GIB for g in range(total)}
    foreign = draw(st.dictionaries(st.integers(0, total - 1), st.sampled_from([1, 4, 8])))
    foreign = {g: b * GIB for g, b in foreign.items()}
    declared = {g: 0 for g in range(total)}
    whole: set[int] = set()
    run = []
    for i in range(draw(st.integers(0, 5))):
        mem = draw(st.sampled_from([0, 2, 4, 8])) * GIB
        n = draw(st.integers(1, 2))
        if mem:
            ok = [g for g in range(total) if g not in whole
                  and declared[g] + mem + foreign.get(g, 0) <= 15 * GIB]
        else:
            ok = [g for g in range(total) if g not in whole and not declared[g]
                  and g not in foreign]
        if len(ok) < n:
            continue
        gpus = tuple(ok[:n])
        for g in gpus:
            if mem:
                declared[g] += mem
            else:
                whole.add(g)
        run.append(RunningJob(100 + i, draw(users), n, gpus, NOW - draw(st.floats(0, 5000)),
                              draw(st.one_of(st.none(), st.floats(60, 9000))), mem))
    free = frozenset(g for g in range(total)
                     if g not in whole and not declared[g] and g not in foreign)
    queued = [
        QueuedJob(i, draw(users), draw(st.integers(0, 2)), NOW - draw(st.floats(0, 1e5)),
                  draw(st.one_of(st.none(), st.floats(60, 9000))),
                  held=draw(st.booleans()),
                  gpu_memory=draw(st.sampled_from([0, 0, 2, 4, 8, 15, 16])) * GIB)
        for i in range(draw(st.integers(0, 15)))
    ]
    queued = [j for j in queued if j.num_gpus or not j.gpu_memory]
    cfg = PolicyConfig(max_gpus_per_user=draw(st.sampled_from([0, 1, 2])))
    s = ClusterState(queued, run, free, draw(st.dictionaries(users, st.floats(0, 1e6))),
                     total_gpus=total, memory=memory, foreign=foreign,
                     external=frozenset(foreign), memory_reserve=GIB)
    return s, cfg, declared, whole


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shared_states())
def test_shared_placement_never_over_commits(case):
    s, cfg, declared, whole = case
    d = decide(s, NOW, cfg)
    entries = explain(s, NOW, cfg)
    assert {e.id for e in entries if e.reason is WaitReason.NONE} == {i for i, _ in d.starts}
    jobs = {j.id: j for j in s.queued}
    for job_id, gpus in d.starts:
        j = jobs[job_id]
        assert len(gpus) == j.num_gpus == len(set(gpus))
        for g in gpus:
            if j.gpu_memory:
                assert g not in whole
                declared[g] += j.gpu_memory
            else:
                assert g not in whole and not declared[g] and g not in s.foreign
                whole.add(g)
    for g, used in declared.items():
        assert used + s.foreign.get(g, 0) <= 15 * GIB or used == 0


def test_whole_job_reserves_a_draining_shared_device():
    run = [RunningJob(1, "ana", 1, (0,), NOW - 100, 1000.0, 4 * GIB)]
    queued = [q(2, "ben", time_limit=60.0), q(3, "cyd", gpu_memory=4 * GIB, time_limit=5000.0),
              q(4, "cyd", gpu_memory=4 * GIB, time_limit=500.0, sub=NOW)]
    s = state(queued, run, total_gpus=1, memory={0: 16 * GIB}, memory_reserve=GIB)
    d = decide(s, NOW, CFG)
    assert d.starts == [(4, (0,))]  # ends by job 1's limit: backfills beside it
    assert reasons(s) == {2: WaitReason.RESOURCES, 3: WaitReason.RESERVED,
                          4: WaitReason.NONE}

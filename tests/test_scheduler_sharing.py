"""Jobs that share devices by declared GPU memory, through the scheduler.

``fakes.Driver`` validates the books after every event: no device both held
whole and shared, no device's declared memory over its memory less the
reserve, running jobs matching the pool.
"""

from __future__ import annotations

import pytest
from fakes import Driver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopq.core import events as ev
from dopq.core import scheduler as sc
from dopq.core.capacity import Capacity, Device, Node
from dopq.core.eta import estimate
from dopq.core.fairshare import PolicyConfig
from dopq.core.jobs import JobState, WaitReason
from dopq.core.policy import QueuedJob

G = 1 << 30


def reasons(d: Driver) -> dict[int, WaitReason]:
    assert d.sched.last_decision is not None
    return {e.id: e.reason for e in d.sched.last_decision.entries}


def test_three_4g_jobs_share_one_16g_device_and_a_fourth_waits() -> None:
    d = Driver(gpus=1, memory=16 * G, reserve=1 * G)
    for job in (1, 2, 3, 4):
        d.submit(job, "ana", 1, gpu_memory=4 * G)
    assert d.started(d.tick()) == [1, 2, 3]
    assert all(d.sched.running[j].gpus == (0,) for j in (1, 2, 3))
    assert d.sched.pool.sharers(0) == {1: 4 * G, 2: 4 * G, 3: 4 * G}
    assert reasons(d)[4] == WaitReason.RESOURCES
    d.exit(2, 0)
    assert d.started(d.tick(1)) == [4]


def test_shared_jobs_fill_used_devices_before_whole_ones() -> None:
    d = Driver(gpus=3, memory=16 * G, reserve=1 * G)
    d.submit(1, gpus=1, gpu_memory=8 * G)
    d.tick()
    d.submit(2, "ben", 1, gpu_memory=4 * G)  # fits beside job 1: devices 1, 2 stay whole
    d.submit(3, "cyd", 2, gpu_memory=12 * G)  # needs two devices with 12g: 1 and 2
    d.tick()
    assert d.sched.running[2].gpus == (0,) and d.sched.running[3].gpus == (1, 2)


def test_whole_gpu_job_waits_for_the_device_to_drain_and_holds_it() -> None:
    d = Driver(gpus=1, memory=16 * G, reserve=1 * G)
    for job in (1, 2):
        d.submit(job, "ana", 1, gpu_memory=4 * G, time_limit=1000.0)
    d.tick()
    d.submit(3, "ben", 1, time_limit=600.0)  # whole GPU: first in line, reserves
    d.tick(10)
    # A stream of small jobs with long limits: room is there, but they would
    # outlast the reservation, so none of them starts.
    for job in range(10, 20):
        d.submit(job, "cyd", 1, submitted=d.now + job, gpu_memory=2 * G, time_limit=5000.0)
        assert d.started(d.tick(30)) == []
    why = reasons(d)
    assert why[3] == WaitReason.RESOURCES
    assert all(why[job] == WaitReason.RESERVED for job in range(10, 20))
    # One that ends before the sharers do may use the room meanwhile.
    d.submit(30, "cyd", 1, gpu_memory=2 * G, time_limit=60.0)
    assert d.started(d.tick()) == [30]
    d.exit(30, 0)
    d.exit(1, 0)
    assert d.started(d.tick(1)) == []  # job 2 still shares the device
    d.exit(2, 0)
    assert d.started(d.tick(1)) == [3]
    assert d.sched.pool.held() == {0: 3}


def test_a_job_bigger_than_any_device_never_starts_nor_reserves() -> None:
    d = Driver(gpus=2, memory=16 * G, reserve=1 * G)
    d.submit(1, "ana", 1, gpu_memory=16 * G)  # 16g > 16g - 1g reserve
    d.submit(2, "ben", 2, submitted=d.now + 1)  # whole GPUs, no limit: not blocked by 1
    assert d.started(d.tick()) == [2]
    d.submit(3, "cyd", 1, gpu_memory=15 * G, time_limit=None)
    d.exit(2, 0)
    assert d.started(d.tick(1)) == [3]
    assert 1 in d.sched.queued and reasons(d)[1] == WaitReason.RESOURCES


def test_foreign_memory_shrinks_what_fits_and_its_departure_reopens() -> None:
    d = Driver(gpus=1, memory=16 * G, reserve=1 * G)
    d.handle(ev.CapacityChanged(foreign={0: 8 * G}))
    d.submit(1, "ana", 1, gpu_memory=4 * G)
    d.submit(2, "ben", 1, gpu_memory=4 * G)
    assert d.started(d.tick()) == [1]  # 16 - 1 - 8 = 7g: one 4g job
    d.handle(ev.CapacityChanged(foreign={}))
    assert d.started(d.tick(1)) == [2]


def test_foreign_use_closes_a_device_to_whole_jobs() -> None:
    d = Driver(gpus=2, memory=16 * G, reserve=1 * G)
    d.handle(ev.CapacityChanged(foreign={0: 1 * G}))
    d.submit(1, "ana", 1)
    d.submit(2, "ben", 1)
    assert d.started(d.tick()) == [1] and d.sched.running[1].gpus == (1,)
    d.handle(ev.CapacityChanged(foreign={}))
    assert d.started(d.tick(1)) == [2] and d.sched.running[2].gpus == (0,)


def test_a_4g_job_on_a_16g_device_is_charged_a_quarter_gpu() -> None:
    d = Driver(gpus=2, memory=16 * G)
    d.submit(1, "ana", 1, gpu_memory=4 * G)
    d.submit(2, "ben", 1)
    d.tick()
    d.tick(3600.0)
    ledger = d.sched.ledger
    assert ledger.value("ana", d.now) / ledger.value("ben", d.now) == pytest.approx(0.25)


def test_the_per_user_gpu_limit_counts_fractions() -> None:
    d = Driver(gpus=2, memory=16 * G, policy=PolicyConfig(max_gpus_per_user=1))
    for job in range(1, 6):
        d.submit(job, "ana", 1, gpu_memory=4 * G)
    assert d.started(d.tick()) == [1, 2, 3, 4]  # 4 x 0.25 = 1 GPU
    assert reasons(d)[5] == WaitReason.USER_LIMIT


def test_adopted_shared_jobs_are_counted() -> None:
    d = Driver(gpus=1, memory=16 * G, reserve=1 * G)
    for job in (1, 2):
        d.store.add(job, user="ana", state=JobState.RUNNING)
        d.handle(ev.JobAdopted(ev.Running(job, "ana", 1, (0,), 900.0, gpu_memory=6 * G)))
    d.submit(3, "ben", 1, gpu_memory=4 * G)
    assert d.started(d.tick()) == []  # 15 - 12 = 3g left
    assert d.sched.pool.room(0) == 3 * G


# -- property: the books balance with shared jobs in the mix ---------------------------
ops = st.lists(st.tuples(
    st.sampled_from(["submit", "tick", "exit", "cancel", "foreign", "external", "refuse"]),
    st.integers(0, 12), st.integers(0, 3), st.sampled_from([0, 0, 3, 4, 8, 15, 16])),
    max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_no_device_is_over_committed(steps: list[tuple[str, int, int, int]]) -> None:
    d = Driver(gpus=3, memory=16 * G, reserve=1 * G, stop_grace=1.0)
    for op, job, n, mem in steps:
        if op == "submit" and job not in d.store.jobs:
            d.submit(job, f"u{job % 3}", n if not mem else max(1, n), gpu_memory=mem * G,
                     time_limit=50.0 * (1 + job % 4) if job % 3 else None)
        elif op == "tick":
            d.tick(float(n * 20))
        elif op == "exit" and job in d.sched.running and d.sched.running[job].container:
            d.exit(job, 0, deferrable=False)
        elif op == "cancel" and job in d.store.jobs:
            st_ = d.store.state(job)
            if st_ in (JobState.QUEUED, JobState.RUNNING):
                d.handle(ev.CancelRequested(job, st_, "root"))
                if st_ == JobState.QUEUED:
                    d.handle(ev.JobLeftQueue(job))
        elif op == "foreign":
            d.handle(ev.CapacityChanged(foreign={g: mem * G for g in range(n)}))
        elif op == "external":
            d.handle(ev.CapacityChanged(external=frozenset(range(n))))
        elif op == "refuse":
            d.block_starts ^= {job}
        for job_id, row in d.store.jobs.items():
            if row["state"] == JobState.QUEUED and job_id not in d.sched.queued \
                    and job_id not in d.sched.running:
                d.handle(ev.JobQueued(QueuedJob(job_id, row["user"], row["want"], d.now,
                                                gpu_memory=row["gpu_memory"])))
        declared: dict[int, int] = {}
        whole: set[int] = set()
        for r in d.sched.running.values():
            for g in r.gpus:
                if r.gpu_memory:
                    declared[g] = declared.get(g, 0) + r.gpu_memory
                else:
                    assert g not in whole
                    whole.add(g)
        assert all(v <= 15 * G for v in declared.values())
        assert not whole & declared.keys()


def test_devices_with_memory_arrive_by_capacity_changed() -> None:
    d = Driver(gpus=1)  # memory unknown: nobody shares
    d.submit(1, "ana", 1, gpu_memory=4 * G)
    assert d.started(d.tick()) == [] and reasons(d)[1] == WaitReason.RESOURCES
    d.handle(ev.CapacityChanged(devices=[Device(0, "GPU-0", 16 * G), Device(1, "GPU-1", 16 * G)]))
    d.submit(2, "ben", 1, gpu_memory=4 * G)
    assert d.started(d.tick(1)) == [1, 2] and d.sched.pool.sharers(0) == {1: 4 * G, 2: 4 * G}


def test_mig_slices_are_placed_like_any_device() -> None:
    slices = [Device(1000 + s, f"MIG-{s}", 10 * G, parent=0) for s in range(2)]
    sched = sc.Scheduler(sc.SchedulerConfig(), Capacity([Node("local", slices)]),
                         memory_reserve=1 * G)
    for job in (1, 2, 3):
        sched.handle(ev.JobQueued(QueuedJob(job, "ana", 1, 0.0,
                                            gpu_memory=0 if job == 1 else 4 * G)), 0.0)
    starts = [i for i in sched.handle(ev.Tick(), 0.0) if isinstance(i, ev.StartJob)]
    assert [(s.job_id, s.gpus) for s in starts] == [(1, (1000,)), (2, (1001,)), (3, (1001,))]
    sched.validate()


def test_estimates_count_shared_jobs() -> None:
    d = Driver(gpus=1, memory=16 * G, reserve=1 * G)
    d.submit(1, "ana", 1, gpu_memory=8 * G, time_limit=600.0)
    d.submit(2, "ana", 1, gpu_memory=6 * G, time_limit=600.0)
    d.tick()
    d.submit(3, "ben", 1, gpu_memory=8 * G, time_limit=300.0)
    d.submit(4, "cyd", 1, submitted=d.now + 1)  # whole: after job 3 drains the device
    d.tick(60)
    state = d.sched.cluster_state(d.now)
    est = estimate(state, d.now, d.sched.policy_config(), when=lambda ts, now: f"{ts - now:.0f}")
    assert est[3].start == pytest.approx(d.now + 540) and "8 GiB" in est[3].reason
    assert est[4].start == pytest.approx(d.now + 840)

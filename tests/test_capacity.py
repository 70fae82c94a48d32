"""The device pool's books: whole, shared by memory, busy from outside, MIG."""

from __future__ import annotations

import pytest

from dopq.core.capacity import Capacity, Device, GpuPool, Node
from dopq.core.errors import Conflict
from dopq.core.policy import RunningJob
from dopq.core.usage import charge_rates, gpu_fraction

G = 1 << 30


def pool(n: int = 2, memory: int = 16 * G, reserve: int = 1 * G) -> GpuPool:
    return GpuPool(range(n), {i: memory for i in range(n)}, reserve)


def test_shared_jobs_fit_within_memory_less_the_reserve() -> None:
    p = pool()
    for job in (1, 2, 3):
        p.acquire(job, (0,), 4 * G)
        p.validate()
    assert p.room(0) == 3 * G and p.sharers(0) == {1: 4 * G, 2: 4 * G, 3: 4 * G}
    with pytest.raises(Conflict, match="free for sharing"):
        p.acquire(4, (0,), 4 * G)
    assert p.free() == {1} and p.held() == {}
    p.validate()


def test_whole_and_shared_never_mix() -> None:
    p = pool()
    p.acquire(1, (0,), 4 * G)
    with pytest.raises(Conflict, match="shared by jobs"):
        p.acquire(2, (0,))
    p.acquire(2, (1,))
    with pytest.raises(Conflict, match="held by job 2"):
        p.acquire(3, (1,), 1 * G)
    p.validate()
    assert p.release(1) == (0,) and p.free() == {0} and p.shared() == {}
    p.validate()


def test_foreign_use_shrinks_room_and_closes_to_whole_jobs() -> None:
    p = pool()
    p.set_external({0}, {0: 8 * G})
    assert p.room(0) == 7 * G and 0 not in p.free()
    with pytest.raises(Conflict, match="outside DoPQ"):
        p.acquire(1, (0,))
    p.acquire(1, (0,), 7 * G)
    with pytest.raises(Conflict):
        p.acquire(2, (0,), 1)
    p.validate()
    p.set_external(set(), {})  # it went
    assert p.room(0) == 8 * G
    p.release(1)
    assert p.free() == {0, 1}
    p.validate()


def test_busy_without_known_bytes_is_closed_to_all() -> None:
    p = pool()
    p.set_external({1})
    assert p.room(1) == 0 and p.free() == {0}
    with pytest.raises(Conflict):
        p.acquire(1, (1,), 1 * G)
    p.validate()


def test_unknown_memory_takes_no_shared_job() -> None:
    p = GpuPool(range(2))
    assert p.room(0) == 0
    with pytest.raises(Conflict):
        p.acquire(1, (0,), 1 * G)


def test_removed_shared_device_leaves_with_its_last_job() -> None:
    p = pool(3)
    p.acquire(1, (0,), 2 * G)
    p.acquire(2, (0,), 2 * G)
    p.set_devices({1, 2}, {1: 16 * G, 2: 16 * G})
    assert p.total == {0, 1, 2} and p.room(0) == 0
    p.release(1)
    assert 0 in p.total
    p.validate()
    p.release(2)
    assert p.total == {1, 2}
    p.validate()


def test_validate_catches_broken_books() -> None:
    p = pool()
    p.acquire(1, (0,), 4 * G)
    p._holder[0] = 2  # corrupt: held whole and shared
    p._jobs[2] = (0,)
    with pytest.raises(AssertionError, match="both held whole and shared"):
        p.validate()
    q = pool()
    q.acquire(1, (0,), 4 * G)
    q._shared[0][1] = 20 * G  # over-committed, and disagreeing with the job table
    with pytest.raises(AssertionError, match="over-committed"):
        q.validate()


def test_mig_slices_are_devices_and_their_parent_is_not() -> None:
    slices = [Device(1000 + 32 * 0 + s, f"MIG-{s}", 10 * G, parent=0) for s in range(3)]
    node = Node("local", [*slices, Device(1, "GPU-1", 80 * G)])
    Capacity([node]).validate()
    node.pool.acquire(7, (1000,))
    node.pool.acquire(8, (1001,), 4 * G)
    node.validate()
    bad = Node("local", [*slices, Device(0, "GPU-0", 80 * G)])
    with pytest.raises(AssertionError, match="listed whole and as MIG slices"):
        bad.validate()


def test_fair_share_charges_a_fraction_of_the_device() -> None:
    assert gpu_fraction(4 * G, [16 * G]) == 0.25
    assert gpu_fraction(4 * G, [16 * G, 8 * G]) == 0.75
    assert gpu_fraction(4 * G, [0]) == 1.0  # memory unknown: whole
    jobs = [RunningJob(1, "ana", 1, (0,), 0.0, gpu_memory=4 * G),
            RunningJob(2, "ana", 1, (1,), 0.0), RunningJob(3, "ben", 0, (), 0.0)]
    assert charge_rates(jobs, 0.1, {0: 16 * G, 1: 16 * G}) == pytest.approx(
        {"ana": 1.25, "ben": 0.1})

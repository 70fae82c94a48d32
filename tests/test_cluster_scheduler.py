"""The scheduler over several nodes (a Slurm cluster): a job's devices are all on one
node, a node that is down or drained takes nothing new, devices the cluster's other
jobs hold are busy. The books are validated after every event (``fakes.Driver``)."""

from __future__ import annotations

from fakes import Driver

from dopq.core import events as ev
from dopq.core.cluster import Flat
from dopq.core.jobs import JobState
from dopq.core.policy import WaitReason


def cluster(*nodes: tuple[str, int]) -> Driver:
    d = Driver(gpus=0)
    for name, gpus in nodes:
        d.handle(ev.NodeSeen(name, gpus))
    return d


def starts(out: list[ev.Instruction]) -> dict[int, tuple[str, tuple[int, ...]]]:
    return {i.job_id: (i.node, i.gpus) for i in out if isinstance(i, ev.StartJob)}


def test_a_job_gets_devices_of_one_node() -> None:
    d = cluster(("n1", 2), ("n2", 2))
    d.submit(1, "ana", 1)
    d.submit(2, "ben", 2)
    d.submit(3, "cyd", 1)
    got = starts(d.tick())
    assert set(got) == {1, 2, 3}
    assert got[2][1] == (0, 1)  # both of one node's devices
    assert got[1][0] == got[3][0] != got[2][0]  # the two 1-GPU jobs share the other
    assert d.sched.running[2].node == got[2][0]


def test_two_free_devices_on_two_nodes_do_not_make_a_two_gpu_job_fit() -> None:
    d = cluster(("n1", 2), ("n2", 2))
    d.submit(1, "ana", 1)
    d.submit(2, "ana", 1)
    got = starts(d.tick())
    assert {got[1][0], got[2][0]} == {"n1"}  # best fit: fills one node first
    d.submit(3, "ben", 1)
    d.submit(4, "ben", 1)
    assert {v[0] for v in starts(d.tick(1)).values()} == {"n2"}
    d.exit(1, 0)
    d.exit(3, 0)
    d.submit(5, "cyd", 2)
    assert starts(d.tick(1)) == {}
    assert d.sched.last_decision is not None
    waits = {e.id: e.reason for e in d.sched.last_decision.entries}
    assert waits[5] == WaitReason.RESOURCES
    d.exit(2, 0)
    assert starts(d.tick(1)) == {5: ("n1", (0, 1))}


def test_more_gpus_than_any_node_has_never_fits() -> None:
    d = cluster(("n1", 2), ("n2", 2))
    d.submit(1, "ana", 3)
    assert starts(d.tick()) == {}
    d.submit(2, "ben", 2)  # not held back by a reservation for a job that can never run
    assert list(starts(d.tick(1))) == [2]


def test_down_node_takes_nothing_and_foreign_jobs_hold_devices() -> None:
    d = cluster(("n1", 2), ("n2", 2))
    d.handle(ev.NodeSeen("n1", 2, usable=False))
    d.handle(ev.NodeSeen("n2", 2, foreign=1))
    for i in range(1, 4):
        d.submit(i, "ana", 1)
    got = starts(d.tick())
    assert list(got.values()) == [("n2", (0,))]
    d.handle(ev.NodeSeen("n1", 2, usable=True))
    assert sorted(v[0] for v in starts(d.tick(1)).values()) == ["n1", "n1"]


def test_a_node_going_down_keeps_its_running_job_counted() -> None:
    d = cluster(("n1", 2), ("n2", 2))
    d.submit(1, "ana", 2)
    (node, _), = starts(d.tick()).values()
    d.handle(ev.NodeSeen(node, 2, usable=False))
    d.submit(2, "ben", 2)
    assert starts(d.tick(1)) != {} and d.sched.running[1].node == node
    d.submit(3, "cyd", 2)
    assert starts(d.tick(1)) == {}  # the other node is full, this one is down
    d.exit(1, 0)
    assert d.store.state(1) == JobState.SUCCEEDED
    assert starts(d.tick(1)) == {}


def test_adopted_jobs_keep_their_node() -> None:
    d = cluster(("n1", 2), ("n2", 2))
    d.handle(ev.JobAdopted(ev.Running(7, "ana", 2, (0, 1), d.now - 5, node="n2")))
    d.submit(1, "ben", 2)
    assert starts(d.tick()) == {1: ("n1", (0, 1))}


def test_flat_ids_round_trip() -> None:
    d = cluster(("b", 2), ("a", 1))
    flat = Flat.of(d.sched.capacity)
    assert flat.to_local(flat.to_global("b", (1,))) == ("b", (1,))
    assert flat.node_of() == {0: "a", 1: "b", 2: "b"}

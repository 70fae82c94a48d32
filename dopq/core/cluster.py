"""Several nodes as one set of devices for the policy, and back.

The policy (:mod:`dopq.core.policy`, :mod:`dopq.core.placement`) counts
devices by integer id. On one node those are the node's own indices and
nothing here is used. On several (a Slurm cluster), each (node, index) gets a
global id, in node-name order, and ``ClusterState.node_of`` tells the placer
which node each id is on, so that one job's devices are all on one node. The
ids live for one decision only: :class:`Flat` is made again for each, and the
starts it returns are turned back into a node and its indices at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dopq.core.capacity import Capacity, Device, Node
from dopq.core.events import Running


@dataclass(frozen=True)
class Flat:
    """Global device id -> (node, index on that node), and the way back."""

    ids: tuple[tuple[str, int], ...]
    index: Mapping[tuple[str, int], int] = field(default_factory=dict)

    @classmethod
    def of(cls, capacity: Capacity) -> Flat:
        ids = tuple((name, i) for name in sorted(capacity.nodes)
                    for i in sorted(capacity.nodes[name].pool.total))
        return cls(ids, {key: g for g, key in enumerate(ids)})

    def to_global(self, node: str, gpus: Iterable[int]) -> tuple[int, ...]:
        return tuple(self.index[(node, g)] for g in gpus if (node, g) in self.index)

    def to_local(self, gpus: Iterable[int]) -> tuple[str, tuple[int, ...]]:
        """The node of global ``gpus`` and their indices there; ``ValueError`` if they
        span nodes (the placer never does that)."""
        pairs = [self.ids[g] for g in gpus]
        nodes = {n for n, _ in pairs}
        if len(nodes) > 1:
            raise ValueError(f"devices on several nodes: {sorted(nodes)}")
        return (pairs[0][0] if pairs else ""), tuple(i for _, i in pairs)

    def node_of(self) -> dict[int, str]:
        return {g: n for g, (n, _) in enumerate(self.ids)}


@dataclass(frozen=True)
class Merged:
    """The pools of every node under global ids: what ``ClusterState`` needs."""

    free: frozenset[int]
    memory: dict[int, int]
    foreign: dict[int, int]
    external: frozenset[int]
    total: int


def merge(capacity: Capacity, flat: Flat) -> Merged:
    free: set[int] = set()
    external: set[int] = set()
    memory: dict[int, int] = {}
    foreign: dict[int, int] = {}
    for name, node in capacity.nodes.items():
        pool = node.pool

        def g(i: int, name: str = name) -> int:
            return flat.index[(name, i)]

        free |= {g(i) for i in pool.free()}
        external |= {g(i) for i in pool.external()}
        memory.update({g(i): pool.memory(i) for i in pool.total if pool.memory(i)})
        foreign.update({g(i): b for i, b in pool.foreign().items()})
    return Merged(frozenset(free), memory, foreign, frozenset(external), len(flat.ids))


def node_devices(count: int, memory: int = 0) -> list[Device]:
    """``count`` whole devices, indices 0..count-1 (a cluster node's GPUs as its
    scheduler reports them: which physical ones a job gets is the node's choice)."""
    return [Device(i, memory=memory) for i in range(count)]


def ensure_node(capacity: Capacity, name: str) -> Node:
    """The node ``name``, added (without devices) if the capacity does not have it."""
    node = capacity.nodes.get(name)
    if node is None:
        reserve = capacity.default.pool.reserve
        node = capacity.nodes[name] = Node(name, (), reserve)
    return node


def closed_devices(node: Node, usable: bool, foreign_count: int) -> frozenset[int]:
    """Devices of ``node`` no new job may have: all of them when the node takes no
    jobs (down, drained), else ``foreign_count`` of those DoPQ's jobs do not hold
    (held by the cluster's other jobs; which ones is the node's business)."""
    pool = node.pool
    if not usable:
        return frozenset(pool.total - set(pool.held()))
    ours = set(pool.held()) | set(pool.shared())
    others = sorted(pool.total - ours, reverse=True)
    return frozenset(others[:max(0, foreign_count)])


def validate_books(capacity: Capacity, running: Mapping[int, Running],
                   queued: Mapping[int, object]) -> None:
    """Assert the books balance: the pools, and running jobs against them."""
    capacity.validate()
    for node in capacity.nodes.values():
        mine = {r.id: r for r in running.values() if r.node == node.name and r.gpus}
        held = node.pool.jobs()
        for job, r in mine.items():
            if job in held and sorted(held[job]) != sorted(r.gpus):
                raise AssertionError(f"job {job} runs on {r.gpus}, the pool says {held[job]}")
            if job in held and r.gpu_memory != node.pool.sharers(r.gpus[0]).get(job, 0):
                raise AssertionError(f"job {job} declared {r.gpu_memory} bytes, the pool "
                                     "has it otherwise")
        stray = set(held) - set(mine)
        if stray:
            raise AssertionError(f"jobs {sorted(stray)} hold GPUs but are not running")
    both = queued.keys() & running.keys()
    if both:
        raise AssertionError(f"jobs {sorted(both)} both queued and running")

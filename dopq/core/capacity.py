"""What the scheduler can place jobs on: nodes, their devices, and who holds which.

Pure accounting, no I/O. A :class:`Node` has devices (a whole GPU, or a MIG
slice that names its parent GPU) and a :class:`GpuPool` that counts them; a
job is placed on devices of one node, and every placement names its node, so
that more nodes (a cluster) or shared devices (memory-based packing) extend
this module rather than reshape the scheduler. Today the server has one node.

The pool's invariant, checked by :meth:`GpuPool.validate` (tests call it after
every event): each device is exactly one of free, held by one job, or busy
with a process outside DoPQ; free + held + external == total.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dopq.core.errors import Conflict

LOCAL = "local"  # the name of the one node of a single-host server


@dataclass(frozen=True)
class Device:
    """One schedulable device: ``index`` as NVML and ``NVIDIA_VISIBLE_DEVICES`` count.

    ``memory`` is in bytes (0 when unknown); ``parent`` is the index of the GPU a
    MIG slice is carved from, None for a whole GPU.
    """

    index: int
    uuid: str = ""
    memory: int = 0
    parent: int | None = None


class GpuPool:
    """Whole, exclusive GPUs: which job holds which, which are busy from outside.

    Every GPU is in exactly one of three states: free, held by one job, or
    external (busy with a process DoPQ did not start). ``validate()`` checks that,
    and tests call it after every event. A GPU taken out of the machine while a
    job holds it stays counted until that job lets it go (:meth:`set_devices`).
    """

    def __init__(self, indices: Iterable[int]) -> None:
        self._all = frozenset(indices)
        self._holder: dict[int, int] = {}  # gpu -> job
        self._jobs: dict[int, tuple[int, ...]] = {}  # job -> gpus, in acquire order
        self._external: frozenset[int] = frozenset()
        self._leaving: frozenset[int] = frozenset()  # removed, still held by a job

    @property
    def total(self) -> frozenset[int]:
        return self._all

    def acquire(self, job_id: int, gpus: Sequence[int]) -> None:
        """Give ``gpus`` to ``job_id``, all or nothing; ``Conflict`` if any is taken."""
        if job_id in self._jobs:
            raise Conflict(f"job {job_id} already holds GPUs {list(self._jobs[job_id])}")
        wanted = tuple(gpus)
        if len(set(wanted)) != len(wanted):
            raise Conflict(f"job {job_id} asked for a GPU twice: {list(wanted)}")
        for gpu in wanted:
            if gpu not in self._all or gpu in self._leaving:
                raise Conflict(f"job {job_id} asked for unknown GPU {gpu}")
            if gpu in self._holder:
                raise Conflict(f"GPU {gpu} is held by job {self._holder[gpu]}")
            if gpu in self._external:
                raise Conflict(f"GPU {gpu} is busy with a process outside DoPQ")
        if not wanted:
            return  # a CPU-only job holds nothing
        self._jobs[job_id] = wanted
        for gpu in wanted:
            self._holder[gpu] = job_id

    def release(self, job_id: int) -> tuple[int, ...]:
        """Free the GPUs of ``job_id`` and return them; () if it held none."""
        gpus = self._jobs.pop(job_id, ())
        for gpu in gpus:
            del self._holder[gpu]
        if self._leaving and self._leaving.intersection(gpus):
            gone = self._leaving.intersection(gpus)
            self._all -= gone
            self._leaving -= gone
        return gpus

    def holder(self, gpu: int) -> int | None:
        return self._holder.get(gpu)

    def of(self, job_id: int) -> tuple[int, ...]:
        """The GPUs ``job_id`` holds, in the order it asked for them."""
        return self._jobs.get(job_id, ())

    def free(self) -> frozenset[int]:
        return self._all - self._holder.keys() - self._external

    def held(self) -> dict[int, int]:
        """GPU -> job, a copy."""
        return dict(self._holder)

    def external(self) -> frozenset[int]:
        return self._external

    def set_external(self, busy: Iterable[int]) -> None:
        """Replace the set of GPUs busy from outside DoPQ.

        A GPU one of our jobs holds stays held (its new process may simply not
        be in the caller's PID list yet); GPUs this host does not have are ignored.
        """
        self._external = frozenset(busy) & (self._all - self._holder.keys())

    def set_devices(self, indices: Iterable[int]) -> None:
        """The machine's GPUs changed: new ones are free at once, a removed one
        leaves now if nobody holds it, else when its job releases it."""
        new = frozenset(indices)
        gone = self._all - new
        held_gone = gone & self._holder.keys()
        self._all = new | held_gone
        self._leaving = held_gone
        self._external &= new

    def validate(self) -> None:
        """Assert the invariants; ``AssertionError`` says which one broke."""
        held = set(self._holder)
        free = self.free()
        problems = []
        if not held <= self._all:
            problems.append(f"held GPUs not in pool: {sorted(held - self._all)}")
        if not self._external <= self._all:
            problems.append(f"external GPUs not in pool: {sorted(self._external - self._all)}")
        if held & self._external:
            problems.append(f"GPUs both held and external: {sorted(held & self._external)}")
        if not self._leaving <= held:
            problems.append(f"removed GPUs still counted: {sorted(self._leaving - held)}")
        counted = len(free) + len(held) + len(self._external)
        if counted != len(self._all):
            problems.append(
                f"free {len(free)} + held {len(held)} + external {len(self._external)}"
                f" != total {len(self._all)}"
            )
        seen: dict[int, int] = {}
        for job, gpus in self._jobs.items():
            if not gpus:
                problems.append(f"job {job} recorded with no GPUs")
            for gpu in gpus:
                if gpu in seen:
                    problems.append(f"GPU {gpu} held by jobs {seen[gpu]} and {job}")
                seen[gpu] = job
        if seen != self._holder:
            problems.append(f"job table {seen} disagrees with holder table {self._holder}")
        if problems:
            raise AssertionError("GpuPool invalid: " + "; ".join(problems))


class Node:
    """One machine: its devices and the pool that counts them."""

    def __init__(self, name: str, devices: Iterable[Device]) -> None:
        self.name = name
        self.devices: dict[int, Device] = {d.index: d for d in devices}
        self.pool = GpuPool(self.devices)

    def set_devices(self, devices: Iterable[Device]) -> None:
        self.devices = {d.index: d for d in devices}
        self.pool.set_devices(self.devices)


class Capacity:
    """The nodes jobs can be placed on, by name."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        if not self.nodes:
            raise ValueError("capacity needs at least one node")

    @classmethod
    def single(cls, indices: Iterable[int], name: str = LOCAL) -> Capacity:
        """One node with whole GPUs ``indices`` (what one server has today)."""
        return cls([Node(name, (Device(i) for i in indices))])

    @property
    def default(self) -> Node:
        """The node the single-node policy places on (the first one)."""
        return next(iter(self.nodes.values()))

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def validate(self) -> None:
        for node in self.nodes.values():
            node.pool.validate()


class _Holding(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def gpus(self) -> tuple[int, ...]: ...


def validate_gpus(
    total: frozenset[int],
    running: Sequence[_Holding],
    starts: Iterable[tuple[int, tuple[int, ...]]] = (),
    free: frozenset[int] | None = None,
) -> None:
    """Raise AssertionError unless no GPU is held twice, and free + held == total."""
    held: dict[int, int] = {}
    for job_id, gpus in [(r.id, r.gpus) for r in running] + list(starts):
        for g in gpus:
            if g in held:
                raise AssertionError(f"GPU {g} held by jobs {held[g]} and {job_id}")
            if g not in total:
                raise AssertionError(f"job {job_id} holds unknown GPU {g}")
            held[g] = job_id
    if free is not None:
        if not free.isdisjoint(held):
            raise AssertionError(f"GPUs {sorted(free & held.keys())} both free and held")
        if free | held.keys() != total:
            raise AssertionError(f"GPUs {sorted(total - free - held.keys())} neither free nor held")


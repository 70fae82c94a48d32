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

from collections.abc import Iterable, Mapping, Sequence
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
    """Devices and who holds them: whole and exclusive, or shared by memory.

    Every device is in exactly one of four states: free; held whole by one
    job; shared by jobs that declared memory (their sum at most the device's
    memory less ``reserve``); or external (busy with a process DoPQ did not
    start, and no job of ours on it). A shared device may also carry foreign
    use, whose bytes (:meth:`set_external` ``foreign``) shrink what more
    shared jobs get; an external device without known bytes is closed to
    every job. ``validate()`` checks all of it, and tests call it after every
    event. A device taken out of the machine while a job holds it stays
    counted until that job lets it go (:meth:`set_devices`).
    """

    def __init__(self, indices: Iterable[int], memory: Mapping[int, int] | None = None,
                 reserve: int = 0) -> None:
        self._all = frozenset(indices)
        self._memory: dict[int, int] = dict(memory or {})  # device -> bytes (absent: unknown)
        self.reserve = reserve  # bytes of each device no shared job gets
        self._holder: dict[int, int] = {}  # device -> job holding it whole
        self._shared: dict[int, dict[int, int]] = {}  # device -> {job: bytes}, never empty
        self._jobs: dict[int, tuple[int, ...]] = {}  # job -> devices, in acquire order
        self._job_memory: dict[int, int] = {}  # job -> bytes on each device (shared jobs)
        self._external: frozenset[int] = frozenset()
        self._foreign: dict[int, int] = {}  # device -> bytes used from outside
        self._leaving: frozenset[int] = frozenset()  # removed, still held by a job

    @property
    def total(self) -> frozenset[int]:
        return self._all

    def memory(self, gpu: int) -> int:
        """The device's memory in bytes; 0 when unknown."""
        return self._memory.get(gpu, 0)

    def room(self, gpu: int) -> int:
        """Bytes one more shared job may declare on ``gpu`` now (0: none, or closed)."""
        if (gpu not in self._all or gpu in self._leaving or gpu in self._holder
                or (gpu in self._external and gpu not in self._foreign)):
            return 0
        used = sum(self._shared.get(gpu, {}).values()) + self._foreign.get(gpu, 0)
        return max(0, self.memory(gpu) - self.reserve - used)

    def acquire(self, job_id: int, gpus: Sequence[int], memory: int = 0) -> None:
        """Give ``gpus`` to ``job_id``, all or nothing; ``Conflict`` if one cannot be had.

        ``memory`` 0: whole, exclusive devices; else the bytes the job shares
        each device with (each must have that much :meth:`room`).
        """
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
            if memory:
                if self.room(gpu) < memory:
                    raise Conflict(f"GPU {gpu} has {self.room(gpu)} bytes free for sharing, "
                                   f"job {job_id} declared {memory}")
                continue
            if gpu in self._shared:
                raise Conflict(f"GPU {gpu} is shared by jobs {sorted(self._shared[gpu])}")
            if gpu in self._external:
                raise Conflict(f"GPU {gpu} is busy with a process outside DoPQ")
        if not wanted:
            return  # a CPU-only job holds nothing
        self._jobs[job_id] = wanted
        for gpu in wanted:
            if memory:
                self._shared.setdefault(gpu, {})[job_id] = memory
            else:
                self._holder[gpu] = job_id
        if memory:
            self._job_memory[job_id] = memory

    def release(self, job_id: int) -> tuple[int, ...]:
        """Free the GPUs of ``job_id`` and return them; () if it held none."""
        gpus = self._jobs.pop(job_id, ())
        shared = self._job_memory.pop(job_id, 0)
        for gpu in gpus:
            if shared:
                sharers = self._shared[gpu]
                del sharers[job_id]
                if not sharers:
                    del self._shared[gpu]
            else:
                del self._holder[gpu]
        gone = self._leaving.intersection(gpus) - self._holder.keys() - self._shared.keys()
        if gone:
            self._all -= gone
            self._leaving -= gone
        return gpus

    def holder(self, gpu: int) -> int | None:
        """The job holding ``gpu`` whole, if one does."""
        return self._holder.get(gpu)

    def sharers(self, gpu: int) -> dict[int, int]:
        """Job -> bytes of the jobs sharing ``gpu``, a copy."""
        return dict(self._shared.get(gpu, {}))

    def of(self, job_id: int) -> tuple[int, ...]:
        """The GPUs ``job_id`` holds, in the order it asked for them."""
        return self._jobs.get(job_id, ())

    def jobs(self) -> dict[int, tuple[int, ...]]:
        """Job -> its devices (whole or shared), a copy."""
        return dict(self._jobs)

    def free(self) -> frozenset[int]:
        """Devices a whole-GPU job can have: nobody on them, inside or outside DoPQ."""
        return self._all - self._holder.keys() - self._shared.keys() - self._external

    def held(self) -> dict[int, int]:
        """GPU -> job holding it whole, a copy."""
        return dict(self._holder)

    def shared(self) -> dict[int, dict[int, int]]:
        """GPU -> {job: bytes} of the shared devices, a copy."""
        return {gpu: dict(jobs) for gpu, jobs in self._shared.items()}

    def external(self) -> frozenset[int]:
        return self._external

    def foreign(self) -> dict[int, int]:
        """GPU -> bytes used by processes outside DoPQ, where known; a copy."""
        return dict(self._foreign)

    def set_external(self, busy: Iterable[int], foreign: Mapping[int, int] | None = None) -> None:
        """Replace the GPUs busy from outside DoPQ (and the bytes they use, if known).

        A GPU one of our jobs holds whole stays held (its new process may
        simply not be in the caller's PID list yet); GPUs this host does not
        have are ignored. On a shared GPU the foreign bytes count against
        what more shared jobs get.
        """
        mine = self._all - self._holder.keys()
        self._foreign = {g: b for g, b in (foreign or {}).items() if g in mine}
        self._external = (frozenset(busy) | self._foreign.keys()) & mine

    def set_devices(self, indices: Iterable[int], memory: Mapping[int, int] | None = None) -> None:
        """The machine's GPUs changed: new ones are free at once, a removed one
        leaves now if nobody holds it, else when its last job releases it."""
        new = frozenset(indices)
        gone = self._all - new
        held_gone = gone & (self._holder.keys() | self._shared.keys())
        self._all = new | held_gone
        self._leaving = held_gone
        self._external &= new
        self._foreign = {g: b for g, b in self._foreign.items() if g in new}
        if memory is not None:
            self._memory = {g: m for g, m in self._memory.items() if g in held_gone}
            self._memory.update(memory)

    def validate(self) -> None:
        """Assert the invariants; ``AssertionError`` says which one broke."""
        held = set(self._holder)
        shared = set(self._shared)
        free = self.free()
        problems = []
        if not (held | shared) <= self._all:
            problems.append(f"held GPUs not in pool: {sorted((held | shared) - self._all)}")
        if not self._external <= self._all:
            problems.append(f"external GPUs not in pool: {sorted(self._external - self._all)}")
        if held & self._external:
            problems.append(f"GPUs both held and external: {sorted(held & self._external)}")
        if held & shared:
            problems.append(f"GPUs both held whole and shared: {sorted(held & shared)}")
        if not self._foreign.keys() <= self._external:
            problems.append(f"foreign use on GPUs not external: {sorted(self._foreign)}")
        if not self._leaving <= held | shared:
            problems.append(f"removed GPUs still counted: {sorted(self._leaving - held - shared)}")
        outside = self._external - shared
        counted = len(free) + len(held) + len(shared) + len(outside)
        if counted != len(self._all):
            problems.append(
                f"free {len(free)} + held {len(held)} + shared {len(shared)} + external "
                f"{len(outside)} != total {len(self._all)}"
            )
        for gpu, jobs in self._shared.items():
            if not jobs:
                problems.append(f"GPU {gpu} shared by nobody")
            if sum(jobs.values()) > self.memory(gpu) - self.reserve:
                problems.append(f"GPU {gpu} over-committed: {sum(jobs.values())} bytes declared,"
                                f" {self.memory(gpu)} - reserve {self.reserve}")
        seen: dict[int, int] = {}
        seen_shared: dict[int, dict[int, int]] = {}
        for job, gpus in self._jobs.items():
            if not gpus:
                problems.append(f"job {job} recorded with no GPUs")
            if len(set(gpus)) != len(gpus):
                problems.append(f"job {job} records a GPU twice: {list(gpus)}")
            memory = self._job_memory.get(job, 0)
            for gpu in gpus:
                if memory:
                    seen_shared.setdefault(gpu, {})[job] = memory
                    continue
                if gpu in seen:
                    problems.append(f"GPU {gpu} held by jobs {seen[gpu]} and {job}")
                seen[gpu] = job
        if seen != self._holder:
            problems.append(f"job table {seen} disagrees with holder table {self._holder}")
        if seen_shared != self._shared:
            problems.append(f"job table {seen_shared} disagrees with shared table {self._shared}")
        if not self._job_memory.keys() <= self._jobs.keys():
            problems.append(f"memory of jobs holding nothing: {sorted(self._job_memory)}")
        if problems:
            raise AssertionError("GpuPool invalid: " + "; ".join(problems))


class Node:
    """One machine: its devices and the pool that counts them.

    A GPU carved into MIG slices is never listed itself: its slices are the
    devices (:meth:`validate` asserts it).
    """

    def __init__(self, name: str, devices: Iterable[Device], reserve: int = 0) -> None:
        self.name = name
        self.devices: dict[int, Device] = {d.index: d for d in devices}
        self.pool = GpuPool(self.devices, self._memory(), reserve)

    def _memory(self) -> dict[int, int]:
        return {d.index: d.memory for d in self.devices.values() if d.memory}

    def set_devices(self, devices: Iterable[Device]) -> None:
        self.devices = {d.index: d for d in devices}
        self.pool.set_devices(self.devices, self._memory())

    def validate(self) -> None:
        parents = {d.parent for d in self.devices.values() if d.parent is not None}
        whole = sorted(parents & self.devices.keys())
        if whole:
            raise AssertionError(f"node {self.name}: GPUs {whole} listed whole and as MIG slices")
        self.pool.validate()


class Capacity:
    """The nodes jobs can be placed on, by name."""

    def __init__(self, nodes: Iterable[Node]) -> None:
        self.nodes: dict[str, Node] = {n.name: n for n in nodes}
        if not self.nodes:
            raise ValueError("capacity needs at least one node")

    @classmethod
    def single(cls, indices: Iterable[int], name: str = LOCAL, memory: int = 0) -> Capacity:
        """One node with GPUs ``indices`` of ``memory`` bytes each (0: unknown)."""
        return cls([Node(name, (Device(i, memory=memory) for i in indices))])

    @property
    def default(self) -> Node:
        """The node the single-node policy places on (the first one)."""
        return next(iter(self.nodes.values()))

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def validate(self) -> None:
        for node in self.nodes.values():
            node.validate()


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


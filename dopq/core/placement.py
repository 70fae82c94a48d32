"""Where queued jobs go: the policy's walk over the queue, device by device.

:class:`Placer` is handed the queued jobs one by one in the policy's order
(:mod:`dopq.core.policy`) and says for each whether it starts now, and on
which devices, or why it waits. Pure, like the policy.

Whole-GPU jobs (``gpu_memory`` 0) need devices nobody uses, inside or
outside DoPQ, and take the lowest free indices. A shared job needs
``num_gpus`` devices with ``gpu_memory`` bytes of room each (a device's
memory less the reserve, foreign use and the jobs already on it); it goes to
devices already in use first, the tightest fit first, then the lowest index,
so that whole devices stay whole for whole-GPU jobs.

Reservation: the first GPU job that does not fit reserves; its *shadow
time* is when enough devices will have drained for it, going by the time
limits of the jobs on them (for a whole-GPU job: when every sharer of a
device has ended; for a shared job: when enough of a device's sharers have
ended). Later GPU jobs start only if they fit now and end by the shadow
time, so a stream of small jobs can never hold a device a whole-GPU job is
waiting for. A job that no device could ever hold (more memory than any
device has, more devices than the machine has) never reserves.

When no job, queued or running, declares memory, none of the sharing code
runs: a whole-GPU queue is placed exactly as before sharing existed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING

from dopq.core.jobs import JobState, WaitReason
from dopq.core.usage import gpu_fraction

_memory = attrgetter("gpu_memory")  # map() over it: the check runs on every decide

if TYPE_CHECKING:
    from dopq.core.fairshare import PolicyConfig
    from dopq.core.policy import ClusterState, QueuedJob

INF = math.inf


def dependency_failure(q: QueuedJob, finished: Mapping[int, JobState]) -> str | None:
    for dep in q.after:
        st = finished.get(dep)
        if st is not None and JobState(st) in (JobState.FAILED, JobState.CANCELLED):
            return f"dependency {dep} {JobState(st).value}"
    return None


def dependencies_met(q: QueuedJob, finished: Mapping[int, JobState]) -> bool:
    for dep in q.after:
        if finished.get(dep) != JobState.SUCCEEDED:
            return False
    return all(dep in finished for dep in q.after_any)


class Placer:
    """Walks jobs in order, hands out devices and records why each one waits."""

    def __init__(self, state: ClusterState, now: float, cfg: PolicyConfig) -> None:
        self.now = now
        self.cfg = cfg
        self.finished = state.finished_states
        self.free = sorted(state.free_gpus)
        self.running = state.running
        self.started: list[QueuedJob] = []
        self.starts: list[tuple[int, tuple[int, ...]]] = []
        self.shadow: float | None = None  # set once a job holds the reservation
        self.head: QueuedJob | None = None  # the job that holds it
        self.count: dict[str, int] = {}
        self.gpus: dict[str, float] = {}
        self.sharing = any(map(_memory, state.queued)) or any(map(_memory, state.running))
        self.node_of = state.node_of  # several nodes: a job's devices on one of them
        self.node_size = Counter(self.node_of.values())
        if self.sharing:
            held = len({g for r in state.running for g in r.gpus})
            self._init_sharing(state)
        else:
            held = sum(len(r.gpus) for r in state.running)
        self.capacity = state.total_gpus if state.total_gpus is not None else held + len(self.free)
        if cfg.max_running_per_user or cfg.max_gpus_per_user:
            for r in state.running:
                u = r.user.lower()
                self.count[u] = self.count.get(u, 0) + 1
                self.gpus[u] = self.gpus.get(u, 0) + self._fraction(r.gpus, r.gpu_memory)

    def _init_sharing(self, state: ClusterState) -> None:
        """Each device's memory for shared jobs (``cap``) and what is left of it (``room``)."""
        self.memory = state.memory
        self.reserve = state.memory_reserve
        whole = {g for r in state.running if not r.gpu_memory for g in r.gpus}
        devices = (set(state.memory) | set(self.free) | set(state.external)
                   | {g for r in state.running for g in r.gpus})
        self.devices = sorted(devices)
        self.foreign = frozenset(state.foreign)  # closed to whole-GPU jobs
        self.closed = state.external - self.foreign  # busy, bytes unknown: closed to all
        self.cap = {d: self.memory.get(d, 0) - self.reserve - state.foreign.get(d, 0)
                    for d in devices if d not in self.closed}
        self.room = {d: c for d, c in self.cap.items() if d not in whole}
        for r in state.running:
            if r.gpu_memory:
                for g in r.gpus:
                    if g in self.room:
                        self.room[g] -= r.gpu_memory
        self.placed: dict[int, tuple[int, ...]] = {}

    def _fraction(self, gpus: Sequence[int], gpu_memory: int) -> float:
        if not gpu_memory:
            return len(gpus)
        return gpu_fraction(gpu_memory, [self.memory.get(g, 0) for g in gpus])

    def has_room(self) -> bool:
        """Is any device still open to some GPU job?"""
        return bool(self.free) or (self.sharing and any(r > 0 for r in self.room.values()))

    def open_for_gpu_jobs(self) -> bool:
        """Could a GPU job still start before anyone holds the reservation?"""
        return self.shadow is None and self.has_room()

    def open_for_backfill(self) -> bool:
        """Does a reservation with a known start leave a device open to jobs ending by then?"""
        return self.shadow is not None and self.shadow < INF and self.has_room()

    def may_fit(self, q: QueuedJob) -> bool:
        """Could ``q`` fit now (the device count only; room only shrinks from here)?"""
        if not q.gpu_memory:
            return self._whole_fits(q.num_gpus)
        if self.node_of:
            return self._pick(q) is not None
        return q.num_gpus <= sum(1 for r in self.room.values() if r >= q.gpu_memory)

    def _by_node(self, devices: Iterable[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for d in devices:
            out.setdefault(self.node_of.get(d, ""), []).append(d)
        return out

    def _whole_fits(self, need: int) -> bool:
        if not self.node_of:
            return need <= len(self.free)
        return any(need <= len(v) for v in self._by_node(self.free).values())

    def _whole_pick(self, need: int) -> tuple[int, ...]:
        """The lowest ``need`` free devices; on several nodes, of the node with the
        fewest free devices that still has enough (best fit keeps big holes whole)."""
        if not self.node_of or not need:
            return tuple(self.free[:need])
        groups = [g for g in self._by_node(self.free).items() if len(g[1]) >= need]
        _, devices = min(groups, key=lambda g: (len(g[1]), g[0]))
        return tuple(devices[:need])

    def _pick(self, q: QueuedJob) -> tuple[int, ...] | None:
        """Devices for a shared job: in use already first, tightest fit, lowest index."""
        m = q.gpu_memory
        fully = set(self.free)
        fits = sorted((d in fully, r, d) for d, r in self.room.items() if r >= m)
        if self.node_of:  # the first node (in that order) with enough of them
            groups: dict[str, list[tuple[bool, int, int]]] = {}
            for f in fits:
                groups.setdefault(self.node_of.get(f[2], ""), []).append(f)
            fits = next((g for g in groups.values() if len(g) >= q.num_gpus), [])
        if len(fits) < q.num_gpus:
            return None
        return tuple(sorted(d for _, _, d in fits[: q.num_gpus]))

    def _could_ever_fit(self, q: QueuedJob) -> bool:
        if not q.gpu_memory:
            if self.node_of:
                return q.num_gpus <= max(self.node_size.values(), default=0)
            return q.num_gpus <= self.capacity
        hosts = [d for d in self.devices if self.memory.get(d, 0) - self.reserve >= q.gpu_memory]
        if self.node_of:
            return any(q.num_gpus <= len(v) for v in self._by_node(hosts).values())
        return q.num_gpus <= len(hosts)

    def visit(self, q: QueuedJob) -> WaitReason:
        if q.held:
            return WaitReason.HELD
        if (q.after or q.after_any) and not dependencies_met(q, self.finished):
            return WaitReason.DEPENDENCY
        cfg = self.cfg
        need = q.num_gpus
        pick = self._pick(q) if need and q.gpu_memory else None
        if cfg.max_running_per_user or cfg.max_gpus_per_user:
            u = q.user.lower()
            if cfg.max_running_per_user and (
                self.count.get(u, 0) >= cfg.max_running_per_user
            ):
                return WaitReason.USER_LIMIT
            if q.gpu_memory and need:
                # Where it would go, else the largest device (its smallest charge).
                largest = max(self.devices, key=lambda d: self.memory.get(d, 0), default=None)
                devs = pick or ([] if largest is None else [largest] * need)
                want = self._fraction(devs, q.gpu_memory)
            else:
                want = need
            if cfg.max_gpus_per_user and (
                need and self.gpus.get(u, 0) + want > cfg.max_gpus_per_user
            ):
                return WaitReason.USER_LIMIT
        if need == 0:
            return self._start(q, ())
        if not self._could_ever_fit(q):
            return WaitReason.RESOURCES  # refused at submit; never reserve for it
        fits = pick is not None if q.gpu_memory else self._whole_fits(need)
        if self.shadow is None:
            if fits:
                return self._start(q, pick)
            self.shadow = self._shadow_time(q)
            self.head = q
            return WaitReason.RESOURCES
        if (fits and q.time_limit is not None and self.shadow < INF
                and self.now + q.time_limit <= self.shadow):
            return self._start(q, pick)
        return WaitReason.RESERVED if fits else WaitReason.PRIORITY

    def _start(self, q: QueuedJob, pick: tuple[int, ...] | None) -> WaitReason:
        if pick is None:  # whole GPUs (or none)
            gpus = self._whole_pick(q.num_gpus)
            self.free = [g for g in self.free if g not in gpus]
            if self.sharing:
                for g in gpus:
                    self.room.pop(g, None)
        else:
            gpus = pick
            for g in gpus:
                self.room[g] -= q.gpu_memory
                if g in self.free:
                    self.free.remove(g)
        if self.sharing and gpus:
            self.placed[q.id] = gpus
        self.starts.append((q.id, gpus))
        self.started.append(q)
        u = q.user.lower()
        self.count[u] = self.count.get(u, 0) + 1
        self.gpus[u] = self.gpus.get(u, 0) + (
            self._fraction(gpus, q.gpu_memory) if q.gpu_memory else q.num_gpus)
        return WaitReason.NONE

    def _shadow_time(self, q: QueuedJob) -> float:
        """When ``q``'s devices are free at the latest, going by time limits."""
        if self.sharing:
            return self._shadow_by_device(q)
        need = q.num_gpus
        now = self.now
        ends = [
            (max(now, r.started_at + r.time_limit) if r.time_limit is not None else INF,
             len(r.gpus))
            for r in self.running
            if r.gpus
        ]
        ends += [
            (now + s.time_limit if s.time_limit is not None else INF, s.num_gpus)
            for s in self.started
            if s.num_gpus
        ]
        ends.sort()
        free = len(self.free)
        for end, n in ends:
            free += n
            if free >= need:
                return end
        return INF  # GPUs outside DoPQ's control are busy: no known time

    def _shadow_by_device(self, q: QueuedJob) -> float:
        """The ``num_gpus``-th earliest time a device drains enough for ``q``."""
        now = self.now
        on: dict[int, list[tuple[float, int]]] = {}  # device -> (end, bytes; 0: whole)
        for r in self.running:
            end = max(now, r.started_at + r.time_limit) if r.time_limit is not None else INF
            for g in r.gpus:
                on.setdefault(g, []).append((end, r.gpu_memory))
        for s in self.started:
            end = now + s.time_limit if s.time_limit is not None else INF
            for g in self.placed.get(s.id, ()):
                on.setdefault(g, []).append((end, s.gpu_memory))
        m = q.gpu_memory
        times = []
        for d in self.devices:
            holders = on.get(d, [])
            if d not in self.cap or (not m and d in self.foreign):
                times.append(INF)  # busy from outside: no known end
            elif not m:
                times.append(max((e for e, _ in holders), default=now))
            elif self.cap[d] < m:
                times.append(INF)
            elif any(b == 0 for _, b in holders):
                times.append(max(e for e, b in holders if b == 0))
            else:
                times.append(self._drained(self.cap[d], m, holders))
        times.sort()
        return times[q.num_gpus - 1] if len(times) >= q.num_gpus else INF

    def _drained(self, cap: int, m: int, holders: list[tuple[float, int]]) -> float:
        """When a shared device with ``holders`` has ``m`` bytes of room."""
        room = cap - sum(b for _, b in holders)
        if room >= m:
            return self.now
        for end, b in sorted(holders):
            room += b
            if room >= m:
                return end
        return INF

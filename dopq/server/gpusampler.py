"""Who uses which GPU: NVML's processes mapped to jobs, foreign processes, the GPU watch.

Every ``[gpus] sample_interval`` the supervisor hands :meth:`GpuSampler.observe`
the backend's samples and the running jobs (with their containers' ids and
process ids). A GPU process belongs to a job when it is one of its
container's processes: the container's first process, or a process whose
cgroup names the container, or a descendant of the first process. Anything
else is *foreign*: its device's memory in use goes to the scheduler (whole-GPU
jobs stay off the device, shared jobs get what is left), the status view
names its user and pid, and the server log warns once per process.

What the samples mean for each job (a memory breach, idleness) is decided
by :mod:`dopq.core.gpuwatch`; this module only gathers the figures and
returns the actions for the supervisor to carry out.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dopq.core.gpuwatch import Action, JobSample, JobWatch, WatchConfig, observe
from dopq.server.gpus import GpuInfo, GpuSample, mig_children

log = logging.getLogger("dopq.server.gpusampler")

ANCESTORS = 64  # parents walked up from a GPU process to find its container's first one
CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


class ProcFs:
    """The few reads of ``/proc`` that tie a host process to a container and a user.

    Tests pass a stand-in. Every read of a process that has gone answers
    "unknown" (empty, None, ``"?"``), never raises.
    """

    def __init__(self, root: str | os.PathLike[str] = "/proc") -> None:
        self.root = Path(root)

    def cgroup(self, pid: int) -> str:
        try:
            return (self.root / str(pid) / "cgroup").read_text(errors="replace")
        except OSError:
            return ""

    def parent(self, pid: int) -> int | None:
        try:
            stat = (self.root / str(pid) / "stat").read_text(errors="replace")
        except OSError:
            return None
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat.rpartition(")")[2].split()
        return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None

    def user(self, pid: int) -> str:
        try:
            uid = (self.root / str(pid)).stat().st_uid
        except OSError:
            return "?"
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)


@dataclass(frozen=True)
class GpuJob:
    """A running job as the sampler needs it."""

    id: int
    user: str
    gpus: tuple[int, ...]
    gpu_memory: int = 0  # declared bytes per device; 0: whole GPUs
    container_id: str = ""  # the engine's full id; "" when not known
    pids: tuple[int, ...] = ()  # the container's first process(es) on the host


@dataclass
class Observation:
    """What one round of samples found."""

    foreign: dict[int, int] = field(default_factory=dict)  # device -> bytes used outside DoPQ
    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)  # job id -> its figures
    devices: list[dict[str, Any]] = field(default_factory=list)  # per device, for the status
    actions: list[Action] = field(default_factory=list)  # what the GPU watch says
    # job id -> its mean GPU utilisation (%) over the samples of its run, once it
    # is no longer running (the supervisor stores it: dopq report's efficiency)
    ended: dict[int, float] = field(default_factory=dict)


class GpuSampler:
    """Turns samples into per-job figures, foreign memory and GPU watch actions."""

    def __init__(self, devices: Sequence[GpuInfo], cfg: WatchConfig,
                 proc: ProcFs | None = None) -> None:
        self.devices = list(devices)
        self.cfg = cfg
        self.proc = proc or ProcFs()
        self.children = mig_children(self.devices)
        self.watch: dict[int, JobWatch] = {}
        self._warned: set[tuple[int, int]] = set()  # (device, pid) already in the log
        self.utilisation: dict[int, tuple[float, int]] = {}  # job id -> (sum of %, samples)

    # -- a process's job ------------------------------------------------------------
    def _owner(self, pid: int, jobs: Sequence[GpuJob]) -> int | None:
        for job in jobs:
            if pid in job.pids:
                return job.id
        cgroup = self.proc.cgroup(pid)
        if cgroup:
            ids = set(CONTAINER_ID.findall(cgroup))
            for job in jobs:
                if job.container_id and job.container_id in ids:
                    return job.id
        firsts = {p: job.id for job in jobs for p in job.pids}
        seen = {pid}
        current: int | None = pid
        for _ in range(ANCESTORS):
            current = self.proc.parent(current) if current is not None else None
            if current is None or current <= 1 or current in seen:
                return None
            if current in firsts:
                return firsts[current]
            seen.add(current)
        return None

    # -- one round ----------------------------------------------------------------------
    def observe(self, samples: Sequence[GpuSample], jobs: Sequence[GpuJob], now: float,
                busy: Iterable[int] = ()) -> Observation:
        """Map ``samples`` to ``jobs``; ``busy``: devices named by containers DoPQ did
        not start (they count as foreign, with the device's memory in use)."""
        info = {d.index: d for d in self.devices}
        by_index = {s.index: s for s in samples}
        owner: dict[int, int | None] = {}
        mine: dict[tuple[int, int], int | None] = {}  # (job, device) -> bytes; None: unknown
        strangers: dict[int, list[tuple[int, int | None]]] = {}  # device -> (pid, bytes)
        for s in samples:
            memory = s.memory_of()
            for pid in s.processes:
                if pid not in owner:
                    owner[pid] = self._owner(pid, jobs)
                job = owner[pid]
                used = memory.get(pid)
                if job is None:
                    strangers.setdefault(s.index, []).append((pid, used))
                    continue
                key = (job, s.index)
                before = mine.get(key, 0)
                mine[key] = None if before is None or used is None else before + used
        out = Observation()
        for index, procs in strangers.items():
            s = by_index[index]
            known = sum(m for _, m in procs if m is not None)
            if any(m is None for _, m in procs):
                # NVML has no figure for some of them: all the device's use
                # that is not ours, else the whole device.
                ours = sum(m or 0 for (_, d), m in mine.items() if d == index)
                total = s.memory_total or (info[index].memory_total if index in info else 0)
                known = max(known, s.memory_used - ours if s.memory_used is not None else total)
            out.foreign[index] = max(0, known)
        for index in self._expand(busy):
            if index in out.foreign or index not in info:
                continue
            s_used = by_index[index].memory_used if index in by_index else None
            out.foreign[index] = s_used if s_used is not None else info[index].memory_total
        self._warn_foreign(strangers)
        self._watch_jobs(jobs, by_index, mine, now, out)
        self._devices(jobs, by_index, mine, strangers, out)
        return out

    def _expand(self, busy: Iterable[int]) -> set[int]:
        """Devices named by index: a GPU in MIG mode stands for all its instances."""
        out: set[int] = set()
        for index in busy:
            out |= self.children.get(index, {index})
        return out

    def _warn_foreign(self, strangers: Mapping[int, list[tuple[int, int | None]]]) -> None:
        now = {(index, pid) for index, procs in strangers.items() for pid, _ in procs}
        for index, pid in sorted(now - self._warned):
            memory = dict(strangers[index]).get(pid)
            log.warning("GPU %s: process %s of user %s is not a DoPQ job's (%s of GPU memory)",
                        index, pid, self.proc.user(pid),
                        "unknown" if memory is None else f"{memory / 1024**2:.0f} MiB")
        self._warned = now  # a process that goes and comes back is warned about again

    def _watch_jobs(self, jobs: Sequence[GpuJob], by_index: Mapping[int, GpuSample],
                    mine: Mapping[tuple[int, int], int | None], now: float,
                    out: Observation) -> None:
        for job in jobs:
            sampled = [g for g in job.gpus if g in by_index]
            if not sampled:
                continue
            per_device = [mine.get((job.id, g), 0) for g in sampled]
            known = [m for m in per_device if m is not None]
            rates = [u for g in sampled if (u := by_index[g].utilization) is not None]
            sample = JobSample(
                memory=max(known) if known and len(known) == len(per_device) else None,
                utilisation=max(rates) if rates else None,
            )
            if rates:  # the mean of its devices: a job on 4 GPUs using one is at 25 %
                total, n = self.utilisation.get(job.id, (0.0, 0))
                self.utilisation[job.id] = (total + sum(rates) / len(rates), n + 1)
            state = self.watch.setdefault(job.id, JobWatch())
            out.actions += observe(job.id, job.gpu_memory, sample, state, now, self.cfg)
            out.jobs[job.id] = {
                "gpu_memory_used": sum(known) if len(known) == len(per_device) else None,
                "gpu_utilisation": sample.utilisation,
                "idle_since": state.idle_since if state.idle_marked else None,
            }
        for gone in set(self.watch) - {j.id for j in jobs}:
            del self.watch[gone]
        for gone in set(self.utilisation) - {j.id for j in jobs}:
            total, n = self.utilisation.pop(gone)
            out.ended[gone] = round(total / n, 2)

    def _devices(self, jobs: Sequence[GpuJob], by_index: Mapping[int, GpuSample],
                 mine: Mapping[tuple[int, int], int | None],
                 strangers: Mapping[int, list[tuple[int, int | None]]],
                 out: Observation) -> None:
        for d in self.devices:
            s = by_index.get(d.index)
            out.devices.append({
                "index": d.index, "uuid": d.uuid, "memory": d.memory_total,
                "used": s.memory_used if s is not None else None,
                "holders": [{"job": j.id, "user": j.user, "memory": mine.get((j.id, d.index), 0)}
                            for j in jobs if d.index in j.gpus],
                "foreign": [{"pid": pid, "user": self.proc.user(pid), "memory": memory}
                            for pid, memory in strangers.get(d.index, [])],
            })

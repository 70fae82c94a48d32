"""``dopq simulate TRACE``: replay a job trace against the real policy.

A discrete-event simulation on a virtual clock. It drives the server's own
:class:`dopq.core.scheduler.Scheduler` (policy, usage ledger, GPU pool, time
limits, exit classification), with an in-memory runtime in place of Docker,
so what it reports is what the queue would do. Events are submits, job ends
and the scheduler's next wake-up; a job running past its time limit is
stopped at the limit. The scheduler's books are validated after every event.

A trace is JSON lines, one job each (blank lines and ``#`` comments skipped)::

    {"submit": 0, "user": "ana", "gpus": 1, "duration": 3600, "time_limit": 7200}

``submit``, ``duration`` and ``time_limit`` are seconds; ``priority`` is
optional; ``gpu_memory`` (bytes, or a size such as ``"10g"``) makes the job
share devices by memory. Jobs are numbered from 1 in file order; the format
is read by :mod:`dopq.core.traces`.

Utilisation is by device (the share of device-time with any job on it) and,
when a job declares memory, by memory too (declared bytes over the devices'
memory; a whole-GPU job counts all of it): with ``--no-sharing`` the gap
between the two is the memory small jobs leave idle on whole GPUs.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dopq.core.capacity import Capacity, validate_gpus
from dopq.core.errors import DopqError, JobRejected
from dopq.core.events import (
    CommitJob,
    ContainerExited,
    DeadlinesDue,
    Instruction,
    JobQueued,
    StartJob,
    StopContainer,
    Tick,
)
from dopq.core.forms import parse_size
from dopq.core.jobs import FINAL_STATES, format_duration, parse_duration
from dopq.core.policy import POLICIES, ClusterState, Decision, PolicyConfig, QueuedJob
from dopq.core.scheduler import TIMEOUT, Scheduler, SchedulerConfig
from dopq.core.traces import TRACE_HELP, TraceError, TraceJob, load_trace, parse_trace
from dopq.core.usage import UsageLedger

__all__ = ["JobRecord", "SimResult", "TraceError", "TraceJob", "UserResult", "VirtualRuntime",
           "format_result", "load_trace", "main", "parse_trace", "simulate"]

GPU_MEMORY = 80 << 30  # bytes of every simulated device unless told
MEMORY_RESERVE = 1 << 30  # as the server's [gpus] memory_reserve


@dataclass
class JobRecord:
    """What happened to one job; ``start`` is None if it never ran."""

    id: int
    user: str
    gpus: int
    submit: float
    start: float | None
    end: float | None
    killed: bool = False
    gpu_ids: tuple[int, ...] = ()
    gpu_memory: int = 0

    @property
    def wait(self) -> float | None:
        return None if self.start is None else self.start - self.submit


@dataclass
class UserResult:
    user: str
    jobs: int
    gpu_hours: float
    share: float  # weight / sum of the weights of the users in the trace
    mean_wait: float
    worst_wait: float


@dataclass
class SimResult:
    gpus: int
    policy: str
    half_life: float
    users: list[UserResult]
    jobs: list[JobRecord]
    makespan: float
    utilisation: float
    jain: float
    events: int
    # Declared bytes held over device memory (a whole-GPU job counts all of
    # its devices); None when no job of the trace declares memory (then it
    # equals ``utilisation``).
    memory_utilisation: float | None = None
    gpu_memory: int = GPU_MEMORY
    sharing: bool = True

    def to_dict(self, with_jobs: bool = False) -> dict[str, Any]:
        out = {
            "gpus": self.gpus,
            "policy": self.policy,
            "half_life": self.half_life,
            "makespan": self.makespan,
            "utilisation": self.utilisation,
            "jain": self.jain,
            "events": self.events,
            "unstarted": sum(1 for j in self.jobs if j.start is None),
            "users": [asdict(u) for u in self.users],
        }
        if self.memory_utilisation is not None:
            out.update(memory_utilisation=self.memory_utilisation, gpu_memory=self.gpu_memory,
                       sharing=self.sharing)
        if with_jobs:
            out["jobs"] = [asdict(j) for j in self.jobs]
        return out


# -------------------------------------------------------------- simulation


class VirtualRuntime:
    """An in-memory container runtime for the simulator: a started trace job
    "runs" for its duration and then exits 0; a stopped one exits 137 at once.

    The simulator hands the scheduler's instructions to it and feeds the exits
    it reports back as :class:`~dopq.core.scheduler.ContainerExited` events.
    """

    def __init__(self) -> None:
        self._ends: list[tuple[float, int, int]] = []  # (at, job, exit code)
        self._live: dict[int, float] = {}  # job -> when it ends by itself

    def run(self, job_id: int, now: float, duration: float) -> None:
        self._live[job_id] = now + duration
        heapq.heappush(self._ends, (now + duration, job_id, 0))

    def stop(self, job_id: int, now: float) -> None:
        if job_id in self._live:
            self._live[job_id] = now
            heapq.heappush(self._ends, (now, job_id, 137))

    def next_exit(self) -> float | None:
        self._drop_stale()
        return self._ends[0][0] if self._ends else None

    def exits(self, now: float) -> list[ContainerExited]:
        """The containers that have ended by ``now``, in (time, job id) order."""
        out = []
        while self.next_exit() is not None and self._ends[0][0] <= now:
            at, job_id, code = heapq.heappop(self._ends)
            del self._live[job_id]
            out.append(ContainerExited(job_id, f"sim-{job_id}", code, at, deferrable=False))
        return out

    def _drop_stale(self) -> None:
        # An end superseded by a stop (or the reverse) is skipped.
        while self._ends and self._live.get(self._ends[0][1]) != self._ends[0][0]:
            heapq.heappop(self._ends)


def simulate(
    jobs: Sequence[TraceJob], gpus: int, cfg: PolicyConfig, *, check: bool = True,
    observe: Callable[[float, ClusterState, Decision], None] | None = None,
    gpu_memory: int = GPU_MEMORY, sharing: bool = True, memory_reserve: int = MEMORY_RESERVE,
) -> SimResult:
    """Run ``jobs`` on ``gpus`` GPUs under ``cfg`` and report what each user got.

    The server's own :class:`~dopq.core.scheduler.Scheduler` decides, on a
    virtual clock, with a :class:`VirtualRuntime` in place of Docker. At each
    event time: the containers that ended are reported, deadlines are
    enforced (a job past its time limit is stopped and exits at once), new
    submits are queued, and the scheduler decides; with ``check`` its books
    are validated after every event. ``observe(now, state, decision)`` is
    called after every decision (``bench/bench_eta.py`` takes its start-time
    estimates there).

    Every device has ``gpu_memory`` bytes; a job that declares memory shares
    devices (less ``memory_reserve`` each), or, without ``sharing``, gets
    whole GPUs like any other (to compare the two).
    """
    if gpus < 1:
        raise JobRejected("the simulated machine needs at least one GPU")
    for tj in jobs:
        if tj.gpus > gpus:
            raise JobRejected(f"job {tj.id} wants {tj.gpus} GPUs, the machine has {gpus}")
        if sharing and tj.gpu_memory > gpu_memory - memory_reserve:
            raise JobRejected(f"job {tj.id} wants {tj.gpu_memory} bytes of GPU memory, a "
                              f"device has {gpu_memory} less a reserve of {memory_reserve}")
    trace = {tj.id: tj for tj in jobs}
    arrivals = sorted(jobs, key=lambda tj: (tj.submit, tj.id))
    records = {tj.id: JobRecord(tj.id, tj.user, tj.gpus, tj.submit, None, None,
                                gpu_memory=tj.gpu_memory) for tj in jobs}
    sched = Scheduler(SchedulerConfig(cfg, stop_grace=0.0, remember_finished=True),
                      Capacity.single(range(gpus), memory=gpu_memory), UsageLedger(cfg.half_life),
                      memory_reserve=memory_reserve)
    runtime = VirtualRuntime()
    wakeup: float | None = None
    nxt = 0
    events = 0
    busy = 0.0  # device-seconds with a job on them
    held_bytes = 0.0  # byte-seconds declared (all of a device for a whole-GPU job)
    sharers: dict[int, int] = {}  # shared device -> its jobs
    since: dict[int, float] = {}  # shared device -> busy since

    def carry_out(instructions: list[Instruction], now: float) -> None:
        nonlocal busy, held_bytes
        for ins in instructions:
            if isinstance(ins, StartJob):
                runtime.run(ins.job_id, now, trace[ins.job_id].duration)
                rec = records[ins.job_id]
                rec.start, rec.gpu_ids = now, ins.gpus
                if sharing and rec.gpu_memory:
                    for g in ins.gpus:
                        sharers[g] = sharers.get(g, 0) + 1
                        since.setdefault(g, now)
            elif isinstance(ins, StopContainer) and ins.job_id is not None:
                runtime.stop(ins.job_id, now)
            elif isinstance(ins, CommitJob) and ins.state in FINAL_STATES:
                rec = records[ins.job_id]
                if rec.start is not None:
                    rec.end = now
                    rec.killed = ins.fields.get("error") == TIMEOUT
                    held_bytes += rec.gpus * (rec.gpu_memory or gpu_memory) * (now - rec.start)
                    if not (sharing and rec.gpu_memory):
                        busy += rec.gpus * (now - rec.start)
                        continue
                    for g in rec.gpu_ids:  # a shared device is busy while anyone is on it
                        sharers[g] -= 1
                        if not sharers[g]:
                            del sharers[g]
                            busy += now - since.pop(g)

    def report_exits(now: float) -> None:
        for ev in runtime.exits(now):
            carry_out(sched.handle(ev, now), now)

    while nxt < len(arrivals) or sched.queued or sched.running:
        times = [t for t in (runtime.next_exit(), wakeup) if t is not None]
        if nxt < len(arrivals):
            times.append(arrivals[nxt].submit)
        if not times:
            break  # queued jobs that nothing will ever start
        now = min(times)
        events += 1
        report_exits(now)
        carry_out(sched.handle(DeadlinesDue(), now), now)
        report_exits(now)  # the jobs stopped at their time limit
        while nxt < len(arrivals) and arrivals[nxt].submit <= now:
            tj = arrivals[nxt]
            nxt += 1
            sched.handle(JobQueued(QueuedJob(
                tj.id, tj.user, tj.gpus, tj.submit, tj.time_limit, priority=tj.priority,
                gpu_memory=tj.gpu_memory if sharing else 0)), now)
        carry_out(sched.handle(Tick(), now), now)
        decision = sched.last_decision
        if observe is not None and decision is not None and decision.inputs is not None:
            observe(now, decision.inputs[0], decision)
        wakeup = sched.next_wakeup()
        if wakeup is not None and wakeup <= now:
            wakeup = None
        if check:
            sched.validate()
            pool = sched.pool
            if not pool.shared():  # (its one-holder-per-GPU check is for whole GPUs)
                validate_gpus(pool.total, list(sched.running.values()), free=pool.free())
    result = _summarise(list(records.values()), gpus, cfg, busy, events,
                        gpu_memory if sharing else 0)
    if any(tj.gpu_memory for tj in jobs):
        span = result.makespan * gpus * gpu_memory
        result.memory_utilisation = held_bytes / span if span > 0 else 0.0
        result.gpu_memory, result.sharing = gpu_memory, sharing
    return result


def _summarise(
    records: list[JobRecord], gpus: int, cfg: PolicyConfig, busy: float, events: int,
    shared_memory: int = 0,
) -> SimResult:
    """Per user and overall; ``shared_memory``: a job declaring memory received
    that fraction of each device it shared (0: jobs ran on whole GPUs)."""

    def gpus_of(r: JobRecord) -> float:
        if shared_memory and r.gpu_memory:
            return r.gpus * min(1.0, r.gpu_memory / shared_memory)
        return r.gpus

    names: dict[str, str] = {}
    for rec in records:
        names.setdefault(rec.user.lower(), rec.user)
    weights = {u: cfg.weight(u) for u in names}
    wsum = sum(weights.values()) or 1.0
    users = []
    for key, name in sorted(names.items()):
        mine = [r for r in records if r.user.lower() == key]
        waits = [r.wait for r in mine if r.wait is not None]
        received = sum(gpus_of(r) * (r.end - r.start) for r in mine
                       if r.start is not None and r.end is not None)
        users.append(
            UserResult(
                user=name,
                jobs=len(mine),
                gpu_hours=received / 3600,
                share=weights[key] / wsum,
                mean_wait=sum(waits) / len(waits) if waits else 0.0,
                worst_wait=max(waits, default=0.0),
            )
        )
    first = min((r.submit for r in records), default=0.0)
    last = max((r.end for r in records if r.end is not None), default=first)
    makespan = last - first
    utilisation = busy / (gpus * makespan) if makespan > 0 else 0.0
    # Jain's index over GPU-hours per unit of share, among users who asked for GPUs.
    gpu_users = {r.user.lower() for r in records if r.gpus}
    x = [u.gpu_hours / u.share for u in users if u.user.lower() in gpu_users]
    squares = sum(v * v for v in x)
    jain = sum(x) ** 2 / (len(x) * squares) if squares > 0 else 1.0
    return SimResult(gpus, cfg.policy, cfg.half_life, users, records, makespan, utilisation,
                     jain, events)


def format_result(result: SimResult, title: str = "") -> str:
    jobs = len(result.jobs)
    lines = [
        f"{title + ': ' if title else ''}{jobs} jobs on {result.gpus} GPUs, "
        f"policy {result.policy}, half-life {format_duration(result.half_life)}",
        f"{'user':<12} {'jobs':>5} {'GPU-hours':>10} {'share':>6} {'mean wait':>10} "
        f"{'worst wait':>10}",
    ]
    for u in result.users:
        lines.append(
            f"{u.user:<12} {u.jobs:>5} {u.gpu_hours:>10.1f} {u.share:>6.3f} "
            f"{format_duration(u.mean_wait):>10} {format_duration(u.worst_wait):>10}"
        )
    unstarted = sum(1 for j in result.jobs if j.start is None)
    by_memory = ("" if result.memory_utilisation is None else
                 f" (by memory {result.memory_utilisation:.1%} of {_gib(result.gpu_memory)}"
                 f" each{', sharing' if result.sharing else ', no sharing'})")
    lines.append(
        f"makespan {format_duration(result.makespan)}, utilisation "
        f"{result.utilisation:.1%}{by_memory}, Jain index {result.jain:.3f}"
        + (f", {unstarted} never started" if unstarted else "")
    )
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:g} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``TRACE [--gpus N] [--policy P] [--half-life S] [--json]``.

    ``argv`` are the arguments after ``dopq simulate`` (a leading
    ``simulate`` is tolerated).
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    if len(args_in) > 1 and args_in[0] == "simulate":
        args_in = args_in[1:]
    parser = argparse.ArgumentParser(
        prog="dopq simulate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Replay a job trace against the scheduling policy (the server's own "
        "code, on a virtual clock) and report waits, GPU use and fairness.",
        epilog=TRACE_HELP,
    )
    parser.add_argument("trace", help="JSON-lines trace, one job per line (format below)")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs in the machine (default 4)")
    parser.add_argument("--policy", choices=POLICIES, default="fairshare",
                        help="fairshare (default) or recency (DoPQ 1.0's ordering)")
    parser.add_argument("--half-life", default="7d", help="usage half-life, e.g. 7d or 86400")
    parser.add_argument("--gpu-memory", default="80g",
                        help="memory of every device, e.g. 80g (default 80g)")
    parser.add_argument("--memory-reserve", default="1g",
                        help="memory of each device no shared job gets (default 1g)")
    parser.add_argument("--no-sharing", action="store_true",
                        help="give jobs that declare gpu_memory whole GPUs (to compare)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(args_in)
    try:
        text = args.half_life
        half_life = parse_duration(float(text) if _is_number(text) else text, "--half-life")
        cfg = PolicyConfig(policy=args.policy, half_life=half_life).validate()
        result = simulate(load_trace(args.trace), args.gpus, cfg,
                          gpu_memory=parse_size(args.gpu_memory, "--gpu-memory"),
                          memory_reserve=parse_size(args.memory_reserve, "--memory-reserve"),
                          sharing=not args.no_sharing)
    except DopqError as err:
        print(f"dopq simulate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_result(result, Path(args.trace).name))
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

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

With ``--preemption fairshare`` the scheduler may preempt preemptible jobs
(the trace key ``preemptible``, else ``--preemptible-default``) for users
under their fair share, as the server would (:mod:`dopq.core.preemption`).
The virtual runtime carries a preemption out as the worst case of the
server's: the victim keeps its devices for the whole grace, then is killed
(unless it ends by itself first); the scheduler requeues it, keeping its
submit time. A job checkpoints every ``--checkpoint-every`` seconds of a run
(default: never): a requeued job runs again for its duration less the work
its checkpoints saved, and what it did since its last checkpoint is lost.
The report adds demand-aware fairness (:mod:`dopq.core.fairness`), first-job
waits and the lost work (:mod:`dopq.core.simreport`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dopq.core.capacity import Capacity, validate_gpus
from dopq.core.errors import DopqError, JobRejected
from dopq.core.events import (
    CommitJob,
    ContainerExited,
    DeadlinesDue,
    Instruction,
    JobQueued,
    PreemptJob,
    StartJob,
    StopContainer,
    Tick,
)
from dopq.core.fairshare import PREEMPTION
from dopq.core.forms import parse_size
from dopq.core.jobs import FINAL_STATES, JobState, parse_duration
from dopq.core.policy import POLICIES, ClusterState, Decision, PolicyConfig, QueuedJob
from dopq.core.scheduler import TIMEOUT, Scheduler, SchedulerConfig
from dopq.core.simreport import (
    GPU_MEMORY,
    JobRecord,
    SimResult,
    UserResult,
    format_result,
    summarise,
)
from dopq.core.traces import TRACE_HELP, TraceError, TraceJob, load_trace, parse_trace
from dopq.core.usage import UsageLedger

__all__ = ["JobRecord", "SimResult", "TraceError", "TraceJob", "UserResult", "VirtualRuntime",
           "format_result", "load_trace", "main", "parse_trace", "simulate"]

MEMORY_RESERVE = 1 << 30  # as the server's [gpus] memory_reserve


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

    def kill_at(self, job_id: int, at: float) -> None:
        """Kill the job at ``at`` (a preemption's grace ending), unless it ends sooner."""
        if job_id in self._live and at < self._live[job_id]:
            self._live[job_id] = at
            heapq.heappush(self._ends, (at, job_id, 137))

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
    checkpoint_every: float | None = None,
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

    ``cfg.preemption`` and its settings turn preemption on (module docstring);
    ``checkpoint_every``: seconds of a run between a job's checkpoints (None:
    it never checkpoints, a preempted run's work is all lost).
    """
    if gpus < 1:
        raise JobRejected("the simulated machine needs at least one GPU")
    if checkpoint_every is not None and not (checkpoint_every > 0 and math.isfinite(
            checkpoint_every)):
        raise JobRejected("the checkpoint interval must be a positive number of seconds")
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
    runs: dict[int, list[tuple[float, float, float]]] = {}  # job -> (start, end, lost)
    run_start: dict[int, float] = {}  # running job -> its run's start
    saved: dict[int, float] = {}  # job -> seconds of its work kept by checkpoints
    left_at: dict[int, float] = {}  # a job that failed in the queue -> when
    finished: dict[int, bool] = {}  # the exit being handled: did the job end by itself?
    preemptions = 0

    def queue(tj: TraceJob, now: float, restarts: int = 0) -> list[Instruction]:
        preemptible = cfg.preemptible_default if tj.preemptible is None else tj.preemptible
        return sched.handle(JobQueued(QueuedJob(
            tj.id, tj.user, tj.gpus, tj.submit, tj.time_limit, priority=tj.priority,
            gpu_memory=tj.gpu_memory if sharing else 0, preemptible=preemptible,
            restarts=restarts)), now)

    def end_run(job_id: int, now: float, requeued: bool) -> None:
        nonlocal busy, held_bytes
        rec, start = records[job_id], run_start.pop(job_id)
        lost = 0.0
        if requeued:  # preempted: keep what its checkpoints saved
            ran = now - start
            every = checkpoint_every
            kept = math.floor(ran / every) * every if every else 0.0
            if finished.pop(job_id, False):
                kept = ran  # it ended by itself in its grace: nothing left but a restart
            saved[job_id] = saved.get(job_id, 0.0) + kept
            lost = ran - kept
        runs.setdefault(job_id, []).append((start, now, lost))
        held_bytes += rec.gpus * (rec.gpu_memory or gpu_memory) * (now - start)
        if not (sharing and rec.gpu_memory):
            busy += rec.gpus * (now - start)
            return
        for g in rec.gpu_ids:  # a shared device is busy while anyone is on it
            sharers[g] -= 1
            if not sharers[g]:
                del sharers[g]
                busy += now - since.pop(g)

    def carry_out(instructions: list[Instruction], now: float) -> None:
        nonlocal preemptions
        for ins in instructions:
            if isinstance(ins, StartJob):
                left = trace[ins.job_id].duration - saved.get(ins.job_id, 0.0)
                runtime.run(ins.job_id, now, left)
                rec = records[ins.job_id]
                if rec.start is None:
                    rec.start = now
                rec.gpu_ids = ins.gpus
                run_start[ins.job_id] = now
                if sharing and rec.gpu_memory:
                    for g in ins.gpus:
                        sharers[g] = sharers.get(g, 0) + 1
                        since.setdefault(g, now)
            elif isinstance(ins, StopContainer) and ins.job_id is not None:
                runtime.stop(ins.job_id, now)
            elif isinstance(ins, PreemptJob):
                preemptions += 1
                runtime.kill_at(ins.job_id, now + ins.grace)
            elif isinstance(ins, CommitJob) and ins.state in FINAL_STATES:
                rec = records[ins.job_id]
                if ins.job_id in run_start:
                    rec.end = now
                    rec.killed = ins.fields.get("error") == TIMEOUT
                    end_run(ins.job_id, now, requeued=False)
                else:
                    left_at[ins.job_id] = now
            elif (isinstance(ins, CommitJob) and ins.state == JobState.QUEUED
                  and ins.job_id in run_start):
                end_run(ins.job_id, now, requeued=True)
                restarts = int(ins.fields.get("restarts", records[ins.job_id].restarts + 1))
                records[ins.job_id].restarts = restarts
                if ins.job_id not in sched.queued:  # (the scheduler queues it again itself)
                    carry_out(queue(trace[ins.job_id], now, restarts), now)

    def report_exits(now: float) -> None:
        for ev in runtime.exits(now):
            finished[ev.job_id] = ev.exit_code == 0
            carry_out(sched.handle(ev, now), now)
            finished.pop(ev.job_id, None)

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
            queue(tj, now)
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
    result = summarise(list(records.values()), gpus, cfg, busy, events,
                       gpu_memory if sharing else 0, runs, left_at, preemptions)
    if any(tj.gpu_memory for tj in jobs):
        span = result.makespan * gpus * gpu_memory
        result.memory_utilisation = held_bytes / span if span > 0 else 0.0
        result.gpu_memory, result.sharing = gpu_memory, sharing
    if cfg.preemption != "off":
        result.preemption = {
            "preemption": cfg.preemption, "min_runtime": cfg.min_runtime,
            "preempt_grace": cfg.preempt_grace, "max_preemptions": cfg.max_preemptions,
            "preemptible_default": cfg.preemptible_default, "checkpoint_every": checkpoint_every}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: ``TRACE [--gpus N] [--policy P] [--half-life S] [--preemption fairshare
    ...] [--checkpoint-every S] [--json]`` (``--help`` lists them all).

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
    parser.add_argument("--preemption", choices=PREEMPTION, default="off",
                        help="off (default) or fairshare: preempt preemptible jobs of users "
                        "above their share for users under it")
    parser.add_argument("--min-runtime", default="30m",
                        help="a run this short is not preempted (default 30m)")
    parser.add_argument("--preempt-grace", default="2m",
                        help="a preempted job is killed this long after its stop signal "
                        "(default 2m; the simulated job holds its GPUs that long)")
    parser.add_argument("--max-preemptions", type=int, default=3,
                        help="a job preempted this often is not preempted again (default 3)")
    parser.add_argument("--preemptible-default", action="store_true",
                        help="jobs whose trace line does not say are preemptible")
    parser.add_argument("--checkpoint-every", default=None, metavar="SECONDS",
                        help="seconds of a run between a job's checkpoints: a preempted job "
                        "loses the work since its last one (default: no checkpoints, all lost)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(args_in)
    try:
        half_life = _duration(args.half_life, "--half-life")
        cfg = PolicyConfig(
            policy=args.policy, half_life=half_life, preemption=args.preemption,
            preemptible_default=args.preemptible_default,
            min_runtime=_duration(args.min_runtime, "--min-runtime", zero=True),
            preempt_grace=_duration(args.preempt_grace, "--preempt-grace", zero=True),
            max_preemptions=args.max_preemptions).validate()
        every = (None if args.checkpoint_every is None
                 else _duration(args.checkpoint_every, "--checkpoint-every"))
        result = simulate(load_trace(args.trace), args.gpus, cfg,
                          gpu_memory=parse_size(args.gpu_memory, "--gpu-memory"),
                          memory_reserve=parse_size(args.memory_reserve, "--memory-reserve"),
                          sharing=not args.no_sharing, checkpoint_every=every)
    except DopqError as err:
        print(f"dopq simulate: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_result(result, Path(args.trace).name))
    return 0


def _duration(text: str, what: str, zero: bool = False) -> float:
    """Seconds (a number or a duration such as ``30m``); ``zero``: 0 is allowed."""
    if zero and _is_number(text) and float(text) == 0:
        return 0.0
    return parse_duration(float(text) if _is_number(text) else text, what)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

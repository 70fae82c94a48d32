"""What ``dopq simulate`` reports: per job, per user, overall; the table and the JSON.

:func:`summarise` turns the simulator's records into a :class:`SimResult`;
:func:`format_result` prints it. The first lines (users' GPU-hours and waits,
utilisation, Jain's index over GPU-hours per share) are as they always were;
a block after them gives demand-aware fairness (:mod:`dopq.core.fairness`):
each user's first-job wait, GPU-hours received against their max-min fair
entitlement, work lost to preemption, and Jain's index over received /
entitled. In the JSON that block is the key ``fairness`` (and ``preemption``
with its settings when it was on); the older keys are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dopq.core.fairness import Claim, FairnessReport, Run, fairness
from dopq.core.fairshare import PolicyConfig
from dopq.core.jobs import format_duration

GPU_MEMORY = 80 << 30  # bytes of every simulated device unless told


@dataclass
class JobRecord:
    """What happened to one job; ``start`` is None if it never ran.

    ``start`` is its first start, ``end`` its final end; a preempted job ran
    ``restarts`` + 1 times in between (its runs are the simulator's).
    """

    id: int
    user: str
    gpus: int
    submit: float
    start: float | None
    end: float | None
    killed: bool = False
    gpu_ids: tuple[int, ...] = ()
    gpu_memory: int = 0
    restarts: int = 0

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
    fairness: FairnessReport | None = None
    preemption: dict[str, Any] = field(default_factory=dict)  # its settings; empty: off

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
        if self.fairness is not None:
            out["fairness"] = self.fairness.to_dict()
        if self.preemption:
            out["preemption"] = dict(self.preemption)
        if with_jobs:
            out["jobs"] = [asdict(j) for j in self.jobs]
        return out


def summarise(
    records: list[JobRecord], gpus: int, cfg: PolicyConfig, busy: float, events: int,
    shared_memory: int = 0, runs: Mapping[int, Sequence[tuple[float, float, float]]] | None = None,
    left_at: Mapping[int, float] | None = None, preemptions: int = 0,
) -> SimResult:
    """Per user and overall.

    ``shared_memory``: a job declaring memory received that fraction of each
    device it shared (0: jobs ran on whole GPUs). ``runs``: per job, its runs
    as (start, end, seconds of work lost); None: one run from ``start`` to
    ``end``. ``left_at``: when a job that never ran left the queue (failed);
    it claimed no GPUs after that.
    """

    def gpus_of(r: JobRecord) -> float:
        if shared_memory and r.gpu_memory:
            return r.gpus * min(1.0, r.gpu_memory / shared_memory)
        return r.gpus

    def runs_of(r: JobRecord) -> Sequence[tuple[float, float, float]]:
        if runs is not None:
            return runs.get(r.id, ())
        return () if r.start is None or r.end is None else ((r.start, r.end, 0.0),)

    names: dict[str, str] = {}
    for rec in records:
        names.setdefault(rec.user.lower(), rec.user)
    weights = {u: cfg.weight(u) for u in names}
    wsum = sum(weights.values()) or 1.0
    users = []
    for key, name in sorted(names.items()):
        mine = [r for r in records if r.user.lower() == key]
        waits = [r.wait for r in mine if r.wait is not None]
        received = sum(gpus_of(r) * sum(end - start for start, end, _ in runs_of(r))
                       for r in mine if runs_of(r))
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
    result = SimResult(gpus, cfg.policy, cfg.half_life, users, records, makespan, utilisation,
                       jain, events)

    # Demand-aware: a job claims its GPUs from its submit to its end (or to the
    # end of the simulation if it never ended).
    horizon = max([last, *(r.submit for r in records)])
    left = left_at or {}
    claims = [Claim(r.user.lower(), gpus_of(r), r.submit, r.end if r.end is not None
                    else left.get(r.id)) for r in records]
    firsts: dict[str, float | None] = {}
    for r in sorted(records, key=lambda r: (r.submit, r.id)):
        firsts.setdefault(r.user.lower(), r.wait)
    done = [Run(r.user.lower(), gpus_of(r), start, end, lost)
            for r in records for start, end, lost in runs_of(r)]
    result.fairness = fairness(claims, done, gpus, weights, horizon, firsts, names, preemptions)
    return result


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
    if result.fairness is not None:
        lines += _fairness_lines(result.fairness, result.preemption)
    return "\n".join(lines)


def _fairness_lines(report: FairnessReport, preemption: Mapping[str, Any]) -> list[str]:
    lines = ["", "demand-aware fairness (entitled: max-min fair share of the GPUs, capped by "
             "what the user had queued and running)"]
    if preemption:
        every = preemption.get("checkpoint_every")
        lines.append(
            f"preemption {preemption['preemption']}: min runtime "
            f"{format_duration(preemption['min_runtime'])}, grace "
            f"{format_duration(preemption['preempt_grace'])}, at most "
            f"{preemption['max_preemptions']} per job, "
            + (f"checkpoint every {format_duration(every)}" if every else "no checkpoints"))
    lines.append(f"{'user':<12} {'first wait':>10} {'GPU-hours':>10} {'entitled':>10} "
                 f"{'ratio':>6} {'lost':>8}")
    for u in report.users:
        ratio = "-" if u.ratio is None else f"{u.ratio:.3f}"
        wait = "never" if u.first_wait is None else format_duration(u.first_wait)
        lines.append(f"{u.user:<12} {wait:>10} {u.received:>10.1f} {u.entitled:>10.1f} "
                     f"{ratio:>6} {u.lost:>8.1f}")
    lines.append(f"demand-aware Jain index {report.jain:.3f}, lost work {report.lost:.1f} "
                 f"GPU-hours in {report.preemptions} preemption"
                 f"{'' if report.preemptions == 1 else 's'}")
    return lines


def _gib(n: int) -> str:
    return f"{n / 2**30:g} GiB"

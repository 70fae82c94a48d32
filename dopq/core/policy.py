"""The scheduling policy: who runs next, on which GPUs, and why the rest wait.

Pure: :func:`decide` takes a :class:`ClusterState` and ``now`` and returns a
:class:`Decision`; nothing here reads a clock, a file or Docker.

Order of the queue
    1. topped jobs (an admin's "move to top"), highest ``top`` first;
    2. aged jobs, which have waited ``max_age`` or longer, oldest first;
    3. all others by priority, highest first;
    ties by submit time, then id. Held and dependent jobs keep their place
    but are passed over.

Priority (``policy="fairshare"``)
    w_fairshare * F_u + w_age * min(1, waited/max_age) + w_job * norm(priority) - nice

    F_u = 2**(-U_u/S_u): U_u is the user's share of all decayed usage, S_u the
    user's weight over the weights of the active users (queued or running jobs,
    or usage above 1e-6 of the total). F is 1 for a user who used nothing, 0.5
    at exactly the entitled share, and falls towards 0 beyond it.
    norm(priority) maps the job's integer priority, clamped to [-1000, 1000],
    linearly onto [0, 1] (0 -> 0.5).

Starvation
    The age term alone cannot outweigh a fair-share gap (10000 vs 1000 by
    default), so tier 2 is a hard rule: a job that has waited ``max_age`` goes
    before every job that has not, and aged jobs keep submit order, so none
    overtakes another. With every running job bounded by a time limit of at
    most L, an aged job with k jobs ahead of it starts within (k+1)*L:
    each head of the line starts within L (reservation below). Hence a job
    submitted behind k others waits at most ``max_age + (k+2)*L``.

Placement (EASY backfill; :mod:`dopq.core.placement`)
    Walk the order. CPU-only jobs start at once (subject to per-user limits).
    A whole-GPU job starts on the lowest free indices if it fits; a job that
    declares ``gpu_memory`` shares devices with room for it (best fit, so
    whole devices stay whole). The first GPU job that does not fit reserves
    the GPUs: its *shadow time* is when enough of them drain for it, from the
    time limits of running jobs (a job without a limit makes it infinite). A
    later GPU job may start only if it fits now, has a time limit and ends by
    the shadow time, so it can never delay the reserved job; behind an
    infinite shadow nothing backfills. ``max_gpus_per_user`` counts a shared
    job as its declared memory over the device's (as fair share charges it).

Preemption (``preemption="fairshare"``; :mod:`dopq.core.preemption`)
    The job that reserves (the head) may have preemptible jobs of users above
    their fair share stopped for it: ``Decision.preempt`` lists (victim, for
    job) to stop now, ``Decision.plan`` says whom it preempts and when, and a
    later plan wakes the decision up. On a full machine the walk goes on as
    far as the head so that it is known. Off: none of this runs.

``policy="recency"`` is DoPQ 1.0's order: a user's penalty is the sum of
``exp(-i)`` over their entries in the finished-job history (newest first, i
from 0); order by penalty, then submit time. No aging tier (as in 1.0).

Cost
    :func:`decide` builds one key per queued job and a heap, then pops only as
    far as starts are possible; ``Decision.entries`` (every job's position,
    reason and factors) is computed on first access by :func:`explain`, which
    walks the whole queue and is ~10x slower. The starts of both agree.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from dopq.core.capacity import validate_gpus
from dopq.core.fairshare import POLICIES, PolicyConfig, fairshare_factors
from dopq.core.jobs import JobState, WaitReason
from dopq.core.placement import INF, Placer, dependency_failure

if TYPE_CHECKING:
    from dopq.core.preemption import Plan

# PolicyConfig and the fair-share factor are defined in dopq.core.fairshare.
__all__ = [
    "POLICIES", "ClusterState", "Decision", "PolicyConfig", "QueueEntry", "QueuedJob",
    "RunningJob", "decide", "explain", "fairshare_factors", "validate_gpus",
]

PRIORITY_SPAN = 1000
_AGED = -INF  # sort key of an aged job: before every priority

_user = attrgetter("user")
_sub = attrgetter("submitted_at")
_prio = attrgetter("priority")


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: int
    user: str
    num_gpus: int
    submitted_at: float
    time_limit: float | None = None
    priority: int = 0
    nice: int = 0
    held: bool = False
    top: int = 0  # admin "move to top": higher is earlier, 0 is not topped
    after: tuple[int, ...] = ()  # all must succeed
    after_any: tuple[int, ...] = ()  # all must end, in any state
    gpu_memory: int = 0  # bytes on each device, shared; 0: whole, exclusive GPUs
    preemptible: bool = False
    restarts: int = 0  # times it was preempted so far


@dataclass(frozen=True, slots=True)
class RunningJob:
    id: int
    user: str
    num_gpus: int
    gpus: tuple[int, ...]
    started_at: float
    time_limit: float | None = None
    gpu_memory: int = 0  # bytes on each of ``gpus``, shared; 0: whole GPUs
    # What preemption (dopq.core.preemption) looks at; the placement ignores them.
    preemptible: bool = False
    restarts: int = 0
    priority: int = 0
    stopping: bool = False  # being stopped already (its devices are on their way)


@dataclass(frozen=True)
class ClusterState:
    """What the policy sees at one instant.

    ``free_gpus``: GPUs free now; GPUs busy with outside processes are not in it.
    ``usage``: decayed usage per user at ``now`` (:meth:`UsageLedger.snapshot`).
    ``finished_states``: final state of jobs that dependencies name; absent = not over.
    ``history``: users of finished jobs, newest first (recency policy only).
    ``total_gpus``: GPUs in the machine; unset, free + held by running jobs.
    ``factors``: F per user, to use instead of computing them from ``usage``
    (:mod:`dopq.core.eta` freezes them while it runs the policy forward).
    ``memory``: bytes of each device (absent: unknown, no job shares it);
    ``foreign``: bytes processes outside DoPQ use on a device (closed to
    whole-GPU jobs); ``external``: devices busy from outside (with or without
    known bytes); ``memory_reserve``: bytes of each device no shared job gets.
    """

    queued: Sequence[QueuedJob]
    running: Sequence[RunningJob] = ()
    free_gpus: frozenset[int] = frozenset()
    usage: Mapping[str, float] = field(default_factory=dict)
    finished_states: Mapping[int, JobState] = field(default_factory=dict)
    history: Sequence[str] = ()
    total_gpus: int | None = None
    factors: Mapping[str, float] | None = None  # F per lower-cased user, when already known
    memory: Mapping[int, int] = field(default_factory=dict)
    foreign: Mapping[int, int] = field(default_factory=dict)
    external: frozenset[int] = frozenset()
    memory_reserve: int = 0
    node_of: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One queued job as ``dopq queue`` shows it."""

    id: int
    position: int  # 1-based
    priority: float
    reason: WaitReason
    factors: dict[str, float]


class Decision:
    """What to do now: ``starts`` (job id, GPU indices), ``fail`` (job id, reason),
    ``preempt`` (job id, for job id).

    ``next_wakeup`` is the earliest future time the decision may change with no
    event (a time limit runs out, a job reaches ``max_age``); the slow drift of
    decaying usage is not counted. ``entries`` is computed on first access.
    """

    def __init__(
        self,
        starts: list[tuple[int, tuple[int, ...]]],
        fail: list[tuple[int, str]],
        next_wakeup: float | None,
        explain: Callable[[], list[QueueEntry]],
    ) -> None:
        self.starts = starts
        self.fail = fail
        self.next_wakeup = next_wakeup
        self._explain: Callable[[], list[QueueEntry]] | None = explain
        self._entries: list[QueueEntry] | None = None
        # What it was decided from, for dopq.core.eta to run the policy forward.
        self.inputs: tuple[ClusterState, float, PolicyConfig] | None = None
        # Preemption (``preemption = "fairshare"``): (victim, for job) to stop now, and
        # the plan of the head job that will preempt (now, or later), for the explanation.
        self.preempt: list[tuple[int, int]] = []
        self.plan: Plan | None = None

    @property
    def entries(self) -> list[QueueEntry]:
        if self._entries is None:
            assert self._explain is not None
            self._entries = self._explain()
            self._explain = None  # drop the state it holds
        return self._entries

    def __repr__(self) -> str:
        return f"Decision(starts={self.starts!r}, fail={self.fail!r})"


# ---------------------------------------------------------------- priority


def job_term(priority: int, w_job: float) -> float:
    """``w_job * norm(priority)``: [-1000, 1000] mapped linearly onto [0, w_job]."""
    p = min(PRIORITY_SPAN, max(-PRIORITY_SPAN, priority))
    return w_job * (p + PRIORITY_SPAN) / (2 * PRIORITY_SPAN)


def recency_penalties(history: Sequence[str]) -> dict[str, float]:
    """DoPQ 1.0's penalty: sum of exp(-i) over the user's places in the history."""
    pen: dict[str, float] = {}
    for i, user in enumerate(history):
        key = user.lower()
        pen[key] = pen.get(key, 0.0) + math.exp(-i)
    return pen


class _Scorer:
    """Per-call constants, shared by :func:`decide` and :func:`explain`."""

    def __init__(self, state: ClusterState, now: float, cfg: PolicyConfig) -> None:
        self.now = now
        self.cfg = cfg
        self.fairshare = cfg.policy != "recency"
        raw = set(map(_user, state.queued))
        if self.fairshare:
            active = {u.lower() for u in raw}
            active.update(r.user.lower() for r in state.running)
            self.F = (dict(state.factors) if state.factors is not None
                      else fairshare_factors(state.usage, active, cfg.shares))
            self.by_raw = {u: cfg.w_fairshare * self.F.get(u.lower(), 1.0) for u in raw}
            self.jt = {p: job_term(p, cfg.w_job) for p in set(map(_prio, state.queued))}
        else:
            self.pen = recency_penalties(state.history)
            self.by_raw = {u: self.pen.get(u.lower(), 0.0) for u in raw}
        self.cut = now - cfg.max_age  # submitted at or before: aged
        self.rate = cfg.w_age / cfg.max_age
        # Sorted submit times: cheap when the queue comes in submit order.
        self.subs = sorted(map(_sub, state.queued)) if self.fairshare else []

    def next_aging(self) -> float | None:
        """When the next job reaches ``max_age`` (fairshare only)."""
        i = bisect.bisect_right(self.subs, self.cut)
        return self.subs[i] + self.cfg.max_age if i < len(self.subs) else None

    def keys(self, jobs: Sequence[QueuedJob]) -> list[tuple[float, float, int, int]]:
        """Sort keys (smaller first) of untopped jobs, ending in the job's index.

        The hot loop, kept flat. Keys hold the index rather than the job so that
        they contain only atomic values and the garbage collector drops them
        from tracking at once (three times faster at 100k jobs).
        """
        by = self.by_raw
        if not self.fairshare:
            return [(by[q.user], q.submitted_at, q.id, i) for i, q in enumerate(jobs)]
        cut, jt = self.cut, self.jt
        if self.subs and self.subs[-1] > self.now:  # clock stepped back: clamp age at 0
            return [
                (_AGED if q.submitted_at <= cut else -self.priority(q), q.submitted_at, q.id, i)
                for i, q in enumerate(jobs)
            ]
        # -priority, with the age term rewritten as submitted_at*rate - now*rate
        rate = self.rate
        offset = self.now * rate
        return [
            (
                _AGED if q.submitted_at <= cut
                else q.submitted_at * rate - by[q.user] - jt[q.priority] + q.nice - offset,
                q.submitted_at,
                q.id,
                i,
            )
            for i, q in enumerate(jobs)
        ]

    def factors(self, q: QueuedJob) -> dict[str, float]:
        if not self.fairshare:
            return {"penalty": self.by_raw[q.user]}
        cfg = self.cfg
        age = min(1.0, max(0.0, self.now - q.submitted_at) / cfg.max_age)
        return {
            "fairshare": self.by_raw[q.user],
            "age": cfg.w_age * age,
            "job": self.jt[q.priority],
            "nice": float(q.nice),
            "F": self.F.get(q.user.lower(), 1.0),
        }

    def priority(self, q: QueuedJob) -> float:
        if not self.fairshare:
            return -self.by_raw[q.user]
        f = self.factors(q)
        return f["fairshare"] + f["age"] + f["job"] - f["nice"]


# --------------------------------------------------------------- decisions


def _failures(state: ClusterState) -> list[tuple[int, str]]:
    finished = state.finished_states
    if not finished:
        return []
    fail = []
    for q in state.queued:
        if q.after:
            why = dependency_failure(q, finished)
            if why is not None:
                fail.append((q.id, why))
    return fail


def _next_wakeup(state: ClusterState, placer: Placer, scorer: _Scorer) -> float | None:
    now = placer.now
    times = [
        r.started_at + r.time_limit
        for r in state.running
        if r.time_limit is not None and r.started_at + r.time_limit > now
    ]
    times += [now + q.time_limit for q in placer.started if q.time_limit is not None]
    aging = scorer.next_aging()
    if aging is not None:
        times.append(aging)
    return min(times, default=None)


def _split_topped(queued: Sequence[QueuedJob]) -> tuple[list[QueuedJob], Sequence[QueuedJob]]:
    topped = [q for q in queued if q.top]
    if not topped:
        return [], queued
    topped.sort(key=lambda q: (-q.top, q.submitted_at, q.id))
    return topped, [q for q in queued if not q.top]


def decide(state: ClusterState, now: float, cfg: PolicyConfig) -> Decision:
    """Which queued jobs start now and on which GPUs; see the module docstring."""
    scorer = _Scorer(state, now, cfg)
    placer = Placer(state, now, cfg)
    topped, rest = _split_topped(state.queued)
    for q in topped:
        placer.visit(q)
    preempting = cfg.preemption != "off"

    def popping() -> bool:
        return placer.open_for_gpu_jobs() or (preempting and placer.shadow is None)

    if not (popping() or placer.open_for_backfill()):
        # Nothing can start on a device (the usual state of a long queue): only
        # CPU-only jobs can start, so only they are ranked (10k queued: 5.1 -> 1.8 ms).
        rest = [q for q in rest if q.num_gpus == 0]
    heap = scorer.keys(rest)
    heapq.heapify(heap)
    # Pop in order while a GPU job could still start without backfilling;
    # with preemption, on a full machine too, as far as the head job (which
    # may preempt): only CPU-only jobs start on the way, as they would below.
    while heap and popping():
        placer.visit(rest[heapq.heappop(heap)[3]])
    # Past that point only CPU-only jobs and backfill candidates can start;
    # the others would only be told why they wait, which explain() does.
    if heap:
        if placer.open_for_backfill():
            # The test of Placer.visit, loosened (free devices only shrink from here).
            shadow = placer.shadow
            assert shadow is not None
            if placer.sharing:
                later = [
                    k for k in heap
                    if (q := rest[k[3]]).num_gpus == 0
                    or (q.time_limit is not None and now + q.time_limit <= shadow
                        and placer.may_fit(q))
                ]
            else:  # whole GPUs only: the same test inline, this walks the whole queue
                free = len(placer.free)
                later = [
                    k for k in heap
                    if (q := rest[k[3]]).num_gpus == 0
                    or (q.num_gpus <= free and q.time_limit is not None
                        and now + q.time_limit <= shadow)
                ]
        else:
            later = [k for k in heap if rest[k[3]].num_gpus == 0]
        later.sort()
        room = placer.has_room
        for k in later:
            q = rest[k[3]]
            if q.num_gpus == 0 or room():
                placer.visit(q)
    decision = Decision(
        placer.starts,
        _failures(state),
        _next_wakeup(state, placer, scorer),
        lambda: explain(state, now, cfg),
    )
    decision.inputs = (state, now, cfg)
    if cfg.preemption != "off" and placer.head is not None:
        _preempt(decision, state, now, cfg, placer, scorer)
    return decision


def _preempt(decision: Decision, state: ClusterState, now: float, cfg: PolicyConfig,
             placer: Placer, scorer: _Scorer) -> None:
    """Whom the head job preempts, now or later (then the decision wakes up for it)."""
    # Imported here: dopq.core.preemption builds the scheduler's instructions
    # (dopq.core.events), which import this module.
    from dopq.core.preemption import plan

    assert placer.head is not None
    factors = scorer.F if scorer.fairshare else fairshare_factors(
        state.usage, {u.lower() for u in map(_user, [*state.queued, *state.running])},
        cfg.shares)
    started = list(zip(placer.started, [g for _, g in placer.starts], strict=True))
    p = plan(state, now, cfg, placer.head, started, factors)
    decision.plan = p
    if p is None:
        return
    if p.at <= now:
        decision.preempt = [(v, p.job) for v in p.victims]
    elif decision.next_wakeup is None or p.at < decision.next_wakeup:
        decision.next_wakeup = p.at


def explain(state: ClusterState, now: float, cfg: PolicyConfig) -> list[QueueEntry]:
    """Every queued job in order with its position, priority, reason and factors."""
    scorer = _Scorer(state, now, cfg)
    placer = Placer(state, now, cfg)
    topped, rest = _split_topped(state.queued)
    keys = scorer.keys(rest)
    keys.sort()
    order = topped + [rest[k[3]] for k in keys]
    return [
        QueueEntry(q.id, pos, scorer.priority(q), placer.visit(q), scorer.factors(q))
        for pos, q in enumerate(order, 1)
    ]

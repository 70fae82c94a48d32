"""Preemption: which running jobs make room for the head of the queue.

Pure, like :mod:`dopq.core.policy`, which calls :func:`plan` after placing
the queue when ``[policy] preemption = "fairshare"``. The head is the first
GPU job in the policy's order that does not fit now (the one that reserves).

Its user must be under their fair share (F > 0.5, usage / share < 1). A
running job is a candidate victim when it is preemptible, holds devices,
belongs to another user who is above their share (F < 0.5), has run at least
``min_runtime`` in its current run (so no job is preempted twice within it),
was preempted fewer than ``max_preemptions`` times, and has no higher
priority than the head job. Candidates are ranked by their user's
usage / share, highest first, then by start, youngest first; the victims are
the fewest candidates that make room (whole devices for a whole-GPU job,
enough free bytes on enough devices for a shared one), the best ranked among
sets of that size. None when no set makes room: nobody is stopped for nothing.

Jobs already being stopped (a preemption in flight, a cancel, a time limit)
count as gone: while their devices drain nobody else is chosen.

The scheduler's side (:mod:`dopq.core.scheduler`): :func:`stop_victims` turns
a decision's victims into :class:`~dopq.core.events.PreemptJob`, and
:func:`requeue` a preempted job's end into its return to the queue.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

from dopq.core.events import CommitJob, Instruction, PreemptJob, Running
from dopq.core.exits import PREEMPTED_PREFIX
from dopq.core.jobs import JobState

if TYPE_CHECKING:
    from collections.abc import Callable

    from dopq.core.fairshare import PolicyConfig
    from dopq.core.policy import ClusterState, Decision, QueuedJob, RunningJob

    _Fits = Callable[[Sequence[RunningJob]], bool]

UNDER = 0.5  # F above it: under the fair share; below it: above the share
SEARCH_BUDGET = 2000  # victim sets tried when looking for fewer than the greedy pick


@dataclass(frozen=True, slots=True)
class Plan:
    """The head ``job`` preempts ``victims`` at ``at`` (now, or when they reach min_runtime)."""

    job: int
    victims: tuple[int, ...]
    at: float
    reason: str  # the victims' stop reason: preempted by job 17 of bob (bob under ...)


class Room:
    """Who holds which device, to ask whether removing some jobs makes room for a job."""

    def __init__(self, state: ClusterState,
                 started: Sequence[tuple[QueuedJob, tuple[int, ...]]]) -> None:
        self.holders: dict[int, list[tuple[int, int]]] = {}  # device -> (job, bytes; 0: whole)
        for r in state.running:
            for g in r.gpus:
                self.holders.setdefault(g, []).append((r.id, r.gpu_memory))
        for q, gpus in started:
            for g in gpus:
                self.holders.setdefault(g, []).append((q.id, q.gpu_memory))
        devices = set(state.free_gpus) | set(self.holders) | set(state.memory)
        # Busy from outside DoPQ: closed to whole-GPU jobs; with unknown bytes, to all.
        self.whole = sorted(devices - state.external)
        closed = state.external - set(state.foreign)
        self.cap = {d: state.memory[d] - state.memory_reserve - state.foreign.get(d, 0)
                    for d in sorted(devices - closed) if d in state.memory}

    def fits(self, q: QueuedJob, gone: set[int]) -> bool:
        """Would ``q`` fit with the jobs in ``gone`` ended?"""
        need, m = q.num_gpus, q.gpu_memory
        holders = self.holders
        if not m:
            free = sum(1 for d in self.whole
                       if all(j in gone for j, _ in holders.get(d, ())))
            return free >= need
        hosts = 0
        for d, cap in self.cap.items():
            left = [b for j, b in holders.get(d, ()) if j not in gone]
            if 0 not in left and cap - sum(left) >= m:
                hosts += 1
        return hosts >= need


def penalty(factor: float) -> float:
    """usage / share from F = 2 ** (-usage / share)."""
    return -math.log2(factor) if factor > 0 else math.inf


def plan(state: ClusterState, now: float, cfg: PolicyConfig, head: QueuedJob,
         started: Sequence[tuple[QueuedJob, tuple[int, ...]]],
         factors: Mapping[str, float]) -> Plan | None:
    """The victims for ``head`` now, else at the earliest time they exist; None: never.

    ``started`` are the jobs this decision starts, with their devices;
    ``factors`` is F per lower-cased user (absent: 1, no usage).
    """
    user = head.user.lower()
    f_head = factors.get(user, 1.0)
    if f_head <= UNDER:
        return None
    room = Room(state, started)
    gone = {r.id for r in state.running if r.stopping}
    if room.fits(head, gone):
        return None  # devices already on their way
    pool = [r for r in state.running if _candidate(r, head, cfg, factors)]
    if not pool:
        return None
    pool.sort(key=lambda r: (-penalty(factors.get(r.user.lower(), 1.0)), -r.started_at, r.id))
    # Try now, then each time another candidate reaches its minimum runtime.
    times = sorted({max(now, r.started_at + cfg.min_runtime) for r in pool})
    for t in times:
        ready = [r for r in pool if r.started_at + cfg.min_runtime <= t]
        victims = _fewest(ready, lambda vs: room.fits(head, gone | {v.id for v in vs}))
        if victims:
            return Plan(head.id, tuple(v.id for v in victims), t,
                        _reason(head, victims))
    return None


def _candidate(r: RunningJob, head: QueuedJob, cfg: PolicyConfig,
               factors: Mapping[str, float]) -> bool:
    return (r.preemptible and bool(r.gpus) and not r.stopping
            and r.user.lower() != head.user.lower()
            and factors.get(r.user.lower(), 1.0) < UNDER
            and r.restarts < cfg.max_preemptions
            and r.priority <= head.priority)


def _fewest(ranked: Sequence[RunningJob],
            fits: _Fits) -> Sequence[RunningJob] | None:
    """The fewest of ``ranked`` for which ``fits`` holds, the best ranked among equals."""
    chosen: list[RunningJob] = []
    for r in ranked:
        chosen.append(r)
        if fits(chosen):
            break
    else:
        return None
    for r in reversed(chosen[:-1]):  # drop the ones not needed, the worst ranked first
        rest = [v for v in chosen if v is not r]
        if fits(rest):
            chosen = rest
    # A smaller set may exist (one large job instead of two small ones): look,
    # while the number of sets stays small. combinations() keeps rank order, so
    # the first hit of a size is the best ranked set of that size.
    for k in range(1, len(chosen)):
        if math.comb(len(ranked), k) > SEARCH_BUDGET:
            break
        for combo in combinations(ranked, k):
            if fits(combo):
                return combo
    return chosen


def _reason(head: QueuedJob, victims: Sequence[RunningJob]) -> str:
    above = ", ".join(sorted({v.user for v in victims}))
    return (f"{PREEMPTED_PREFIX} by job {head.id} of {head.user} "
            f"({head.user} under fair share; {above} above)")


# ------------------------------------------------------- the scheduler's side


def stop_victims(decision: Decision, running: Mapping[int, Running],
                 stopping: MutableMapping[int, float], now: float,
                 grace: float) -> list[Instruction]:
    """Mark the decision's victims stopping (with the reason) and preempt them.

    A job already being stopped is not asked again, so a victim is preempted once.
    """
    assert decision.plan is not None
    reason = decision.plan.reason
    out: list[Instruction] = []
    for job_id, by in decision.preempt:
        live = running.get(job_id)
        if live is None or job_id in stopping:
            continue
        live.error = reason
        stopping[job_id] = now
        out.append(CommitJob(job_id, None, fields={"error": reason}))
        out.append(PreemptJob(job_id, by, reason, grace, live.container))
    return out


def draining(live: Running, asked: float | None, grace: float) -> tuple[float | None, bool]:
    """The job's time limit and whether it is being stopped, as the policy sees them.

    A preempted job ends by the end of its grace at the latest: so the
    reservation of the job it makes room for ends then, and no job backfills
    onto its devices unless it ends by then too. Its stored stop reason marks
    it stopping after a server restart as well (no second victim for the head).
    """
    preempted = (live.error or "").startswith(PREEMPTED_PREFIX)
    if not preempted or asked is None or live.started_at is None:
        return live.time_limit, asked is not None or preempted
    end = asked + grace - live.started_at
    return (end if live.time_limit is None else min(live.time_limit, end)), True


def requeue(live: Running) -> tuple[CommitJob, QueuedJob | None]:
    """A preempted job's return to the queue, and the job to queue again (if known here).

    It keeps its submit time; its outputs are not sealed (it runs again into
    the same folder); who preempted it is read from its stop reason, which the
    store keeps across a server restart.
    """
    by = re.search(r"by job (\d+)", live.error or "")
    restarts = live.restarts + 1
    commit = CommitJob(live.id, JobState.QUEUED, (JobState.RUNNING,), {
        "gpus": [], "container": None, "started_at": None, "error": None,
        "restarts": restarts, "preempted_by": int(by[1]) if by else None},
        live.error or PREEMPTED_PREFIX)
    again = (dataclasses.replace(live.queued, restarts=restarts)
             if live.queued is not None else None)
    return commit, again

"""When will my job start: the policy run forward on a simulated future.

Pure, like :mod:`dopq.core.policy`: :func:`estimate` takes a
:class:`~dopq.core.policy.ClusterState`, ``now``, the policy settings and what is
known of run times, and returns for every queued job an :class:`Estimate`: the
expected start (None when it cannot be known) and why the job waits, in words
(``Resources: 2 GPUs busy until ~10:40 (jobs 12, 15)``).

The model
    A running job ends at its start plus its time limit; without one, plus its
    user's typical run time (:class:`RunTimes`), else the server's default
    limit, else never (its GPUs are busy for good, and whatever waits for them
    gets None). Jobs the simulation starts run as long and succeed, so jobs
    that depend on them become eligible when they end. Between events the
    same :func:`~dopq.core.policy.decide` as the server places jobs, so holds,
    dependencies, per-user limits, reservations and backfill are honoured
    exactly as the queue would. Decayed usage is frozen at ``now`` (the
    fair-share factors drift slowly; aging is counted).

Cost
    One :func:`~dopq.core.policy.decide` and one :func:`~dopq.core.policy.explain` on the
    whole queue (both reusable from the queue's own decision), then at most
    ``max_events`` decisions on a window of the first ``window`` unstarted jobs
    in queue order, refilled as they start. A job that lies deeper than the
    window can therefore not backfill in the simulated future (it can at
    ``now``), and jobs still waiting after ``max_events`` events get None with
    that reason. See ``bench/bench_eta.py`` for the figures.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dopq.core.jobs import JobState, WaitReason
from dopq.core.policy import (
    INF,
    ClusterState,
    Decision,
    PolicyConfig,
    QueuedJob,
    QueueEntry,
    RunningJob,
    decide,
    explain,
    fairshare_factors,
)
from dopq.core.preemption import Plan

MAX_EVENTS = 400
STARTING = "Starting"  # the reason of a job that starts at this instant
WINDOW = 64


@dataclass(frozen=True, slots=True)
class Estimate:
    """When a queued job is expected to start (None: unknown) and why it waits."""

    start: float | None
    reason: str


@dataclass(frozen=True)
class RunTimes:
    """How long jobs run: their time limit, else ``typical[user]``, else ``default``."""

    typical: Mapping[str, float] = field(default_factory=dict)  # lower-cased user -> seconds
    default: float | None = None

    def of(self, user: str, time_limit: float | None) -> float | None:
        if time_limit is not None:
            return time_limit
        return self.typical.get(user.lower(), self.default)


def clock_text(ts: float, now: float) -> str:
    """``10:40`` today (local time), ``Dec 04 10:40`` on another day."""
    t, n = time.localtime(ts), time.localtime(now)
    same_day = (t.tm_year, t.tm_yday) == (n.tm_year, n.tm_yday)
    return time.strftime("%H:%M" if same_day else "%b %d %H:%M", t)


def start_text(iso: str | None, now: float) -> str:
    """An expected start (ISO 8601, as the API gives it) as ``~10:40``; ``-`` when None."""
    if not iso:
        return "-"
    try:
        ts = dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return "-"
    return "~now" if ts <= now else "~" + clock_text(ts, now)


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def typical_run_times(rows: Sequence[tuple[str, float]], per_user: int = 20) -> dict[str, float]:
    """Median run time of each user's ``per_user`` newest runs; ``rows``: newest first."""
    runs: dict[str, list[float]] = {}
    for user, seconds in rows:
        mine = runs.setdefault(user.lower(), [])
        if len(mine) < per_user and seconds >= 0:
            mine.append(seconds)
    return {u: median(v) for u, v in runs.items() if v}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def short_duration(seconds: float) -> str:
    """``43m``, ``2h05m``, ``1d03h``: whole minutes, rounded down."""
    m = int(seconds) // 60
    d, m = divmod(m, 1440)
    h, m = divmod(m, 60)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m"


def _ids(ids: Sequence[int]) -> str:
    return ("job " if len(ids) == 1 else "jobs ") + ", ".join(map(str, ids))


def _simulate(
    state: ClusterState, now: float, cfg: PolicyConfig, runtimes: RunTimes,
    first: Decision, order: Sequence[int], max_events: int, window: int,
) -> tuple[dict[int, float], dict[int, float | None], bool]:
    """Start time per job the simulation starts, the end of every job, and cut short?"""
    pending = {q.id: q for q in state.queued if not q.held}
    running: dict[int, RunningJob] = {r.id: r for r in state.running}
    end_of: dict[int, float | None] = {}
    heap: list[tuple[float, int]] = []
    for r in state.running:
        run = runtimes.of(r.user, r.time_limit)
        end_of[r.id] = None if run is None else max(now, r.started_at + run)
        if run is not None:
            heap.append((max(now, r.started_at + run), r.id))
    heapq.heapify(heap)
    free = set(state.free_gpus)
    finished = dict(state.finished_states)
    starts: dict[int, float] = {}
    t, decision, events, head = now, first, 0, 0
    factors = None
    if cfg.policy != "recency":
        active = {q.user.lower() for q in state.queued} | {r.user.lower() for r in state.running}
        factors = fairshare_factors(state.usage, active, cfg.shares)
    while True:
        for jid, gpus in decision.starts:
            q = pending.pop(jid, None)
            if q is None:
                continue
            starts[jid] = t
            free.difference_update(gpus)
            running[jid] = RunningJob(jid, q.user, q.num_gpus, gpus, t, q.time_limit,
                                      q.gpu_memory)
            run = runtimes.of(q.user, q.time_limit)
            end_of[jid] = None if run is None else t + run
            if run is not None:
                heapq.heappush(heap, (t + run, jid))
        for jid, _why in decision.fail:
            pending.pop(jid, None)
        if not pending:
            return starts, end_of, False
        if events >= max_events:
            return starts, end_of, True
        wake = decision.next_wakeup
        nxt = min(heap[0][0] if heap else INF, wake if wake is not None and wake > t else INF)
        if nxt == INF:
            return starts, end_of, False
        t = nxt
        while heap and heap[0][0] <= t:
            _, jid = heapq.heappop(heap)
            gone = running.pop(jid)
            if gone.gpu_memory:  # a shared device is free once its last job ends
                busy = {g for r in running.values() for g in r.gpus} | state.external
                free.update(g for g in gone.gpus if g not in busy)
            else:
                free.update(gone.gpus)
            finished[jid] = JobState.SUCCEEDED
        events += 1
        while head < len(order) and order[head] not in pending:
            head += 1
        jobs: list[QueuedJob] = []
        i = head
        while len(jobs) < window and i < len(order):
            q = pending.get(order[i])
            if q is not None:
                jobs.append(q)
            i += 1
        sub = dataclasses.replace(state, queued=jobs, running=list(running.values()),
                                  free_gpus=frozenset(free), finished_states=finished,
                                  factors=factors)
        decision = decide(sub, t, cfg)


class _Words:
    """Turns explain's one-word reasons into sentences."""

    def __init__(self, state: ClusterState, now: float, cfg: PolicyConfig, first: Decision,
                 starts: Mapping[int, float], end_of: Mapping[int, float | None],
                 when: Callable[[float, float], str]) -> None:
        self.state, self.now, self.cfg, self.first = state, now, cfg, first
        self.starts, self.end_of, self.when = starts, end_of, when
        self.queued = {q.id: q for q in state.queued}
        self.running = {r.id: r for r in state.running}
        self.gpus_of = dict(first.starts)
        # Who holds GPUs at this point of the walk: (job, GPUs, limit-based end).
        self.holders: list[tuple[int, int, float]] = [
            (r.id, len(r.gpus),
             max(now, r.started_at + r.time_limit) if r.time_limit is not None else INF)
            for r in state.running if r.gpus
        ]
        self.free = sorted(state.free_gpus)
        self.capacity = state.total_gpus if state.total_gpus is not None else (
            sum(len(r.gpus) for r in state.running) + len(state.free_gpus))
        self.reserver: tuple[int, float] | None = None  # (job, policy's shadow time)

    def started(self, q: QueuedJob) -> None:
        """``q`` starts now: explain walks in the order decide placed jobs."""
        gpus = self.gpus_of.get(q.id, ())
        if gpus:
            self.free = [g for g in self.free if g not in gpus]
            end = self.now + q.time_limit if q.time_limit is not None else INF
            self.holders.append((q.id, len(gpus), end))

    def _at(self, ts: float | None) -> str:
        return "~" + self.when(ts, self.now) if ts is not None else "an unknown time"

    def resources(self, q: QueuedJob) -> str:
        if q.gpu_memory:
            start = self.starts.get(q.id)
            return (f"Resources: {_plural(q.num_gpus, 'GPU')} with {q.gpu_memory / 2**30:.3g} "
                    f"GiB free each" + (f" until {self._at(start)}" if start is not None else ""))
        if q.num_gpus > self.capacity:
            return (f"Resources: needs {_plural(q.num_gpus, 'GPU')}, "
                    f"the machine has {self.capacity}")
        if self.reserver is None:
            self.reserver = (q.id, self._shadow(q.num_gpus))
        missing = q.num_gpus - len(self.free)
        ends = sorted((self.end_of.get(jid) or INF, jid, n) for jid, n, _ in self.holders)
        got, ids, until = len(self.free), [], -INF
        for end, jid, n in ends:
            if got >= q.num_gpus:
                break
            got += n
            ids.append(jid)
            until = max(until, end)
        ids.sort()
        busy = _plural(missing, "GPU") + " busy"
        if got < q.num_gpus:
            return f"Resources: {busy} ({_plural(q.num_gpus - got, 'GPU')} in use outside DoPQ)"
        if until == INF:  # any of them might end first: name them all
            ids = sorted(jid for end, jid, _ in ends if end == INF)
            return f"Resources: {busy} ({_ids(ids)}: no time limit, end unknown)"
        return f"Resources: {busy} until {self._at(until)} ({_ids(ids)})"

    def _shadow(self, need: int) -> float:
        """The policy's shadow time: when ``need`` GPUs free up, by time limits alone."""
        got = len(self.free)
        for end, n in sorted((end, n) for _, n, end in self.holders):
            got += n
            if got >= need:
                return end
        return INF

    def preempt(self, plan: Plan) -> str:
        """``will preempt job 12 of alice at ~10:42`` (now, or at the victims' min_runtime)."""
        victims = ", ".join(
            f"job {v} of {self.running[v].user}" if v in self.running else f"job {v}"
            for v in plan.victims)
        return f"will preempt {victims} at {self._at(plan.at)}"

    def reserved(self, q: QueuedJob) -> str:
        gpus = self.free[: q.num_gpus] if q.num_gpus else self.free
        what = ("GPU " if len(gpus) == 1 else "GPUs ") + ", ".join(map(str, gpus))
        verb, it = ("is", "it") if len(gpus) == 1 else ("are", "them")
        if self.reserver is None:  # explain always names the reserving job first
            return f"Reserved: {what} {verb} held for a job ahead"
        rid, shadow = self.reserver
        head = (f"Reserved: {what} {verb} held for job {rid} "
                f"(starts {self._at(self.starts.get(rid))})")
        if shadow == INF:
            return head + "; a running job has no time limit, so none can be lent before then"
        room = int(shadow - self.now) // 60 * 60
        if room < 60:
            return head
        return (f"{head}; a time limit under {short_duration(room)} would let this job "
                f"use {it} now")

    def dependency(self, q: QueuedJob) -> str:
        finished = self.state.finished_states
        waits = [d for d in q.after if finished.get(d) != JobState.SUCCEEDED]
        waits += [d for d in q.after_any if d not in finished and d not in waits]
        parts = []
        for d in waits:
            if d in finished:
                what = JobState(finished[d]).value
            elif d in self.running:
                what = "running"
            elif d in self.queued:
                what = "held" if self.queued[d].held else "queued"
            else:
                what = "not finished"
            parts.append(f"{d} ({what})")
        return ("Dependency: job " if len(parts) == 1 else "Dependency: jobs ") + ", ".join(parts)

    def user_limit(self, q: QueuedJob) -> str:
        cfg, u = self.cfg, q.user.lower()
        mine = [(r.id, len(r.gpus)) for r in self.state.running if r.user.lower() == u]
        mine += [(jid, len(g)) for jid, g in self.first.starts
                 if self.queued[jid].user.lower() == u]
        if cfg.max_running_per_user and len(mine) >= cfg.max_running_per_user:
            return (f"User limit: {q.user} has {_plural(len(mine), 'job')} running "
                    f"(at most {cfg.max_running_per_user})")
        gpus = sum(n for _, n in mine)
        return (f"User limit: {q.user} uses {_plural(gpus, 'GPU')}; {q.num_gpus} more "
                f"would pass the cap of {cfg.max_gpus_per_user}")

def estimate(
    state: ClusterState,
    now: float,
    cfg: PolicyConfig,
    runtimes: RunTimes | None = None,
    *,
    decision: Decision | None = None,
    entries: Sequence[QueueEntry] | None = None,
    max_events: int = MAX_EVENTS,
    window: int = WINDOW,
    when: Callable[[float, float], str] = clock_text,
) -> dict[int, Estimate]:
    """Every queued job's expected start and worded reason; see the module docstring.

    ``decision`` and ``entries`` may be passed when already computed for this
    ``state`` (the queue's own decision), to save one pass over the queue each.
    """
    runtimes = runtimes or RunTimes()
    first = decision if decision is not None else decide(state, now, cfg)
    entries = entries if entries is not None else explain(state, now, cfg)
    order = [e.id for e in entries]
    starts, end_of, cut = _simulate(state, now, cfg, runtimes, first, order, max_events,
                                    window)
    words = _Words(state, now, cfg, first, starts, end_of, when)
    plan = first.plan  # the head job's preemption (``preemption = "fairshare"``)
    # Only jobs on GPUs keep GPU jobs waiting; naming CPU-only ones too would change
    # every queued job's reason (and the shared view) whenever one of them starts.
    on_gpus = {r.id for r in state.running if r.gpus} | {q.id for q in state.queued if q.num_gpus}
    unknown = sorted(jid for jid, end in end_of.items() if end is None and jid in on_gpus)
    out: dict[int, Estimate] = {}
    ahead = 0
    for e in entries:
        q = words.queued[e.id]
        r = e.reason
        if r == WaitReason.HELD:
            out[q.id] = Estimate(None, "Held")
            continue
        if r == WaitReason.NONE:
            text = STARTING
            words.started(q)
        elif r == WaitReason.RESOURCES and plan is not None and plan.job == q.id:
            text = words.preempt(plan)
        elif r == WaitReason.RESOURCES:
            text = words.resources(q)
        elif r == WaitReason.RESERVED:
            text = words.reserved(q)
        elif r == WaitReason.DEPENDENCY:
            text = words.dependency(q)
        elif r == WaitReason.USER_LIMIT:
            text = words.user_limit(q)
        else:
            text = f"Priority: {_plural(ahead, 'job')} ahead"
        ahead += 1
        start = starts.get(q.id)
        if plan is not None and plan.job == q.id:  # the victims' grace is the longest wait
            start = min(start if start is not None else INF, plan.at + cfg.preempt_grace)
        if start is None and "unknown" not in text:
            if cut:
                text += f"; start not estimated (beyond {max_events} simulated events)"
            elif unknown:
                text += f"; start unknown ({_ids(unknown[:5])}: no time limit, no typical run)"
            else:
                text += "; start unknown"
        out[q.id] = Estimate(start, text)
    return out


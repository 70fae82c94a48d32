"""Demand-aware fairness of a schedule: what each user got against what was fair.

Pure: the simulator (:mod:`dopq.core.simulate`) hands in what happened (each
job's claim on GPUs from its submit to its end, each run, each piece of work
lost to a preemption) and gets back a :class:`FairnessReport`.

A user's *entitlement* at an instant is their max-min fair allocation of the
machine's GPUs given what they had queued and running then
(:func:`water_fill`): every user with demand gets GPUs in proportion to their
weight, but never more than they asked for, and what a capped user leaves is
shared among the others the same way. Integrated over the simulation it is
what the user could fairly have had; a user who asked for nothing at an
instant was entitled to nothing then, so idle users do not count against the
schedule (as a plain GPU-hours-per-share index does).

Demand is in GPUs: a whole-GPU job counts its GPUs, a job sharing devices by
memory the fraction of each device it declared (as its GPU-hours do). A
preempted job is demand from its submit to its final end, queued or not.

*Received* is GPU-time held, including runs cut short by a preemption (the
machine was theirs then; that work is counted apart as *lost*). Jain's index
is over received / entitled, among users entitled to anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Claim", "FairnessReport", "Run", "UserFairness", "entitlements", "fairness", "jain",
           "water_fill"]


@dataclass(frozen=True)
class Claim:
    """A job's demand: ``gpus`` (a fraction for a shared job) from ``since`` to
    ``until`` (None: to the end of the simulation, a job that never ended)."""

    user: str
    gpus: float
    since: float
    until: float | None


@dataclass(frozen=True)
class Run:
    """A stretch of a job on its devices; ``lost``: seconds of it thrown away
    (a preempted run's work since its last checkpoint)."""

    user: str
    gpus: float
    start: float
    end: float
    lost: float = 0.0


@dataclass
class UserFairness:
    user: str
    received: float  # GPU-hours held
    entitled: float  # GPU-hours of max-min fair allocation given the demand
    ratio: float | None  # received / entitled; None when entitled to nothing
    first_wait: float | None  # seconds the user's first job waited; None: it never started
    lost: float  # GPU-hours of work thrown away by preemptions


@dataclass
class FairnessReport:
    users: list[UserFairness]
    jain: float  # over the users' ratios (entitled > 0); 1.0 when none
    lost: float  # GPU-hours, all users
    preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"jain": self.jain, "lost_gpu_hours": self.lost, "preemptions": self.preemptions,
                "users": [asdict(u) for u in self.users]}


def water_fill(capacity: float, demands: Mapping[str, float],
               weights: Mapping[str, float]) -> dict[str, float]:
    """Max-min fair allocation of ``capacity`` to ``demands``, weighted.

    Every user gets ``min(demand, level * weight)`` with one ``level`` for all,
    chosen so that the allocation uses the whole capacity (or meets every
    demand when there is enough). Users with no demand get 0; a weight
    missing from ``weights`` is 1.
    """
    want = {u: d for u, d in demands.items() if d > 0}
    out = dict.fromkeys(demands, 0.0)
    left = max(0.0, capacity)
    weight = {u: weights.get(u, 1.0) for u in want}
    total = sum(weight.values())
    # Users whose demand is met below the common level are served first; the
    # rest share what is left by weight (smallest demand per weight first).
    for user in sorted(want, key=lambda u: (want[u] / weight[u], u)):
        level = left / total if total > 0 else 0.0
        if want[user] <= level * weight[user]:
            out[user] = want[user]
        else:
            out[user] = level * weight[user]
        left -= out[user]
        total -= weight[user]
    return out


def entitlements(claims: Iterable[Claim], capacity: float, weights: Mapping[str, float],
                 end: float) -> dict[str, float]:
    """GPU-seconds each user was entitled to, integrating :func:`water_fill` over
    the instants between the claims' changes up to ``end``."""
    changes: dict[float, dict[str, float]] = {}
    users: set[str] = set()
    for c in claims:
        users.add(c.user)
        until = end if c.until is None else min(c.until, end)
        if c.gpus <= 0 or until <= c.since:
            continue
        for at, delta in ((c.since, c.gpus), (until, -c.gpus)):
            step = changes.setdefault(at, {})
            step[c.user] = step.get(c.user, 0.0) + delta
    out = dict.fromkeys(users, 0.0)
    demand: dict[str, float] = {}
    times = sorted(changes)
    for at, nxt in zip(times, times[1:], strict=False):
        for user, delta in changes[at].items():
            # Rounding would leave a finished user a tiny demand, and a share.
            demand[user] = max(0.0, round(demand.get(user, 0.0) + delta, 9))
        for user, gpus in water_fill(capacity, demand, weights).items():
            out[user] += gpus * (nxt - at)
    return out


def jain(values: Sequence[float]) -> float:
    """Jain's index: 1 when all equal, 1/n when one has everything; 1.0 for none."""
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares > 0 else 1.0


def fairness(claims: Sequence[Claim], runs: Iterable[Run], capacity: float,
             weights: Mapping[str, float], end: float,
             first_waits: Mapping[str, float | None], names: Mapping[str, str] | None = None,
             preemptions: int = 0) -> FairnessReport:
    """The report: per user (sorted; keys as in ``claims``, shown as ``names``)
    and overall. ``first_waits``: per user, the wait of their first job."""
    entitled = entitlements(claims, capacity, weights, end)
    received = dict.fromkeys(entitled, 0.0)
    lost = dict.fromkeys(entitled, 0.0)
    for r in runs:
        received[r.user] = received.get(r.user, 0.0) + r.gpus * (r.end - r.start)
        lost[r.user] = lost.get(r.user, 0.0) + r.gpus * r.lost
    users = []
    for user in sorted(received):
        ent = entitled.get(user, 0.0)
        users.append(UserFairness(
            user=(names or {}).get(user, user), received=received[user] / 3600,
            entitled=ent / 3600, ratio=received[user] / ent if ent > 0 else None,
            first_wait=first_waits.get(user), lost=lost[user] / 3600))
    index = jain([u.ratio for u in users if u.ratio is not None])
    return FairnessReport(users, index, sum(lost.values()) / 3600, preemptions)

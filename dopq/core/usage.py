"""Decayed GPU usage per user: the memory behind fair share.

Each user's usage ``H`` is in GPU-seconds (a job sharing a device by memory
is charged its declared fraction of it: :func:`charge_rates`) and halves every ``half_life``
seconds. Between two calls of :meth:`UsageLedger.advance` a user holding
``r`` GPUs at a constant rate is charged

    H <- H * 2**(-dt/T) + r * T/ln2 * (1 - 2**(-dt/T))

The second term is the exact integral of ``r`` over the interval with every
second decayed to its end. It equals ``r * dt`` to first order (so for short
steps it is the textbook ``H * 2**(-dt/T) + gpus * dt``), and unlike that
form it does not depend on how the interval is cut into steps: one step of
``2*dt`` gives the same ledger as two steps of ``dt``.

Pure: no clock reads, ``now`` is always an argument. User names are
case-insensitive and stored lower-cased.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

LN2 = math.log(2.0)
PRUNE_BELOW = 1e-6  # GPU-seconds; a user idle this long is forgotten


def decay(h: float, dt: float, half_life: float) -> float:
    """``h`` after ``dt`` seconds of exponential decay with the given half-life."""
    return h * 2.0 ** (-dt / half_life)


def charge(rate: float, dt: float, half_life: float) -> float:
    """GPU-seconds that ``rate`` GPUs held for ``dt`` seconds add, decayed to the end."""
    # -expm1(-x) == 1 - e**-x, kept accurate when dt is tiny against half_life.
    return rate * half_life / LN2 * -math.expm1(-dt * LN2 / half_life)


@dataclass
class UserUsage:
    """One user's decayed usage (GPU-seconds) as of ``updated_at``."""

    value: float
    updated_at: float


class _Holder(Protocol):
    @property
    def user(self) -> str: ...

    @property
    def num_gpus(self) -> int: ...

    @property
    def gpus(self) -> tuple[int, ...]: ...

    @property
    def gpu_memory(self) -> int: ...


def gpu_fraction(gpu_memory: int, device_memory: Sequence[int]) -> float:
    """GPUs a shared job counts as: its declared bytes over each device's memory.

    A device of unknown memory (0), or one the job declares all of, counts whole.
    """
    return sum(min(1.0, gpu_memory / mem) if mem > 0 else 1.0 for mem in device_memory)


def charge_rates(running: Iterable[_Holder], cpu_fraction: float,
                 memory: Mapping[int, int] | None = None) -> dict[str, float]:
    """Charge rate per user, in GPUs: whole GPUs held count 1 each, a shared job
    its :func:`gpu_fraction` of each device (``memory``: device -> bytes), a
    CPU-only job ``cpu_fraction``. The one place a job's charge is decided;
    the policy's per-user GPU limit counts the same way."""
    rates: dict[str, float] = {}
    for job in running:
        user = job.user.lower()
        if job.gpu_memory and job.gpus:
            mem = memory or {}
            rate = gpu_fraction(job.gpu_memory, [mem.get(g, 0) for g in job.gpus])
        else:
            rate = job.num_gpus or cpu_fraction
        rates[user] = rates.get(user, 0.0) + rate
    return rates


class UsageLedger:
    """Decayed usage of every user, advanced by the caller at each event.

    ``advance(now, rates)`` charges the rates held since the previous advance,
    so call it *before* the set of running jobs changes.
    """

    def __init__(self, half_life: float, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        if not half_life > 0:
            raise ValueError("half_life must be positive")
        self.half_life = float(half_life)
        self._users: dict[str, UserUsage] = {}
        self.updated_at: float | None = None
        self.load_rows(rows)

    def __contains__(self, user: str) -> bool:
        return user.lower() in self._users

    def __len__(self) -> int:
        return len(self._users)

    def advance(self, now: float, running: Mapping[str, float]) -> None:
        """Decay everyone to ``now`` and charge ``running`` (user -> rate) since last time.

        A clock that steps back is treated as no time passing.
        """
        last = self.updated_at if self.updated_at is not None else now
        charged_dt = max(0.0, now - last)
        rates: dict[str, float] = {}
        for user, rate in running.items():
            key = user.lower()
            rates[key] = rates.get(key, 0.0) + rate
        for user in self._users.keys() | rates.keys():
            rec = self._users.get(user)
            if rec is None:
                rec = self._users[user] = UserUsage(0.0, last)
            if now > rec.updated_at:
                rec.value = decay(rec.value, now - rec.updated_at, self.half_life)
                rec.updated_at = now
            rate = rates.get(user, 0.0)
            if rate and charged_dt:
                rec.value += charge(rate, charged_dt, self.half_life)
            if rec.value < PRUNE_BELOW and user not in rates:
                del self._users[user]
        self.updated_at = max(now, last)

    def value(self, user: str, now: float) -> float:
        """``user``'s usage decayed to ``now`` (no charge since the last advance)."""
        rec = self._users.get(user.lower())
        if rec is None:
            return 0.0
        return decay(rec.value, max(0.0, now - rec.updated_at), self.half_life)

    def snapshot(self, now: float) -> dict[str, float]:
        """Every user's usage decayed to ``now``: the ``usage`` a policy decision takes."""
        return {user: self.value(user, now) for user in self._users}

    def total(self, now: float) -> float:
        return sum(self.snapshot(now).values())

    def reset(self, user: str | None = None) -> None:
        """Forget one user's usage, or everyone's."""
        if user is None:
            self._users.clear()
        else:
            self._users.pop(user.lower(), None)

    def to_rows(self) -> list[dict[str, Any]]:
        """Rows for persistence: ``{"user", "value", "updated_at"}``, sorted by user."""
        return [
            {"user": user, "value": rec.value, "updated_at": rec.updated_at}
            for user, rec in sorted(self._users.items())
        ]

    def load_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Add rows written by :meth:`to_rows` (same-named users are summed)."""
        for row in rows:
            user = str(row["user"]).lower()
            value = float(row["value"])
            updated_at = float(row["updated_at"])
            rec = self._users.get(user)
            if rec is None:
                self._users[user] = UserUsage(value, updated_at)
            else:
                # Bring both to the later time before adding.
                t = max(rec.updated_at, updated_at)
                rec.value = decay(rec.value, t - rec.updated_at, self.half_life) + decay(
                    value, t - updated_at, self.half_life
                )
                rec.updated_at = t
            if self.updated_at is None or updated_at > self.updated_at:
                self.updated_at = updated_at

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], half_life: float) -> UsageLedger:
        return cls(half_life, rows)

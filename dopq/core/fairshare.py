"""The policy's settings and each user's fair share: one definition of both.

:class:`PolicyConfig` is the ``[policy]`` table of the settings file and the
configuration :func:`dopq.core.policy.decide` takes; the simulator builds one
from its flags. ``max_*_per_user`` of 0 means no limit (TOML has no null).

:func:`fair_shares` is the one computation of a user's share and fair-share
factor; the policy orders jobs by it and ``dopq users`` shows it, so the two
always agree.

    share_u = weight_u / sum of the weights of the active users
    usage_u = the user's fraction of all decayed usage
    F_u     = 2 ** (-usage_u / share_u)

Active users have a queued or running job, or usage above ``ACTIVE_FRACTION``
of the total. A user with usage who is not active still gets a share computed
against the active users' weights, so a trace of old usage counts without
shrinking anyone's entitlement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dopq.core.errors import ConfigError

POLICIES = ("fairshare", "recency")
PREEMPTION = ("off", "fairshare")
ACTIVE_FRACTION = 1e-6
LIMIT_KEYS = ("max_gpus_per_user", "max_running_per_user", "max_queued_per_user")


@dataclass
class PolicyConfig:
    """Settings of the policy; :meth:`validate` refuses a bad value, naming its key."""

    policy: str = "fairshare"  # fairshare | recency
    half_life: float = 7 * 86400.0
    w_fairshare: float = 10000.0
    w_age: float = 1000.0
    w_job: float = 1000.0
    max_age: float = 7 * 86400.0
    cpu_fraction: float = 0.1
    max_gpus_per_user: int = 0  # 0: no limit
    max_running_per_user: int = 0
    max_queued_per_user: int = 0
    shares: dict[str, float] = field(default_factory=dict)  # user -> weight (default 1)
    preemption: str = "off"  # off | fairshare (dopq.core.preemption)
    preemptible_default: bool = False  # a job that does not say is preemptible
    min_runtime: float = 1800.0  # a job runs this long in one run before it may be preempted
    preempt_grace: float = 120.0  # seconds between the stop signal and SIGKILL
    max_preemptions: int = 3  # a job preempted this often is not preempted again

    def validate(self, prefix: str = "") -> PolicyConfig:
        """Check every value; ``prefix`` is put before the key in the error (``policy.``)."""

        def bad(key: str, problem: str) -> ConfigError:
            return ConfigError(prefix + key, problem)

        if self.policy not in POLICIES:
            raise bad("policy", f"must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        for key in ("half_life", "w_fairshare", "w_age", "w_job", "max_age", "cpu_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value):
                raise bad(key, f"must be a finite number (got {value!r})")
            if value < 0:
                raise bad(key, f"must not be negative (got {value!r})")
        if not 3600 <= self.half_life <= 30 * 86400:
            raise bad("half_life", "must be between 3600 (1 h) and 2592000 (30 d)")
        if self.max_age <= 0:
            raise bad("max_age", "must be positive")
        if self.cpu_fraction > 1:
            raise bad("cpu_fraction", "must be between 0 and 1")
        for key in LIMIT_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(key, "must be a whole number >= 0 (0: no limit)")
        if self.preemption not in PREEMPTION:
            raise bad("preemption",
                      f"must be one of {', '.join(PREEMPTION)} (got {self.preemption!r})")
        if not isinstance(self.preemptible_default, bool):
            raise bad("preemptible_default", "must be true or false")
        for key in ("min_runtime", "preempt_grace"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < 0):
                raise bad(key, f"must be a finite number of seconds >= 0 (got {value!r})")
        value = self.max_preemptions
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("max_preemptions", "must be a whole number >= 0 (0: never preempted)")
        for user, weight in self.shares.items():
            if not isinstance(user, str) or not user:
                raise bad("shares", f"bad user name {user!r}")
            if (isinstance(weight, bool) or not isinstance(weight, int | float)
                    or not math.isfinite(weight) or weight <= 0):
                raise bad(f"shares.{user}", "weight must be a positive number")
        return self

    def weight(self, user: str) -> float:
        """The user's fair-share weight (1 unless set in ``shares``)."""
        low = user.lower()
        for name, weight in self.shares.items():
            if name.lower() == low:
                return float(weight)
        return 1.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyConfig:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(key, "unknown policy setting")
        return cls(**data).validate()


@dataclass(frozen=True, slots=True)
class Share:
    """One user's standing: ``share`` of the machine, ``usage`` fraction, factor F."""

    weight: float
    share: float
    usage: float
    factor: float

    @property
    def penalty(self) -> float:
        """usage / share: 1 at exactly the entitled share (F = 0.5)."""
        return self.usage / self.share


def fair_shares(
    usage: Mapping[str, float], active: Iterable[str], weights: Mapping[str, float]
) -> dict[str, Share]:
    """Share and F per user (lower-cased) for the active users and everyone with usage.

    Empty when no user is active and nobody has usage (every F is then 1).
    """
    use: dict[str, float] = {}
    for user, value in usage.items():
        key = user.lower()
        use[key] = use.get(key, 0.0) + max(0.0, value)
    total = sum(use.values())
    act = {u.lower() for u in active}
    if total > 0:
        act.update(u for u, v in use.items() if v > ACTIVE_FRACTION * total)
    low = {u.lower(): float(w) for u, w in weights.items()}
    wsum = sum(low.get(u, 1.0) for u in act)
    if wsum <= 0:
        return {}
    out = {}
    for user in act | use.keys():
        weight = low.get(user, 1.0)
        share = weight / wsum
        used = use.get(user, 0.0) / total if total > 0 else 0.0
        out[user] = Share(weight, share, used, 2.0 ** (-used / share))
    return out


def fairshare_factors(
    usage: Mapping[str, float], active: Iterable[str], shares: Mapping[str, float]
) -> dict[str, float]:
    """F per user (lower-cased) for the active users and everyone with usage."""
    return {u: s.factor for u, s in fair_shares(usage, active, shares).items()}

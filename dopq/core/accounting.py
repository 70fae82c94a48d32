"""Accounting for ``dopq report``: finished jobs in, report lines out (pure).

``report(rows, by, device_memory)`` groups finished jobs by user, by month
(the UTC month the job ended in) or by both, and counts for each line:

- ``jobs`` and how they ended (``succeeded``/``failed``/``cancelled``);
- ``gpu_hours``: run time times the GPUs held; a shared GPU (``gpu_memory``
  bytes of a device) counts as its fraction of that device's memory, so two
  jobs sharing one GPU for an hour make one GPU-hour between them;
- ``cpu_hours``: the run time of jobs that held no GPU;
- ``wait_mean``/``wait_p90`` (seconds): from queued (image ready) to start,
  over the jobs that started;
- ``efficiency``: the mean GPU utilisation (%) of the GPU-hours where NVML
  measured it (``jobs.gpu_utilisation``), weighted by GPU-hours; ``None``
  where nothing was measured.

A preempted job is counted by its last run (its ``started_at``); its earlier
runs' time is in the fair-share usage, not here.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from dopq.core.errors import DopqError

_DATE = re.compile(r"^(\d{4})-(\d{2})(?:-(\d{2}))?$")
ENDINGS = ("succeeded", "failed", "cancelled")
FIELDS = ("user", "month", "jobs", *ENDINGS, "gpu_hours", "cpu_hours", "wait_mean",
          "wait_p90", "efficiency")


class GroupBy(StrEnum):
    USER = "user"
    MONTH = "month"
    USER_MONTH = "user,month"


def group_by(text: str | None) -> GroupBy:
    """``user``, ``month`` or ``user,month`` (``month,user`` too); one-line error else."""
    raw = (text or "user").replace(" ", "").lower()
    if raw == "month,user":
        raw = GroupBy.USER_MONTH.value
    try:
        return GroupBy(raw)
    except ValueError:
        raise DopqError(f"--by {text!r}: use user, month or user,month") from None


def parse_date(text: str, *, end: bool = False) -> float:
    """``YYYY-MM-DD`` or ``YYYY-MM`` (UTC) as a timestamp: its start, or with
    ``end`` the start of the next day or month (so ``--until`` includes it)."""
    m = _DATE.match(str(text).strip())
    if m is None:
        raise DopqError(f"bad date {str(text)[:40]!r}: use YYYY-MM-DD or YYYY-MM")
    year, month = int(m[1]), int(m[2])
    day = int(m[3]) if m[3] else None
    try:
        start = datetime(year, month, day or 1, tzinfo=UTC)
    except ValueError:
        raise DopqError(f"bad date {text!r}: no such day") from None
    if not end:
        return start.timestamp()
    if day is not None:
        return start.timestamp() + 86400
    days = calendar.monthrange(year, month)[1]
    return start.timestamp() + days * 86400


def month_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by the nearest-rank method; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def gpu_share(row: Mapping[str, Any], device_memory: Mapping[int, int]) -> float:
    """How many GPUs the job held: whole ones count 1 each, a share its fraction.

    A share on a device whose memory is not known counts as a whole GPU (the
    most it could have held)."""
    gpus = list(row.get("gpus") or [])
    count = len(gpus) or int(row.get("num_gpus") or 0)
    share = int(row.get("gpu_memory") or 0)
    if share <= 0:
        return float(count)
    if not gpus:
        return float(count)
    total = 0.0
    for g in gpus:
        mem = device_memory.get(int(g), 0)
        total += min(1.0, share / mem) if mem > 0 else 1.0
    return total


def _run_seconds(row: Mapping[str, Any]) -> float:
    start, end = row.get("started_at"), row.get("finished_at")
    if not start or not end:
        return 0.0
    return max(0.0, float(end) - float(start))


def _key(row: Mapping[str, Any], by: GroupBy) -> tuple[str, str]:
    month = month_of(float(row.get("finished_at") or 0))
    user = str(row.get("user") or "")
    if by is GroupBy.USER:
        return user, ""
    if by is GroupBy.MONTH:
        return "", month
    return user, month


class _Line:
    def __init__(self) -> None:
        self.jobs = 0
        self.ends = dict.fromkeys(ENDINGS, 0)
        self.gpu_hours = 0.0
        self.cpu_hours = 0.0
        self.waits: list[float] = []
        self.measured_hours = 0.0
        self.measured_util = 0.0

    def add(self, row: Mapping[str, Any], device_memory: Mapping[int, int]) -> None:
        self.jobs += 1
        state = str(row.get("state") or "")
        if state in self.ends:
            self.ends[state] += 1
        hours = _run_seconds(row) / 3600
        gpus = gpu_share(row, device_memory) if row.get("started_at") else 0.0
        if gpus > 0:
            self.gpu_hours += gpus * hours
            util = row.get("gpu_utilisation")
            if util is not None and hours > 0:
                self.measured_hours += gpus * hours
                self.measured_util += float(util) * gpus * hours
        else:
            self.cpu_hours += hours
        started = row.get("started_at")
        ready = row.get("queued_at") or row.get("submitted_at")
        if started and ready:
            self.waits.append(max(0.0, float(started) - float(ready)))

    def out(self, user: str, month: str) -> dict[str, Any]:
        waits = self.waits
        return {
            "user": user, "month": month, "jobs": self.jobs, **self.ends,
            "gpu_hours": round(self.gpu_hours, 6), "cpu_hours": round(self.cpu_hours, 6),
            "wait_mean": round(sum(waits) / len(waits), 1) if waits else None,
            "wait_p90": percentile(waits, 0.9),
            "efficiency": (round(self.measured_util / self.measured_hours, 1)
                           if self.measured_hours > 0 else None),
        }


def report(rows: Iterable[Mapping[str, Any]], by: GroupBy,
           device_memory: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """One line per group, sorted by user then month; the rows are finished jobs."""
    lines: dict[tuple[str, str], _Line] = {}
    mem = device_memory or {}
    for row in rows:
        lines.setdefault(_key(row, by), _Line()).add(row, mem)
    return [lines[k].out(*k) for k in sorted(lines)]


def in_window(row: Mapping[str, Any], since: float | None, until: float | None) -> bool:
    end = row.get("finished_at")
    if end is None:
        return False
    return (since is None or float(end) >= since) and (until is None or float(end) < until)

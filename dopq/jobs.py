"""What a job is: its states, why it waits, its spec, and unit parsing.

Pure data, no I/O. ``JobState`` and ``WaitReason`` are ``str`` enums so they
store in SQLite and cross Pyro5 as plain strings.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from dopq.errors import JobRejected


class JobState(StrEnum):
    RECEIVED = "received"  # archive accepted, not yet unpacked/built
    BUILDING = "building"  # provider is unpacking or building the image
    QUEUED = "queued"  # image ready, waiting for the queue thread
    RUNNING = "running"  # container created/started on its GPUs
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset({JobState.RECEIVED, JobState.BUILDING, JobState.QUEUED, JobState.RUNNING})


class WaitReason(StrEnum):
    """Why a queued job is not running (as Slurm's squeue shows it)."""

    PRIORITY = "Priority"  # others come first
    RESOURCES = "Resources"  # first in line, not enough free GPUs
    RESERVED = "Reserved"  # GPUs are reserved for a higher-priority job
    USER_LIMIT = "UserLimit"  # a per-user limit holds it back
    HELD = "Held"  # an admin holds it
    DEPENDENCY = "Dependency"  # waits for other jobs
    NONE = "None"  # about to start


@dataclass
class JobSpec:
    """A validated job description (``container_config.json`` plus overrides).

    Sizes are bytes, durations seconds; ``None`` means "use the server default".
    """

    name: str
    user: str
    num_gpus: int = 1
    memory: int | None = None
    cpus: float | None = None
    shm_size: int | None = None
    time_limit: float | None = None
    priority: int = 0
    command: list[str] | str | None = None
    env: dict[str, str] = field(default_factory=dict)
    build_flag: bool = True
    num_slots: int = 1
    run_params: dict[str, Any] = field(default_factory=dict)
    after: list[int] = field(default_factory=list)
    after_any: list[int] = field(default_factory=list)
    array: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d{1,15}(?:\.\d{1,9})?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: Any, what: str = "size") -> int:
    """Parse ``"20g"``, ``"512m"``, ``"1.5G"``, ``"64MiB"`` or an int of bytes."""
    if isinstance(value, bool):
        raise JobRejected(f"{what}: expected a size like '8g', got {_short(value)}")
    if isinstance(value, int):
        if value < 0:
            raise JobRejected(f"{what}: must not be negative")
        return value
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise JobRejected(f"{what}: expected a size like '8g', got {_short(value)}")


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
# Every part carries its unit, so the pattern cannot split a digit run two ways.
_DURATION_PART = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)\s*(d|h|min|m|s)\s*")
_DURATION_ALL = re.compile(r"(?:\d{1,9}(?:\.\d{1,6})?\s*(?:d|h|min|m|s)\s*)+")
_NUMBER = re.compile(r"\d{1,9}(?:\.\d{1,6})?")


def parse_duration(value: Any, what: str = "duration") -> float:
    """Parse ``"2h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, ``"01:30:00"`` or seconds."""
    if isinstance(value, bool):
        raise JobRejected(f"{what}: expected a duration like '2h', got {_short(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0 or value > 1e9:
            raise JobRejected(f"{what}: must be a positive number of seconds")
        return float(value)
    if isinstance(value, str) and len(value) <= 64:
        text = value.strip().lower()
        if _NUMBER.fullmatch(text) and float(text) > 0:
            return float(text)
        if re.fullmatch(r"\d{1,6}(:\d{1,2}){1,2}", text):
            total = 0.0
            for part in text.split(":"):
                total = total * 60 + int(part)
            if total > 0:
                return total
        elif _DURATION_ALL.fullmatch(text):
            total = sum(
                float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text)
            )
            if total > 0:
                return total
    raise JobRejected(f"{what}: expected a duration like '2h' or '90m', got {_short(value)}")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

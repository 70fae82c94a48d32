"""What a job is: its states, why it waits, its spec, and unit parsing.

Pure data, no I/O. ``JobState`` and ``WaitReason`` are ``str`` enums so they
store in SQLite and cross Pyro5 as plain strings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

# Sizes and durations are parsed in dopq.core.forms; importers find them here too.
from dopq.core.forms import parse_duration as parse_duration
from dopq.core.forms import parse_size as parse_size


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
# Waiting to run: what the queue view lists, what counts against the per-user
# queue limit and what a user may still edit.
WAITING_STATES = frozenset({JobState.RECEIVED, JobState.BUILDING, JobState.QUEUED})
ACTIVE_STATES = WAITING_STATES | {JobState.RUNNING}


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
    ``gpu_memory`` (bytes per device) asks for a share of ``num_gpus`` devices
    instead of whole ones; ``None`` means whole, exclusive GPUs.
    ``preemptible``: the job may be stopped (its stop signal, a grace) and queued
    again for a user under their fair share; ``None`` is the server's
    ``[policy] preemptible_default``.
    """

    name: str
    user: str
    num_gpus: int = 1
    gpu_memory: int | None = None
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
    preemptible: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)


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


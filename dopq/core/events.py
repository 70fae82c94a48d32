"""What the scheduler hears and what it says: events in, instructions out.

Events are past tense (something happened: a job was queued, a container
exited, the engine went down, time passed); instructions are imperative
(start this job on these devices of this node, stop that container, commit
this state change). Both are plain frozen dataclasses, so a driver (the
server's queue thread, the simulator, a test) can build, compare and log
them. :class:`Running` is a running job as the scheduler tracks it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dopq.core.capacity import Device
from dopq.core.exits import PREEMPTED_PREFIX as PREEMPTED_PREFIX  # a preempted job's reason
from dopq.core.jobs import JobState
from dopq.core.policy import QueuedJob

# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class JobQueued:
    """A job is queued (again), or a queued job was edited (same payload)."""

    job: QueuedJob


@dataclass(frozen=True)
class JobEdited(JobQueued):
    pass


@dataclass(frozen=True)
class JobLeftQueue:
    """A queued job moved on without the scheduler (cancelled, deleted, held elsewhere)."""

    job_id: int


@dataclass(frozen=True)
class QueueLoaded:
    """Every queued job, read afresh: replaces what the scheduler had."""

    jobs: Sequence[QueuedJob]


@dataclass(frozen=True)
class JobAdopted:
    """A job the store says is running (after a restart, or found by a reconcile)."""

    job: Running


@dataclass(frozen=True)
class CancelRequested:
    """Someone asked to cancel a job the store has in ``state``."""

    job_id: int
    state: JobState
    by: str
    container: str | None = None


@dataclass(frozen=True)
class OutputLimitReached:
    job_id: int
    reason: str


@dataclass(frozen=True)
class StartRefused:
    """A start did not happen: the store refused its compare-and-set (the job
    moved on), or, with ``retry``, it was not tried or the store failed (the
    job goes back to the queue as it was)."""

    job_id: int
    retry: bool = False


@dataclass(frozen=True)
class ContainerStarted:
    """The job's container runs; ``marker`` is the job's stop reason in the store."""

    job_id: int
    container: str
    marker: str | None = None


@dataclass(frozen=True)
class StartFailed:
    job_id: int
    error: str
    engine_down: bool = False


@dataclass(frozen=True)
class ContainerExited:
    job_id: int
    container: str
    exit_code: int | None
    finished_at: float | None
    oom: bool = False
    deferrable: bool = True  # False: classify now (a recheck, or a reconcile)
    reason: str | None = None  # ended without an exit code: why (its node failed...)


@dataclass(frozen=True)
class ContainerMissing:
    """A running job has no container; ``ran``: it had one and was started."""

    job_id: int
    ran: bool


@dataclass(frozen=True)
class ContainerNeverStarted:
    """Cut off between create and start (a crash): start afresh."""

    job_id: int
    container: str


@dataclass(frozen=True)
class StrayContainer:
    """A container of ours whose job is not running (``state``: None if unknown)."""

    job_id: int
    container: str
    running: bool
    state: JobState | None


@dataclass(frozen=True)
class EngineDown:
    pass


@dataclass(frozen=True)
class EngineUp:
    pass


@dataclass(frozen=True)
class CapacityChanged:
    """GPUs busy with processes outside DoPQ, and (if given) the node's devices now.

    ``foreign`` maps a device to the bytes processes outside DoPQ use on it:
    such a device is closed to whole-GPU jobs and shared jobs get what is
    left; given, it replaces ``external`` (its keys are the busy set). A
    device only in ``external`` (no bytes known) is closed to every job.
    ``devices`` are the node's devices now (bare indices: memory unknown).
    """

    external: frozenset[int] | None = None  # None: as before
    node: str | None = None
    devices: Sequence[Device | int] | None = None
    foreign: Mapping[int, int] | None = None  # None: as before


@dataclass(frozen=True)
class NodeSeen:
    """A cluster node as its scheduler reports it now (:mod:`dopq.core.cluster`).

    ``gpus`` devices (indices 0..gpus-1); ``usable``: it takes new jobs (not
    down or drained); ``foreign``: its devices held by jobs that are not ours.
    A node not reported any more comes as ``gpus=0, usable=False``.
    """

    name: str
    gpus: int
    usable: bool = True
    foreign: int = 0


@dataclass(frozen=True)
class UsageReset:
    user: str | None


@dataclass(frozen=True)
class DeadlinesDue:
    """Time passed: enforce time limits, retry stops, recheck deferred exits."""


@dataclass(frozen=True)
class Tick:
    """Decide: charge usage and start what the policy says.

    ``finished_states``/``history`` are what the policy needs from the store
    (final states of the dependencies in :meth:`Scheduler.dependencies`, users
    of finished jobs newest first); None: what the scheduler saw end itself.
    """

    finished_states: Mapping[int, JobState] | None = None
    history: Sequence[str] | None = None


Event = (JobQueued | JobLeftQueue | QueueLoaded | JobAdopted | CancelRequested
         | OutputLimitReached | StartRefused | ContainerStarted | StartFailed | ContainerExited
         | ContainerMissing | ContainerNeverStarted | StrayContainer | EngineDown | EngineUp
         | CapacityChanged | NodeSeen | UsageReset | DeadlinesDue | Tick)


# ----------------------------------------------------------- instructions


@dataclass(frozen=True)
class StartJob:
    """Commit queued -> running (unless held), then run the container."""

    job_id: int
    node: str
    gpus: tuple[int, ...]
    started_at: float


@dataclass(frozen=True)
class StopContainer:
    """Stop a container (``ref`` None: the job's own name), ``grace`` None: the default.

    ``reason`` is why, for the log (the job's stop reason is committed apart).
    """

    job_id: int | None
    ref: str | None
    grace: float | None = None
    reason: str = field(default="", compare=False)


@dataclass(frozen=True)
class PreemptJob:
    """Preempt a running job for ``by_job``: send its stop signal, SIGKILL after ``grace``.

    The job's stop reason (``reason``, starting :data:`PREEMPTED_PREFIX`) is
    committed apart; when the container exits the scheduler requeues the job.
    ``container`` None: the job's own name.
    """

    job_id: int
    by_job: int
    reason: str
    grace: float
    container: str | None


@dataclass(frozen=True)
class CommitJob:
    """Change a job in the store: to ``state`` (compare-and-set on ``expect``), or,
    with ``state`` None, only its ``fields``. ``then`` runs only if it was committed."""

    job_id: int
    state: JobState | None
    expect: tuple[JobState, ...] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""
    then: tuple[Instruction, ...] = ()


@dataclass(frozen=True)
class SealOutputs:
    job_id: int
    user: str


@dataclass(frozen=True)
class CollectContainer:
    """Save the container's log, then remove it."""

    job_id: int
    container: str


@dataclass(frozen=True)
class RemoveContainer:
    """Remove a container (``ref`` None: the job's own name), on a worker if ``background``."""

    job_id: int | None
    ref: str | None
    background: bool = True


@dataclass(frozen=True)
class Untag:
    """Drop the job's image tag (unless another active job needs it)."""

    job_id: int


@dataclass(frozen=True)
class RecheckContainer:
    """Ping the engine: if up, report the container's exit again (not deferrable);
    if down, report :class:`EngineDown`."""

    job_id: int
    container: str


@dataclass(frozen=True)
class SaveUsage:
    """Persist the ledger's rows (``Scheduler.ledger.to_rows()``)."""


Instruction = (StartJob | StopContainer | PreemptJob | CommitJob | SealOutputs
               | CollectContainer | RemoveContainer | Untag | RecheckContainer | SaveUsage)


# ------------------------------------------------------------------ state


@dataclass
class Running:
    """A running job as the scheduler tracks it; ``error`` is its stop reason."""

    id: int
    user: str
    num_gpus: int
    gpus: tuple[int, ...]
    started_at: float | None
    time_limit: float | None = None
    node: str = ""
    container: str | None = None
    error: str | None = None
    gpu_memory: int = 0  # bytes on each of ``gpus``, shared; 0: whole GPUs
    preemptible: bool = False
    restarts: int = 0  # times it was preempted before this run
    priority: int = 0
    queued: QueuedJob | None = field(default=None, repr=False)  # as it was queued, if started here

"""The shapes of what the API returns, as the server builds them and clients read them.

The API speaks plain dicts, lists, strings and numbers; these ``TypedDict``s
name their fields for readers and for mypy (nothing checks them at run time).
The server builds them (``dopq.server.platform``, ``dopq.server.views``), the
CLI prints them and the GUI's models show them (``dopq.client.gui.columns``).

Times are ISO 8601 strings in UTC to the millisecond (``iso``); durations
(``wait_s``, ``run_s``, ``time_limit``) are seconds.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, NotRequired, TypedDict


def iso(ts: float | None) -> str | None:
    """A Unix time as the API writes it: ``2024-05-01T12:00:00.000Z``."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


class WhoAmI(TypedDict):
    user: str
    role: str  # "user" or "admin"


class JobEvent(TypedDict):
    at: str | None
    state: str
    detail: str


class JobView(TypedDict):
    """One job in the running and finished views and the history."""

    id: int
    name: str
    user: str
    state: str  # a dopq.core.jobs.JobState value
    num_gpus: int
    gpu_memory: int  # bytes on each of its GPUs, shared; 0: whole, exclusive GPUs
    gpus: list[int]
    exit_code: int | None
    error: str | None  # failed and cancelled jobs only
    submitted_at: str | None
    started_at: str | None
    finished_at: str | None
    image: str | None  # None here; ``job`` shows it to its owner and admins
    container: str | None
    time_limit: float | None
    priority: int
    nice: int
    held: bool
    array_index: int | None
    array_parent: int | None
    after: list[int]
    after_any: list[int]
    origin: str
    wait_s: float | None
    run_s: float | None
    preemptible: NotRequired[bool]  # NotRequired: older servers leave the three out
    restarts: NotRequired[int]  # times it was preempted and queued again
    preempted_by: NotRequired[int | None]  # the job it was last preempted for
    restarted_from: NotRequired[int | None]  # dopq restart: the finished job it copies
    node: NotRequired[str | None]  # where it runs (ran): "local", or a cluster node


class JobDetail(JobView):
    """``job``: one job with its events and estimates (``dopq show``, the details dialog)."""

    events: list[JobEvent]
    spec: dict[str, Any] | None  # its owner and admins only: it holds the environment
    outputs: str  # the folder on the server host
    expected_start: str | None
    reason: str | None
    expected_start_first: str | None
    expected_start_last: str | None


class GpuSample(TypedDict, total=False):
    index: int
    utilization: float | None
    memory_used: int | None
    memory_total: int | None


class RunningView(JobView):
    cpu_percent: float | None
    memory_bytes: int | None
    gpu_samples: list[GpuSample]
    gpu_memory_used: int | None  # bytes the job's processes hold on its GPUs (None: unknown)
    gpu_utilisation: float | None  # percent, over its GPUs
    idle_since: str | None  # its GPUs idle since then (``[gpus] idle_after``): marked IDLE


class QueuedRow(TypedDict):
    """A waiting job (received, building or queued) as the server keeps it."""

    id: int
    name: str
    user: str
    state: str
    num_gpus: int
    gpu_memory: int  # bytes per GPU, shared; 0: whole GPUs
    submitted_at: str | None
    submitted_ts: float
    time_limit: float | None
    priority: int
    nice: int
    held: bool
    array_index: int | None
    array_parent: int | None
    reason: str  # why it waits
    priority_value: float | None  # the policy's priority
    expected_start: str | None
    preemptible: NotRequired[bool]  # NotRequired: older servers leave both out
    restarts: NotRequired[int]  # times it was preempted and queued again


class QueuedView(QueuedRow):
    """A waiting job in queue order, as the queue view shows it."""

    position: int | None  # None while it is not (yet) queued
    wait_s: float


class GpuHolder(TypedDict):
    """A job on a device: its declared share and the memory it was seen to use there."""

    job: int
    user: str
    declared: int  # bytes; 0: it holds the whole device
    memory: int | None  # bytes in use by its processes; None: not sampled


class ForeignProcess(TypedDict):
    """A process on a GPU that no DoPQ job started."""

    pid: int
    user: str | None
    memory: int | None


class GpuView(TypedDict):
    """One device (a GPU or a MIG slice) and who holds how much of it."""

    index: int
    name: str
    uuid: str
    memory_total: int | None
    job: int | None  # the (first) job that holds it
    user: str | None
    external: bool  # busy with a process DoPQ did not start
    utilization: NotRequired[float | None]
    memory_used: NotRequired[int | None]
    memory: int | None  # bytes
    used: int | None  # bytes in use, by anyone
    holders: list[GpuHolder]
    foreign: list[ForeignProcess]
    node: NotRequired[str]  # on a cluster: the node it is on, ``node_index`` its index there
    node_index: NotRequired[int]


class StatusView(TypedDict):
    """``status``: the server, its workers and its GPUs."""

    name: str
    version: str
    queue_state: str  # running, paused or stopped
    provider_state: str  # running or stopped
    engine_state: str  # up or down
    started_at: str | None
    uptime_s: float
    gpu_backend: str
    gpu_mode: str
    gpus: list[GpuView]
    counts: dict[str, int]  # jobs per state
    policy: str
    provider_restarts: int
    queue_restarts: int


class UserView(TypedDict):
    """``users``: one user's jobs, usage and fair share."""

    user: str
    queued: int
    running: int
    finished: int
    succeeded: int
    failed: int
    gpu_hours: float
    weight: float
    share: float  # of the GPUs, among the active users
    fairshare: float  # 2^(-usage/share)
    penalty: float | None


class QueuedDelta(TypedDict):
    """The queued rows as a change from the version the client holds."""

    full: bool  # rows are all of them: forget what was held
    rows: list[QueuedRow]  # changed or new
    removed: list[int]
    order: list[int] | None  # None: the order did not change


class FinishedDelta(TypedDict):
    full: bool
    rows: list[JobView]
    removed: list[int]
    order: list[int] | None


class TimelineBar(TypedDict):
    """A job on the GPU timeline: running, or finished within ``TIMELINE_WINDOW``.

    Unix times (not ISO strings): thousands travel with every snapshot.
    """

    id: int
    name: str
    user: str
    state: str
    gpus: list[int]
    start: float
    end: float | None  # None: still running


TIMELINE_WINDOW = 86400.0  # seconds of finished jobs the timeline shows
TIMELINE_LIMIT = 5000  # bars at most, the newest starts first


class Snapshot(TypedDict):
    """``snapshot``: the five views of the GUI in one call (the plain form)."""

    version: int
    now: float  # the server's clock
    running: list[RunningView]
    queued: list[QueuedView]
    finished: list[JobView]
    users: list[UserView]
    system: StatusView
    whoami: NotRequired[WhoAmI]
    timeline: NotRequired[list[TimelineBar]]  # NotRequired: older servers leave it out


class DeltaSnapshot(TypedDict):
    """``snapshot(limit, since)``: queued and finished as changes (``SnapshotFollower``)."""

    version: int
    now: float
    running: list[RunningView]
    users: list[UserView]
    system: StatusView
    queued_delta: QueuedDelta
    finished_delta: FinishedDelta
    history_limit: int
    whoami: NotRequired[WhoAmI]
    timeline: NotRequired[list[TimelineBar]]

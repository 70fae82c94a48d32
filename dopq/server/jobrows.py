"""A stored job as the scheduler sees it: a queued one, or a running one.

The queue thread reads rows from the store and hands the pure
:class:`dopq.core.scheduler.Scheduler` these plain values; nothing here
touches the store.
"""

from __future__ import annotations

from dopq.core import events as ev
from dopq.core import policy as policy_mod
from dopq.server.schema import JobRow


def queued_job(row: JobRow) -> policy_mod.QueuedJob:
    return policy_mod.QueuedJob(
        id=row["id"], user=row["user"], num_gpus=row["num_gpus"], gpu_memory=row["gpu_memory"],
        submitted_at=row["submitted_at"], time_limit=row["time_limit"],
        priority=row["priority"], nice=row["nice"], held=row["held"], top=row["top"],
        after=tuple(row["after"]), after_any=tuple(row["after_any"]),
        preemptible=bool(row["preemptible"]), restarts=int(row["restarts"]),
    )


def running_job(row: JobRow) -> ev.Running:
    """A stored running job as the scheduler tracks it (with its stop reason)."""
    return ev.Running(
        id=row["id"], user=row["user"], num_gpus=row["num_gpus"], gpus=tuple(row["gpus"]),
        gpu_memory=row["gpu_memory"], started_at=row["started_at"],
        time_limit=row["time_limit"], container=row["container"], error=row["error"],
        preemptible=bool(row["preemptible"]), restarts=int(row["restarts"]),
        priority=int(row["priority"]), node=row.get("node") or "",
    )

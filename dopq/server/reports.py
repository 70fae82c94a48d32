"""``dopq report`` and ``dopq restart`` on the server: the store and engine side.

- ``usage_report``: the finished jobs in a window, hidden ones included (a
  cleared history hides rows, never deletes them, so usage survives
  ``clear-history``), filtered by ``authz`` (a user's own lines, an admin's
  everyone's) and summed by ``dopq.core.accounting``.
- ``restart``: a copy of a finished job, queued at once with the image the
  original ran (no build). The options it may change are checked as submit's
  overrides and limits are; the copy belongs to the original's owner, records
  ``restarted_from``, and gets its own job tag on the image, so the image
  stays while the copy waits (the original's tag may be gone already).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dopq.core import accounting
from dopq.core import spec as spec_mod
from dopq.core.errors import Conflict, DopqError, JobRejected
from dopq.core.jobs import FINAL_STATES, JobSpec, JobState
from dopq.core.settings import Settings
from dopq.server import authz, limits
from dopq.server.auth import Principal
from dopq.server.authz import Action
from dopq.server.gpus import GpuInfo
from dopq.server.images import job_tag
from dopq.server.limits import check_spec_limits
from dopq.server.runtime import ContainerRuntime
from dopq.server.schema import ids_of
from dopq.server.store import Store

REPORT_COLUMNS = ("id", "user", "state", "num_gpus", "gpus", "gpu_memory", "gpu_utilisation",
                  "submitted_at", "queued_at", "started_at", "finished_at")
# What ``dopq restart`` may change: flag (as in submit's overrides) -> JobSpec field.
RESTART_OPTIONS = {"gpus": "num_gpus", "memory": "memory", "time_limit": "time_limit",
                   "priority": "priority", "gpu_memory": "gpu_memory",
                   "preemptible": "preemptible"}


def finished_rows(store: Store, since: float | None, until: float | None,
                  user: str | None = None) -> list[dict[str, Any]]:
    """Finished jobs (of ``user``, or everyone's) that ended in [since, until),
    hidden ones too."""
    states = [s.value for s in FINAL_STATES]
    sql = (f"SELECT {', '.join(REPORT_COLUMNS)} FROM jobs WHERE state IN "
           f"({', '.join('?' * len(states))}) AND finished_at IS NOT NULL")
    params: list[Any] = list(states)
    if since is not None:
        sql += " AND finished_at >= ?"
        params.append(since)
    if until is not None:
        sql += " AND finished_at < ?"
        params.append(until)
    if user is not None:
        sql += " AND user = ?"
        params.append(user)
    out = []
    for r in store.read(sql, params):
        row = dict(r)
        row["gpus"] = ids_of(row["gpus"] or "")
        out.append(row)
    return out


def usage_report(store: Store, devices: Sequence[GpuInfo], who: Principal,
                 since: str | None, until: str | None, by: str | None) -> dict[str, Any]:
    group = accounting.group_by(by)
    start = accounting.parse_date(since) if since else None
    end = accounting.parse_date(until, end=True) if until else None
    if start is not None and end is not None and start >= end:
        raise DopqError(f"--since {since} is not before --until {until}")
    # A user's own rows only are read (a user's report costs what their jobs do);
    # each row is still checked against the rule.
    rows = [r for r in finished_rows(store, start, end, None if who.is_admin else who.name)
            if authz.may(who, Action.REPORT, r["user"])]
    memory = {d.index: d.memory_total for d in devices}
    return {"by": group.value, "since": since, "until": until,
            "lines": accounting.report(rows, group, memory)}


def restarted_spec(original: dict[str, Any], overrides: Any) -> JobSpec:
    """The original's spec with the changed options, checked as submit checks them."""
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise JobRejected("restart options must be a dict")
    for key in overrides:
        if key not in RESTART_OPTIONS:
            raise JobRejected(f"restart cannot change {str(key)[:40]!r}: only "
                              + ", ".join("--" + k.replace("_", "-") for k in RESTART_OPTIONS))
    given = {k: v for k, v in overrides.items() if v is not None}
    options = spec_mod.check_overrides(given)
    spec = JobSpec.from_dict(dict(original))
    for key in given:
        field = RESTART_OPTIONS[key]
        setattr(spec, field, getattr(options, field))
    spec.after, spec.after_any, spec.array = [], [], []  # its waits were met: it runs now
    if spec.gpu_memory is not None and spec.num_gpus == 0:
        raise JobRejected("gpu_memory: needs num_gpus of at least 1 (it is memory on each "
                          "GPU the job gets), got num_gpus 0")
    return spec


def restart(settings: Settings, store: Store, runtime: ContainerRuntime,
            devices: Sequence[GpuInfo], who: Principal, job_id: int,
            overrides: Any) -> int:
    """Queue a copy of finished job ``job_id``; return the new job's id."""
    row = store.job(int(job_id))
    authz.require(who, Action.RESTART, row["user"], job=row["id"])
    if row["state"] not in FINAL_STATES:
        raise Conflict(f"job {row['id']} is {row['state']}: only a finished job (succeeded, "
                       "failed or cancelled) can be restarted")
    if not row["image"] or not row["spec"]:
        raise Conflict(f"job {row['id']} never had an image (it ended before its build): "
                       "submit it again")
    if row["array_index"] is not None:
        raise Conflict(f"job {row['id']} is element {row['array_index']} of array "
                       f"{row['array_parent']}: an array element cannot be restarted alone")
    spec = restarted_spec(row["spec"], overrides)
    check_spec_limits(spec, settings, len(devices),
                      max((d.memory_total for d in devices), default=0))
    refused = authz.refusal(who, Action.SUBMIT, user=row["user"], priority=spec.priority,
                            allowed=settings.users.allowed)
    if refused is not None:
        raise JobRejected(refused)
    if not runtime.image_exists(row["image"]):
        raise Conflict(f"the image of job {row['id']} is gone from the engine (removed once "
                       "unused): submit the job again")
    now = time.time()
    fields: dict[str, Any] = dict(
        name=row["name"], user=row["user"], state=JobState.QUEUED, origin="restart",
        spec=spec.to_dict(), num_gpus=spec.num_gpus, gpu_memory=spec.gpu_memory or 0,
        preemptible=(settings.policy.preemptible_default if spec.preemptible is None
                     else spec.preemptible),
        time_limit=spec.time_limit, priority=spec.priority, image=row["image"],
        context_hash=row["context_hash"], submitted_at=now, queued_at=now,
        submitted_by=who.name, restarted_from=row["id"],
    )
    new_id = limits.add_job_within(store, settings.policy.max_queued_per_user, fields)
    try:  # the copy's own name for the image: cleaning keeps it while the copy waits
        runtime.tag(row["image"], job_tag(store.owner_id(), row["user"], spec.name, new_id))
    except DopqError as exc:
        store.transition(new_id, JobState.FAILED, expect=[JobState.QUEUED],
                         error=f"restart: the image could not be tagged: {exc}",
                         detail="restart failed")
        raise Conflict(f"the image of job {row['id']} could not be used: {exc}") from None
    return new_id

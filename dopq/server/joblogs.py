"""A job's build and run logs, read in pieces (``dopq logs``, ``logs -f``).

The build log is a file the Provider writes; the run log is read from the
container while it exists and from the file the queue thread saves when it
ends (``jobs/<id>/run.log``), whichever there is. ``done`` tells a follower
that no more will come. A preempted job's earlier runs are ``run.<n>.log``
(kind ``run.1`` is its first run).
"""

from __future__ import annotations

import re
from typing import Any

from dopq.core.errors import DopqError
from dopq.core.jobs import FINAL_STATES, JobState
from dopq.core.settings import Settings
from dopq.server import authz
from dopq.server.auth import Principal
from dopq.server.provider import job_dir
from dopq.server.runspec import JobRuntime
from dopq.server.store import Store

MAX_READ = 4 << 20  # the most one call returns
EARLIER_RUN = re.compile(r"run\.([1-9][0-9]{0,5})")  # run.1: a preempted job's first run


def read_log(settings: Settings, store: Store, runtime: JobRuntime, who: Principal,
             job_id: int, kind: str = "run", offset: int = 0, limit: int = 1 << 20
             ) -> dict[str, Any]:
    """``limit`` bytes of job ``job_id``'s ``kind`` log from ``offset``, as text."""
    row = store.job(int(job_id))
    authz.require(who, authz.Action.READ_LOGS, row["user"], job=job_id,
                  visible_to_all=settings.users.logs_visible_to_all)
    earlier = EARLIER_RUN.fullmatch(kind)
    if kind not in ("run", "build") and earlier is None:
        raise DopqError("log kind must be 'run', 'build' or 'run.N' (a preempted job's N-th run)")
    limit = max(1, min(int(limit), MAX_READ))
    offset = max(0, int(offset))
    path = job_dir(settings, row["id"]) / f"{kind}.log"
    if earlier is not None:  # saved when that run was preempted; it will not grow
        if int(earlier[1]) > int(row["restarts"] or 0):
            raise DopqError(f"job {job_id} was preempted {row['restarts'] or 0} times: "
                            f"no run {earlier[1]} to show (run.1 is its first run)")
        data = b""
        if path.exists():
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(limit)
        return {"data": data.decode("utf-8", "replace"), "offset": offset + len(data),
                "done": len(data) < limit, "state": row["state"]}

    def from_file() -> bytes:
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                return fh.read(limit)
        except FileNotFoundError:
            return b""

    data = from_file() if path.exists() else b""
    if not path.exists() and kind == "run" and row["container"]:
        try:
            data = runtime.logs(row["container"])[offset: offset + limit]
        except DopqError:
            data = b""
        if not data and path.exists():  # saved and removed meanwhile
            data = from_file()
    state = JobState(row["state"])
    if kind == "build":
        done = state not in (JobState.RECEIVED, JobState.BUILDING)
    else:
        done = state in FINAL_STATES and (path.exists() or not row["container"]
                                          or not row["started_at"])
    return {"data": data.decode("utf-8", "replace"), "offset": offset + len(data),
            "done": done and len(data) < limit, "state": state.value}

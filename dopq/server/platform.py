"""DataPlatform: the layer between the Controller and the server's parts.

It opens the store, the Docker runtime and the output mount, and holds the
parts each named for what it does:

- ``Supervisor`` (``dopq.server.supervisor``): the workers' life cycle: the
  Provider process, the priority-queue thread, the relays and samplers;
- ``Uploads`` (``dopq.server.uploads``): submissions in flight;
- ``ViewBuilder`` (``dopq.server.viewbuilder``): the shared views and job details;
- ``JobCommands`` (``dopq.server.jobcommands``): what callers may change.

Who may do what is decided in ``dopq.server.authz`` (pure); the parts ask it.
The Controller finds out who is calling and forwards here; this class only
forwards on, and keeps the names the Controller and the tests use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from dopq.core.jobs import JobState
from dopq.core.settings import Settings
from dopq.server import hostfs
from dopq.server.auth import Principal, Users
from dopq.server.fetch import OutputFetches
from dopq.server.jobcommands import JobCommands
from dopq.server.joblogs import read_log
from dopq.server.limits import QueueSlots
from dopq.server.metrics import Metrics, for_platform
from dopq.server.queue import PriorityQueueThread
from dopq.server.runtime import ContainerRuntime
from dopq.server.store import Store
from dopq.server.supervisor import Supervisor
from dopq.server.uploads import Uploads
from dopq.server.viewbuilder import VIEW_TTL, ViewBuilder, iso, job_view
from dopq.server.views import full_queue

__all__ = ["DataPlatform", "iso", "job_view"]  # iso, job_view: where they were before


class DataPlatform:
    """Everything the Controller can ask of the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        hostfs.secure_state(settings)  # the server's alone: 0711 / 0700 / 0600
        self.store = Store(settings.db_path)
        hostfs.secure_state(settings)  # the database files now exist: 0600
        self.output_mount = hostfs.OutputMount(settings)
        self.users = Users(self.store)
        self.runtime = ContainerRuntime(settings.docker.base_url)
        self.workers = Supervisor(settings, self.store, self.users, self.runtime)
        self.gpu_info = self.workers.gpu_info
        self.gpu_mode = self.workers.gpu_mode
        self.fetches = OutputFetches(settings, self.store.owner_id())
        self.fetches.clear()
        # ``_send`` looked up per call: a test holds the Provider back by replacing it.
        self.uploads = Uploads(settings, self.store, self.runtime, len(self.gpu_info),
                               lambda cmd: self._send(cmd),
                               max((g.memory_total for g in self.gpu_info), default=0))
        self.views = ViewBuilder(settings, self.store, self.users, self.workers, self.fetches)
        self.metrics: Metrics | None = for_platform(self)  # None: [metrics] listen is empty
        self.commands = JobCommands(settings, self.store, self.users, self.workers,
                                    self.fetches, self._wrote)
        self.closing = False  # set when the server stops: the API refuses calls

    # -- life cycle -----------------------------------------------------------------------
    @property
    def queue(self) -> PriorityQueueThread:
        """The queue thread now (the supervisor replaces one that died)."""
        return self.workers.queue

    @property
    def slots(self) -> QueueSlots:
        return self.uploads.slots

    @property
    def shutdown_requested(self) -> threading.Event:
        return self.commands.shutdown_requested

    @property
    def stop_running_on_shutdown(self) -> bool:
        return self.commands.stop_running_on_shutdown

    def start(self) -> None:
        if self.metrics is not None:  # first: a port in use stops the start before any work
            self.metrics.start(self.settings)
        self.output_mount.mount()  # outputs nosuid,nodev before any job can write there
        self.workers.start(self.views.cache.refresh, self.uploads.sweep, VIEW_TTL)

    def stop(self, stop_running: bool = False) -> None:
        """Stop intake and the queue; running containers stay unless asked."""
        self.workers.stop(stop_running)
        if self.metrics is not None:
            self.metrics.stop()
        if not self.store.jobs([JobState.RUNNING], light=True):
            self.output_mount.unmount()  # else running jobs keep it (and the next start adopts it)
        self.workers.close()
        self.runtime.close()
        self.store.close()

    def _send(self, cmd: tuple[Any, ...]) -> None:
        self.workers.send(cmd)

    def _wrote(self, who: Principal) -> None:
        self.views.wrote(who)

    # -- submission -------------------------------------------------------------------------
    def begin_upload(self, who: Principal, size: int, overrides: dict[str, Any],
                     check: dict[str, Any] | None = None) -> str:
        return self.uploads.begin(who, size, overrides, check)

    def upload_chunk(self, who: Principal, upload_id: str, data: bytes) -> int:
        return self.uploads.chunk(who, upload_id, data)

    def abort_upload(self, who: Principal, upload_id: str) -> None:
        self.uploads.abort(who, upload_id)

    def finish_upload(self, who: Principal, upload_id: str) -> dict[str, Any]:
        job_id = self.uploads.finish(who, upload_id)
        self._wrote(who)
        return self.job(who, job_id)

    # -- views --------------------------------------------------------------------------------
    def job(self, who: Principal, job_id: int) -> dict[str, Any]:
        return self.views.job(who, job_id)

    def images(self, who: Principal) -> dict[str, Any]:
        return self.views.images(who)

    def queued(self, who: Principal | None = None) -> list[dict[str, Any]]:
        return full_queue(self.views.view(who), time.time())

    def running(self, who: Principal | None = None) -> list[dict[str, Any]]:
        return list(self.views.view(who).rest["running"])

    def snapshot(self, history_limit: int = 200, since: int | None = None,
                 who: Principal | None = None) -> dict[str, Any]:
        return self.views.snapshot(history_limit, since, who)

    def history(self, limit: int = 200, user: str | None = None,
                who: Principal | None = None) -> list[dict[str, Any]]:
        return self.views.history(limit, user, who)

    def status(self, who: Principal | None = None) -> dict[str, Any]:
        return dict(self.views.view(who).rest["system"])

    def user_stats(self, who: Principal | None = None) -> list[dict[str, Any]]:
        return list(self.views.view(who).rest["users"])

    def priorities(self, job_id: int | None = None) -> list[dict[str, Any]]:
        return self.views.priorities(job_id)

    def array(self, job_id: int) -> list[dict[str, Any]]:
        """The elements of the array whose first job is ``job_id`` (empty: not an array)."""
        return [{"id": r["id"], "array_index": r["array_index"], "state": r["state"],
                 "user": r["user"]} for r in self.store.array_elements(job_id)]

    def logs(self, who: Principal, job_id: int, kind: str = "run", offset: int = 0,
             limit: int = 1 << 20) -> dict[str, Any]:
        return read_log(self.settings, self.store, self.workers.jobs, who, job_id, kind, offset,
                        limit)

    # -- commands ------------------------------------------------------------------------------
    def cancel(self, who: Principal, job_id: int) -> dict[str, Any]:
        return self.commands.cancel(who, job_id)

    def edit_queued(self, who: Principal, ids: Iterable[int], action: str,
                    value: Any = None) -> dict[str, Any]:
        return self.commands.edit_queued(who, ids, action, value)

    def clear_history(self, who: Principal, user: str | None = None) -> dict[str, Any]:
        return self.commands.clear_history(who, user)

    def clear_status(self, who: Principal, user: str | None = None) -> dict[str, Any]:
        return self.commands.clear_status(who, user)

    def request_shutdown(self, who: Principal, stop_running: bool = False) -> dict[str, Any]:
        out = self.commands.request_shutdown(who, stop_running)
        self.closing = True
        return out

    def set_share(self, who: Principal, user: str, weight: float) -> dict[str, Any]:
        return self.commands.set_share(who, user, weight)

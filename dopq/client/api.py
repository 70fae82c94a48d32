"""The Python client: ``from dopq import Client``, with methods that mirror the CLI.

The same class the ``dopq`` command uses (``dopq.client.commands`` builds its
client with ``Client.connect``), so a script finds the server and its token as
the command does: arguments first, then the environment (``DOPQ_SERVER``,
``DOPQ_NS_HOST``, ``DOPQ_NS_PORT``, ``DOPQ_TOKEN``, ``DOPQ_FINGERPRINT``), then
the token and the certificate pinned by ``dopq login``. Errors are the CLI's:
a ``DopqError`` (``dopq.core.errors``) whose text is the line ``dopq`` prints
after ``dopq: error:``.

    from dopq import Client

    c = Client.connect()
    job = c.submit("my-job", env={"LR": "0.1"}, gpus=1)
    print(c.wait(job["id"])["state"])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, overload

from dopq.client import remote
from dopq.wire.views import (
    JobDetail,
    QueuedView,
    RunningView,
    Snapshot,
    StatusView,
    UserView,
    WhoAmI,
)

FINAL = ("succeeded", "failed", "cancelled")


class Client(remote.Client):
    """A DoPQ server's client with one typed method for each of the CLI's commands."""

    @classmethod
    def connect(
        cls,
        server: str | None = None,
        ns_host: str | None = None,
        ns_port: int | None = None,
        token: str | None = None,
        fingerprint: str | None = None,
        timeout: float = 30.0,
    ) -> Client:
        """A client found as ``dopq`` finds its server (nothing is sent until the first call)."""
        return cls(ns_host, ns_port, server, token=token, timeout=timeout,
                   fingerprint=fingerprint)

    def whoami(self) -> WhoAmI:
        result: WhoAmI = self.call("whoami")
        return result

    def submit(  # type: ignore[override]
        self,
        path: str | Path,
        options: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
        precheck: bool = True,
        **more: Any,
    ) -> dict[str, Any]:
        """``dopq submit PATH``: the options by keyword, as ``container_config.json``
        names them (``gpus``, ``env={"K": "V"}``, ``time_limit="5m"``, ``array="0-9"``,
        ``name``, ``priority``, ``after``, ``command``, ...). Returns the new job
        (``id``, ``state``, ``user``)."""
        return super().submit(path, {**(options or {}), **more}, progress, precheck)

    def queue(self) -> list[QueuedView]:
        rows: list[QueuedView] = self.call("queue")
        return rows

    def running(self) -> list[RunningView]:
        rows: list[RunningView] = self.call("running")
        return rows

    def history(self, limit: int = 200, user: str | None = None) -> list[JobDetail]:
        rows: list[JobDetail] = self.call("history", limit, user)
        return rows

    def show(self, job_id: int) -> JobDetail:
        """``dopq show ID``: one job with its events."""
        job: JobDetail = self.call("job", job_id)
        return job

    def logs(self, job_id: int, build: bool = False, run: int | None = None) -> str:
        """The job's run log as it is now (``build``: its build log; ``run``: run N
        of a preempted job), as ``dopq logs`` prints it without ``-f``."""
        kind = "build" if build else "run" if run is None else f"run.{run}"
        parts, offset = [], 0
        while True:
            r = self.call("logs", job_id, kind, offset)
            parts.append(r["data"])
            if r["done"] or not r["data"] or r["offset"] == offset:
                return "".join(parts)
            offset = r["offset"]

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel a job; its state after (``running``: it is being stopped)."""
        result: dict[str, Any] = self.call("cancel", job_id)
        return result

    @overload
    def wait(self, ids: int, timeout: float | None = None, poll: float = 0.5) -> JobDetail: ...

    @overload
    def wait(self, ids: Sequence[int], timeout: float | None = None,
             poll: float = 0.5) -> list[JobDetail]: ...

    def wait(self, ids: int | Sequence[int], timeout: float | None = None,
             poll: float = 0.5) -> JobDetail | list[JobDetail]:
        """``dopq wait``: the jobs once they ended, or as they are when ``timeout``
        seconds (for all of them together) have passed."""
        if isinstance(ids, int):
            return super().wait(ids, timeout, poll)
        deadline = None if timeout is None else time.monotonic() + timeout
        done = []
        for job_id in ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done.append(super().wait(job_id, left, poll))
        return done

    def status(self) -> StatusView:
        result: StatusView = self.call("status")
        return result

    def users(self) -> list[UserView]:
        rows: list[UserView] = self.call("users")
        return rows

    def snapshot(self, history_limit: int = 200) -> Snapshot:
        """The five views the GUI shows (queued, running, finished, users, status), at once."""
        # through the follower, which reads every form the server replies in
        return remote.SnapshotFollower(self, history_limit).update()


__all__ = ["FINAL", "Client"]

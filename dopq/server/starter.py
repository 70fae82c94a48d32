"""Starting containers without holding up the queue thread.

When devices free, the scheduler says ``StartJob`` for each job it chose.
Each start is committed first (queued -> running, compare-and-set, on the
calling thread, in the scheduler's order); then its create and start go to a
small pool and the queue thread goes on: a device freeing while another
job's container is still being started gets its own start at once, instead
of waiting its turn (issue 17). Most of a start is the engine's time.

A launch that ends wakes the queue thread, which hands its outcome to the
scheduler (``settle``): pool threads never touch the scheduler or the
store's job rows. Until then the job is *in flight*: its row is running
without a container, so the queue thread lets its launches land before it
compares the store with the engine, and holds back the exit of a container
whose start it has not recorded yet.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_all
from typing import TYPE_CHECKING

from dopq.core import events as ev
from dopq.core.errors import DopqError, EngineUnavailable
from dopq.core.jobs import JobState
from dopq.server.store import JobRow

if TYPE_CHECKING:
    from dopq.server.queue import PriorityQueueThread

log = logging.getLogger("dopq.server.queue")

# Creates and starts in flight at once. On Docker 20.10 with 2 cores, 8 starts
# took 1.39 s one at a time, 0.87 s two at a time and 0.79 s with 3 or 4, each
# start getting slower (174 -> 210 -> 358 ms at 4): 2 gets most of the gain. In
# workload W (issue 17) 2 left the makespan as it was and lowered the gap's p95.
START_WORKERS = 2


class Starter:
    """Carries out ``StartJob`` instructions for the queue thread, on a pool."""

    def __init__(self, queue: PriorityQueueThread, workers: int = START_WORKERS) -> None:
        self.q = queue
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dopq-start")
        self._lock = threading.Lock()
        # job id -> its start and its launch, in the order they were committed
        self._flying: dict[int, tuple[ev.StartJob, Future[str]]] = {}

    def shutdown(self) -> None:
        """Settle the starts in flight (no job left running without its container), then stop."""
        try:
            self.settle(wait=True)
        except Exception as exc:  # noqa: BLE001 - recovery finds them at the next start
            log.warning("starts left unsettled at stop: %s", exc)
        self._pool.shutdown(wait=True)

    def in_flight(self, job_id: int | None = None) -> bool:
        """Whether this job's launch (or, without one, any launch) has not been settled."""
        with self._lock:
            return bool(self._flying) if job_id is None else job_id in self._flying

    def start_all(self, starts: list[ev.StartJob]) -> None:
        """Commit each start, then hand the committed ones to the pool.

        A refused commit goes back to the scheduler at once. If the store
        fails, the starts not yet committed are handed back and the error is
        raised once the committed ones are on their way.
        """
        error: BaseException | None = None
        committed: list[tuple[ev.StartJob, JobRow]] = []
        for n, ins in enumerate(starts):
            try:
                row = self._commit(ins)
            except BaseException as exc:
                self.q._handle_all([ev.StartRefused(i.job_id, retry=True)
                                    for i in starts[n + 1:]])
                error = exc
                break
            if row is not None:
                committed.append((ins, row))
        for ins, row in committed:
            future = self._pool.submit(self._launch, ins, row)
            with self._lock:
                self._flying[ins.job_id] = (ins, future)
            future.add_done_callback(lambda _: self.q.wake())
        if error is not None:
            raise error

    def settle(self, wait: bool = False) -> None:
        """On the queue thread: tell the scheduler how the launches that ended went.

        ``wait``: first let every launch in flight end, and those its outcomes
        start, until none is left. An engine that went away is raised once
        every ended launch is settled.
        """
        error: BaseException | None = None
        while True:
            with self._lock:
                flying = list(self._flying.values())
            if wait:
                wait_for_all([future for _, future in flying])
            landed = [(ins, future) for ins, future in flying if future.done()]
            for ins, future in landed:
                with self._lock:
                    del self._flying[ins.job_id]
                lost = self._settle(ins.job_id, self._outcome(future))
                if lost is not None and error is None:
                    error = lost
            if not (wait and self.in_flight()):
                break
        if error is not None:
            raise error

    @staticmethod
    def _outcome(launch: Future[str]) -> str | BaseException:
        """A landed launch's container id, or what it raised."""
        try:
            return launch.result()
        except Exception as exc:  # noqa: BLE001 - settled on the queue thread
            return exc

    def _commit(self, ins: ev.StartJob) -> JobRow | None:
        job_id, gpus = ins.job_id, list(ins.gpus)
        try:
            return self.q.store.transition(
                job_id, JobState.RUNNING, expect=[JobState.QUEUED], unless_held=True,
                gpus=gpus, container=None, started_at=ins.started_at, node=ins.node,
                detail="gpus " + (",".join(map(str, gpus)) or "none")
                + (f" on {ins.node}" if self.q.backend.cluster else ""),
            )
        except DopqError:  # refused: held, or moved on
            self.q._handle(ev.StartRefused(job_id))
            return None
        except Exception:  # the store failed: the job stays queued
            self.q._handle(ev.StartRefused(job_id, retry=True))
            raise

    def _launch(self, ins: ev.StartJob, row: JobRow) -> str:
        """On a pool thread: the engine's part of a start; returns the container's id."""
        q, job_id = self.q, ins.job_id
        q.run_log_path(job_id).unlink(missing_ok=True)  # from a run cut off earlier
        if row["restarts"]:  # preempted before: its last run's container has this name
            q.house.clear_for_rerun(job_id, q.container_name(job_id), row["restarts"])
        return q.runtime.run(q.backend.adapt(q.container_spec(row, list(ins.gpus)), ins.node, row))

    def _settle(self, job_id: int, outcome: str | BaseException) -> BaseException | None:
        """On the queue thread: tell the scheduler how a start went; an engine lost is returned."""
        q = self.q
        if isinstance(outcome, EngineUnavailable):
            q._carry_out(q._handle(ev.StartFailed(job_id, "engine unavailable", True)))
            return outcome
        if isinstance(outcome, BaseException):  # whatever it was, this job failed to start
            text = str(outcome).splitlines()[0][:300] if str(outcome) else type(outcome).__name__
            q._carry_out(q._handle(ev.StartFailed(job_id, text)))
            return None
        # Only now is there a container to look for after a crash: a running
        # job without one was cut off before its start and is queued again.
        name = q.backend.container_ref(q.container_name(job_id), outcome)
        q.store.update_job(job_id, container=name)
        log.debug("job %s started as %s", job_id, outcome[:12])
        marker = q.store.job(job_id)["error"]  # a cancel during the create left its mark
        q._carry_out(q._handle(ev.ContainerStarted(job_id, name, marker)))
        return None

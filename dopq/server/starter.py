"""Starting the containers of one decision, several at a time.

When several devices free at once the scheduler says ``StartJob`` for each job
it chose. Each start is committed first (queued -> running, compare-and-set,
on the queue thread, in the scheduler's order), then the creates and starts
run together on a small pool, since most of a start is the engine's time.
Their outcomes come back to the queue thread, which hands them to the
scheduler in order: pool threads never touch the scheduler.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from dopq.core import events as ev
from dopq.core.errors import DopqError, EngineUnavailable
from dopq.core.jobs import JobState
from dopq.server.store import JobRow

if TYPE_CHECKING:
    from dopq.server.queue import PriorityQueueThread

log = logging.getLogger("dopq.server.queue")

# Creates and starts in flight at once. 1: on Docker 20.10 here, 4 at once made
# each start about twice as slow and workload W's makespan worse (bench_dispatch,
# issue 17: 3.5 s -> 4.5 s median); raise it where the engine starts in parallel.
START_WORKERS = 1


class Starter:
    """Carries out the ``StartJob`` instructions of one decision for the queue thread."""

    def __init__(self, queue: PriorityQueueThread, workers: int = START_WORKERS) -> None:
        self.q, self.workers = queue, workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dopq-start")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    def start_all(self, starts: list[ev.StartJob]) -> None:
        """Commit each start, then create and start the committed ones together.

        A refused commit goes back to the scheduler at once. If the store
        fails, the starts not yet committed are handed back and the error is
        raised once the committed ones have been carried out; so is an engine
        that went away.
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
        outcomes: list[str | BaseException]
        if len(committed) == 1 or self.workers == 1:  # no hop to the pool
            outcomes = [self._outcome(self._launch, ins, row) for ins, row in committed]
        else:
            futures: list[Future[str]] = [self._pool.submit(self._launch, ins, row)
                                          for ins, row in committed]
            outcomes = [self._outcome(f.result) for f in futures]
        for (ins, _), outcome in zip(committed, outcomes, strict=True):
            lost = self._settle(ins.job_id, outcome)
            if lost is not None and error is None:
                error = lost
        if error is not None:
            raise error

    @staticmethod
    def _outcome(call: object, *args: object) -> str | BaseException:
        try:
            return call(*args)  # type: ignore[operator,no-any-return]
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

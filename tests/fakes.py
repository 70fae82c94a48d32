"""In-memory stand-ins for the store and the container runtime, and a driver
that carries the scheduler's instructions out against them the way the
queue thread does against SQLite and Docker (compare-and-set commits, a
refused start handed back). Every event is followed by ``validate()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dopq.core import events as ev
from dopq.core import scheduler as sc
from dopq.core.capacity import Capacity
from dopq.core.errors import Conflict
from dopq.core.fairshare import PolicyConfig
from dopq.core.jobs import FINAL_STATES, JobState
from dopq.core.policy import QueuedJob


@dataclass
class FakeContainer:
    job_id: int
    running: bool = True
    exit_code: int | None = None
    created: bool = False  # created, never started
    stops: int = 0
    graces: list[float | None] = field(default_factory=list)  # of each stop asked


class FakeRuntime:
    """Containers by name; nothing runs, a test says when one exits."""

    def __init__(self) -> None:
        self.containers: dict[str, FakeContainer] = {}
        self.removed: list[str] = []
        self.fail_next_run: str | None = None

    def run(self, job_id: int) -> str:
        if self.fail_next_run:
            error, self.fail_next_run = self.fail_next_run, None
            raise RuntimeError(error)
        name = f"c-{job_id}"
        self.containers[name] = FakeContainer(job_id)
        return name

    def stop(self, ref: str, grace: float | None = None) -> None:
        c = self.containers.get(ref)
        if c is not None:
            c.stops += 1
            c.graces.append(grace)


@dataclass
class FakeStore:
    """Jobs as dicts: ``transition`` is compare-and-set, as in ``dopq.server.store``."""

    jobs: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, str]] = field(default_factory=list)

    def add(self, job_id: int, **fields: Any) -> None:
        self.jobs[job_id] = {"state": JobState.QUEUED, "error": None, "exit_code": None,
                             "container": None, "gpus": [], **fields}

    def transition(self, job_id: int, to: JobState, expect: tuple[JobState, ...],
                   detail: str = "", **fields: Any) -> None:
        row = self.jobs[job_id]
        if expect and row["state"] not in expect:
            raise Conflict(f"job {job_id} is {row['state'].value}")
        if row["state"] in FINAL_STATES:
            raise Conflict(f"job {job_id} already ended")
        row.update(fields, state=to)
        self.events.append((job_id, to.value, detail))

    def state(self, job_id: int) -> JobState:
        return JobState(self.jobs[job_id]["state"])


class Driver:
    """The scheduler on a fake store and runtime, on a clock the test moves."""

    def __init__(self, gpus: int = 4, policy: PolicyConfig | None = None,
                 requeue_on_engine_restart: bool = False, stop_grace: float = 10.0,
                 remember_finished: bool = True, memory: int = 0, reserve: int = 0) -> None:
        self.sched = sc.Scheduler(
            sc.SchedulerConfig(policy or PolicyConfig(), stop_grace, requeue_on_engine_restart,
                               remember_finished),
            Capacity.single(range(gpus), memory=memory), memory_reserve=reserve,
        )
        self.store = FakeStore()
        self.runtime = FakeRuntime()
        self.now = 1000.0
        self.done: list[ev.Instruction] = []  # every instruction carried out, in order
        self.block_starts: set[int] = set()  # jobs whose start commit the store refuses

    # -- feeding events -------------------------------------------------------------
    def handle(self, event: ev.Event) -> list[ev.Instruction]:
        out = self.sched.handle(event, self.now)
        self.sched.validate()
        self.carry_out(out)
        self.sched.validate()
        return out

    def submit(self, job_id: int, user: str = "ana", gpus: int = 1, *,
               submitted: float | None = None, **kw: Any) -> None:
        q = QueuedJob(job_id, user, gpus, self.now if submitted is None else submitted, **kw)
        self.store.add(job_id, user=user, want=gpus, gpu_memory=kw.get("gpu_memory", 0))
        self.handle(ev.JobQueued(q))

    def tick(self, advance: float = 0.0) -> list[ev.Instruction]:
        self.now += advance
        return self.handle(ev.DeadlinesDue()) + self.handle(ev.Tick())

    def exit(self, job_id: int, code: int | None = 0, oom: bool = False,
             deferrable: bool = True) -> list[ev.Instruction]:
        name = f"c-{job_id}"
        c = self.runtime.containers[name]
        c.running, c.exit_code = False, code
        return self.handle(ev.ContainerExited(job_id, name, code, self.now, oom, deferrable))

    # -- carrying out ------------------------------------------------------------------
    def carry_out(self, instructions: list[ev.Instruction]) -> None:
        pending = list(instructions)
        while pending:
            ins = pending.pop(0)
            self.done.append(ins)
            if isinstance(ins, ev.StartJob):
                self._start(ins)
            elif isinstance(ins, ev.CommitJob):
                try:
                    if ins.state is None:
                        self.store.jobs[ins.job_id].update(ins.fields)
                    else:
                        self.store.transition(ins.job_id, ins.state, ins.expect, ins.detail,
                                              **ins.fields)
                except Conflict:
                    continue
                pending[0:0] = ins.then
            elif isinstance(ins, ev.StopContainer):
                self.runtime.stop(ins.ref or f"c-{ins.job_id}", ins.grace)
            elif isinstance(ins, ev.PreemptJob):  # the stop signal, SIGKILL after the grace
                self.runtime.stop(ins.container or f"c-{ins.job_id}", ins.grace)
            elif isinstance(ins, ev.RemoveContainer):
                self.runtime.removed.append(ins.ref or f"c-{ins.job_id}")

    def _start(self, ins: ev.StartJob) -> None:
        if ins.job_id in self.block_starts:
            self.handle(ev.StartRefused(ins.job_id))
            return
        try:
            self.store.transition(ins.job_id, JobState.RUNNING, (JobState.QUEUED,),
                                  gpus=list(ins.gpus), started_at=ins.started_at)
        except Conflict:
            self.handle(ev.StartRefused(ins.job_id))
            return
        try:
            name = self.runtime.run(ins.job_id)
        except RuntimeError as exc:
            self.handle(ev.StartFailed(ins.job_id, str(exc)))
            return
        self.store.jobs[ins.job_id]["container"] = name
        self.handle(ev.ContainerStarted(ins.job_id, name, self.store.jobs[ins.job_id]["error"]))

    # -- looking ---------------------------------------------------------------------------
    def started(self, instructions: list[ev.Instruction]) -> list[int]:
        return [i.job_id for i in instructions if isinstance(i, ev.StartJob)]

    def of_type(self, kind: type) -> list[Any]:
        return [i for i in self.done if isinstance(i, kind)]


class AnswerClient:
    """A client for the CLI's printers: each method returns its canned answer."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    def call(self, method: str, *args: Any, **kw: Any) -> Any:
        return self.answers[method]


def database_at(path: Any, version: int) -> Any:
    """A database left by an older DoPQ: schema ``version``, one queued job of alice."""
    import sqlite3

    from dopq.server.schema import MIGRATIONS

    db = sqlite3.connect(path)
    for step in MIGRATIONS[:version]:
        db.executescript(step)
    db.execute(f"PRAGMA user_version={version}")
    db.execute("INSERT INTO jobs (name, user, state, num_gpus, submitted_at) "
               "VALUES ('old', 'alice', 'queued', 1, 1.0)")
    db.commit()
    db.close()
    return path

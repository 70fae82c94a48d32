"""The priority-queue thread: drives the scheduler and carries out what it says.

All decisions (who starts on which GPUs, how a container's end is
classified, time limits, cancels, recovery) live in the pure
:class:`dopq.core.scheduler.Scheduler`. This thread turns what happens in the
store and the engine into the scheduler's events and carries its
instructions out: a state change is committed to the store with
compare-and-set (a refused start goes back to the scheduler), then Docker is
acted on. A container exit is recorded (and its GPUs freed) before its log is
saved and the container removed, which happens on a worker thread.

Event-driven: a job becoming ready, a container exiting, a cancel, an edit or
a GPU freeing calls ``wake()``, and the thread decides at once. It also wakes
for the scheduler's next deadline and every few seconds to reconcile with the
engine.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dopq.core import events as ev
from dopq.core import policy as policy_mod
from dopq.core import scheduler as sc
from dopq.core.capacity import LOCAL, Capacity, Device, GpuPool, Node
from dopq.core.errors import Conflict, DopqError, EngineUnavailable
from dopq.core.jobs import JobState
from dopq.core.settings import Settings
from dopq.core.usage import UsageLedger
from dopq.server import outputs
from dopq.server.backends import Backend
from dopq.server.containers import container_name, container_spec
from dopq.server.housekeeping import Housekeeper
from dopq.server.jobrows import queued_job, running_job
from dopq.server.runspec import ContainerSpec, JobRuntime
from dopq.server.starter import Starter
from dopq.server.store import JobRow, Store

log = logging.getLogger("dopq.server.queue")
__all__ = ["PriorityQueueThread", "queued_job", "running_job"]  # where tests found them

RECONCILE_EVERY = 3.0  # seconds between full comparisons with the engine
FULL_REFRESH_EVERY = 60.0  # seconds between full reads of the queued jobs


class PriorityQueueThread(threading.Thread):
    """Runs queued jobs on free GPUs; the only thread that starts containers."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: JobRuntime,
        gpus: Sequence[int | Device],
        gpu_mode: str,
        clock: Callable[[], float] = time.time,
        backend: Backend | None = None,
    ) -> None:
        super().__init__(name="dopq-queue", daemon=True)
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.gpu_mode = gpu_mode
        self.clock = clock
        self.instance = settings.docker.name_prefix
        self.owner = store.owner_id()
        # One host: the engine runs the jobs and keeps the images. A cluster: see backends.
        self.backend = backend or Backend(
            settings, runtime, self.owner, jobs=runtime)  # type: ignore[arg-type]
        # The machine's devices (memory, MIG parent, UUID: what containers are given).
        self.devices = {d.index: d for d in (Device(g) if isinstance(g, int) else g
                                             for g in gpus)}
        self.scheduler = sc.Scheduler(
            sc.SchedulerConfig(
                policy=settings.policy, stop_grace=settings.docker.stop_grace,
                requeue_on_engine_restart=settings.docker.requeue_on_engine_restart,
            ),
            Capacity([Node(LOCAL, self.devices.values())]),
            UsageLedger(settings.policy.half_life, store.load_usage()),
            memory_reserve=settings.bytes_of("gpus.memory_reserve"),
        )
        self._foreign: dict[int, int] = {}
        self.scheduler.shares = {}
        # The scheduler is touched from API threads too (cancel, reset_usage);
        # each event is handled whole under this lock, instructions outside it.
        self._lock = self.lock = threading.RLock()
        self._cond = threading.Condition()
        self._dirty = True
        self._exited: list[str] = []
        self._halt = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dopq-worker")
        # sbatch is a short call that waits mostly on slurmctld: several at once on a cluster
        self.starter = Starter(self, 4) if self.backend.cluster else Starter(self)
        self.outputs = outputs.OutputFolders(settings, self.owner)
        self.house = Housekeeper(settings, store, runtime, self.owner, self.outputs,
                                 self.backend.images)
        self._last_reconcile = 0.0
        self._event_mark = 0
        self._last_full_refresh = 0.0
        self.last_decision: policy_mod.Decision | None = None
        self.decision_seq = 0
        self.decision_lock = threading.Lock()
        self.started_at = self.clock()

    # -- the scheduler's state, as other code reads it --------------------------------------
    @property
    def pool(self) -> GpuPool:
        return self.scheduler.pool

    @property
    def ledger(self) -> UsageLedger:
        return self.scheduler.ledger

    @property
    def shares(self) -> dict[str, float]:
        return self.scheduler.shares or {}

    @shares.setter
    def shares(self, value: dict[str, float]) -> None:
        self.scheduler.shares = dict(value)

    @property
    def paused(self) -> bool:
        return self.scheduler.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.scheduler.paused = value

    @property
    def engine_up(self) -> bool:
        return self.scheduler.engine_up

    @engine_up.setter
    def engine_up(self, value: bool) -> None:
        self.scheduler.engine_up = value

    # -- signals from other threads -------------------------------------------
    def wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify()

    def container_exited(self, container_id: str) -> None:
        with self._cond:
            self._exited.append(container_id)
            self._dirty = True
            self._cond.notify()

    def set_external(self, busy: set[int]) -> None:
        with self._lock:
            if frozenset(busy) == self.scheduler.external:
                return
            self._handle(ev.CapacityChanged(external=frozenset(busy)))
        self.wake()

    def set_foreign(self, foreign: Mapping[int, int]) -> None:
        """Devices used by processes outside DoPQ, with the bytes they use (the sampler)."""
        with self._lock:
            if dict(foreign) == self._foreign:
                return
            self._foreign = dict(foreign)
            self._handle(ev.CapacityChanged(external=frozenset(foreign),
                                            foreign=dict(foreign)))
        self.wake()

    def stop(self) -> None:
        self._halt.set()
        self.wake()

    def engine_lost(self) -> None:
        self._handle(ev.EngineDown())

    # -- the loop ----------------------------------------------------------------
    def run(self) -> None:
        self.recover()
        while not self._halt.is_set():
            with self._cond:
                if not self._dirty:
                    timeout = RECONCILE_EVERY
                    t = self.scheduler.next_wakeup()
                    if t is not None:
                        timeout = min(timeout, max(0.0, t - self.clock()))
                    self._cond.wait(timeout)
                self._dirty = False
                exited, self._exited = self._exited, []
            try:
                self.step(exited, wait=False)
            except EngineUnavailable as exc:
                self.engine_lost()
                log.warning("%s", exc)
                self._halt.wait(1.0)
            except Exception:  # noqa: BLE001 - the queue thread must not die
                log.error("queue step failed\n%s", traceback.format_exc())
                self._halt.wait(0.5)
        self.starter.shutdown()  # the starts in flight land first
        self._save_usage()
        self._workers.shutdown(wait=True)

    def step(self, exited: list[str] | None = None, wait: bool = True) -> None:
        """One round; ``wait``: until its starts landed (the loop's don't: they wake it)."""
        now = self.clock()
        self.starter.settle()
        for cid in exited or []:
            self._finish_container(cid)
        if now - self._last_reconcile >= RECONCILE_EVERY:
            self._handle_all(self.backend.node_events())
            self.reconcile()
            self._last_reconcile = now
        self._refresh_queued()
        self._carry_out(self._handle(ev.DeadlinesDue(), now))
        self._tick(now)
        if wait:
            self.starter.settle(wait=True)

    def _handle(self, event: ev.Event, now: float | None = None) -> list[ev.Instruction]:
        with self._lock:
            return self.scheduler.handle(event, self.clock() if now is None else now)

    def _handle_all(self, events: Iterable[ev.Event]) -> list[ev.Instruction]:
        with self._lock:
            return self.scheduler.handle_all(events, self.clock())

    # -- carrying instructions out ------------------------------------------------------
    def _carry_out(self, instructions: list[ev.Instruction], strict: bool = False) -> JobRow | None:
        """Do what the scheduler said, in order; return the last committed row.

        A run of ``StartJob`` is committed one by one, then created and started
        on the starter's pool, without waiting (``dopq.server.starter``).

        ``strict``: a refused commit raises (to an API caller) instead of being
        passed over. If one instruction raises, the starts not yet tried are
        handed back to the scheduler before the error goes on.
        """
        pending = list(instructions)
        committed: JobRow | None = None
        while pending:
            ins = pending.pop(0)
            try:
                if isinstance(ins, ev.StartJob):
                    batch = [ins]
                    while pending and isinstance(pending[0], ev.StartJob):
                        batch.append(pending.pop(0))  # type: ignore[arg-type]
                    self.starter.start_all(batch)
                elif isinstance(ins, ev.CommitJob):
                    row = self._commit(ins, strict)
                    if row is not None:
                        committed = row
                        pending[0:0] = ins.then
                elif isinstance(ins, ev.StopContainer):
                    ref = ins.ref or self.container_name(ins.job_id or 0)
                    log.debug("stopping %s: %s", ref, ins.reason)
                    self._workers.submit(self._stop_container, ref, ins.grace)
                elif isinstance(ins, ev.PreemptJob):
                    self._preempt(ins)
                elif isinstance(ins, ev.SealOutputs):
                    self._workers.submit(self.house.seal, ins.job_id, ins.user)
                elif isinstance(ins, ev.CollectContainer):
                    self._workers.submit(self.house.collect, ins.job_id, ins.container)
                elif isinstance(ins, ev.RemoveContainer):
                    ref = ins.ref if ins.ref is not None else self.container_name(ins.job_id or 0)
                    if ins.background:
                        self._workers.submit(self.house.remove, ref)
                    else:
                        self.runtime.remove(ref, owner=self.owner)
                elif isinstance(ins, ev.Untag):
                    self._workers.submit(self.house.untag, ins.job_id)
                elif isinstance(ins, ev.RecheckContainer):
                    if self.runtime.ping():
                        self._finish_container(ins.container, defer=False)
                    else:
                        self.engine_lost()  # the reconcile records it once the engine is back
                elif isinstance(ins, ev.SaveUsage):
                    self._save_usage()
            except BaseException:
                refused = [ev.StartRefused(i.job_id, retry=True)
                           for i in pending if isinstance(i, ev.StartJob)]
                if refused:
                    self._handle_all(refused)
                raise
        return committed

    def _commit(self, ins: ev.CommitJob, strict: bool) -> JobRow | None:
        try:
            if ins.state is None:
                self.store.update_job(ins.job_id, **ins.fields)
                return None
            return self.store.transition(ins.job_id, ins.state, expect=ins.expect or None,
                                         detail=ins.detail, **ins.fields)
        except DopqError:
            if strict:
                raise
            return None

    def _preempt(self, ins: ev.PreemptJob) -> None:
        """Its stop signal now (the container's, from ``run_params.stop_signal``), SIGKILL
        after the grace: ``docker stop`` does both. The exit requeues it (the scheduler)."""
        try:
            user = self.store.job(ins.job_id)["user"]
        except DopqError:
            user = "?"
        self.store.audit("dopq", "preempt", f"job {ins.job_id} of {user}: {ins.reason}")
        log.info("preempting job %s for job %s: %s", ins.job_id, ins.by_job, ins.reason)
        self._workers.submit(self._stop_container,
                             ins.container or self.container_name(ins.job_id), ins.grace)

    def _stop_container(self, ref: str, grace: float | None = None) -> None:
        try:
            self.runtime.stop(ref, self.settings.docker.stop_grace if grace is None else grace,
                              owner=self.owner)
        except Exception:  # noqa: BLE001
            log.warning("stopping %s failed\n%s", ref, traceback.format_exc())
        st = self.runtime.status(ref)
        if st is not None and not st.running:
            self.container_exited(st.id)

    # -- recovery and reconciliation --------------------------------------------------
    def recover(self) -> None:
        """Re-adopt running containers by label, record exits that happened meanwhile."""
        try:
            self.reconcile()
        except EngineUnavailable as exc:
            # Down since some time before we started: exits are not blamed on it.
            with self._lock:
                self.scheduler.engine_up = False
            log.warning("engine down at start: %s", exc)
            self._handle_all([ev.JobAdopted(running_job(r))
                              for r in self.store.jobs([JobState.RUNNING])])
        self._refresh_queued(full=True)

    def reconcile(self) -> None:
        """Compare the store's running jobs with the engine's containers."""
        self.starter.settle(wait=True)  # no running job whose container is on its way
        containers = {c.job_id: c for c in self.runtime.list(self.instance, self.owner) if c.job_id}
        events: list[ev.Event] = [ev.EngineUp()]
        for row in self.store.jobs([JobState.RUNNING]):
            events.append(ev.JobAdopted(running_job(row)))
            c = containers.pop(row["id"], None)
            if c is None:
                # Ran and its container is gone (removed by hand), or never started.
                events.append(ev.ContainerMissing(row["id"], bool(row["container"]
                                                               and row["started_at"])))
            elif c.created:
                events.append(ev.ContainerNeverStarted(row["id"], c.id))
            elif not c.running:
                events.append(ev.ContainerExited(row["id"], c.id, c.exit_code, c.finished_at,
                                              c.oom_killed, deferrable=False, reason=c.reason))
        for job_id, c in containers.items():
            # Containers of ours whose job is over (or unknown): collect them.
            state: JobState | None = None
            if c.running:
                try:
                    state = JobState(self.store.job(job_id)["state"])
                except DopqError:
                    state = None
            events.append(ev.StrayContainer(job_id, c.id, c.running, state))
        self._carry_out(self._handle_all(events))
        with self._lock:
            self.scheduler.capacity.validate()

    def _finish_container(self, cid: str, defer: bool = True) -> None:
        st = self.runtime.status(cid)
        if st is None or st.job_id is None or st.running or st.owner != self.owner:
            return
        try:
            row = self.store.job(st.job_id)
        except DopqError:
            return
        if row["state"] != JobState.RUNNING.value:
            return
        if self.starter.in_flight(st.job_id):  # ended before its start landed: once it has
            with self._cond:  # (the landing wakes the loop)
                self._exited.append(cid)
            return
        self._carry_out(self._handle_all([
            ev.JobAdopted(running_job(row)),
            ev.ContainerExited(st.job_id, cid, st.exit_code, st.finished_at, st.oom_killed, defer,
                               st.reason),
        ]))

    # -- cancels and stops from other threads -------------------------------------------
    def cancel(self, job_id: int, by: str) -> JobRow:
        """Cancel a queued or running job (called from API threads). The state read
        may move before the cancel commits (the Provider takes a received job up):
        read again and retry, a few times."""
        for attempt in range(3):
            row = self.store.job(job_id)
            state = JobState(row["state"])
            try:
                committed = self._carry_out(self._handle(
                    ev.CancelRequested(job_id, state, by, row["container"])), strict=True)
                break
            except Conflict:
                if attempt == 2 or JobState(self.store.job(job_id)["state"]) == state:
                    raise
        if state != JobState.RUNNING and committed is not None:
            self.wake()
            return committed
        return self.store.job(job_id)

    def stop_for_output(self, job_id: int, reason: str) -> None:
        """Kill a job that wrote more than ``limits.max_output`` (output watcher)."""
        self._carry_out(self._handle(ev.OutputLimitReached(job_id, reason)))

    def stop_for_gpu(self, job_id: int, reason: str) -> None:
        """Stop a job the GPU watch says must go (GPU memory beyond what it declared,
        idle with ``idle_action = "cancel"``); it fails with ``reason``.

        Carried by the output limit's event: the scheduler stops the job and
        ``dopq.core.exits`` knows the GPU watch's reasons.
        """
        self._carry_out(self._handle(ev.OutputLimitReached(job_id, reason)))

    # -- usage ----------------------------------------------------------------------------------
    def _save_usage(self) -> None:
        with self._lock:
            rows = self.scheduler.ledger.to_rows()
        self.store.save_usage(rows, replace=True)

    def reset_usage(self, user: str | None) -> None:
        self._carry_out(self._handle(ev.UsageReset(user)))
        self.wake()

    # -- scheduling ---------------------------------------------------------------------------
    def _refresh_queued(self, full: bool = False) -> None:
        """Bring the scheduler's queue up to date from the store's events.

        Every state change and edit writes an event row, so only the jobs with
        new events are read again; a full read happens at start and every
        ``FULL_REFRESH_EVERY`` seconds as a safety net.
        """
        now = self.clock()
        if full or now - self._last_full_refresh >= FULL_REFRESH_EVERY:
            mark = self.store.last_event_id()
            rows = self.store.jobs([JobState.QUEUED], light=True)
            self._handle(ev.QueueLoaded([queued_job(r) for r in rows]), now)
            self._event_mark = mark
            self._last_full_refresh = now
            return
        self._event_mark, changed = self.store.changed_since(self._event_mark)
        self._handle_all([
            ev.JobQueued(queued_job(r)) if r["state"] == JobState.QUEUED.value
            else ev.JobLeftQueue(r["id"])
            for r in changed
        ])

    def _policy_inputs(self) -> tuple[dict[int, JobState], list[str]]:
        """What the policy needs from the store: dependencies' final states, history."""
        with self._lock:
            deps = self.scheduler.dependencies()
        history: list[str] = []
        if self.settings.policy.policy == "recency":
            rows = self.store.read(
                "SELECT user FROM jobs WHERE state IN ('succeeded','failed','cancelled')"
                " AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1000"
            )
            history = [r["user"] for r in rows]
        return dict(self.store.final_states(deps)), history

    def cluster_state(self, now: float) -> policy_mod.ClusterState:
        finished, history = self._policy_inputs()
        with self._lock:
            return self.scheduler.cluster_state(now, finished, history)

    def _tick(self, now: float) -> None:
        if self.paused:
            self._carry_out(self._handle(ev.Tick(), now))  # charges usage, starts nothing
            return
        finished, history = self._policy_inputs()
        with self._lock:
            instructions = self.scheduler.handle(ev.Tick(finished, history), now)
            decision = self.scheduler.last_decision
        with self.decision_lock:
            self.last_decision = decision
            self.decision_seq += 1
        self._carry_out(instructions)

    # -- containers, logs, images -------------------------------------------------------------
    def container_name(self, job_id: int) -> str:
        """``<prefix>-<owner>-<job-id>``: unique per server, even with one prefix."""
        return container_name(self.instance, self.owner, job_id)

    def container_spec(self, row: JobRow, gpus: list[int]) -> ContainerSpec:
        return container_spec(self.settings, self.outputs, row, gpus, instance=self.instance,
                              owner=self.owner, gpu_mode=self.gpu_mode, devices=self.devices)

    def run_log_path(self, job_id: int) -> Path:
        return self.house.run_log_path(job_id)

    def sweep_tags(self) -> list[str]:
        return self.house.sweep_tags()

    def clean_images(self, now: float) -> list[str]:
        return self.house.clean_images(now)

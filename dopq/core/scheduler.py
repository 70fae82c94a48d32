"""The scheduler as a state machine: events in, instructions out.

:meth:`Scheduler.handle` takes an event (something that happened: a job was
queued, a container exited, the engine went down, a deadline came) and
``now``, updates what the scheduler knows (queued and running jobs, who holds
which GPUs, decayed usage, stops in flight, the engine's health) and returns
the instructions that follow (start this job on these GPUs of this node, stop
that container, commit this state change, save usage); both kinds are in
:mod:`dopq.core.events`. It reads no clock, no store and no Docker. The
server's queue thread (:mod:`dopq.server.queue`) feeds it from the store
and the engine and carries its instructions out; the simulator
(:mod:`dopq.core.simulate`) drives the very same object with a virtual clock
and an in-memory runtime, so what the simulator proves holds for the loop
the server runs.

The scheduler applies a change as soon as it decides it and tells the driver
to commit it; a commit the store refuses (compare-and-set) comes back as an
event: only a refused start needs undoing (:class:`StartRefused`).

Preemption: the policy names victims, :func:`dopq.core.preemption.stop_victims`
stops them, and a victim's exit sends it back to the queue
(:func:`dopq.core.preemption.requeue`) instead of ending it.

How a container's end is classified: :func:`dopq.core.exits.classify`. A
signal exit DoPQ did not ask for is looked at again after
``DEFER_SIGNAL_EXIT`` seconds: the engine may be on its way down.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dopq.core import cluster, preemption
from dopq.core import events as E  # short: the handlers name their event ``ev``
from dopq.core import policy as policy_mod
from dopq.core.capacity import Capacity, Device, GpuPool
from dopq.core.errors import Conflict
from dopq.core.exits import (  # noqa: F401 (TIMEOUT, OOM, OUTPUT_LIMIT: the scheduler's words)
    CANCELLED_PREFIX,
    OOM,
    OUTPUT_LIMIT,
    PREEMPTED_PREFIX,
    SIGNAL_EXITS,
    TIMEOUT,
    classify,
)
from dopq.core.jobs import WAITING_STATES, JobState
from dopq.core.usage import UsageLedger, charge_rates

log = logging.getLogger("dopq.core.scheduler")

DEFER_SIGNAL_EXIT = 3.0  # seconds before a signal exit from outside is classified
OUTAGE_BEFORE = 30.0  # an exit this long before an outage began counts as caused by it
OUTAGE_AFTER = 5.0  # ... and this long after it ended
USAGE_SAVE_EVERY = 15.0
HISTORY = 1000  # finished users the recency policy looks at (exp(-1000) is nothing)


@dataclass(frozen=True)
class SchedulerConfig:
    policy: policy_mod.PolicyConfig = field(default_factory=policy_mod.PolicyConfig)
    stop_grace: float = 10.0
    requeue_on_engine_restart: bool = False
    remember_finished: bool = False  # keep final states and history (no store to ask)


class Scheduler:
    """All of the queue's decisions; see the module docstring."""

    def __init__(
        self, config: SchedulerConfig, capacity: Capacity, ledger: UsageLedger | None = None,
        memory_reserve: int = 0,
    ) -> None:
        self.config = config
        self.memory_reserve = memory_reserve  # bytes of each device no shared job gets
        for node in capacity.nodes.values():
            node.pool.reserve = memory_reserve
        self.capacity = capacity
        self.ledger = ledger if ledger is not None else UsageLedger(config.policy.half_life)
        self.shares: dict[str, float] | None = None  # over the policy's own, when set
        self.queued: dict[int, policy_mod.QueuedJob] = {}
        self.running: dict[int, E.Running] = {}
        self.stopping: dict[int, float] = {}  # job -> when its stop was asked
        self.deferred: list[tuple[float, int, str]] = []  # (due, job, container)
        self.external: frozenset[int] = frozenset()
        self.foreign: dict[int, int] = {}  # device -> bytes used from outside DoPQ
        self.nodes_seen: dict[str, tuple[bool, int]] = {}  # cluster node -> (usable, foreign)
        self._flat: cluster.Flat | None = None  # several nodes: this decision's device ids
        self.engine_up = True
        self.engine_down_since: float | None = None
        self.last_outage: tuple[float, float] | None = None
        self.paused = False
        self.last_decision: policy_mod.Decision | None = None
        self.finished: dict[int, JobState] = {}
        self.history: deque[str] = deque(maxlen=HISTORY)
        self._deadline: float | None = None
        self._policy_wakeup: float | None = None
        self._last_usage_save = -math.inf  # the first charge saves

    @property
    def pool(self) -> GpuPool:
        return self.capacity.default.pool

    # -- the one entry point ------------------------------------------------------
    def handle(self, event: E.Event, now: float) -> list[E.Instruction]:
        """Apply ``event`` at ``now``; return what the driver must do, in order."""
        out: list[E.Instruction] = []
        handler = getattr(self, "_on_" + type(event).__name__)
        handler(event, now, out)
        return out

    def handle_all(self, events: Iterable[E.Event], now: float) -> list[E.Instruction]:
        out: list[E.Instruction] = []
        for event in events:
            out += self.handle(event, now)
        return out

    # -- queue --------------------------------------------------------------------
    def _on_JobQueued(self, ev: E.JobQueued, now: float, out: list[E.Instruction]) -> None:
        self.queued[ev.job.id] = ev.job

    _on_JobEdited = _on_JobQueued

    def _on_JobLeftQueue(self, ev: E.JobLeftQueue, now: float, out: list[E.Instruction]) -> None:
        self.queued.pop(ev.job_id, None)

    def _on_QueueLoaded(self, ev: E.QueueLoaded, now: float, out: list[E.Instruction]) -> None:
        self.queued = {q.id: q for q in ev.jobs}

    def _on_CancelRequested(self, ev: E.CancelRequested, now: float,
                            out: list[E.Instruction]) -> None:
        reason = f"{CANCELLED_PREFIX} by {ev.by}"
        if ev.state in WAITING_STATES:
            # The queue drops it when the store says it left (a start racing
            # this cancel loses the compare-and-set, or this one does).
            out.append(E.CommitJob(ev.job_id, JobState.CANCELLED, (ev.state,),
                                 {"error": reason}, reason, then=(E.Untag(ev.job_id),)))
            return
        if ev.state != JobState.RUNNING:
            raise Conflict(f"job {ev.job_id} already ended ({ev.state.value})")
        out.append(E.CommitJob(ev.job_id, None, fields={"error": reason}))
        live = self.running.get(ev.job_id)
        if live is not None:
            live.error = reason
        # A job whose container is being created has none to stop yet: the
        # stop is retried, and E.ContainerStarted looks at the stop reason again.
        self._stop(ev.job_id, live.container if live else ev.container, now, out, reason=reason)

    def _on_OutputLimitReached(self, ev: E.OutputLimitReached, now: float,
                               out: list[E.Instruction]) -> None:
        live = self.running.get(ev.job_id)
        if live is None or (live.error or "").startswith(CANCELLED_PREFIX):
            return
        live.error = ev.reason
        out.append(E.CommitJob(ev.job_id, None, fields={"error": ev.reason}))
        self._stop(ev.job_id, live.container, now, out, 0.0, ev.reason)  # it would keep writing

    # -- starts -------------------------------------------------------------------
    def _on_StartRefused(self, ev: E.StartRefused, now: float, out: list[E.Instruction]) -> None:
        live = self.running.get(ev.job_id)
        self._release(ev.job_id)
        if ev.retry and live is not None and live.queued is not None:
            self.queued[ev.job_id] = live.queued
        else:
            self.queued.pop(ev.job_id, None)

    def _on_ContainerStarted(self, ev: E.ContainerStarted, now: float,
                             out: list[E.Instruction]) -> None:
        live = self.running.get(ev.job_id)
        if live is None:
            return
        live.container = ev.container
        marker = ev.marker or live.error or ""
        if marker.startswith(CANCELLED_PREFIX):
            # A cancel that came while the container was being created found
            # nothing to stop; it left its mark, so stop it now.
            live.error = marker
            self._stop(ev.job_id, live.container, now, out, reason=marker)

    def _on_StartFailed(self, ev: E.StartFailed, now: float, out: list[E.Instruction]) -> None:
        if ev.engine_down:
            self._requeue(ev.job_id, "engine unavailable", out)
            self._engine_lost(now)
            return
        error = f"start failed: {ev.error}"
        out.append(E.CommitJob(ev.job_id, JobState.FAILED, (JobState.RUNNING,),
                             {"error": error}, error))
        self._release(ev.job_id)
        out.append(E.RemoveContainer(ev.job_id, None, background=False))
        out.append(E.Untag(ev.job_id))

    # -- exits ----------------------------------------------------------------------
    def _on_ContainerExited(self, ev: E.ContainerExited, now: float,
                            out: list[E.Instruction]) -> None:
        live = self.running.get(ev.job_id)
        if live is None:
            return
        if ev.deferrable and ev.exit_code in SIGNAL_EXITS and ev.job_id not in self.stopping:
            # Killed by a signal DoPQ did not send: if the engine is going down,
            # that is why; look again shortly to tell the user the right reason.
            self.deferred.append((now + DEFER_SIGNAL_EXIT, ev.job_id, ev.container))
            return
        self._exit(live, ev.exit_code, ev.finished_at, now, out, ev.reason, ev.oom)
        out.append(E.CollectContainer(ev.job_id, ev.container))

    def _on_ContainerMissing(self, ev: E.ContainerMissing, now: float,
                             out: list[E.Instruction]) -> None:
        live = self.running.get(ev.job_id)
        if live is None:
            return
        if ev.ran:
            self._exit(live, None, None, now, out, vanished="container vanished")
        else:
            self._requeue(ev.job_id, "container was never started", out)

    def _on_ContainerNeverStarted(self, ev: E.ContainerNeverStarted, now: float,
                                  out: list[E.Instruction]) -> None:
        out.append(E.RemoveContainer(ev.job_id, ev.container, background=False))
        self._requeue(ev.job_id, "container was created but never started", out)

    def _on_StrayContainer(self, ev: E.StrayContainer, now: float,
                           out: list[E.Instruction]) -> None:
        if not ev.running:
            out.append(E.CollectContainer(ev.job_id, ev.container))
        elif ev.state != JobState.RUNNING:
            why = f"job {ev.job_id} is not running"
            out.append(E.StopContainer(None, ev.container, reason=why))

    def _exit(self, live: E.Running, exit_code: int | None, finished_at: float | None,
              now: float, out: list[E.Instruction], vanished: str | None = None,
              oom: bool = False) -> None:
        """Commit the job's end (state, exit code, reason), then free its GPUs."""
        if (live.error or "").startswith(PREEMPTED_PREFIX):
            # However it ended (it may save its state and exit 0), it was asked
            # to stop: back to the queue, its submit time and /outdir kept.
            self._charge(now, out)  # for the time it ran
            commit, again = preemption.requeue(live)
            out.append(commit)
            self._release(live.id)
            if again is not None:
                self.queued[live.id] = again
            return
        state, error = classify(
            live.error or "", exit_code, vanished=vanished, oom=oom,
            in_outage=exit_code in SIGNAL_EXITS and self._in_outage(finished_at),
            requeue=self.config.requeue_on_engine_restart)
        if state is None:
            assert error is not None
            self._requeue(live.id, error, out)
            out.append(E.RemoveContainer(live.id, live.container or ""))
            return
        out.append(E.CommitJob(
            live.id, state, (JobState.RUNNING,),
            {"exit_code": exit_code, "error": error, "finished_at": finished_at or now},
            error or "exit code 0"))
        self._charge(now, out)
        self._release(live.id)
        if self.config.remember_finished:
            self.finished[live.id] = state
            self.history.appendleft(live.user)
        out.append(E.SealOutputs(live.id, live.user))

    def _requeue(self, job_id: int, why: str, out: list[E.Instruction]) -> None:
        out.append(E.CommitJob(job_id, JobState.QUEUED, (JobState.RUNNING,),
                             {"gpus": [], "container": None, "started_at": None}, why))
        self._release(job_id)

    def _release(self, job_id: int) -> None:
        live = self.running.pop(job_id, None)
        self.stopping.pop(job_id, None)
        node = self.capacity.nodes.get(live.node) if live and live.node else None
        (node or self.capacity.default).pool.release(job_id)

    # -- recovery ---------------------------------------------------------------------
    def _on_JobAdopted(self, ev: E.JobAdopted, now: float, out: list[E.Instruction]) -> None:
        job = ev.job
        if job.id in self.running:
            return
        node = self.capacity.nodes.get(job.node) or self.capacity.default
        job.node = node.name
        try:
            node.pool.acquire(job.id, job.gpus, job.gpu_memory)
        except Conflict:
            log.error("job %s: GPUs %s already held; not adopting its GPUs", job.id, job.gpus)
        self.queued.pop(job.id, None)
        self.running[job.id] = job

    # -- the engine and the machine -----------------------------------------------------
    def _on_EngineDown(self, ev: E.EngineDown, now: float, out: list[E.Instruction]) -> None:
        self._engine_lost(now)

    def _engine_lost(self, now: float) -> None:
        if self.engine_down_since is None:
            self.engine_down_since = now
        self.engine_up = False

    def _on_EngineUp(self, ev: E.EngineUp, now: float, out: list[E.Instruction]) -> None:
        if self.engine_down_since is not None:
            log.warning("Docker engine is back after %.1f s", now - self.engine_down_since)
            self.last_outage = (self.engine_down_since, now)
            self.engine_down_since = None
        self.engine_up = True

    def _in_outage(self, finished_at: float | None) -> bool:
        """Did a container end around an engine outage (stop, crash, restart)?"""
        if self.engine_down_since is not None:
            return True
        if self.last_outage is None or finished_at is None:
            return False
        start, end = self.last_outage
        return start - OUTAGE_BEFORE <= finished_at <= end + OUTAGE_AFTER

    def _on_CapacityChanged(self, ev: E.CapacityChanged, now: float,
                            out: list[E.Instruction]) -> None:
        node = self.capacity.nodes[ev.node] if ev.node else self.capacity.default
        if ev.devices is not None:
            node.set_devices(Device(d) if isinstance(d, int) else d for d in ev.devices)
        if ev.foreign is not None:
            self.foreign = dict(ev.foreign)
            self.external = frozenset(ev.foreign)
        elif ev.external is not None:
            self.external = frozenset(ev.external)
            self.foreign = {}

    def _on_NodeSeen(self, ev: E.NodeSeen, now: float, out: list[E.Instruction]) -> None:
        node = cluster.ensure_node(self.capacity, ev.name)
        if len(node.devices) != ev.gpus:
            node.set_devices(cluster.node_devices(ev.gpus))
        self.nodes_seen[ev.name] = (ev.usable, ev.foreign)

    # -- usage --------------------------------------------------------------------------
    def _on_UsageReset(self, ev: E.UsageReset, now: float, out: list[E.Instruction]) -> None:
        self.ledger.reset(ev.user)
        self._save_usage(now, out)

    def _charge(self, now: float, out: list[E.Instruction]) -> None:
        self.ledger.advance(now, charge_rates(self.running.values(),
                                              self.config.policy.cpu_fraction,
                                              self._device_memory()))
        if now - self._last_usage_save >= USAGE_SAVE_EVERY:
            self._save_usage(now, out)

    def _device_memory(self) -> dict[int, int]:
        pool = self.pool
        return {g: pool.memory(g) for g in pool.total}

    def _save_usage(self, now: float, out: list[E.Instruction]) -> None:
        out.append(E.SaveUsage())
        self._last_usage_save = now

    def save_usage(self, now: float) -> list[E.Instruction]:
        """The usage rows to save now (at shutdown)."""
        out: list[E.Instruction] = []
        self._save_usage(now, out)
        return out

    # -- time ---------------------------------------------------------------------------
    def _on_DeadlinesDue(self, ev: E.DeadlinesDue, now: float, out: list[E.Instruction]) -> None:
        for item in list(self.deferred):
            due, job_id, container = item
            if due <= now:
                self.deferred.remove(item)
                out.append(E.RecheckContainer(job_id, container))
        self._charge(now, out)
        self._enforce_limits(now, out)

    def _enforce_limits(self, now: float, out: list[E.Instruction]) -> None:
        deadline: float | None = None
        for job_id, live in list(self.running.items()):
            asked = self.stopping.get(job_id)
            if asked is not None:
                # A stop that did not take (engine busy, container not yet
                # created when it was asked): ask again.
                grace = self._grace(live)
                retry_after = (self.config.stop_grace if grace is None else grace) + 5.0
                if now - asked >= retry_after:
                    self._stop(job_id, live.container, now, out, grace, "the stop did not take")
                else:
                    deadline = _earliest(deadline, asked + retry_after)
                continue
            if not live.time_limit or live.started_at is None:
                continue
            end = live.started_at + live.time_limit
            if end <= now:
                out.append(E.CommitJob(job_id, None, fields={"error": TIMEOUT}))
                live.error = TIMEOUT
                self._stop(job_id, live.container, now, out, reason=TIMEOUT)
            else:
                deadline = _earliest(deadline, end)
        self._deadline = deadline

    def _stop(self, job_id: int, container: str | None, now: float, out: list[E.Instruction],
              grace: float | None = None, reason: str = "") -> None:
        self.stopping[job_id] = now
        out.append(E.StopContainer(job_id, container, grace, reason))

    def _grace(self, live: E.Running) -> float | None:
        """A preempted job keeps its grace to save its state; others: the default."""
        if (live.error or "").startswith(PREEMPTED_PREFIX):
            return self.config.policy.preempt_grace
        return None

    def next_wakeup(self) -> float | None:
        """When the scheduler wants a :class:`DeadlinesDue` and a :class:`Tick` at the latest."""
        times = [t for t in (self._deadline, self._policy_wakeup) if t is not None]
        times += [due for due, _, _ in self.deferred]
        return min(times, default=None)

    # -- deciding -------------------------------------------------------------------------
    def policy_config(self) -> policy_mod.PolicyConfig:
        cfg = self.config.policy
        if self.shares is None:
            return cfg
        return dataclasses.replace(cfg, shares={**cfg.shares, **self.shares})

    def dependencies(self) -> set[int]:
        """Jobs the queued jobs wait for: the final states a :class:`Tick` should carry."""
        deps: set[int] = set()
        for q in self.queued.values():
            deps.update(q.after)
            deps.update(q.after_any)
        return deps

    def cluster_state(self, now: float, finished_states: Mapping[int, JobState] | None = None,
                      history: Sequence[str] | None = None) -> policy_mod.ClusterState:
        pool = self.pool
        pool.set_external(self.external - set(pool.held()), self.foreign)
        for name, (usable, foreign) in self.nodes_seen.items():
            node = self.capacity.nodes[name]
            node.pool.set_external(cluster.closed_devices(node, usable, foreign))
        flat = self._flat = cluster.Flat.of(self.capacity) if self.nodes_seen else None
        grace = self.config.policy.preempt_grace
        running = []
        for r in self.running.values():
            limit, stopping = preemption.draining(r, self.stopping.get(r.id), grace)
            running.append(policy_mod.RunningJob(
                r.id, r.user, r.num_gpus, flat.to_global(r.node, r.gpus) if flat else r.gpus,
                now if r.started_at is None else r.started_at,
                limit, r.gpu_memory, r.preemptible, r.restarts, r.priority, stopping))
        m = (cluster.merge(self.capacity, flat) if flat else cluster.Merged(
            pool.free(), self._device_memory(), pool.foreign(), pool.external(), len(pool.total)))
        return policy_mod.ClusterState(
            queued=list(self.queued.values()), running=running, free_gpus=m.free,
            usage=self.ledger.snapshot(now),
            finished_states=self.finished if finished_states is None else finished_states,
            history=self.history if history is None else history,
            total_gpus=m.total, memory=m.memory, foreign=m.foreign, external=m.external,
            memory_reserve=self.memory_reserve, node_of=flat.node_of() if flat else {},
        )

    def _on_Tick(self, ev: E.Tick, now: float, out: list[E.Instruction]) -> None:
        self._charge(now, out)
        if self.paused:
            self._policy_wakeup = None  # no decision to revisit (the wait would spin)
            return
        cfg = self.policy_config()
        decision = policy_mod.decide(
            self.cluster_state(now, ev.finished_states, ev.history), now, cfg)
        self.last_decision = decision
        self._policy_wakeup = decision.next_wakeup
        for job_id, reason in decision.fail:
            out.append(E.CommitJob(job_id, JobState.FAILED, (JobState.QUEUED,),
                                 {"error": reason}, reason, then=(E.Untag(job_id),)))
            self.queued.pop(job_id, None)
            if self.config.remember_finished:
                self.finished[job_id] = JobState.FAILED
        for job_id, picked in decision.starts:
            q = self.queued[job_id]
            name, gpus = self._flat.to_local(picked) if self._flat else ("", picked)
            node = self.capacity.nodes.get(name) or self.capacity.default
            try:
                node.pool.acquire(job_id, gpus, q.gpu_memory)
            except Conflict as exc:
                log.error("job %s: %s", job_id, exc)
                continue
            del self.queued[job_id]
            self.running[job_id] = E.Running(
                job_id, q.user, q.num_gpus, tuple(gpus), now, q.time_limit, node.name,
                gpu_memory=q.gpu_memory, preemptible=q.preemptible, restarts=q.restarts,
                priority=q.priority, queued=q)
            out.append(E.StartJob(job_id, node.name, tuple(gpus), now))
        if decision.preempt:
            grace = cfg.preempt_grace
            out += preemption.stop_victims(decision, self.running, self.stopping, now, grace)
            # Wake up to ask again if a stop does not take (E.DeadlinesDue).
            self._deadline = _earliest(self._deadline, now + grace + 5.0)

    def validate(self) -> None:
        """Assert the books balance: the pools, and running jobs against them."""
        cluster.validate_books(self.capacity, self.running, self.queued)


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)

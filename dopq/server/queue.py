"""The priority-queue thread: starts containers in priority order on free GPUs.

Event-driven: a job becoming ready, a container exiting, a cancel, an edit or
a GPU freeing calls ``wake()``, and the thread decides at once. It also wakes
for the next deadline (a time limit) and every few seconds to reconcile with
the engine. Decisions come from the pure ``dopq.core.policy.decide``; this thread
only carries them out: it commits each change to the store, then acts on
Docker. A container exit is recorded (and its GPUs freed) before its log is
saved and the container removed, which happens on a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dopq.core import policy as policy_mod
from dopq.core.errors import Conflict, DopqError, EngineUnavailable
from dopq.core.jobs import ACTIVE_STATES, JobState
from dopq.core.settings import Settings
from dopq.core.usage import UsageLedger
from dopq.server import hostfs, outputs
from dopq.server.gpus import GpuPool
from dopq.server.images import cache_tag, job_tag, owner_tag_pattern
from dopq.server.runtime import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_OWNER,
    LABEL_USER,
    ContainerRuntime,
    ContainerSpec,
)
from dopq.server.store import JobRow, Store

log = logging.getLogger("dopq.server.queue")

RECONCILE_EVERY = 3.0  # seconds between full comparisons with the engine
FULL_REFRESH_EVERY = 60.0  # seconds between full reads of the queued jobs
USAGE_SAVE_EVERY = 15.0

SIGNAL_EXITS = (137, 143)  # SIGKILL, SIGTERM
DEFER_SIGNAL_EXIT = 3.0
CANCELLED_PREFIX = "cancelled"
TIMEOUT = "timeout"


def policy_config(settings: Settings, shares: dict[str, float]) -> policy_mod.PolicyConfig:
    """The settings' policy with the weights in the store over those of the file."""
    return dataclasses.replace(settings.policy, shares={**settings.policy.shares, **shares})


def queued_job(row: JobRow) -> policy_mod.QueuedJob:
    return policy_mod.QueuedJob(
        id=row["id"], user=row["user"], num_gpus=row["num_gpus"],
        submitted_at=row["submitted_at"], time_limit=row["time_limit"],
        priority=row["priority"], nice=row["nice"], held=row["held"], top=row["top"],
        after=tuple(row["after"]), after_any=tuple(row["after_any"]),
    )


def running_job(row: JobRow) -> policy_mod.RunningJob:
    return policy_mod.RunningJob(
        id=row["id"], user=row["user"], num_gpus=row["num_gpus"], gpus=tuple(row["gpus"]),
        started_at=row["started_at"] or time.time(), time_limit=row["time_limit"],
    )


class PriorityQueueThread(threading.Thread):
    """Runs queued jobs on free GPUs; the only thread that starts containers."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: ContainerRuntime,
        gpu_indices: list[int],
        gpu_mode: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name="dopq-queue", daemon=True)
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.gpu_mode = gpu_mode
        self.clock = clock
        self.pool = GpuPool(gpu_indices)
        self.instance = settings.docker.name_prefix
        self.owner = store.owner_id()
        self.ledger = UsageLedger(settings.policy.half_life, store.load_usage())
        self._cond = threading.Condition()
        self._dirty = True
        self._exited: list[str] = []
        self._halt = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dopq-worker")
        self._queued: dict[int, policy_mod.QueuedJob] = {}
        self._running: dict[int, JobRow] = {}
        self._stopping_jobs: dict[int, float] = {}  # job -> when its stop was asked
        self._collecting: set[int] = set()
        self.outputs = outputs.OutputFolders(settings)
        self._sealed: set[int] = set()  # jobs whose outputs were sealed since start
        self._last_reconcile = 0.0
        self._last_usage_save = 0.0
        self._next_deadline: float | None = None
        self._policy_wakeup: float | None = None
        self._external: set[int] = set()
        self._deferred: list[tuple[float, str]] = []
        self._event_mark = 0
        self._last_full_refresh = 0.0
        self._engine_down_since: float | None = None
        self._last_outage: tuple[float, float] | None = None
        self.paused = False
        self.engine_up = True
        self.last_decision: policy_mod.Decision | None = None
        self.decision_seq = 0
        self.decision_lock = threading.Lock()
        self.started_at = self.clock()
        self.shares: dict[str, float] = {}

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
        with self._cond:
            if busy != self._external:
                self._external = set(busy)
                self._dirty = True
                self._cond.notify()

    def stop(self) -> None:
        self._halt.set()
        self.wake()

    # -- the loop ----------------------------------------------------------------
    def run(self) -> None:
        self.recover()
        while not self._halt.is_set():
            with self._cond:
                if not self._dirty:
                    timeout = RECONCILE_EVERY
                    for t in (self._next_deadline, self._policy_wakeup):
                        if t is not None:
                            timeout = min(timeout, max(0.0, t - self.clock()))
                    self._cond.wait(timeout)
                self._dirty = False
                exited, self._exited = self._exited, []
            try:
                self.step(exited)
            except EngineUnavailable as exc:
                self.engine_lost()
                log.warning("%s", exc)
                self._halt.wait(1.0)
            except Exception:  # noqa: BLE001 - the queue thread must not die
                log.error("queue step failed\n%s", traceback.format_exc())
                self._halt.wait(0.5)
        self._save_usage(self.clock())
        self._workers.shutdown(wait=True)

    def engine_lost(self) -> None:
        if self._engine_down_since is None:
            self._engine_down_since = self.clock()
        self.engine_up = False

    def _engine_back(self, now: float) -> None:
        if self._engine_down_since is not None:
            log.warning("Docker engine is back after %.1f s", now - self._engine_down_since)
            self._last_outage = (self._engine_down_since, now)
            self._engine_down_since = None
        self.engine_up = True

    def _in_outage(self, finished_at: float | None) -> bool:
        """Did a container end around an engine outage (stop, crash, restart)?"""
        if self._engine_down_since is not None:
            return True
        if self._last_outage is None or finished_at is None:
            return False
        start, end = self._last_outage
        return start - 30.0 <= finished_at <= end + 5.0

    def step(self, exited: list[str] | None = None) -> None:
        now = self.clock()
        for cid in exited or []:
            self._finish_container(cid)
        for due, cid in list(self._deferred):
            if due <= now:
                self._deferred.remove((due, cid))
                if self.runtime.ping():
                    self._finish_container(cid, defer=False)
                else:
                    self.engine_lost()  # reconcile records it once the engine is back
        if now - self._last_reconcile >= RECONCILE_EVERY:
            self.reconcile()
            self._last_reconcile = now
        self._refresh_queued()
        self._charge(now)
        self._enforce_limits(now)
        if not self.paused:
            self._schedule(now)

    # -- recovery and reconciliation --------------------------------------------------
    def recover(self) -> None:
        """Re-adopt running containers by label, record exits that happened meanwhile."""
        try:
            self.reconcile()
            self.engine_up = True
        except EngineUnavailable as exc:
            self.engine_up = False
            log.warning("engine down at start: %s", exc)
            for row in self.store.jobs([JobState.RUNNING]):
                self._adopt(row)
        self._refresh_queued(full=True)

    def reconcile(self) -> None:
        """Compare the store's running jobs with the engine's containers."""
        containers = {c.job_id: c for c in self.runtime.list(self.instance, self.owner) if c.job_id}
        self._engine_back(self.clock())
        for row in self.store.jobs([JobState.RUNNING]):
            c = containers.pop(row["id"], None)
            if c is None:
                if row["container"] and row["started_at"]:
                    # It ran and its container is gone (removed by hand).
                    self._record_exit(row, None, None, "container vanished")
                else:
                    self._requeue(row, "container was never started")
                continue
            if c.created:
                # Cut off between create and start (a crash): start afresh.
                self.runtime.remove(c.id, owner=self.owner)
                self._requeue(row, "container was created but never started")
                continue
            if row["id"] not in self._running:
                self._adopt(row)
            if not c.running:
                self._record_exit(row, c.exit_code, c.finished_at, oom=c.oom_killed)
                self._workers.submit(self._collect, row["id"], c.id)
        for job_id, c in containers.items():
            # Containers of ours whose job is over (or unknown): collect them.
            if c.running:
                try:
                    state = self.store.job(job_id)["state"]
                except DopqError:
                    state = None
                if state != JobState.RUNNING.value:
                    self._workers.submit(self._stop_container, c.id)
            else:
                self._workers.submit(self._collect, job_id, c.id)
        self.pool.validate()

    def _adopt(self, row: JobRow) -> None:
        if row["id"] in self._running:
            return
        try:
            self.pool.acquire(row["id"], row["gpus"])
        except Conflict:
            log.error("job %s: GPUs %s already held; not adopting its GPUs", row["id"], row["gpus"])
        self._running[row["id"]] = row

    def _requeue(self, row: JobRow, why: str) -> None:
        try:
            self.store.transition(
                row["id"], JobState.QUEUED, expect=[JobState.RUNNING], detail=why,
                gpus=[], container=None, started_at=None,
            )
        except DopqError:
            return
        self._release(row["id"])

    def _release(self, job_id: int) -> None:
        self._running.pop(job_id, None)
        self._stopping_jobs.pop(job_id, None)
        self.pool.release(job_id)

    # -- exits -------------------------------------------------------------------------------
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
        if defer and st.exit_code in SIGNAL_EXITS and st.job_id not in self._stopping_jobs:
            # Killed by a signal DoPQ did not send: if the engine is going down,
            # that is why; look again shortly to tell the user the right reason.
            self._deferred.append((self.clock() + DEFER_SIGNAL_EXIT, cid))
            self._next_deadline = self.clock() + DEFER_SIGNAL_EXIT
            return
        self._record_exit(row, st.exit_code, st.finished_at, oom=st.oom_killed)
        self._workers.submit(self._collect, row["id"], cid)

    def _record_exit(
        self,
        row: JobRow,
        exit_code: int | None,
        finished_at: float | None,
        vanished: str | None = None,
        oom: bool = False,
    ) -> None:
        """Commit the job's end (state, exit code, reason), then free its GPUs."""
        marker = row.get("error") or ""
        if marker.startswith(CANCELLED_PREFIX):
            state, error = JobState.CANCELLED, marker
        elif marker == TIMEOUT:
            state, error = JobState.FAILED, TIMEOUT
        elif marker.startswith(outputs.OUTPUT_LIMIT):
            state, error = JobState.FAILED, marker
        elif vanished:
            state, error = JobState.FAILED, vanished
        elif oom:
            state, error = JobState.FAILED, "out of memory (killed at the memory limit)"
        elif exit_code in SIGNAL_EXITS and self._in_outage(finished_at):
            if self.settings.docker.requeue_on_engine_restart:
                self._requeue(row, f"requeued: Docker engine restart (exit code {exit_code})")
                self._workers.submit(self._remove, row["container"] or "")
                return
            state, error = (JobState.FAILED,
                            f"killed by a Docker engine restart (exit code {exit_code})")
        elif exit_code == 0:
            state, error = JobState.SUCCEEDED, None
        elif exit_code in SIGNAL_EXITS:
            state, error = JobState.FAILED, (
                f"exit code {exit_code} (killed by signal {exit_code - 128} from outside DoPQ)")
        else:
            state, error = JobState.FAILED, f"exit code {exit_code}"
        at = finished_at or self.clock()
        try:
            self.store.transition(
                row["id"], state, expect=[JobState.RUNNING], exit_code=exit_code, error=error,
                finished_at=at, detail=error or "exit code 0",
            )
        except DopqError:
            pass
        self._charge(self.clock())
        self._release(row["id"])
        self._workers.submit(self._seal, row["id"], row["user"])

    def _seal(self, job_id: int, user: str) -> None:
        """Give a finished job's outputs to its user, made inert (worker thread)."""
        with self._cond:
            if job_id in self._sealed:
                return
            self._sealed.add(job_id)
        try:
            self.outputs.seal(user, job_id)
        except OSError as exc:
            log.warning("job %s: sealing outputs failed: %s", job_id, exc)

    def _collect(self, job_id: int, cid: str) -> None:
        """Save a finished container's log, then remove it (worker thread)."""
        with self._cond:
            if job_id in self._collecting:
                return
            self._collecting.add(job_id)
        try:
            path = self.run_log_path(job_id)
            if not path.exists():
                cap = self.settings.bytes_of("docker.log_max_bytes")
                tmp = path.with_suffix(".tmp")
                self.runtime.save_logs(cid, tmp, cap)
                hostfs.private_file(tmp)
                tmp.replace(path)
            row = self.store.job(job_id)
            self._seal(job_id, row["user"])  # again after a crash: before the container goes
            if self.settings.docker.remove_containers:
                self.runtime.remove(cid, owner=self.owner)
                self._untag(job_id)
        except Exception:  # noqa: BLE001
            log.warning("job %s: collecting container failed\n%s", job_id, traceback.format_exc())
        finally:
            with self._cond:
                self._collecting.discard(job_id)

    def _remove(self, ref: str) -> None:
        self.runtime.remove(ref, owner=self.owner)

    def container_name(self, job_id: int) -> str:
        """``<prefix>-<owner>-<job-id>``: unique per server, even with one prefix."""
        return f"{self.instance}-{self.owner[:8]}-{job_id}"

    def _untag(self, job_id: int) -> None:
        """Drop the job's own image tag; a built image stays under its cache tag.

        An array's elements share the tag of its first job: it stays while any
        element still needs the image (a loaded image has no other name).
        """
        try:
            row = self.store.job(job_id)
            spec = row["spec"] or {}
            tagged = row["array_parent"] or job_id
            if not row["image"] or not spec.get("name") or tagged in self._tag_users():
                return
            self.runtime.untag(job_tag(self.owner, row["user"], spec["name"], tagged))
        except Exception:  # noqa: BLE001 - a tag left behind is swept later
            log.warning("job %s: untag failed\n%s", job_id, traceback.format_exc())

    def _tag_users(self) -> set[int]:
        """Ids whose job tag an active job still needs (its own, or its array's)."""
        return {r["array_parent"] or r["id"] for r in self.store.jobs(ACTIVE_STATES)}

    def sweep_tags(self) -> list[str]:
        """Remove this server's job tags whose job is over and has no container."""
        removed = []
        busy = self._tag_users()
        for tag in self.runtime.tags_matching(owner_tag_pattern(self.owner)):
            tail = tag.rpartition(":")[2].rpartition("-")[2]
            if not tail.isdigit() or int(tail) in busy or int(tail) in self._collecting:
                continue
            self.runtime.untag(tag)
            removed.append(tag)
        return removed

    def clean_images(self, now: float) -> list[str]:
        """Remove cached images unused for ``docker.image_keep_days`` and not needed,
        and job tags left behind (``sweep_tags``)."""
        try:
            self.sweep_tags()
        except DopqError as exc:
            log.warning("sweeping image tags failed: %s", exc)
        keep = self.settings.docker.image_keep_days
        if keep <= 0:
            return []
        needed = {r["image"] for r in self.store.jobs(ACTIVE_STATES) if r["image"]}
        removed = []
        for img in self.store.images():
            if img["last_used"] < now - keep * 86400 and img["image_id"] not in needed:
                self.runtime.untag(cache_tag(self.owner, img["context_hash"]))
                self.store.forget_image(img["image_id"])
                removed.append(img["image_id"])
        return removed

    def run_log_path(self, job_id: int) -> Path:
        return self.settings.state_path / "jobs" / str(job_id) / "run.log"

    # -- limits, cancels ----------------------------------------------------------------------
    def _enforce_limits(self, now: float) -> None:
        deadline: float | None = None
        retry_after = self.settings.docker.stop_grace + 5.0
        for job_id, row in list(self._running.items()):
            asked = self._stopping_jobs.get(job_id)
            if asked is not None:
                # A stop that did not take (engine busy, container not yet
                # created when it was asked): ask again.
                if now - asked >= retry_after:
                    self._stop_job(job_id, row)
                else:
                    deadline = asked + retry_after if deadline is None else min(
                        deadline, asked + retry_after)
                continue
            limit = row["time_limit"]
            if not limit or not row["started_at"]:
                continue
            end = row["started_at"] + limit
            if end <= now:
                self.store.update_job(job_id, error=TIMEOUT)
                row["error"] = TIMEOUT
                self._stop_job(job_id, row)
            else:
                deadline = end if deadline is None else min(deadline, end)
        self._next_deadline = deadline

    def cancel(self, job_id: int, by: str) -> JobRow:
        """Cancel a queued or running job (called from API threads)."""
        row = self.store.job(job_id)
        state = JobState(row["state"])
        reason = f"{CANCELLED_PREFIX} by {by}"
        if state in (JobState.RECEIVED, JobState.BUILDING, JobState.QUEUED):
            row = self.store.transition(
                job_id, JobState.CANCELLED, expect=[state], error=reason, detail=reason
            )
            self._workers.submit(self._untag, job_id)
            self.wake()
            return row
        if state == JobState.RUNNING:
            self.store.update_job(job_id, error=reason)
            with self._cond:
                live = self._running.get(job_id)
                if live is not None:
                    live["error"] = reason
            self._stop_job(job_id, row)
            return self.store.job(job_id)
        raise Conflict(f"job {job_id} already ended ({state.value})")

    def stop_for_output(self, job_id: int, reason: str) -> None:
        """Kill a job that wrote more than ``limits.max_output`` (output watcher)."""
        with self._cond:
            live = self._running.get(job_id)
            if live is None or (live.get("error") or "").startswith(CANCELLED_PREFIX):
                return
            live["error"] = reason
        self.store.update_job(job_id, error=reason)
        self._stop_job(job_id, live, grace=0.0)  # no grace: it would keep writing

    def _stop_job(self, job_id: int, row: JobRow, grace: float | None = None) -> None:
        self._stopping_jobs[job_id] = self.clock()
        ref = row.get("container") or self.container_name(job_id)
        self._workers.submit(self._stop_container, ref, grace)

    def _stop_container(self, ref: str, grace: float | None = None) -> None:
        try:
            self.runtime.stop(ref, self.settings.docker.stop_grace if grace is None else grace,
                              owner=self.owner)
        except Exception:  # noqa: BLE001
            log.warning("stopping %s failed\n%s", ref, traceback.format_exc())
        st = self.runtime.status(ref)
        if st is not None and not st.running:
            self.container_exited(st.id)

    # -- usage ----------------------------------------------------------------------------------
    def _charge(self, now: float) -> None:
        rates: dict[str, float] = {}
        frac = self.settings.policy.cpu_fraction
        for row in self._running.values():
            rate = float(row["num_gpus"]) if row["num_gpus"] else frac
            rates[row["user"]] = rates.get(row["user"], 0.0) + rate
        self.ledger.advance(now, rates)
        if now - self._last_usage_save >= USAGE_SAVE_EVERY:
            self._save_usage(now)

    def _save_usage(self, now: float) -> None:
        self.store.save_usage(self.ledger.to_rows(), replace=True)
        self._last_usage_save = now

    def reset_usage(self, user: str | None) -> None:
        with self._cond:
            self.ledger.reset(user)
            self._save_usage(self.clock())
        self.wake()

    # -- scheduling ---------------------------------------------------------------------------
    def _refresh_queued(self, full: bool = False) -> None:
        """Bring the in-memory queue up to date from the store's events.

        Every state change and edit writes an event row, so only the jobs with
        new events are read again; a full read happens at start and every
        ``FULL_REFRESH_EVERY`` seconds as a safety net.
        """
        now = self.clock()
        if full or now - self._last_full_refresh >= FULL_REFRESH_EVERY:
            mark = self.store.last_event_id()
            rows = self.store.jobs([JobState.QUEUED], light=True)
            self._queued = {r["id"]: queued_job(r) for r in rows}
            self._event_mark = mark
            self._last_full_refresh = now
            return
        self._event_mark, changed = self.store.changed_since(self._event_mark)
        for r in changed:
            if r["state"] == JobState.QUEUED.value:
                self._queued[r["id"]] = queued_job(r)
            else:
                self._queued.pop(r["id"], None)

    def cluster_state(self, now: float) -> policy_mod.ClusterState:
        running = [running_job(r) for r in self._running.values()]
        deps: set[int] = set()
        for q in self._queued.values():
            deps.update(q.after)
            deps.update(q.after_any)
        history: list[str] = []
        if self.settings.policy.policy == "recency":
            rows = self.store.read(
                "SELECT user FROM jobs WHERE state IN ('succeeded','failed','cancelled')"
                " AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT 1000"
            )
            history = [r["user"] for r in rows]
        self.pool.set_external(self._external - set(self.pool.held()))
        usage = self.ledger.snapshot(now)
        return policy_mod.ClusterState(
            queued=list(self._queued.values()), running=running, free_gpus=self.pool.free(),
            usage=usage, finished_states=self.store.final_states(deps), history=history,
            total_gpus=len(self.pool.total),
        )

    def _schedule(self, now: float) -> None:
        cfg = policy_config(self.settings, self.shares)
        state = self.cluster_state(now)
        decision = policy_mod.decide(state, now, cfg)
        with self.decision_lock:
            self.last_decision = decision
            self.decision_seq += 1
        self._policy_wakeup = decision.next_wakeup
        for job_id, reason in decision.fail:
            try:
                self.store.transition(
                    job_id, JobState.FAILED, expect=[JobState.QUEUED], error=reason, detail=reason
                )
                self._workers.submit(self._untag, job_id)
            except DopqError:
                pass
            self._queued.pop(job_id, None)
        for job_id, gpus in decision.starts:
            self._start(job_id, list(gpus))

    def _start(self, job_id: int, gpus: list[int]) -> bool:
        name = self.container_name(job_id)
        now = self.clock()
        try:
            self.pool.acquire(job_id, gpus)
        except Conflict as exc:
            log.error("job %s: %s", job_id, exc)
            return False
        try:
            row = self.store.transition(
                job_id, JobState.RUNNING, expect=[JobState.QUEUED], unless_held=True,
                gpus=gpus, container=None,
                started_at=now, detail="gpus " + (",".join(map(str, gpus)) or "none"),
            )
        except DopqError:
            self.pool.release(job_id)
            self._queued.pop(job_id, None)
            return False
        self._queued.pop(job_id, None)
        self._running[job_id] = row
        self.run_log_path(job_id).unlink(missing_ok=True)  # from a run cut off earlier
        try:
            cid = self.runtime.run(self.container_spec(row, gpus))
        except EngineUnavailable:
            self._requeue(row, "engine unavailable")
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it was, this job failed to start
            text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            error = f"start failed: {text}"
            self.store.transition(
                job_id, JobState.FAILED, expect=[JobState.RUNNING], error=error, detail=error
            )
            self._release(job_id)
            self.runtime.remove(name, owner=self.owner)
            self._workers.submit(self._untag, job_id)
            return True
        # Only now is there a container to look for after a crash: a running
        # job without one was cut off before its start and is queued again.
        self.store.update_job(job_id, container=name)
        row["container"] = name
        log.debug("job %s started as %s", job_id, cid[:12])
        # A cancel that came while the container was being created found
        # nothing to stop; it left its mark in the store, so stop it now.
        marker = self.store.job(job_id)["error"] or ""
        if marker.startswith(CANCELLED_PREFIX):
            row["error"] = marker
            self._stop_job(job_id, row)
        return True

    def container_spec(self, row: JobRow, gpus: list[int]) -> ContainerSpec:
        s = self.settings
        spec: dict[str, Any] = row["spec"] or {}
        user = row["user"]
        outdir = self.outputs.prepare(user, row["id"])  # the user's, 0700, on the nosuid mount
        binds = {str(outdir): {"bind": "/outdir", "mode": "rw"}}
        for m in s.mounts:
            binds[m.source] = {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
        env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
        run_params: dict[str, Any] = spec.get("run_params") or {}
        env.update({str(k): str(v) for k, v in (run_params.get("environment") or {}).items()})
        env["DOPQ_JOB_ID"] = str(row["id"])
        env["DOPQ_GPUS"] = ",".join(str(g) for g in gpus)
        env["DOPQ_USER"] = user
        if row["array_index"] is not None:
            env["DOPQ_ARRAY_INDEX"] = str(row["array_index"])
            env["DOPQ_ARRAY_JOB_ID"] = str(row["array_parent"])
        memory = spec.get("memory") or s.bytes_of("limits.default_memory")
        cpus = spec.get("cpus") or s.limits.default_cpus
        shm = spec.get("shm_size") or s.bytes_of("limits.default_shm")
        return ContainerSpec(
            name=self.container_name(row["id"]),
            image=row["image"],
            labels={**{str(k): str(v) for k, v in (run_params.get("labels") or {}).items()},
                    LABEL_JOB: str(row["id"]), LABEL_INSTANCE: self.instance, LABEL_USER: user,
                    LABEL_OWNER: self.owner},
            env=env,
            command=spec.get("command") or run_params.get("command"),
            entrypoint=run_params.get("entrypoint"),
            working_dir=run_params.get("working_dir"),
            user=run_params.get("user"),
            mem_limit=int(memory),
            nano_cpus=int(float(cpus) * 1e9),
            shm_size=int(shm),
            pids_limit=s.docker.pids_limit,
            network=s.docker.network,
            binds=binds,
            gpus=gpus,
            gpu_mode=self.gpu_mode,
            cap_add=list(s.docker.cap_add),
            read_only=s.docker.read_only_rootfs,
            log_max_bytes=s.bytes_of("docker.log_max_bytes"),
            tty=bool(run_params.get("tty", False)),
            stop_signal=run_params.get("stop_signal"),
            ulimits=list(run_params.get("ulimits") or []),
        )


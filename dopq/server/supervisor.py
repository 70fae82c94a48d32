"""The server's workers and their life cycle.

``Supervisor`` starts and stops the Provider process and the priority-queue
thread, and restarts either when it dies. Beside them run small threads,
each relaying one outside source to the queue thread: the Provider's
notices, Docker's event stream (container exits; the engine going away and
coming back), the sampler (container stats, hourly image cleaning, and every
``[gpus] sample_interval`` the GPUs: each job's GPU memory and utilisation,
processes outside DoPQ, the GPU watch's warnings and stops; see
``dopq.server.gpusampler``) and the output watcher (a job writing past its
limit is stopped). The shared views are rebuilt on a thread of their own.
"""

from __future__ import annotations

import logging
import queue as queue_mod
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from dopq.core.errors import DopqError, EngineUnavailable
from dopq.core.gpuwatch import Act, WatchConfig
from dopq.core.jobs import JobState
from dopq.core.settings import Settings
from dopq.server import gpus as gpus_mod
from dopq.server import outputs
from dopq.server.auth import Users
from dopq.server.backends import Backend
from dopq.server.gpusampler import GpuJob, GpuSampler, ProcFs
from dopq.server.notify import Notifier
from dopq.server.provider import start_process
from dopq.server.queue import PriorityQueueThread
from dopq.server.runtime import ContainerRuntime, cpu_percent
from dopq.server.store import Store

log = logging.getLogger("dopq.server.supervisor")

SAMPLE_EVERY = 2.0  # seconds between container samples (GPUs: [gpus] sample_interval)


class Supervisor:
    """Starts, watches and stops the Provider process, the queue thread and the relays."""

    def __init__(self, settings: Settings, store: Store, users: Users,
                 runtime: ContainerRuntime) -> None:
        self.settings = settings
        self.store = store
        self.users = users
        self.runtime = runtime  # this host's engine: builds and images
        self.backend = Backend(settings, runtime, store.owner_id())
        self.jobs = self.backend.jobs  # what runs the jobs' containers (backends)
        # On a cluster the nodes' GPUs are Slurm's to sample; this host's stand-ins only
        # say how many one job may ask for (the most any node has).
        self.gpu_backend = gpus_mod.open_backend(
            "virtual" if self.backend.cluster else settings.gpus.backend,
            self.backend.largest_node() if self.backend.cluster else settings.gpus.virtual_count,
            settings.bytes_of("gpus.virtual_memory"))
        self.gpu_info = self.gpu_backend.devices()
        self.gpu_sampler = GpuSampler(self.gpu_info, WatchConfig.of(settings), ProcFs())
        self._gpu_report: dict[str, Any] = {}
        self._last_gpu_sample = -float("inf")
        self._last_stats = -float("inf")
        self.gpu_mode = self._gpu_mode()
        self.queue = self._new_queue()
        self.halt = threading.Event()
        self._threads: list[threading.Thread] = []
        self._provider: Any = None
        self._commands: Any = None
        self._notices: Any = None
        self.provider_restarts = 0
        self.queue_restarts = 0
        self.stats: dict[int, dict[str, float]] = {}  # job id -> cpu, memory...
        self.stats_version = 0  # moves when ``stats`` changed (the views' key)
        self.gpu_samples: dict[int, dict[str, Any]] = {}
        self._raw_stats: dict[int, dict[str, float]] = {}
        self._last_clean_hour = 0
        self.notifier = Notifier(settings, store)  # dopq notify, [notify] urls
        self._foreign_seen: set[int] = set()  # GPUs with a foreign process, told once

    def _gpu_mode(self) -> str:
        mode = self.settings.docker.gpu_mode
        if mode != "auto":
            return mode
        try:
            nvidia = self.runtime.has_nvidia_runtime()
        except DopqError:
            nvidia = False
        return "nvidia" if nvidia and self.gpu_backend.kind == "nvml" else "env"

    def _new_queue(self) -> PriorityQueueThread:
        q = PriorityQueueThread(
            self.settings, self.store, self.jobs,
            [] if self.backend.cluster else gpus_mod.as_devices(self.gpu_info),
            self.gpu_mode, backend=self.backend,
        )
        q.shares = self.users.shares()
        return q

    @property
    def provider_alive(self) -> bool:
        return self._provider is not None and self._provider.is_alive()

    # -- start and stop -----------------------------------------------------------------
    def start(self, refresh_views: Callable[[], None], sweep: Callable[[float], None],
              view_every: float) -> None:
        """Start every worker. ``sweep(now)`` runs with each sample (stale uploads);
        ``refresh_views`` every ``view_every`` seconds."""
        self.queue.start()
        self._start_provider()
        self.notifier.start()
        watcher = outputs.OutputWatcher(
            outputs.OutputFolders(self.settings, self.store.owner_id()),
            self.settings.bytes_of("limits.max_output"),
            self.settings.limits.max_output,
            lambda: [(r["id"], r["user"]) for r in self.store.jobs([JobState.RUNNING], light=True)],
            lambda job_id, reason: self.queue.stop_for_output(job_id, reason),
            self._job_pid, halt=self.halt,
        )
        watcher.start()
        self._threads.append(watcher)
        for target, name in (
            (self._relay_notices, "dopq-notices"),
            (self._watch_engine, "dopq-events"),
            (lambda: self._sample(sweep), "dopq-sampler"),
            (self._supervise, "dopq-supervisor"),
            (lambda: self._every(view_every, refresh_views, "building the views"), "dopq-views"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _start_provider(self) -> None:
        self._provider, self._commands, self._notices = start_process(
            self.settings, len(self.gpu_info), max((g.memory_total for g in self.gpu_info),
                                                   default=0)
        )

    def send(self, cmd: tuple[Any, ...]) -> None:
        """A command for the Provider (``("job", id)``); lost if it is down, which is
        fine: a restarted Provider picks up every received job itself."""
        try:
            self._commands.put(cmd)
        except (OSError, ValueError, AttributeError):
            pass

    def stop(self, stop_running: bool = False) -> None:
        """Stop the Provider, the queue and the relays; running containers stay unless asked."""
        self.halt.set()
        self.notifier.stop()
        if stop_running:
            for row in self.store.jobs([JobState.RUNNING]):
                try:
                    self.queue.cancel(row["id"], "shutdown")
                except DopqError:
                    pass
        self.queue.paused = True
        if self._commands is not None:
            try:
                self._commands.put(("stop",))
            except (OSError, ValueError):
                pass
        if self._provider is not None:
            self._provider.join(timeout=15)
            if self._provider.is_alive():
                self._provider.terminate()
                self._provider.join(timeout=5)
        if stop_running:
            deadline = time.time() + self.settings.docker.stop_grace + 10
            while time.time() < deadline and self.store.jobs([JobState.RUNNING]):
                self.queue.wake()
                self.halt.wait(0.2)
        self.queue.stop()
        self.queue.join(timeout=15)
        for t in self._threads:
            t.join(timeout=3)
        if self.notifier.is_alive():  # it reads the store, which closes next
            self.notifier.join(timeout=3)

    def close(self) -> None:
        self.gpu_backend.close()

    # -- the relays -------------------------------------------------------------------------
    def _job_pid(self, job_id: int) -> int | None:
        """The first process of a running job's container (output watcher); none on
        a cluster, whose processes are on the nodes."""
        if self.backend.cluster:
            return None
        try:
            row = self.store.job(job_id)
            st = self.jobs.status(row["container"]) if row["container"] else None
        except DopqError:
            return None
        return st.pids[0] if st is not None and st.pids else None

    def _relay_notices(self) -> None:
        while not self.halt.is_set():
            notices = self._notices
            try:
                notices.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            except (EOFError, OSError, ValueError):
                self.halt.wait(0.5)
                continue
            self.queue.wake()

    def _watch_engine(self) -> None:
        """Relay container exits from Docker's event stream; reconnect when it drops."""
        while not self.halt.is_set():
            try:
                for ev in self.jobs.events(self.store.owner_id(), self.halt):
                    cid = ev.get("id") or ev.get("Actor", {}).get("ID")
                    if ev.get("Action") == "die" and cid:
                        self.queue.container_exited(cid)
            except EngineUnavailable:
                if self.queue.engine_up:  # told once per outage
                    self.notifier.server_event("engine-down", "the Docker engine does not answer")
                self.queue.engine_lost()
                self.halt.wait(1.0)
            except Exception:  # noqa: BLE001
                log.warning("event stream failed\n%s", traceback.format_exc())
                self.halt.wait(1.0)
            else:
                if not self.queue.engine_up:
                    self.queue.wake()

    def _every(self, seconds: float, work: Callable[[], None], what: str) -> None:
        while not self.halt.wait(seconds):
            try:
                work()
            except Exception:  # noqa: BLE001 - the thread must live on
                log.warning("%s failed\n%s", what, traceback.format_exc())

    def _sample(self, sweep: Callable[[float], None]) -> None:
        """The GPUs (every ``sample_interval``), container stats (every 2 s), stale uploads."""
        every = min(SAMPLE_EVERY, self.settings.gpus.sample_interval)
        while not self.halt.wait(every):
            try:
                self.sample_once()
                sweep(time.time())
            except Exception:  # noqa: BLE001
                log.debug("sampling failed\n%s", traceback.format_exc())

    def sample_once(self, now: float | None = None) -> None:
        """The GPUs when ``sample_interval`` has passed, the rest when ``SAMPLE_EVERY`` has."""
        now = time.time() if now is None else now
        gpus_due = now - self._last_gpu_sample >= self.settings.gpus.sample_interval
        rest_due = now - self._last_stats >= SAMPLE_EVERY
        if not (gpus_due or rest_due):
            return
        running = self.store.jobs([JobState.RUNNING])
        # On a cluster the nodes' GPUs are not this host's to sample (and each job's
        # status would be a call to Slurm): nothing to watch here.
        if gpus_due:
            self._last_gpu_sample = now
            if not self.backend.cluster:
                self.sample_gpus(running, now)
        if not rest_due:
            return
        self._last_stats = now
        hour = int(now // 3600)
        if hour != self._last_clean_hour:
            self._last_clean_hour = hour
            self.queue.clean_images(now)
        stats = {}
        for row in running:
            if row["container"]:
                s = self.jobs.stats(row["container"])
                if s is not None:
                    s["cpu"] = cpu_percent(self._raw_stats.get(row["id"]), s) or 0.0
                    stats[row["id"]] = s
        self._raw_stats = stats
        if stats != self.stats:
            self.stats = stats
            self.stats_version += 1

    def sample_gpus(self, running: list[Any], now: float) -> None:
        """Map the GPUs' processes to jobs; tell the queue what is used from outside
        DoPQ; carry out the GPU watch's warnings, idle marks and stops."""
        samples = self.gpu_backend.sample()
        jobs = []
        for row in running:
            st = self.jobs.status(row["container"]) if row["container"] else None
            jobs.append(GpuJob(
                row["id"], row["user"], tuple(row["gpus"]), int(row.get("gpu_memory") or 0),
                st.id if st is not None else "", tuple(st.pids) if st is not None else ()))
        self.gpu_samples = {
            s.index: {"utilization": s.utilization, "memory_used": s.memory_used,
                      "memory_total": s.memory_total}
            for s in samples
        }
        found = self.gpu_sampler.observe(samples, jobs, now, self._foreign_containers())
        self.queue.set_foreign(found.foreign)
        for index in sorted(set(found.foreign) - self._foreign_seen):
            self.notifier.server_event("foreign-gpu", f"GPU {index}: a process outside DoPQ"
                                       " uses it (see the server log)")
        self._foreign_seen = set(found.foreign)
        for job_id, mean in found.ended.items():  # dopq report's efficiency
            self.store.update_job(job_id, gpu_utilisation=mean)
        report = {"jobs": found.jobs, "devices": found.devices}
        if report != self._gpu_report:
            self._gpu_report = report
            self.stats_version += 1
        for action in found.actions:
            try:
                if action.kind == Act.STOP:
                    log.warning("job %s: stopping: %s", action.job_id, action.reason)
                    self.queue.stop_for_gpu(action.job_id, action.reason)
                else:
                    log.warning("job %s: %s", action.job_id, action.reason)
                    self.store.note_event(action.job_id, action.reason)
            except DopqError:
                log.debug("job %s: %s not carried out\n%s", action.job_id, action.kind,
                          traceback.format_exc())

    def _foreign_containers(self) -> set[int]:
        """Real GPUs named by containers DoPQ did not start (virtual GPUs exist only
        inside this server, so nobody else can hold them)."""
        busy: set[int] = set()
        if self.gpu_backend.kind != "nvml":
            return busy
        uuids = gpus_mod.uuid_index(self.gpu_info)
        whole = {g.index for g in self.gpu_info} | set(gpus_mod.mig_children(self.gpu_info))
        try:
            for env, ids in self.runtime.foreign_gpu_envs(self.store.owner_id()):
                seen = gpus_mod.visible_devices_in_env(env, uuids)
                busy |= whole if seen is None else seen
                for ref in ids:
                    got = gpus_mod.parse_visible(ref, uuids)
                    busy |= whole if got is None else got
        except DopqError:
            pass
        return busy

    def gpu_report(self) -> dict[str, Any]:
        """The last GPU sample for the views: ``{"jobs": {job id: {"gpu_memory_used",
        "gpu_utilisation", "idle_since"}}, "devices": [{"index", "uuid", "memory",
        "used", "holders", "foreign"}]}`` (empty before the first sample)."""
        return self._gpu_report

    def _supervise(self) -> None:
        """Restart the Provider process or the queue thread if either died."""
        while not self.halt.wait(1.0):
            if self._provider is not None and not self._provider.is_alive():
                log.error("provider died (exit %s); restarting", self._provider.exitcode)
                self.provider_restarts += 1
                self.notifier.server_event("provider-restarted", "the provider process died"
                                           f" (exit {self._provider.exitcode}); restarted")
                self._start_provider()
            if not self.queue.is_alive() and not self.halt.is_set():
                log.error("queue thread died; restarting")
                self.queue_restarts += 1
                self.queue = self._new_queue()
                self.queue.start()

"""Prometheus metrics: ``[metrics] listen = "127.0.0.1:9400"`` serves ``/metrics``.

Two kinds of numbers, in a registry of this server's own (not the library's
global one, so a process can hold several servers, as the tests do):

- gauges read at scrape time from what the server already keeps: the shared
  views' newest version (jobs per state, per user, GPU holders, usage and
  fair share) and the queue thread's ``engine_up``. A scrape never takes the
  queue's lock and never builds a view; before the first view is built it
  shows only ``dopq_engine_up``. ``gauges`` is pure: a version's rest in,
  metric families out.
- counters and histograms moved by hooks (``job_started``, ``job_finished``,
  ``build_done``, ``api_call``). Builds run in the Provider process and jobs
  end on the queue thread, so rather than reach into either, ``follow`` reads
  the store's event log from where it last stopped (every state change writes
  one row there, from any process) and calls the hooks for each change it
  sees. It runs every ``FOLLOW_EVERY`` on a thread of its own, reading only the
  new rows: not in the scrape, whose HTTP server starts a thread per request
  (and the store keeps a reader connection per thread that reads).

The endpoint has no sign-in: what it shows is what every signed-in user sees
in ``dopq users`` and ``dopq status`` (user names, counts, GPUs), never job
names, specs or images. Keep it on loopback or a trusted network.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dopq.core.errors import ConfigError
from dopq.core.jobs import FINAL_STATES, JobState
from dopq.core.settings import Settings
from dopq.server.eventlog import events_after

log = logging.getLogger("dopq.server.metrics")

WAIT_BUCKETS = (1, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600,
                24 * 3600, 3 * 24 * 3600, float("inf"))
BUILD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
API_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))
TAIL_CHUNK = 5000  # event rows read per query while catching up
FOLLOW_EVERY = 1.0  # seconds between reads of the event log
FINAL = {s.value for s in FINAL_STATES}
ALL_STATES = [s.value for s in JobState]


def gauges(rest: Mapping[str, Any] | None, engine_up: bool) -> list[Metric]:
    """The gauges from a views version's ``rest`` (``running``, ``users``, ``system``).

    ``dopq_gpu_held`` is 1 for a job holding a whole device, and the share it
    declared (bytes / the device's memory) when it shares one; one user's jobs
    on one device add up.
    """
    up = GaugeMetricFamily("dopq_engine_up", "1 when the Docker engine answers")
    up.add_metric([], 1.0 if engine_up else 0.0)
    if rest is None:
        return [up]
    system = rest.get("system") or {}
    jobs = GaugeMetricFamily("dopq_jobs", "Jobs in each state", labels=["state"])
    counts = system.get("counts") or {}
    for state in ALL_STATES:
        jobs.add_metric([state], float(counts.get(state, 0)))
    queued = GaugeMetricFamily("dopq_queued_jobs", "Waiting jobs (received, building, queued)",
                               labels=["user"])
    running = GaugeMetricFamily("dopq_running_jobs", "Running jobs", labels=["user"])
    usage = GaugeMetricFamily("dopq_user_usage_gpu_hours",
                              "Decayed GPU-hours the fair share charges", labels=["user"])
    fair = GaugeMetricFamily("dopq_user_fairshare", "Fair-share factor, 2^(-usage/share)",
                             labels=["user"])
    for u in rest.get("users") or ():
        name = str(u.get("user"))
        queued.add_metric([name], float(u.get("queued") or 0))
        running.add_metric([name], float(u.get("running") or 0))
        usage.add_metric([name], float(u.get("gpu_hours") or 0.0))
        fair.add_metric([name], float(u.get("fairshare") or 0.0))
    held = GaugeMetricFamily("dopq_gpu_held", "Part of the GPU a user's jobs hold (1: whole)",
                             labels=["gpu", "user"])
    util = GaugeMetricFamily("dopq_gpu_utilization", "GPU utilisation, percent (NVML)",
                             labels=["gpu"])
    mem = GaugeMetricFamily("dopq_gpu_memory_used_bytes", "GPU memory in use, bytes (NVML)",
                            labels=["gpu"])
    for g in system.get("gpus") or ():
        gpu = str(g.get("index"))
        total = g.get("memory") or g.get("memory_total") or 0
        parts: dict[str, float] = {}
        for h in g.get("holders") or ():
            declared = int(h.get("declared") or 0)
            part = min(1.0, declared / total) if declared and total else 1.0
            parts[str(h.get("user"))] = parts.get(str(h.get("user")), 0.0) + part
        for user, part in sorted(parts.items()):
            held.add_metric([gpu, user], round(min(part, 1.0), 6))
        if isinstance(g.get("utilization"), int | float):
            util.add_metric([gpu], float(g["utilization"]))
        if isinstance(g.get("memory_used"), int | float):
            mem.add_metric([gpu], float(g["memory_used"]))
    return [up, jobs, queued, running, usage, fair, held, util, mem]


class _Gauges(Collector):
    """Reads the newest views at scrape time (registered in the server's registry)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        # The newest version already built (never ``current()``, which may build one).
        version = m.views.cache._newest() if m.views is not None else None
        yield from gauges(version.rest if version is not None else None, m.engine_up())

    def describe(self) -> Iterable[Metric]:
        return []  # names are fixed here; no collect at registration


class Metrics:
    """The server's metrics: its registry, the hooks, the event-log follower, the endpoint."""

    def __init__(self, store: Any, views: Any = None, workers: Any = None) -> None:
        self.store = store
        self.views = views
        self.workers = workers
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.finished = Counter("dopq_jobs_finished", "Jobs ended, by user and final state",
                                ["user", "state"], registry=r)
        self.wait = Histogram("dopq_queue_wait_seconds", "Seconds from submission to start",
                              buckets=WAIT_BUCKETS, registry=r)
        self.build = Histogram("dopq_build_seconds", "Seconds an image build took",
                               buckets=BUILD_BUCKETS, registry=r)
        self.api = Histogram("dopq_api_request_seconds", "Seconds an API call took",
                             ["method"], buckets=API_BUCKETS, registry=r)
        r.register(_Gauges(self))
        self._tail = threading.Lock()
        self._mark = store.last_event_id() if store is not None else 0
        # Jobs not ended as of the mark: (state, waiting since); only their changes count.
        self._jobs: dict[int, tuple[str, float]] = {}
        self._build_began: dict[int, float] = {}
        if store is not None:
            for row in store.read("SELECT id, state, submitted_at FROM jobs WHERE state NOT IN"
                                  f" ({', '.join('?' * len(FINAL))})", sorted(FINAL)):
                self._jobs[int(row[0])] = (str(row[1]), float(row[2]))
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._follower: threading.Thread | None = None

    # -- hooks ------------------------------------------------------------------------
    def job_started(self, row: Mapping[str, Any]) -> None:
        """A job started: its wait (``started_at - submitted_at``; after a preemption,
        from when it was queued again)."""
        self.wait.observe(max(0.0, float(row["started_at"]) - float(row["submitted_at"])))

    def job_finished(self, row: Mapping[str, Any]) -> None:
        self.finished.labels(str(row["user"]), str(row["state"])).inc()

    def build_done(self, seconds: float) -> None:
        self.build.observe(max(0.0, float(seconds)))

    def api_call(self, method: str, seconds: float) -> None:
        self.api.labels(method).observe(max(0.0, float(seconds)))

    def engine_up(self) -> bool:
        queue = getattr(self.workers, "queue", None)
        return bool(queue.engine_up) if queue is not None else False

    # -- the event log ------------------------------------------------------------------
    def follow(self) -> int:
        """Call the hooks for the state changes logged since the last call; returns how many
        event rows were read."""
        if self.store is None:
            return 0
        seen = 0
        with self._tail:
            while True:
                rows = events_after(self.store, self._mark, TAIL_CHUNK)
                for r in rows:
                    self._event(int(r["job_id"]), float(r["at"]), str(r["state"]), r["user"],
                                r["submitted_at"])
                seen += len(rows)
                if rows:
                    self._mark = int(rows[-1]["id"])
                if len(rows) < TAIL_CHUNK:
                    return seen

    def _event(self, job: int, at: float, state: str, user: str | None,
               submitted: float | None) -> None:
        before = self._jobs.get(job)
        if before is None:
            if state in FINAL or user is None:
                return  # ended before we started following (a note), or deleted since
            before = ("", float(submitted if submitted is not None else at))  # new
        was, since = before
        if state == was:
            return  # a note or an edit, not a change
        if state == JobState.RUNNING.value:
            self.job_started({"started_at": at, "submitted_at": since})
        elif was == JobState.BUILDING.value and state == JobState.QUEUED.value:
            self.build_done(at - self._build_began.pop(job, at))
        if state == JobState.BUILDING.value:
            self._build_began[job] = at
        if state in FINAL:
            self._jobs.pop(job, None)
            self._build_began.pop(job, None)
            if user is not None:
                self.job_finished({"user": user, "state": state})
            return
        # Queued again after running (preempted, engine lost): its next wait starts now.
        self._jobs[job] = (state, at if was == JobState.RUNNING.value else since)

    # -- the endpoint -------------------------------------------------------------------
    def start(self, settings: Settings) -> None:
        """Serve ``/metrics`` on ``[metrics] listen``; nothing when it is empty."""
        address = settings.metrics_address()
        if address is None:
            return
        host, port = address
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError("metrics.listen", f"cannot listen on {host}:{port}: "
                              f"{exc.strerror or exc}") from None
        self._halt.clear()
        self._follower = threading.Thread(target=self._follow_loop, name="dopq-metrics",
                                          daemon=True)
        self._follower.start()

    def _follow_loop(self) -> None:
        while not self._halt.wait(FOLLOW_EVERY):
            try:
                self.follow()
            except Exception:  # noqa: BLE001 - the thread must live on
                log.warning("reading the event log for metrics failed\n%s",
                            traceback.format_exc())

    @property
    def port(self) -> int | None:
        return int(self._http.server_port) if self._http is not None else None

    def stop(self) -> None:
        self._halt.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
            self._follower = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def for_platform(platform: Any) -> Metrics | None:
    """The platform's metrics when ``[metrics] listen`` is set; None when off."""
    if platform.settings.metrics_address() is None:
        return None
    return Metrics(platform.store, platform.views, platform.workers)

"""DataPlatform: the layer between the Controller and the server's workers.

It owns the store, the Docker runtime, the GPU backend, the priority-queue
thread and the Provider process, supervises them (a dead Provider or queue
thread is restarted), and offers the Controller plain-data views and commands.
Authorisation is decided here (who may do what); the Controller only finds out
who is calling.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import queue as queue_mod
import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dopq import __version__
from dopq.core.errors import (
    Conflict,
    DopqError,
    EngineUnavailable,
    Forbidden,
    JobRejected,
    LimitExceeded,
    NotFound,
)
from dopq.core.fairshare import fair_shares
from dopq.core.jobs import FINAL_STATES, JobState
from dopq.core.settings import Settings
from dopq.core.spec import check_overrides
from dopq.core.text import safe_name
from dopq.server import gpus as gpus_mod
from dopq.server import hostfs, outputs
from dopq.server.auth import Principal, Users, check_username
from dopq.server.estimates import StartEstimates
from dopq.server.fetch import OutputFetches
from dopq.server.intake import Intake
from dopq.server.limits import QueueSlots, submission_slots
from dopq.server.provider import job_dir, start_process
from dopq.server.queue import PriorityQueueThread
from dopq.server.runtime import ContainerRuntime, cpu_percent
from dopq.server.store import JobRow, Store
from dopq.server.views import Version, ViewCache, finished_delta, full_queue, queue_delta

log = logging.getLogger("dopq.server.platform")

MAX_CHUNK = 4 * 2**20
VIEW_TTL = 0.5  # seconds a shared view may be old (writes through the API show at once)
HISTORY_CACHED = 1000  # finished jobs kept in the shared views
EDIT_ACTIONS = ("delete", "priority", "nice", "hold", "release", "top", "time_limit")
ADMIN_HOLD = 2  # jobs.held: an admin held another user's job; only an admin releases it


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def job_view(row: JobRow, now: float) -> dict[str, Any]:
    """A job as the API shows it: plain types, ISO 8601 UTC times."""
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": row["id"],
        "name": row["name"],
        "user": row["user"],
        "state": row["state"],
        "num_gpus": row["num_gpus"],
        "gpus": list(row["gpus"]),
        "exit_code": row["exit_code"],
        "error": row["error"] if row["state"] in ("failed", "cancelled") else None,
        "submitted_at": iso(row["submitted_at"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "image": None,  # image ids only in ``job`` for the owner and admins: an id reads the code
        "container": row["container"],
        "time_limit": row["time_limit"],
        "priority": row["priority"],
        "nice": row["nice"],
        "held": row["held"],
        "array_index": row["array_index"],
        "array_parent": row["array_parent"],
        "after": list(row["after"]),
        "after_any": list(row["after_any"]),
        "origin": row["origin"],
        "wait_s": round(((started or finished or now) - row["submitted_at"]), 3)
        if row["state"] != "cancelled" or started else None,
        "run_s": round((finished or now) - started, 3) if started else None,
    }


@dataclass
class Upload:
    id: str
    user: str
    size: int
    overrides: dict[str, Any]
    path: Path
    received: int = 0
    last: float = field(default_factory=time.time)
    by: str = ""
    slots: int = 1  # queue slots reserved (an array: one per element)
    source_name: str = ""  # the zip's or folder's name: the job's name until its config names it


class DataPlatform:
    """Everything the Controller can ask of the server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        hostfs.secure_state(settings)  # the server's alone: 0711 / 0700 / 0600
        # Uploads cut off by a stop or crash: their clients got no job id.
        for part in (settings.state_path / "uploads").glob("*.part"):
            part.unlink(missing_ok=True)
        self.store = Store(settings.db_path)
        hostfs.secure_state(settings)  # the database files now exist: 0600
        self.output_mount = hostfs.OutputMount(settings)
        self.users = Users(self.store)
        self.runtime = ContainerRuntime(settings.docker.base_url)
        self.gpu_backend = gpus_mod.open_backend(settings.gpus.backend, settings.gpus.virtual_count)
        self.gpu_info = self.gpu_backend.devices()
        self.gpu_mode = self._gpu_mode()
        self.queue = self._new_queue()
        self.started_at = time.time()
        self._uploads: dict[str, Upload] = {}
        self._uploads_lock = threading.Lock()
        self.slots = QueueSlots(self.store, settings.policy.max_queued_per_user)
        self.fetches = OutputFetches(settings)
        self.fetches.clear()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._provider: Any = None
        self._commands: Any = None
        self._notices: Any = None
        self.provider_restarts = 0
        self.queue_restarts = 0
        self.stats: dict[int, dict[str, float]] = {}
        self.gpu_samples: dict[int, dict[str, Any]] = {}
        self.shutdown_requested = threading.Event()
        self._last_clean_hour = 0
        self.views = ViewCache(self._build_views, self._views_key, ttl=VIEW_TTL)
        self.estimates = StartEstimates(self.store, iso)
        self._write_gen: dict[str, int] = {}
        self._stats_version = 0
        self._raw_stats: dict[int, dict[str, float]] = {}

    # -- life cycle ---------------------------------------------------------------
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
            self.settings, self.store, self.runtime, [g.index for g in self.gpu_info],
            self.gpu_mode,
        )
        q.shares = self.users.shares()
        return q

    def start(self) -> None:
        self.output_mount.mount()  # outputs nosuid,nodev before any job can write there
        self.queue.start()
        self._start_provider()
        watcher = outputs.OutputWatcher(
            outputs.OutputFolders(self.settings), self.settings.bytes_of("limits.max_output"),
            self.settings.limits.max_output,
            lambda: [(r["id"], r["user"]) for r in self.store.jobs([JobState.RUNNING], light=True)],
            lambda job_id, reason: self.queue.stop_for_output(job_id, reason),
            self._job_pid, halt=self._stop,
        )
        watcher.start()
        self._threads.append(watcher)
        for target, name in (
            (self._relay_notices, "dopq-notices"),
            (self._watch_engine, "dopq-events"),
            (self._sample, "dopq-sampler"),
            (self._supervise, "dopq-supervisor"),
            (self._build_views_loop, "dopq-views"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _start_provider(self) -> None:
        self._provider, self._commands, self._notices = start_process(
            self.settings, len(self.gpu_info)
        )

    def stop(self, stop_running: bool = False) -> None:
        """Stop intake and the queue; running containers stay unless asked."""
        self._stop.set()
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
                self._stop.wait(0.2)
        self.queue.stop()
        self.queue.join(timeout=15)
        for t in self._threads:
            t.join(timeout=3)
        if not self.store.jobs([JobState.RUNNING], light=True):
            self.output_mount.unmount()  # else running jobs keep it (and the next start adopts it)
        self.gpu_backend.close()
        self.runtime.close()
        self.store.close()

    def _job_pid(self, job_id: int) -> int | None:
        """The first process of a running job's container (output watcher)."""
        try:
            row = self.store.job(job_id)
            st = self.runtime.status(row["container"]) if row["container"] else None
        except DopqError:
            return None
        return st.pids[0] if st is not None and st.pids else None

    def _relay_notices(self) -> None:
        while not self._stop.is_set():
            notices = self._notices
            try:
                notices.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            except (EOFError, OSError, ValueError):
                self._stop.wait(0.5)
                continue
            self.queue.wake()

    def _watch_engine(self) -> None:
        """Relay container exits from Docker's event stream; reconnect when it drops."""
        while not self._stop.is_set():
            try:
                for ev in self.runtime.events(self.store.owner_id(), self._stop):
                    cid = ev.get("id") or ev.get("Actor", {}).get("ID")
                    if ev.get("Action") == "die" and cid:
                        self.queue.container_exited(cid)
            except EngineUnavailable:
                self.queue.engine_lost()
                self._stop.wait(1.0)
            except Exception:  # noqa: BLE001
                log.warning("event stream failed\n%s", traceback.format_exc())
                self._stop.wait(1.0)
            else:
                if not self.queue.engine_up:
                    self.queue.wake()

    def _sample(self) -> None:
        """GPUs used from outside, container stats, stale uploads (every 2 s)."""
        while not self._stop.wait(2.0):
            try:
                self._sample_once()
            except Exception:  # noqa: BLE001
                log.debug("sampling failed\n%s", traceback.format_exc())

    def _sample_once(self) -> None:
        busy: set[int] = set()
        samples = self.gpu_backend.sample()
        our_pids: set[int] = set()
        running = self.store.jobs([JobState.RUNNING])
        for row in running:
            if row["container"]:
                st = self.runtime.status(row["container"])
                if st is not None:
                    our_pids.update(st.pids)
        if self.gpu_backend.kind == "nvml":
            busy |= gpus_mod.external_busy(samples, our_pids)
        self.gpu_samples = {
            s.index: {"utilization": s.utilization, "memory_used": s.memory_used,
                      "memory_total": s.memory_total}
            for s in samples
        }
        uuids = gpus_mod.uuid_index(self.gpu_info)
        all_gpus = {g.index for g in self.gpu_info}
        if self.gpu_backend.kind == "nvml":
            # Containers DoPQ did not start that name real GPUs (virtual GPUs
            # exist only inside this server, so nobody else can hold them).
            try:
                for env, ids in self.runtime.foreign_gpu_envs(self.store.owner_id()):
                    seen = gpus_mod.visible_devices_in_env(env, uuids)
                    busy |= all_gpus if seen is None else seen
                    for ref in ids:
                        got = gpus_mod.parse_visible(ref, uuids)
                        busy |= all_gpus if got is None else got
            except DopqError:
                pass
        self.queue.set_external(busy & all_gpus)
        hour = int(time.time() // 3600)
        if hour != self._last_clean_hour:
            self._last_clean_hour = hour
            self.queue.clean_images(time.time())
        stats = {}
        for row in running:
            if row["container"]:
                s = self.runtime.stats(row["container"])
                if s is not None:
                    s["cpu"] = cpu_percent(self._raw_stats.get(row["id"]), s) or 0.0
                    stats[row["id"]] = s
        self._raw_stats = stats
        if stats != self.stats:
            self.stats = stats
            self._stats_version += 1
        now = time.time()
        with self._uploads_lock:
            for up in list(self._uploads.values()):
                if now - up.last > self.settings.intake.upload_timeout:
                    self._discard_upload(up)

    def _build_views_loop(self) -> None:
        """Keep the shared views at most ``VIEW_TTL`` old, off the API threads."""
        while not self._stop.wait(VIEW_TTL):
            try:
                self.views.refresh()
            except Exception:  # noqa: BLE001
                log.warning("building the views failed\n%s", traceback.format_exc())

    def _supervise(self) -> None:
        """Restart the Provider process or the queue thread if either died."""
        while not self._stop.wait(1.0):
            if self._provider is not None and not self._provider.is_alive():
                log.error("provider died (exit %s); restarting", self._provider.exitcode)
                self.provider_restarts += 1
                self._start_provider()
            if not self.queue.is_alive() and not self._stop.is_set():
                log.error("queue thread died; restarting")
                self.queue_restarts += 1
                self.queue = self._new_queue()
                self.queue.start()

    # -- authorisation helpers -------------------------------------------------------
    def _own_or_admin(self, who: Principal, row: JobRow, what: str) -> None:
        if row["user"] != who.name and not who.is_admin:
            raise Forbidden(f"{what} job {row['id']}: it belongs to {row['user']}")

    @staticmethod
    def _admin(who: Principal, what: str) -> None:
        if not who.is_admin:
            raise Forbidden(f"{what} needs the admin role")

    def _audit(self, who: Principal, action: str, detail: str = "") -> None:
        if who.is_admin:
            self.store.audit(who.name, action, detail)

    # -- submission ---------------------------------------------------------------
    def begin_upload(self, who: Principal, size: int, overrides: dict[str, Any],
                     check: dict[str, Any] | None = None) -> str:
        size = int(size)
        limit = self.settings.bytes_of("limits.max_upload")
        if size <= 0:
            raise LimitExceeded("upload is empty")
        if size > limit:
            raise LimitExceeded(
                f"upload of {size} bytes is over the limit of {self.settings.limits.max_upload}"
            )
        user = who.name
        wanted = overrides.pop("user", None)
        if wanted:
            wanted = check_username(wanted)
            if wanted != who.name and not who.is_admin:
                raise Forbidden(f"cannot submit as {wanted}: only as yourself ({who.name})")
            user = wanted
        allowed = self.settings.users.allowed
        if allowed and user not in allowed:
            raise Forbidden(f"user {user} is not allowed to submit on this server")
        source_name = safe_name(str(overrides.pop("source_name", "") or ""), "")[:128]
        self._check_overrides(overrides)
        wanted = submission_slots(overrides)  # every option checked before anything is kept
        gpus = overrides.get("gpus")
        if isinstance(gpus, int) and gpus > len(self.gpu_info):
            raise LimitExceeded(f"asks for {gpus} GPUs, this server has {len(self.gpu_info)}")
        prio = overrides.get("priority")
        if isinstance(prio, int) and prio > 0 and not who.is_admin:
            raise Forbidden("only an admin may submit with a priority above 0")
        self._intake().at_begin(who, user, overrides, check)  # the verdict, before a byte
        uid = uuid.uuid4().hex
        self.slots.reserve(uid, user, wanted)  # the queue limit, uploads in flight counted
        path = self.settings.state_path / "uploads" / f"{uid}.part"
        try:
            path.touch(mode=0o600)
        except OSError as exc:
            self.slots.release(uid)
            raise DopqError(f"cannot store upload: {exc.strerror}") from None
        with self._uploads_lock:
            self._uploads[uid] = Upload(uid, user, size, dict(overrides), path, by=who.name,
                                        slots=wanted, source_name=source_name)
        return uid

    def _intake(self) -> Intake:
        return Intake(self.settings, self.store, self.runtime, len(self.gpu_info))

    def _check_overrides(self, overrides: dict[str, Any]) -> None:
        allowed = {
            "name", "gpus", "memory", "cpus", "time_limit", "shm_size",
            "priority", "command", "env", "after", "after_any", "array",
        }
        for key in overrides:
            if key not in allowed:
                raise DopqError(f"unknown submit option {key!r}")

    def _upload(self, who: Principal, upload_id: str) -> Upload:
        up = self._uploads.get(str(upload_id))
        if up is None:
            raise NotFound(f"no upload {upload_id} (expired or finished)")
        if up.user != who.name and not who.is_admin:
            raise Forbidden("not your upload")
        return up

    def upload_chunk(self, who: Principal, upload_id: str, data: bytes) -> int:
        if len(data) > MAX_CHUNK:
            raise LimitExceeded(f"chunk over {MAX_CHUNK} bytes")
        with self._uploads_lock:
            up = self._upload(who, upload_id)
            if up.received + len(data) > up.size:
                self._discard_upload(up)
                raise LimitExceeded("upload is larger than announced; discarded")
            try:
                with up.path.open("ab") as fh:
                    fh.write(data)
            except OSError as exc:
                self._discard_upload(up)
                raise DopqError(f"cannot store upload: {exc.strerror}") from None
            up.received += len(data)
            up.last = time.time()
            return up.received

    def _discard_upload(self, up: Upload) -> None:
        self._uploads.pop(up.id, None)
        self.slots.release(up.id)
        up.path.unlink(missing_ok=True)

    def abort_upload(self, who: Principal, upload_id: str) -> None:
        with self._uploads_lock:
            self._discard_upload(self._upload(who, upload_id))

    def finish_upload(self, who: Principal, upload_id: str) -> dict[str, Any]:
        with self._uploads_lock:
            up = self._upload(who, upload_id)
            if up.received != up.size:
                raise Conflict(f"upload incomplete: {up.received} of {up.size} bytes")
            self._uploads.pop(up.id, None)
        try:  # the archive's own verdict, before a job exists
            self._intake().archive(who, up.user, up.path, up.overrides)
        except DopqError:
            self._discard_upload(up)
            raise
        target = self.settings.state_path / "incoming" / f"api-{up.id}.zip"
        name = str(up.overrides.get("name") or up.source_name or "job")[:128]
        try:  # the limit again, in the transaction that creates the job
            job_id = self.slots.add_job(up.id, dict(
                name=name, user=up.user, origin="api", source=str(target), overrides=up.overrides,
                submitted_by=up.by or up.user,
            ), up.slots)
        except DopqError:
            up.path.unlink(missing_ok=True)
            raise
        os.replace(up.path, target)
        self._send(("job", job_id))
        self._wrote(who)
        return self.job(who, job_id)

    def _send(self, cmd: tuple[Any, ...]) -> None:
        try:
            self._commands.put(cmd)
        except (OSError, ValueError, AttributeError):
            pass  # the supervisor restarts the provider, which picks the job up

    # -- views ---------------------------------------------------------------------
    def job(self, who: Principal, job_id: int) -> dict[str, Any]:
        row = self.store.job(int(job_id))
        view = job_view(row, time.time())
        view["events"] = [
            {"at": iso(e["at"]), "state": e["state"], "detail": e["detail"]}
            for e in self.store.events(row["id"])
        ]
        # The spec holds the job's environment: only its owner and admins see it.
        view["spec"] = row["spec"] if (row["user"] == who.name or who.is_admin) else None
        view["image"] = row["image"] if (row["user"] == who.name or who.is_admin) else None
        view["outputs"] = str(self.fetches.folders.path(row["user"], row["id"]))
        shown = self.estimates.shown.get(row["id"]) if row["state"] == "queued" else None
        view["expected_start"], view["reason"] = shown if shown else (None, None)
        # Start estimates kept for the record: the first made, the last while it waited.
        view["expected_start_first"] = iso(row.get("expected_start_first"))
        view["expected_start_last"] = iso(row.get("expected_start_last"))
        return view

    def images(self, who: Principal) -> dict[str, Any]:
        """What ``who`` may build from: the allowed bases and their own job images."""
        rows = self.store.read(
            "SELECT image, MAX(id) AS job, COUNT(*) AS jobs FROM jobs WHERE user = ?"
            " AND image IS NOT NULL GROUP BY image ORDER BY job DESC LIMIT 100", (who.name,))
        own = []
        for r in rows:
            try:
                present = self.runtime.image_exists(r["image"])
            except DopqError:
                present = None
            own.append({"image": r["image"], "job": r["job"], "jobs": r["jobs"],
                        "present": present})
        return {"allowed_bases": list(self.settings.images.allowed_bases), "own": own,
                "build_network": self.settings.build.network,
                "build_time_limit": self.settings.build.time_limit}

    def _views_key(self) -> Any:
        return (self.store.data_version(), id(self.queue), self.queue.decision_seq,
                self._stats_version, int(time.time() // 5))

    def _build_views(self, prev: Version | None) -> Version:
        with self.queue.decision_lock:
            decision, seq = self.queue.last_decision, self.queue.decision_seq
        entries = {e.id: e for e in decision.entries} if decision else {}
        rows = self.store.read(
            "SELECT id, name, user, state, num_gpus, submitted_at, time_limit, priority, nice,"
            " held, array_index, array_parent FROM jobs"
            " WHERE state IN ('received', 'building', 'queued')"
        )
        shown = self.estimates.update(decision, seq, [r[0] for r in rows if r[3] == "queued"])
        old = prev.queued if prev is not None else {}
        queued: dict[int, dict[str, Any]] = {}
        for r in rows:
            jid, state, ts = r[0], r[3], r[5]
            e = entries.get(jid) if state == "queued" else None
            eta = shown.get(jid) if state == "queued" else None
            o = old.get(jid)
            row = {
                "id": jid, "name": r[1], "user": r[2], "state": state, "num_gpus": r[4],
                "submitted_at": o["submitted_at"] if o and o["submitted_ts"] == ts else iso(ts),
                "submitted_ts": ts, "time_limit": r[6], "priority": r[7], "nice": r[8],
                "held": bool(r[9]), "array_index": r[10], "array_parent": r[11],
                "reason": eta[1] if eta else str(e.reason) if e
                else ("Priority" if state == "queued" else "Building"),
                "priority_value": round(e.priority, 1) if e else None,
                "expected_start": eta[0] if eta else None,
            }
            queued[jid] = o if o == row else row  # unchanged rows stay the same object
        order = [e.id for e in decision.entries if e.id in queued] if decision else []
        placed = set(order)
        order += sorted(j for j in queued if j not in placed)
        running = self.store.jobs([JobState.RUNNING], light=True)
        finished_rows = self._history_rows(HISTORY_CACHED, None)
        old_finished = prev.finished if prev is not None else {}
        finished = {}
        for row in finished_rows:
            o = old_finished.get(row["id"])
            finished[row["id"]] = o if o == row else row
        rest = {
            "running": self._running_view(running),
            "finished": [finished[r["id"]] for r in finished_rows],
            "users": self._user_stats(),
            "system": self._status(running),
        }
        return Version(self.views.next_number(), 0.0, None, queued, order, rest,
                       finished=finished, finished_order=[r["id"] for r in finished_rows])

    def _wrote(self, who: Principal) -> None:
        """``who`` changed something: build the views now, so every read after shows it."""
        generation = self.views.invalidate()
        self._write_gen[who.name] = generation
        self.views.current(generation)

    def _view(self, who: Principal | None) -> Version:
        return self.views.current(self._write_gen.get(who.name, 0) if who else 0)

    def queued(self, who: Principal | None = None) -> list[dict[str, Any]]:
        return full_queue(self._view(who), time.time())

    def running(self, who: Principal | None = None) -> list[dict[str, Any]]:
        return list(self._view(who).rest["running"])

    def snapshot(
        self, history_limit: int = 200, since: int | None = None, who: Principal | None = None
    ) -> dict[str, Any]:
        """All five views; with ``since`` (a version the client has) the queue as a delta."""
        v = self._view(who)
        now = time.time()
        limit = max(1, min(int(history_limit), HISTORY_CACHED))
        out: dict[str, Any] = {
            "version": v.number, "now": now, "running": v.rest["running"],
            "finished": v.rest["finished"][:limit], "users": v.rest["users"],
            "system": v.rest["system"],
        }
        if since is None:
            out["queued"] = full_queue(v, now)
        else:
            old = self.views.find(int(since)) if since else None
            out["queued_delta"] = queue_delta(old, v)
            out["finished_delta"] = finished_delta(old, v)
            out["history_limit"] = limit
            del out["finished"]
        return out

    def _running_view(self, running: list[JobRow]) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for row in running:
            v = job_view(row, now)
            s = self.stats.get(row["id"]) or {}
            v["cpu_percent"] = s.get("cpu")
            v["memory_bytes"] = s.get("memory")
            v["gpu_samples"] = [
                {"index": g, **self.gpu_samples.get(g, {})} for g in row["gpus"]
            ]
            out.append(v)
        return out

    def history(
        self, limit: int = 200, user: str | None = None, who: Principal | None = None
    ) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), 100000))
        if user is None and limit <= HISTORY_CACHED:
            return list(self._view(who).rest["finished"][:limit])
        return self._history_rows(limit, user)

    def _history_rows(self, limit: int, user: str | None) -> list[dict[str, Any]]:
        now = time.time()
        rows = self.store.jobs(FINAL_STATES, user=user, include_hidden=False,
                               order="finished_at", desc=True, limit=limit, light=True)
        return [job_view(r, now) for r in rows]

    def status(self, who: Principal | None = None) -> dict[str, Any]:
        return dict(self._view(who).rest["system"])

    def _status(self, running: list[JobRow]) -> dict[str, Any]:
        now = time.time()
        holders = {}
        for row in running:
            for g in row["gpus"]:
                holders[g] = (row["id"], row["user"])
        external = self.queue.pool.external() if self.queue.is_alive() else set()
        gpus = []
        for g in self.gpu_info:
            job = holders.get(g.index)
            gpus.append({
                "index": g.index, "name": g.name, "uuid": g.uuid, "memory_total": g.memory_total,
                "job": job[0] if job else None, "user": job[1] if job else None,
                "external": g.index in external,
                **{k: v for k, v in self.gpu_samples.get(g.index, {}).items()
                   if k != "memory_total"},
            })
        counts = {s.value: 0 for s in JobState}
        for r in self.store.read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = int(r["n"])
        provider_alive = self._provider is not None and self._provider.is_alive()
        return {
            "name": self.settings.server_name,
            "version": __version__,
            "queue_state": "paused" if self.queue.paused else (
                "running" if self.queue.is_alive() else "stopped"),
            "provider_state": "running" if provider_alive else "stopped",
            "engine_state": "up" if self.queue.engine_up else "down",
            "started_at": iso(self.started_at),
            "uptime_s": round(now - self.started_at, 1),
            "gpu_backend": self.gpu_backend.kind,
            "gpu_mode": self.gpu_mode,
            "gpus": gpus,
            "counts": counts,
            "policy": self.settings.policy.policy,
            "provider_restarts": self.provider_restarts,
            "queue_restarts": self.queue_restarts,
        }

    def user_stats(self, who: Principal | None = None) -> list[dict[str, Any]]:
        return list(self._view(who).rest["users"])

    def _user_stats(self) -> list[dict[str, Any]]:
        now = time.time()
        counts = self.store.counts_by_user()
        weights = {**self.settings.policy.shares, **self.users.shares()}
        snap = self.queue.ledger.snapshot(now)
        users = set(counts) | set(snap) | set(weights)
        active = {u for u in users
                  if counts.get(u, {}).get("queued") or counts.get(u, {}).get("running")}
        standing = fair_shares(snap, active, weights)  # the policy's own numbers
        out = []
        for u in sorted(users):
            c = counts.get(u, {})
            mine = standing.get(u.lower())
            out.append({
                "user": u,
                "queued": sum(c.get(s, 0) for s in ("received", "building", "queued")),
                "running": c.get("running", 0),
                "finished": sum(c.get(s, 0) for s in ("succeeded", "failed", "cancelled")),
                "succeeded": c.get("succeeded", 0),
                "failed": c.get("failed", 0),
                "gpu_hours": round(snap.get(u, 0.0) / 3600.0, 4),
                "weight": weights.get(u, 1.0),
                "share": round(mine.share, 4) if mine else 0.0,
                "fairshare": round(mine.factor, 4) if mine else 1.0,
                "penalty": round(mine.penalty, 4) if mine else None,
            })
        return out

    def priorities(self, job_id: int | None = None) -> list[dict[str, Any]]:
        decision = self.queue.last_decision
        out = []
        for e in decision.entries if decision else []:
            if job_id is not None and e.id != int(job_id):
                continue
            out.append({"id": e.id, "position": e.position, "priority": round(e.priority, 3),
                        "reason": str(e.reason), "factors": e.factors})
        if job_id is not None and not out:
            raise NotFound(f"job {job_id} is not queued")
        return out

    def logs(
        self, who: Principal, job_id: int, kind: str = "run", offset: int = 0,
        limit: int = 1 << 20,
    ) -> dict[str, Any]:
        row = self.store.job(int(job_id))
        if row["user"] != who.name and not who.is_admin and \
                not self.settings.users.logs_visible_to_all:
            raise Forbidden(f"the logs of job {job_id} belong to {row['user']}")
        if kind not in ("run", "build"):
            raise DopqError("log kind must be 'run' or 'build'")
        limit = max(1, min(int(limit), 4 << 20))
        offset = max(0, int(offset))
        path = job_dir(self.settings, row["id"]) / f"{kind}.log"

        def from_file() -> bytes:
            try:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    return fh.read(limit)
            except FileNotFoundError:
                return b""

        data = from_file() if path.exists() else b""
        if not path.exists() and kind == "run" and row["container"]:
            try:
                data = self.runtime.logs(row["container"])[offset: offset + limit]
            except DopqError:
                data = b""
            if not data and path.exists():  # saved and removed meanwhile
                data = from_file()
        state = JobState(row["state"])
        if kind == "build":
            done = state not in (JobState.RECEIVED, JobState.BUILDING)
        else:
            done = state in FINAL_STATES and (path.exists() or not row["container"]
                                              or not row["started_at"])
        return {"data": data.decode("utf-8", "replace"), "offset": offset + len(data),
                "done": done and len(data) < limit, "state": state.value}

    # -- commands --------------------------------------------------------------------
    def cancel(self, who: Principal, job_id: int) -> dict[str, Any]:
        row = self.store.job(int(job_id))
        self._own_or_admin(who, row, "cannot cancel")
        if row["user"] != who.name:
            self._audit(who, "cancel", f"job {job_id} of {row['user']}")
        self.queue.cancel(row["id"], who.name)
        self._wrote(who)
        return job_view(self.store.job(row["id"]), time.time())

    def edit_queued(
        self, who: Principal, ids: Iterable[int], action: str, value: Any = None
    ) -> dict[str, Any]:
        """One atomic batch edit of queued jobs (all or nothing)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise DopqError("no job ids given")
        if action not in EDIT_ACTIONS:
            raise DopqError(f"unknown action {action!r}: use one of {', '.join(EDIT_ACTIONS)}")
        if action == "top":
            self._admin(who, action)
        num: int | None = None
        limit: float | None = None
        if action == "time_limit":
            try:
                limit = check_overrides({"time_limit": value}).time_limit
            except JobRejected as exc:
                raise DopqError(exc.reason) from None
        if action in ("priority", "nice"):
            try:
                num = int(value)
            except (TypeError, ValueError):
                raise DopqError(f"{action} needs an integer value") from None
            if action == "priority" and not -1000 <= num <= 1000:
                raise DopqError("priority must be between -1000 and 1000")
            if action == "nice" and not -1_000_000 <= num <= 1_000_000:
                raise DopqError("nice must be between -1000000 and 1000000")
        now = time.time()
        with self.store.transaction() as db:
            marks = ",".join("?" * len(ids))
            rows = {
                r["id"]: r for r in db.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", ids)
            }
            for i in ids:
                r = rows.get(i)
                if r is None:
                    raise NotFound(f"no job {i}")
                if r["state"] not in ("received", "building", "queued"):
                    raise Conflict(f"job {i} is {r['state']}, no longer queued; nothing changed")
                if r["user"] != who.name and not who.is_admin:
                    raise Forbidden(f"job {i} belongs to {r['user']}; nothing changed")
                if action == "priority" and num is not None and not who.is_admin \
                        and num > max(0, r["priority"]):
                    raise Forbidden(f"only an admin may set a priority above 0 (job {i}); "
                                    "nothing changed")
                if action == "release" and r["held"] == ADMIN_HOLD and not who.is_admin:
                    raise Forbidden(f"job {i} was held by an admin: only an admin may "
                                    "release it; nothing changed")
                if action == "nice" and num is not None and num < r["nice"] and not who.is_admin:
                    raise Forbidden(f"only an admin may lower nice (job {i}); nothing changed")
            top = 0
            if action == "top":
                top = int(db.execute("SELECT COALESCE(MAX(top), 0) FROM jobs").fetchone()[0])
            for n, i in enumerate(ids):
                if action == "delete":
                    reason = f"cancelled by {who.name}"
                    db.execute(
                        "UPDATE jobs SET state='cancelled', error=?, finished_at=? WHERE id=?",
                        (reason, now, i),
                    )
                    db.execute(
                        "INSERT INTO events (job_id, at, state, detail) VALUES (?,?,?,?)",
                        (i, now, "cancelled", reason),
                    )
                    continue
                if action == "priority":
                    db.execute("UPDATE jobs SET priority=? WHERE id=?", (num, i))
                elif action == "nice":
                    db.execute("UPDATE jobs SET nice=? WHERE id=?", (num, i))
                elif action == "hold":
                    admin_hold = who.is_admin and rows[i]["user"] != who.name
                    db.execute("UPDATE jobs SET held=? WHERE id=?",
                               (ADMIN_HOLD if admin_hold else 1, i))
                elif action == "time_limit":
                    db.execute("UPDATE jobs SET time_limit=? WHERE id=?", (limit, i))
                elif action == "release":
                    db.execute("UPDATE jobs SET held=0 WHERE id=?", (i,))
                elif action == "top":
                    db.execute("UPDATE jobs SET top=? WHERE id=?", (top + len(ids) - n, i))
                # An event row for the edit: the queue thread re-reads changed jobs.
                shown = num if num is not None else limit
                detail = f"{action}" + (f" {shown:g}" if shown is not None else "") \
                    + f" by {who.name}"
                db.execute("INSERT INTO events (job_id, at, state, detail) VALUES (?,?,?,?)",
                           (i, now, rows[i]["state"], detail))
        if who.is_admin:
            self._audit(who, f"edit {action}", f"jobs {ids} value {value!r}")
        self.queue.wake()
        self._wrote(who)
        return {"changed": ids, "action": action}

    def clear_history(self, who: Principal, user: str | None = None) -> dict[str, Any]:
        self._admin(who, "clear-history")
        n = self.store.hide_history(check_username(user) if user else None)
        self._audit(who, "clear-history", user or "all users")
        self._wrote(who)
        return {"cleared": n}

    def clear_status(self, who: Principal, user: str | None = None) -> dict[str, Any]:
        self._admin(who, "clear-status")
        name = check_username(user) if user else None
        self.queue.reset_usage(name)
        self._audit(who, "clear-status", user or "all users")
        self._wrote(who)
        return {"reset": name or "all"}

    def request_shutdown(self, who: Principal, stop_running: bool = False) -> dict[str, Any]:
        self._admin(who, "shutdown")
        self.closing = True
        self._audit(who, "shutdown", "stop running" if stop_running else "leave running")
        self.stop_running_on_shutdown = bool(stop_running)
        self.shutdown_requested.set()
        return {"shutdown": True, "stop_running": bool(stop_running)}

    stop_running_on_shutdown = False
    closing = False  # set when the server stops: the API refuses calls

    def set_share(self, who: Principal, user: str, weight: float) -> dict[str, Any]:
        self._admin(who, "set-share")
        self.users.set_share(user, float(weight))
        self.queue.shares = self.users.shares()
        self._audit(who, "set-share", f"{user} = {weight}")
        self._wrote(who)
        self.queue.wake()
        return {"user": user, "weight": float(weight)}

"""After a job: its log saved, its outputs sealed, its container and image tag gone.

The queue thread hands these to worker threads once the scheduler has
recorded the job's end (so its GPUs are free before any of this runs).
Each step is safe to repeat: after a crash the reconcile asks again.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from typing import Any

from dopq.core.errors import DopqError, NotFound
from dopq.core.jobs import ACTIVE_STATES, FINAL_STATES
from dopq.core.settings import Settings
from dopq.server import hostfs
from dopq.server.images import cache_tag, job_tag, owner_tag_pattern
from dopq.server.outputs import OutputFolders
from dopq.server.runspec import JobRuntime
from dopq.server.runtime import ContainerRuntime
from dopq.server.store import JobRow, Store

log = logging.getLogger("dopq.server.queue")


class Housekeeper:
    """Logs, outputs, containers and image tags of finished jobs (thread-safe)."""

    def __init__(self, settings: Settings, store: Store, runtime: JobRuntime,
                 owner: str, folders: OutputFolders, images: ContainerRuntime | None = None
                 ) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime  # the jobs' containers
        self.images: Any = images if images is not None else runtime  # this host's engine
        self.owner = owner
        self.outputs = folders
        self._lock = threading.Lock()
        self._sealed: set[int] = set()  # jobs whose outputs were sealed since start
        self.collecting: set[int] = set()
        self._idle = threading.Event()  # never set: a pause that is not a bare sleep

    def run_log_path(self, job_id: int, run: int | None = None) -> Path:
        """``run.log``: the job's last (or only) run; ``run.<n>.log``: its ``n``-th run,
        kept when it was preempted (the next run writes ``run.log`` again)."""
        name = "run.log" if run is None else f"run.{run}.log"
        return self.settings.state_path / "jobs" / str(job_id) / name

    def seal(self, job_id: int, user: str) -> None:
        """Give a finished job's outputs to its user, made inert."""
        with self._lock:
            if job_id in self._sealed:
                return
            self._sealed.add(job_id)
        try:
            self.outputs.seal(user, job_id)
        except OSError as exc:
            log.warning("job %s: sealing outputs failed: %s", job_id, exc)

    def collect(self, job_id: int, cid: str) -> None:
        """Save a finished container's log, then remove it."""
        with self._lock:
            if job_id in self.collecting:
                return
            self.collecting.add(job_id)
        try:
            try:
                row: JobRow | None = self.store.job(job_id)
            except NotFound:
                row = None  # a stray container of a job this store does not know
            # Queued again (preempted: restarts counts this run; or its node died):
            # its log is kept apart, its outputs stay open for the next run.
            run = row["restarts"] if row is not None else 0
            preempted = row is not None and row["state"] not in FINAL_STATES
            path = self.run_log_path(job_id, run if preempted else None)
            if not path.exists():
                cap = self.settings.bytes_of("docker.log_max_bytes")
                tmp = path.with_suffix(".tmp")
                self.runtime.save_logs(cid, tmp, cap)
                hostfs.private_file(tmp)
                tmp.replace(path)
            if not preempted:  # again after a crash: before the container goes
                self.seal(job_id, self.store.job(job_id)["user"])
            if self.settings.docker.remove_containers:
                self.runtime.remove(cid, owner=self.owner)
                self.untag(job_id)
        except Exception:  # noqa: BLE001
            log.warning("job %s: collecting container failed\n%s", job_id, traceback.format_exc())
        finally:
            with self._lock:
                self.collecting.discard(job_id)

    def clear_for_rerun(self, job_id: int, ref: str, restarts: int) -> None:
        """Before a preempted job runs again: its last run's log saved (``run.<n>.log``)
        and that container gone, whatever ``remove_containers`` says (the new one
        takes its name). Waits for a worker already collecting it."""
        while True:
            with self._lock:
                if job_id not in self.collecting:
                    break
            self._idle.wait(0.1)
        st = self.runtime.status(ref)
        if st is None or st.running:
            return  # nothing left, or not ours to touch: the start reports the clash
        path = self.run_log_path(job_id, restarts)
        if not path.exists():  # collect() did not get to it
            tmp = path.with_suffix(".tmp")
            self.runtime.save_logs(st.id, tmp, self.settings.bytes_of("docker.log_max_bytes"))
            hostfs.private_file(tmp)
            tmp.replace(path)
        self.runtime.remove(st.id, owner=self.owner)

    def remove(self, ref: str) -> None:
        self.runtime.remove(ref, owner=self.owner)

    def untag(self, job_id: int) -> None:
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
            self.images.untag(job_tag(self.owner, row["user"], spec["name"], tagged))
        except Exception:  # noqa: BLE001 - a tag left behind is swept later
            log.warning("job %s: untag failed\n%s", job_id, traceback.format_exc())

    def _tag_users(self) -> set[int]:
        """Ids whose job tag an active job still needs (its own, or its array's)."""
        # light: without their specs (10k queued jobs' JSON cost 240 ms per finished job)
        return {r["array_parent"] or r["id"]
                for r in self.store.jobs(ACTIVE_STATES, light=True)}

    def sweep_tags(self) -> list[str]:
        """Remove this server's job tags whose job is over and has no container."""
        removed = []
        busy = self._tag_users()
        for tag in self.images.tags_matching(owner_tag_pattern(self.owner)):
            tail = tag.rpartition(":")[2].rpartition("-")[2]
            if not tail.isdigit() or int(tail) in busy or int(tail) in self.collecting:
                continue
            self.images.untag(tag)
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
                self.images.untag(cache_tag(self.owner, img["context_hash"]))
                self.store.forget_image(img["image_id"])
                removed.append(img["image_id"])
        return removed

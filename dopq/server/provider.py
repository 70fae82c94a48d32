"""The Provider: a separate process that turns archives into ready images.

As in the first DoPQ, the Provider runs in its own process. It has two doors:
the drop folder (``inbox/<user>/*.zip``, ``dopq.server.inbox``), which it
watches itself, and uploads through the API, which the server hands over as
``("job", id)`` commands. For each job it checks the archive, validates the job
spec, builds (or reuses, or loads) the image and moves the job to ``queued``.
A context to build is never unpacked: it is checked, hashed and streamed to
the engine straight from the zip, in one read (``dopq.core.zipcontext``); a
context the user built before is found at the stream's end and reused, the
stream cut before the engine could use it. Only an ``image.tar`` to load is
unpacked, into a private directory.
A bad archive or a failed build fails that job only, with the reason kept;
nothing a user sends stops the Provider.

It talks to the server through the shared SQLite store (every change committed
first) and a multiprocessing queue of notices (``("queued", id)``), which the
server uses only to wake the queue thread at once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from dopq.core import archive as archive_mod
from dopq.core import dockerfile as dockerfile_mod
from dopq.core import spec as spec_mod
from dopq.core.errors import (
    BuildFailed,
    Conflict,
    DopqError,
    EngineUnavailable,
    JobRejected,
    LimitExceeded,
)
from dopq.core.jobs import JobSpec, JobState
from dopq.core.settings import Settings
from dopq.core.text import safe_name
from dopq.core.zipcontext import ZipContext
from dopq.server import authz, hostfs
from dopq.server import images as images_mod
from dopq.server import limits as limits_mod
from dopq.server.auth import Principal, Role, Users
from dopq.server.builds import BuildLimits, remove_stale
from dopq.server.images import cache_tag, job_tag
from dopq.server.inbox import INCOMING, InboxWatcher
from dopq.server.limits import check_spec_limits
from dopq.server.runtime import (
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_USER,
    ContainerRuntime,
)
from dopq.server.store import Store

log = logging.getLogger("dopq.server.provider")


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.state_path / "jobs" / str(job_id)


class Provider:
    """Unpacks, validates and builds jobs; runs as ``Provider.main`` in a process."""

    def __init__(
        self,
        settings: Settings,
        total_gpus: int,
        commands: Any,
        notices: Any,
        store: Store | None = None,
        runtime: ContainerRuntime | None = None,
        device_memory: int = 0,
    ) -> None:
        self.settings = settings
        self.total_gpus = total_gpus
        self.device_memory = device_memory  # the largest GPU's (check_spec_limits)
        self.commands = commands
        self.notices = notices
        self.store = store or Store(settings.db_path)
        self.runtime = runtime or ContainerRuntime(settings.docker.base_url)
        self.watcher = InboxWatcher(settings, self.store)
        self._claimed: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=settings.build.concurrency, thread_name_prefix="build"
        )
        self._stopping = threading.Event()

    # -- process entry point ----------------------------------------------------
    @classmethod
    def main(cls, settings: Settings, total_gpus: int, commands: Any, notices: Any,
             device_memory: int = 0, server: int | None = None) -> None:
        """``server``: the pid of the server that started it (``start_process``)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s provider %(message)s")
        os.umask(0o077)  # build logs and job folders: the server's alone (modes kept in images)
        provider = cls(settings, total_gpus, commands, notices, device_memory=device_memory)
        provider.run(server)

    def _watch_parent(self, server: int) -> None:
        """Exit at once when the server dies (kill -9): its successor takes over. The
        server's pid comes from the server: one that died while this process was
        still starting had already left it to init, whose pid never changes."""
        while os.getppid() == server:
            if self._stopping.wait(0.2):
                return
        os._exit(0)

    def run(self, server: int | None = None) -> None:
        threading.Thread(target=self._watch_parent, args=(server or os.getppid(),),
                         name="parent-watch", daemon=True).start()
        self.recover()
        poll = self.settings.intake.poll_interval
        next_scan = 0.0
        while not self._stopping.is_set():
            now = time.time()
            if now >= next_scan:
                for job_id in self.watcher.scan(now):
                    self.submit(job_id)
                next_scan = now + poll
            try:
                cmd = self.commands.get(timeout=max(0.01, next_scan - time.time()))
            except queue_mod.Empty:
                continue
            except (EOFError, OSError):
                break  # the server went away
            if cmd is None or cmd[0] == "stop":
                break
            if cmd[0] == "job":
                self.submit(int(cmd[1]))
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def recover(self) -> None:
        """Re-run builds that were cut off and adopt archives without a job."""
        try:
            remove_stale(self.store.owner_id())  # cgroups of builds cut off by a crash
        except OSError as exc:
            log.warning("removing stale build cgroups: %s", exc)
        for job in self.store.jobs([JobState.BUILDING]):
            self.store.transition(
                job["id"], JobState.RECEIVED, expect=[JobState.BUILDING], detail="build restarted"
            )
        incoming = self.settings.state_path / INCOMING
        if incoming.is_dir():
            owned = {j["source"] for j in self.store.jobs([JobState.RECEIVED])}
            known = self.store.sources()
            for f in incoming.iterdir():
                if str(f) in owned or str(f) in known:
                    continue
                parts = f.name.split("-")
                if f.name.startswith("inbox-") and len(parts) >= 3:
                    # Taken from the inbox, then a crash before its job was written.
                    user = "-".join(parts[1:-1])
                    uid, problem = hostfs.check_taken(f)
                    if problem is not None:
                        self.watcher._refuse(f, user, problem)
                        continue
                    job_id = self.watcher.adopt(f, user, uid, "job")
                    if job_id is not None:
                        log.info("adopted %s as job %s", f.name, job_id)
                elif not _recent(f):  # one in flight: its job is being written now
                    f.unlink(missing_ok=True)  # an upload whose job was never written
        for job in self.store.jobs([JobState.RECEIVED]):
            self.submit(job["id"])

    def submit(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._claimed:
                return
            self._claimed.add(job_id)
        self._pool.submit(self._process_safely, job_id)

    # -- one job -------------------------------------------------------------
    def _process_safely(self, job_id: int) -> None:
        try:
            self.process(job_id)
        except Conflict as exc:  # cancelled (or taken) before its build began
            log.info("job %s: %s; skipped", job_id, exc)
        except EngineUnavailable as exc:
            # Not the job's fault: put it back and try again shortly.
            log.warning("job %s: %s; will retry", job_id, exc)
            self._back_to_received(job_id, str(exc))
            threading.Timer(5.0, self._retry, args=(job_id,)).start()
            return
        except Exception:  # noqa: BLE001 - a provider thread must never die
            log.error("job %s: internal error\n%s", job_id, traceback.format_exc())
            self._fail(job_id, "internal error: " + traceback.format_exc().splitlines()[-1][:200])
        finally:
            with self._lock:
                self._claimed.discard(job_id)

    def _retry(self, job_id: int) -> None:
        if not self._stopping.is_set():
            self.submit(job_id)

    def _back_to_received(self, job_id: int, detail: str) -> None:
        try:
            self.store.transition(
                job_id, JobState.RECEIVED, expect=[JobState.BUILDING], detail=detail
            )
        except DopqError:
            pass

    def _fail(self, job_id: int, error: str) -> None:
        try:
            self.store.transition(
                job_id, JobState.FAILED, expect=[JobState.RECEIVED, JobState.BUILDING],
                error=error, detail=error,
            )
        except DopqError:
            return
        self._notify("failed", job_id)
        self._cleanup(job_id)

    def _notify(self, kind: str, job_id: int) -> None:
        try:
            self.notices.put((kind, job_id))
        except (OSError, ValueError):
            pass

    def _cleanup(self, job_id: int) -> None:
        shutil.rmtree(job_dir(self.settings, job_id) / "context", ignore_errors=True)

    def process(self, job_id: int) -> None:
        job = self.store.transition(
            job_id, JobState.BUILDING, expect=[JobState.RECEIVED], detail="reading the archive"
        )
        self._notify("building", job_id)
        jdir = job_dir(self.settings, job_id)
        jdir.mkdir(parents=True, exist_ok=True)
        build_log = jdir / "build.log"
        ctx_dir = jdir / "context"
        shutil.rmtree(ctx_dir, ignore_errors=True)
        try:
            spec, image, context_hash = self._prepare(job, ctx_dir, build_log)
        except (JobRejected, BuildFailed) as exc:
            with build_log.open("a", encoding="utf-8") as fh:
                fh.write(f"\n[dopq] {exc}\n")
            self._fail(job_id, str(exc))
            self._drop_source(job)
            return
        tag = job_tag(self.store.owner_id(), spec.user, spec.name, job_id)
        try:
            self._enqueue(job, spec, image, context_hash)
        except Conflict:
            log.info("job %s was cancelled during its build", job_id)
            self.runtime.untag(tag)
        except LimitExceeded as exc:  # an array with more elements than free queue slots
            self._fail(job_id, str(exc))
            self.runtime.untag(tag)
        self._cleanup(job_id)
        self._drop_source(job)

    def _name_from_config(self, job: dict[str, Any], config: Any) -> None:
        """Name the job after its config's ``name`` before anything can reject it
        (unless ``--name`` was given), so a rejected job is shown as its owner knows it."""
        if (job.get("overrides") or {}).get("name") or not isinstance(config, dict):
            return
        name = config.get("name")
        if isinstance(name, str) and 3 <= len(name.strip()) <= 128:
            self.store.update_job(job["id"], name=safe_name(name))

    def _drop_source(self, job: dict[str, Any]) -> None:
        if job.get("source"):
            Path(job["source"]).unlink(missing_ok=True)

    def _prepare(
        self, job: dict[str, Any], ctx_dir: Path, build_log: Path
    ) -> tuple[JobSpec, str, str | None]:
        source = job.get("source")
        if not source or not Path(source).is_file():
            raise JobRejected("the archive is missing (upload or move was cut off)")
        limits = archive_mod.ArchiveLimits(
            max_archive_bytes=self.settings.bytes_of("limits.max_upload"),
            max_unpacked_bytes=self.settings.bytes_of("limits.max_unpacked"),
            max_entries=self.settings.limits.max_entries,
        )
        # A context to build is read from the zip in place and streamed to the engine:
        # unpacking a checkpoint of gigabytes first cost a second copy on disk.
        with ZipContext.open(Path(source), limits, mtime=int(time.time())) as zc:
            try:  # every byte is checked as it goes to the engine (ZipContext.tar)
                spec = self._judge(job, zc)
            except JobRejected:
                zc.verify()  # a broken archive is the reason, as when it was unpacked first
                raise
            tag = job_tag(self.store.owner_id(), spec.user, spec.name, job["id"])
            self.store.update_job(job["id"], name=spec.name)
            with build_log.open("w", encoding="utf-8") as fh:
                on_log = _capped_log(fh, self.settings.bytes_of("docker.log_max_bytes"))
                if not spec.build_flag:  # image.tar: loaded from the unpacked folder
                    ctx = archive_mod.inspect_context(
                        archive_mod.unpack(Path(source), ctx_dir, limits))
                    if ctx.image_tar is None:
                        raise JobRejected("build_flag is false but the archive has no image.tar")
                    on_log(f"[dopq] loading image.tar as {tag}\n")
                    return spec, self.runtime.load(ctx.image_tar, tag, on_log), None
                image, chash = self._build(zc, spec, tag, on_log)
                return spec, image, chash

    def _judge(self, job: dict[str, Any], zc: ZipContext) -> JobSpec:
        """The job's spec from the zip's config, within the limits and the submitter's
        rights; a job that builds must have a Dockerfile whose bases it may use."""
        config = zc.config()
        self._name_from_config(job, config)  # kept even if the job is rejected below
        spec = spec_mod.parse_spec(
            config, submitter=job["user"], overrides=job["overrides"],
            allowed_users=self.settings.users.allowed,
        )
        check_spec_limits(spec, self.settings, self.total_gpus, self.device_memory)
        refused = authz.refusal(self._principal(job.get("submitted_by") or job["user"]),
                                authz.Action.SUBMIT, priority=spec.priority)
        if refused is not None:
            raise JobRejected(refused)
        if spec.build_flag:
            if zc.kind(archive_mod.DOCKERFILE_NAME) != "file":
                raise JobRejected("no Dockerfile at the top of the archive")
            self._check_bases(zc.read(archive_mod.DOCKERFILE_NAME, 1 << 20, JobRejected(
                "Dockerfile is larger than 1 MiB")) or b"", spec.user)
        return spec

    def _build(self, zc: ZipContext, spec: JobSpec, tag: str,
               on_log: Callable[[str], None]) -> tuple[str, str]:
        """Build the zip's context as ``tag`` (its Dockerfile checked: ``_judge``), or
        reuse the user's image of the same context; return (image, context hash)."""

        def decide(chash: str) -> None:  # the whole context read and hashed, not yet built
            known = self.store.image_for(chash)
            # Only the user's own: another user's image of the same context holds
            # what their RUN steps produced (fetched with their network access).
            if known and known in self.store.images_of(spec.user) \
                    and self.runtime.image_exists(known):
                raise _Reuse(known)

        # The hash pass is the tar's own: the engine gets the context as it is read,
        # and a known context ends the stream before its end marker, unbuilt.
        zc.decide = decide
        on_log(f"[dopq] building {tag}\n")
        labels = {
            LABEL_INSTANCE: self.settings.docker.name_prefix,
            LABEL_USER: spec.user,
            LABEL_OWNER: self.store.owner_id(),
        }
        try:
            image = self.runtime.build(zc, tag, labels, on_log, self._build_limits(spec))
        except _Reuse as reuse:
            on_log(f"[dopq] identical context already built: reusing {reuse.image[:19]}\n")
            self.runtime.tag(reuse.image, tag)
            self.store.touch_image(reuse.image, time.time())
            return reuse.image, zc.context_hash
        chash = zc.context_hash
        # A cache tag keeps the image after the job's own tag is removed.
        self.runtime.tag(image, cache_tag(self.store.owner_id(), chash))
        self.store.remember_image(chash, image, time.time())
        return image, chash

    def _check_bases(self, dockerfile: bytes, user: str) -> None:
        """Refuse a Dockerfile that reads any image but the allowed bases and the
        user's own job images (``dopq.server.images.check_references``)."""
        try:  # newlines as a text file reads them
            text = dockerfile.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError:
            raise JobRejected("Dockerfile is not UTF-8 text") from None
        refs = dockerfile_mod.references(text)
        own = set(self.store.images_of(user))
        images_mod.check_references(refs, self.settings.images.allowed_bases, own,
                                    self.runtime.inspect_image)

    def _build_limits(self, spec: JobSpec) -> BuildLimits:
        """A build runs under its job's memory and CPUs and the pids limit."""
        s = self.settings
        return BuildLimits(
            memory=spec.memory or s.bytes_of("limits.default_memory"),
            cpus=spec.cpus or s.limits.default_cpus,
            pids=s.docker.pids_limit,
            time_limit=s.build_time_limit(),
            network=s.build.network,
            cache_from=tuple(self.store.images_of(spec.user, 20)),
        )

    def _principal(self, user: str) -> Principal:
        """Who submitted, as the rules see them (the role they have now)."""
        record = Users(self.store).get(user)
        return Principal(user, Role.ADMIN if record and record["role"] == "admin" else Role.USER)

    def _enqueue(
        self, job: dict[str, Any], spec: JobSpec, image: str, context_hash: str | None
    ) -> None:
        fields: dict[str, Any] = dict(
            name=spec.name, spec=spec.to_dict(), num_gpus=spec.num_gpus,
            gpu_memory=spec.gpu_memory or 0,
            preemptible=(self.settings.policy.preemptible_default if spec.preemptible is None
                         else spec.preemptible),
            time_limit=spec.time_limit, priority=spec.priority, after=spec.after,
            after_any=spec.after_any, image=image, context_hash=context_hash,
            queued_at=time.time(),
        )
        if not spec.array:
            self.store.transition(
                job["id"], JobState.QUEUED, expect=[JobState.BUILDING], detail="image ready",
                **fields,
            )
            self._notify("queued", job["id"])
            return
        # A job array: one build, one job per index; the first row is index 0.
        cap = self.settings.policy.max_queued_per_user
        if self.store.enqueue_array(job["id"], fields, spec.array, room=lambda db: (
                limits_mod.check_room(db, job["user"], cap, len(spec.array), exclude=job["id"]))):
            self._notify("queued", job["id"])


def start_process(settings: Settings, total_gpus: int,
                  device_memory: int = 0) -> tuple[Any, Any, Any]:
    """Start the Provider in a fresh (spawned) process; return (process, commands, notices).

    ``device_memory``: the largest GPU's memory in bytes (``check_spec_limits``)."""
    ctx = mp.get_context("spawn")
    commands = ctx.Queue()
    notices = ctx.Queue()
    proc = ctx.Process(
        target=Provider.main,
        args=(settings, total_gpus, commands, notices, device_memory, os.getpid()),
        name="dopq-provider", daemon=True,
    )
    proc.start()
    return proc, commands, notices


def _capped_log(fh: TextIO, cap: int) -> Callable[[str], None]:
    """Write a build's log to ``fh``, at most ``cap`` characters (then a note)."""
    left = [cap]

    def on_log(text: str) -> None:
        if left[0] <= 0:
            return
        data = text[:left[0]]
        left[0] -= len(data)
        fh.write(data if left[0] > 0 else data + "\n[dopq: build log truncated]\n")
        fh.flush()

    return on_log


class _Reuse(Exception):  # noqa: N818 - not an error: the flow of a known context
    """Raised through the build's tar stream: this image of the user's has the context."""

    def __init__(self, image: str) -> None:
        super().__init__(image)
        self.image = image


def _recent(path: Path, seconds: float = 60.0) -> bool:
    """Written in the last ``seconds`` (an upload moved in just before its job row)."""
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False

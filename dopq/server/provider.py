"""The Provider: a separate process that turns archives into ready images.

As in the first DoPQ, the Provider runs in its own process. It has two doors:
the drop folder (``inbox/<user>/*.zip``), which it watches itself, and uploads
through the API, which the server hands over as ``("job", id)`` commands. For
each job it unpacks the archive into a private directory, validates the job
spec, builds (or reuses, or loads) the image and moves the job to ``queued``.
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
import pwd
import queue as queue_mod
import shutil
import stat as stat_mod
import threading
import time
import traceback
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from dopq.server import hostfs
from dopq.server import images as images_mod
from dopq.server import limits as limits_mod
from dopq.server.builds import BuildLimits, remove_stale
from dopq.server.images import cache_tag, job_tag
from dopq.server.runtime import (
    LABEL_CONTEXT,
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_USER,
    ContainerRuntime,
)
from dopq.server.store import Store

log = logging.getLogger("dopq.server.provider")

INCOMING = "incoming"  # archives owned by a job (or about to be)


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.state_path / "jobs" / str(job_id)


def check_spec_limits(spec: JobSpec, settings: Settings, total_gpus: int) -> None:
    """Refuse a spec that asks more than the machine or the admins allow."""
    if spec.num_gpus > total_gpus:
        raise JobRejected(f"asks for {spec.num_gpus} GPUs, this server has {total_gpus}")
    if spec.memory is not None and spec.memory > settings.bytes_of("limits.max_memory"):
        raise JobRejected(
            f"memory {spec.memory // 2**20} MiB is over the limit of {settings.limits.max_memory}"
        )
    max_cpus = settings.limits.max_cpus or float(os.cpu_count() or 1)
    if spec.cpus is not None and spec.cpus > max_cpus:
        raise JobRejected(f"cpus {spec.cpus:g} is over the limit of {max_cpus:g}")
    if spec.shm_size is not None and spec.shm_size > settings.bytes_of("limits.max_shm"):
        raise JobRejected(f"shm_size is over the limit of {settings.limits.max_shm}")
    cap = settings.max_time_limit()
    if cap is not None and spec.time_limit is not None and spec.time_limit > cap:
        raise JobRejected(f"time_limit is over the limit of {settings.limits.max_time_limit}")


class InboxWatcher:
    """Finds complete archives in ``inbox/<user>/`` and turns them into jobs.

    A file (not ``*.part``) is complete when it reads as a whole zip (the
    end-of-archive record is written last, so a zip being copied does not), or
    when it has not changed for ``settle_seconds`` (then it is taken, and a
    file that is no zip is refused with that reason).
    """

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.inbox = settings.inbox_path
        self.incoming = settings.state_path / INCOMING
        self._seen: dict[Path, tuple[int, float, float]] = {}
        self._next_folders = 0.0
        self._no_account: set[str] = set()  # users told about once: no Unix account
        self._misplaced: set[tuple[str, int, float]] = set()  # files in inbox/ itself, reported

    def scan(self, now: float) -> list[int]:
        new_jobs: list[int] = []
        if now >= self._next_folders:
            self._next_folders = now + 10.0
            self.make_folders()
        try:
            user_dirs = [d for d in self.inbox.iterdir() if d.is_dir() and not d.is_symlink()]
            self._report_misplaced()
        except OSError:
            return new_jobs
        alive: set[Path] = set()
        for udir in user_dirs:
            user = udir.name.lower()
            try:
                self._own_folder(udir, user)
                with os.scandir(udir) as it:
                    entries = list(it)
            except (OSError, DopqError):
                continue
            for entry in entries:
                f = Path(entry.path)
                if f.name.startswith(".") or f.name.endswith(".part"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat_mod.S_ISDIR(st.st_mode):
                    continue  # a folder (even one named x.zip) is not an upload
                if not stat_mod.S_ISREG(st.st_mode):
                    # A symlink, FIFO, socket or device: never read, never waited on.
                    self._take(f, user)
                    continue
                alive.add(f)
                key = (st.st_size, st.st_mtime)
                prev = self._seen.get(f)
                if prev is None or prev[:2] != key:
                    self._seen[f] = (key[0], key[1], now)
                    # A zip's end record is written last: a file that already
                    # reads as a whole zip is complete (a renamed .part, a cp).
                    if not _complete_zip(f):
                        continue
                elif now - prev[2] < self.settings.intake.settle_seconds:
                    continue
                job_id = self._take(f, user)
                self._seen.pop(f, None)
                if job_id is not None:
                    new_jobs.append(job_id)
        for gone in set(self._seen) - alive:
            self._seen.pop(gone, None)
        return new_jobs

    def make_folders(self) -> None:
        """``inbox/<user>/`` for every allowed user (``users.allowed``; empty: every
        DoPQ user and every user of ``users.uid_map``), owned by their Unix account,
        0700; a user without one is logged."""
        if not self.settings.users.check_owner:
            return
        allowed = set(self.settings.users.allowed)
        names = allowed or ({r["name"] for r in self.store.read("SELECT name FROM users")}
                            | set(self.settings.users.uid_map))
        for user in sorted(names):
            if user != user.lower() or "/" in user or user.startswith("."):
                continue
            ids = hostfs.unix_ids(self.settings, user)
            if ids is None:
                if user not in self._no_account:
                    self._no_account.add(user)
                    log.info("inbox/%s not made: no Unix account %r (set users.uid_map)",
                             user, user)
                continue
            try:
                hostfs.ensure_dir(self.inbox / user, 0o700, ids)
            except (OSError, DopqError) as exc:
                log.warning("inbox/%s: %s", user, exc)

    def _report_misplaced(self) -> None:
        """A zip dropped in ``inbox/`` itself is not taken: tell its owner, once."""
        for entry in os.scandir(self.inbox):
            if entry.name.startswith(".") or not entry.name.endswith(".zip"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (entry.name, st.st_ino, st.st_mtime)
            if stat_mod.S_ISDIR(st.st_mode) or key in self._misplaced:
                continue
            self._misplaced.add(key)
            shown = "".join(c if c.isprintable() else "?" for c in entry.name)[:128]
            user = self._user_of_uid(st.st_uid)
            reason = (f"rejected: inbox/{shown} is in inbox/ itself, not taken; "
                      f"drop it in inbox/{user or '<user>'}/")
            log.warning("%s (file owner uid %s)", reason, st.st_uid)
            if user is not None:
                self.store.add_job(name=shown if len(shown) >= 3 else "inbox file", user=user,
                                   origin="inbox", source=None, state=JobState.FAILED,
                                   error=reason, finished_at=time.time())

    def _user_of_uid(self, uid: int) -> str | None:
        """The DoPQ user whose Unix account has ``uid`` (``users.uid_map`` first)."""
        known = {r["name"] for r in self.store.read("SELECT name FROM users")}
        mapped = [u for u, m in self.settings.users.uid_map.items() if m == uid and u in known]
        if mapped:  # several DoPQ users on one account: whose it is cannot be told
            return str(mapped[0]) if len(mapped) == 1 else None
        try:
            name = pwd.getpwuid(uid).pw_name.lower()
        except KeyError:
            return None
        mapped_elsewhere = name in self.settings.users.uid_map
        return name if name in known and not mapped_elsewhere else None

    def _own_folder(self, udir: Path, user: str) -> None:
        """Keep ``inbox/<user>/`` the user's and 0700, so nobody else drops or swaps files."""
        ids = hostfs.unix_ids(self.settings, user) if self.settings.users.check_owner else None
        if ids is None:
            return
        st = os.lstat(udir)
        if (st.st_uid, st.st_gid, stat_mod.S_IMODE(st.st_mode)) != (*ids, 0o700):
            hostfs.ensure_dir(udir, 0o700, ids)

    def _take(self, path: Path, user: str) -> int | None:
        """Move the file into ``incoming/`` and create its job (or a refusal).

        Whatever the name holds at the move is what is checked, on the open
        descriptor (owner, a regular file, one link), and a symlink is never
        followed: a file swapped in after the scan gains nothing.
        """
        self.incoming.mkdir(parents=True, exist_ok=True)
        target = self.incoming / f"inbox-{user}-{uuid.uuid4().hex}.zip"
        try:
            uid, problem = hostfs.take_file(path, target)
        except OSError as exc:
            log.warning("cannot take %s: %s", path, exc)
            return None
        if problem is not None:
            self._refuse(path, user, problem)
            return None
        return self.adopt(target, user, uid, path.stem[:128] or "job")

    def _refuse(self, path: Path, user: str, problem: str) -> None:
        shown = "".join(c if c.isprintable() else "?" for c in path.name)[:128]
        reason = (f"rejected: inbox/{user}/{shown} {problem}; "
                  "only a regular file of your own is taken")
        log.warning("%s", reason)
        self.store.add_job(name=shown if len(shown) >= 3 else "inbox file", user=user,
                           origin="inbox", source=None, state=JobState.FAILED, error=reason,
                           finished_at=time.time())

    def adopt(self, target: Path, user: str, uid: int, name: str) -> int | None:
        """Create the job of an archive in ``incoming/`` (or its refusal)."""
        name = safe_name(name)  # from a file name: no control characters reach a terminal
        reason = self._owner_problem(user, uid)
        if reason is None:
            try:  # the per-user queue limit, counted in the transaction that inserts
                return limits_mod.add_job_within(
                    self.store, self.settings.policy.max_queued_per_user,
                    dict(name=name, user=user, origin="inbox", source=str(target)))
            except LimitExceeded as exc:
                reason = str(exc)
        if reason is not None:
            job_id = self.store.add_job(
                name=name, user=user, origin="inbox", source=None,
                state=JobState.FAILED, error=f"rejected: {reason}", finished_at=time.time(),
            )
            rejected = self.settings.state_path / "rejected"
            rejected.mkdir(parents=True, exist_ok=True)
            os.replace(target, rejected / f"{job_id}.zip")
        return None

    def _owner_problem(self, user: str, uid: int) -> str | None:
        allowed = self.settings.users.allowed
        if allowed and user not in allowed:
            return f"unknown user {user!r}"
        accounts = self.store.read("SELECT name FROM users")
        if accounts and user not in {r["name"] for r in accounts}:
            return f"no DoPQ user {user!r} (ask an admin: dopq user add {user})"
        if not self.settings.users.check_owner:
            return None
        expected = self.settings.users.uid_map.get(user)
        if expected is None:
            try:
                expected = pwd.getpwnam(user).pw_uid
            except KeyError:
                return f"no Unix user {user!r} owns inbox/{user} (set users.uid_map)"
        if uid != expected:
            return f"file owner uid {uid} is not user {user!r} (uid {expected})"
        return None


def _complete_zip(path: Path) -> bool:
    """Whether the file reads as a whole zip: an end record whose central
    directory is really there (an inner zip's end record near the end of a
    half-copied archive does not pass)."""
    try:
        fd = os.open(path, hostfs.FILE_FLAGS)  # no symlink followed, a FIFO never waited on
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat_mod.S_ISREG(os.fstat(fh.fileno()).st_mode) or not zipfile.is_zipfile(fh):
                return False
            with zipfile.ZipFile(fh) as zf:
                zf.infolist()
        return True
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError):
        return False


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
    ) -> None:
        self.settings = settings
        self.total_gpus = total_gpus
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
    def main(cls, settings: Settings, total_gpus: int, commands: Any, notices: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s provider %(message)s")
        os.umask(0o077)  # build logs and job folders: the server's alone (modes kept in images)
        provider = cls(settings, total_gpus, commands, notices)
        provider.run()

    def _watch_parent(self) -> None:
        """Exit at once when the server dies (kill -9): its successor takes over."""
        parent = os.getppid()
        while not self._stopping.wait(0.2):
            if os.getppid() != parent:
                os._exit(0)

    def run(self) -> None:
        threading.Thread(target=self._watch_parent, name="parent-watch", daemon=True).start()
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
            known = {
                r["source"]
                for r in self.store.read("SELECT source FROM jobs WHERE source IS NOT NULL")
            }
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
                else:
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
            job_id, JobState.BUILDING, expect=[JobState.RECEIVED], detail="unpacking"
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
        root = archive_mod.unpack(Path(source), ctx_dir, limits)
        ctx = archive_mod.inspect_context(root)
        self._name_from_config(job, ctx.config)  # kept even if the job is rejected below
        spec = spec_mod.parse_spec(
            ctx.config, submitter=job["user"], overrides=job["overrides"],
            allowed_users=self.settings.users.allowed,
        )
        check_spec_limits(spec, self.settings, self.total_gpus)
        if spec.priority > 0 and not self._is_admin(job.get("submitted_by") or job["user"]):
            raise JobRejected("only an admin may submit with a priority above 0")
        tag = job_tag(self.store.owner_id(), spec.user, spec.name, job["id"])
        self.store.update_job(job["id"], name=spec.name)
        cap = [self.settings.bytes_of("docker.log_max_bytes")]  # a build's log is capped too
        with build_log.open("w", encoding="utf-8") as fh:

            def on_log(text: str) -> None:
                if cap[0] <= 0:
                    return
                data = text[:cap[0]]
                cap[0] -= len(data)
                fh.write(data if cap[0] > 0 else data + "\n[dopq: build log truncated]\n")
                fh.flush()

            if not spec.build_flag:
                if ctx.image_tar is None:
                    raise JobRejected("build_flag is false but the archive has no image.tar")
                on_log(f"[dopq] loading image.tar as {tag}\n")
                return spec, self.runtime.load(ctx.image_tar, tag, on_log), None
            if ctx.dockerfile is None:
                raise JobRejected("no Dockerfile at the top of the archive")
            self._check_bases(ctx.dockerfile, spec.user)
            chash = archive_mod.context_hash(root)
            known = self.store.image_for(chash)
            # Only the user's own: another user's image of the same context holds
            # what their RUN steps produced (fetched with their network access).
            if known and known not in self.store.images_of(spec.user):
                known = None
            if known and self.runtime.image_exists(known):
                on_log(f"[dopq] identical context already built: reusing {known[:19]}\n")
                self.runtime.tag(known, tag)
                self.store.touch_image(known, time.time())
                return spec, known, chash
            on_log(f"[dopq] building {tag}\n")
            labels = {
                LABEL_INSTANCE: self.settings.docker.name_prefix,
                LABEL_USER: spec.user,
                LABEL_CONTEXT: chash,
                LABEL_OWNER: self.store.owner_id(),
            }
            image = self.runtime.build(root, tag, labels, on_log, self._build_limits(spec))
            # A cache tag keeps the image after the job's own tag is removed.
            self.runtime.tag(image, cache_tag(self.store.owner_id(), chash))
            self.store.remember_image(chash, image, time.time())
            return spec, image, chash

    def _check_bases(self, dockerfile: Path, user: str) -> None:
        """Refuse a Dockerfile that reads any image but the allowed bases and the
        user's own job images (``dopq.server.images.check_references``)."""
        if dockerfile.stat().st_size > 1 << 20:
            raise JobRejected("Dockerfile is larger than 1 MiB")
        try:
            text = dockerfile.read_text(encoding="utf-8")
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

    def _is_admin(self, user: str) -> bool:
        rows = self.store.read("SELECT role FROM users WHERE name = ?", (user,))
        return bool(rows) and rows[0]["role"] == "admin"

    def _enqueue(
        self, job: dict[str, Any], spec: JobSpec, image: str, context_hash: str | None
    ) -> None:
        now = time.time()
        fields: dict[str, Any] = dict(
            name=spec.name, spec=spec.to_dict(), num_gpus=spec.num_gpus,
            time_limit=spec.time_limit, priority=spec.priority, after=spec.after,
            after_any=spec.after_any, image=image, context_hash=context_hash, queued_at=now,
        )
        if not spec.array:
            self.store.transition(
                job["id"], JobState.QUEUED, expect=[JobState.BUILDING], detail="image ready",
                **fields,
            )
            self._notify("queued", job["id"])
            return
        # A job array: one build, one job per index; the first row is index 0.
        first, rest = spec.array[0], spec.array[1:]
        with self.store.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job["id"],)).fetchone()
            if row is None or row["state"] != JobState.BUILDING.value:
                return
            limits_mod.check_room(db, job["user"], self.settings.policy.max_queued_per_user,
                                  len(spec.array), exclude=job["id"])
            self.store._update(db, job["id"], {**fields, "state": JobState.QUEUED,
                                              "array_index": first, "array_parent": job["id"]})
            db.execute(
                "INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, 'queued', ?)",
                (job["id"], now, "image ready"),
            )
            for index in rest:
                self.store._insert_job(db, {
                    **fields, "user": job["user"], "origin": job["origin"],
                    "state": JobState.QUEUED, "submitted_at": job["submitted_at"],
                    "array_index": index, "array_parent": job["id"],
                    "overrides": job["overrides"],
                })
        self._notify("queued", job["id"])


def start_process(settings: Settings, total_gpus: int) -> tuple[Any, Any, Any]:
    """Start the Provider in a fresh (spawned) process; return (process, commands, notices)."""
    ctx = mp.get_context("spawn")
    commands = ctx.Queue()
    notices = ctx.Queue()
    proc = ctx.Process(
        target=Provider.main, args=(settings, total_gpus, commands, notices),
        name="dopq-provider", daemon=True,
    )
    proc.start()
    return proc, commands, notices

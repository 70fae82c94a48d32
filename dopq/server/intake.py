"""The verdict on a submission while its owner is still there: no job for a mistake.

An upload is checked twice before a job row exists, with the server's own
limits and the same code the Provider runs later (``dopq.core.spec``,
``limits.check_spec_limits``, ``dopq.server.images.check_references``):

- at ``submit_begin`` (``at_begin``): the options, the ``--after`` jobs, and
  the ``container_config.json`` and Dockerfile the client read from the
  folder or zip and sent along; so a mistake costs no upload;
- at ``submit_finish`` (``archive``): the archive itself, which a client may
  have built any way it likes. Reading its directory and two small files
  (``dopq.core.archive.peek``, each at most 1 MiB, every entry checked as
  ``unpack`` checks it) takes milliseconds, so it is done synchronously: a
  zip with a bad config is refused at submit, not turned into a failed job.

What is left to the Provider: the real unpack (bytes counted, not declared
sizes), the build, ``image.tar``. The drop folder (``inbox/``) has no one to
answer, so its mistakes still become failed jobs with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dopq.core import archive as archive_mod
from dopq.core import dockerfile as dockerfile_mod
from dopq.core import spec as spec_mod
from dopq.core.errors import EngineUnavailable, JobRejected, NotFound
from dopq.core.jobs import JobSpec
from dopq.core.settings import Settings
from dopq.core.submitcheck import near_miss
from dopq.server import authz
from dopq.server import images as images_mod
from dopq.server.auth import Principal
from dopq.server.limits import check_spec_limits
from dopq.server.runtime import ContainerRuntime
from dopq.server.store import Store

MAX_SENT = 1024**2  # what a client may send of container_config.json or the Dockerfile


class Intake:
    """The checks, with what they need of the server."""

    def __init__(self, settings: Settings, store: Store, runtime: ContainerRuntime,
                 total_gpus: int, device_memory: int = 0) -> None:
        self.settings = settings
        self.store = store
        self.runtime = runtime
        self.total_gpus = total_gpus
        self.device_memory = device_memory  # the largest GPU's: gpu_memory is checked by it

    def at_begin(self, who: Principal, user: str, overrides: dict[str, Any],
                 sent: Mapping[str, Any] | None) -> None:
        """Options and dependencies; the config and Dockerfile when the client sent them."""
        options = spec_mod.check_overrides(overrides)
        if "gpus" not in overrides:
            options.num_gpus = 0  # the config's count is checked with the config
        check_spec_limits(options, self.settings, self.total_gpus, self.device_memory)
        self.dependencies(who, user, options)
        if not sent:
            return
        if not isinstance(sent, Mapping):
            raise JobRejected("submit check: expected an object")
        config = sent.get("config")
        if config is None:
            return
        spec = self.config(who, user, config, overrides)
        text = sent.get("dockerfile")
        if spec.build_flag and isinstance(text, str) and len(text) <= MAX_SENT:
            self.bases(text, user)

    def archive(self, who: Principal, user: str, path: Path, overrides: dict[str, Any]) -> None:
        """The uploaded zip, before its job is made: config, Dockerfile or image.tar, bases."""
        limits = archive_mod.ArchiveLimits(
            max_archive_bytes=self.settings.bytes_of("limits.max_upload"),
            max_unpacked_bytes=self.settings.bytes_of("limits.max_unpacked"),
            max_entries=self.settings.limits.max_entries,
        )
        names, data = archive_mod.peek(path, limits)
        config_name = archive_mod.CONFIG_NAME
        if config_name not in data:
            raise JobRejected(f"{config_name} is missing at the top of the archive"
                              + near_miss(names, config_name))
        spec = self.config(who, user, archive_mod.load_config(data[config_name]), overrides)
        if not spec.build_flag:
            if archive_mod.IMAGE_TAR_NAME not in names:
                raise JobRejected("build_flag is false but the archive has no image.tar")
            return
        docker_name = archive_mod.DOCKERFILE_NAME
        if docker_name not in data:
            raise JobRejected(f"no {docker_name} at the top of the archive"
                              + near_miss(names, docker_name))
        try:
            text = data[docker_name].decode("utf-8")
        except UnicodeDecodeError:
            raise JobRejected("Dockerfile is not UTF-8 text") from None
        self.bases(text, user)

    def config(self, who: Principal, user: str, config: Any,
               overrides: dict[str, Any]) -> JobSpec:
        spec = spec_mod.parse_spec(config, submitter=user, overrides=overrides,
                                   allowed_users=self.settings.users.allowed)
        check_spec_limits(spec, self.settings, self.total_gpus, self.device_memory)
        refused = authz.refusal(who, authz.Action.SUBMIT, priority=spec.priority)
        if refused is not None:
            raise JobRejected(refused)
        return spec

    def dependencies(self, who: Principal, user: str, spec: JobSpec) -> None:
        """``--after``/``--after-any`` name jobs that exist and are the submitter's."""
        for flag, ids in (("--after", spec.after), ("--after-any", spec.after_any)):
            for job_id in ids:
                try:
                    row = self.store.job(job_id)
                except NotFound:
                    raise JobRejected(f"{flag} {job_id}: no job {job_id}") from None
                if row["user"] != user:
                    authz.require(who, authz.Action.DEPEND, row["user"], job=job_id, flag=flag)
                if flag == "--after" and row["state"] in ("failed", "cancelled"):
                    raise JobRejected(f"--after {job_id}: job {job_id} is {row['state']}, so "
                                      "this job could never start (--after-any waits for "
                                      "any end)")

    def bases(self, text: str, user: str) -> None:
        """The images the Dockerfile reads are allowed bases or the user's own."""
        refs = dockerfile_mod.references(text)
        own = set(self.store.images_of(user))
        try:
            images_mod.check_references(refs, self.settings.images.allowed_bases, own,
                                        self.runtime.inspect_image)
        except EngineUnavailable:
            pass  # the Provider checks again before it builds


"""The one seam around the Docker engine: ``ContainerRuntime``.

Everything DoPQ does with Docker goes through this class (builds, loads,
starting, watching, stopping and cleaning containers), so the queue thread can
be unit-tested with a fake runtime and nothing else imports ``docker``.
Errors from the engine come out as ``EngineUnavailable`` (engine down) or
``BuildFailed`` (a build); other Docker API errors are ``DopqError``.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Ulimit

from dopq.core.errors import BuildFailed, DopqError, EngineUnavailable
from dopq.core.zipcontext import ZipContext
from dopq.server import builds
from dopq.server import images as images_mod
from dopq.server.builds import BuildLimits
from dopq.server.runspec import (  # noqa: F401 - the seam's data, importable from here too
    LABEL_CONTEXT,
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_OWNER,
    LABEL_USER,
    ContainerSpec,
    ContainerStatus,
)

# Pinned, so making a client sends nothing (``auto`` asks the engine at once,
# and leaks the connection when the engine is down); Docker >= 20.10 speaks it.
API_VERSION = "1.41"
log = logging.getLogger("dopq.server.runtime")


def _ts(text: str | None) -> float | None:
    """Docker's RFC 3339 nano timestamps to epoch seconds (zero time -> None)."""
    if not text or text.startswith("0001-"):
        return None
    main, _, frac = text.rstrip("Z").partition(".")
    frac = "".join(c for c in frac if c.isdigit())[:6]
    base = dt.datetime.fromisoformat(main).replace(tzinfo=dt.UTC)
    return base.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


def _engine_error(exc: Exception) -> DopqError:
    if isinstance(exc, docker.errors.APIError):
        return DopqError(f"docker: {exc.explanation or exc}")
    return EngineUnavailable(f"Docker engine unavailable: {exc.__class__.__name__}")


_CONNECTION_ERRORS = (requests.exceptions.ConnectionError, docker.errors.DockerException, OSError)


class ContainerRuntime:
    """Docker engine access through docker-py's low-level API client."""

    def __init__(self, base_url: str = "unix:///var/run/docker.sock", timeout: int = 60) -> None:
        self.base_url = base_url
        self._timeout = timeout
        self._local = threading.local()
        self._clients: builtins.list[docker.APIClient] = []
        self._clients_lock = threading.Lock()

    @property
    def api(self) -> docker.APIClient:
        # One HTTP client per thread: requests sessions are not thread-safe.
        client = getattr(self._local, "api", None)
        if client is None:
            try:
                client = docker.APIClient(
                    base_url=self.base_url, timeout=self._timeout, version=API_VERSION
                )
            except docker.errors.DockerException as exc:
                raise EngineUnavailable(f"Docker engine unavailable: {exc}") from None
            self._local.api = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every thread's connection (threads that ended leave theirs here)."""
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def _drop_client(self) -> None:
        client = getattr(self._local, "api", None)
        self._local.api = None
        if client is not None:
            with self._clients_lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as exc:
            raise _engine_error(exc) from None
        except _CONNECTION_ERRORS as exc:
            self._drop_client()
            raise _engine_error(exc) from None

    # -- engine -------------------------------------------------------------
    def ping(self) -> bool:
        try:
            return bool(self._call(self.api.ping))
        except DopqError:
            return False

    def has_nvidia_runtime(self) -> bool:
        info = self._call(self.api.info)
        return "nvidia" in (info.get("Runtimes") or {})

    # -- images ---------------------------------------------------------------
    def build(
        self,
        context: Path | ZipContext,
        tag: str,
        labels: dict[str, str],
        on_log: Callable[[str], None],
        limits: BuildLimits | None = None,
    ) -> str:
        """Build the context's ``Dockerfile`` under ``limits`` (a folder, or a job's zip
        read in place: ``ZipContext``); every chunk goes to ``on_log``."""
        image_id = builds.build(self.base_url, API_VERSION, context, tag, labels, on_log,
                                limits or BuildLimits(), _chunk_text, labels.get(LABEL_OWNER, ""))
        if image_id is None:
            image_id = self._call(self.api.inspect_image, tag)["Id"]
        return str(image_id)

    def load(self, tar: Path, tag: str, on_log: Callable[[str], None]) -> str:
        """``docker load`` an image archive as ``tag`` and no other name.

        The archive is copied with its names removed first (``images.strip_tags``),
        so its RepoTags can never re-point a name on the engine.
        """
        clean = tar.with_name(tar.name + ".untagged")
        images_mod.strip_tags(tar, clean)
        loaded: list[str] = []
        try:
            with clean.open("rb") as fh:
                for chunk in self._call(self.api.load_image, fh):
                    text = _chunk_text(chunk)
                    if text:
                        on_log(text)
                    if "error" in chunk:
                        raise BuildFailed(f"image.tar: {str(chunk['error'])[:300]}")
                    stream = str(chunk.get("stream", ""))
                    if stream.startswith("Loaded image ID: "):
                        loaded.append(stream[len("Loaded image ID: "):].strip())
                    elif stream.startswith("Loaded image: "):
                        raise BuildFailed("image.tar: the engine loaded a named image")
        finally:
            clean.unlink(missing_ok=True)
        if len(loaded) != 1:
            raise BuildFailed("image.tar: no image found in the archive" if not loaded
                              else "image.tar: must hold exactly one image")
        image_id = str(self._call(self.api.inspect_image, loaded[0])["Id"])
        self.tag(image_id, tag)
        return image_id

    def inspect_image(self, ref: str) -> dict[str, Any] | None:
        """The engine's view of an image (by name, id, short id or digest), or None."""
        try:
            return dict(self._call(self.api.inspect_image, ref))
        except docker.errors.NotFound:
            return None
        except DopqError as exc:
            if "invalid reference" in str(exc).lower() or "no such image" in str(exc).lower():
                return None
            raise

    def tags_matching(self, pattern: str) -> builtins.list[str]:
        """Every image name on the engine that matches Docker's reference ``pattern``."""
        rows = self._call(self.api.images, filters={"reference": pattern})
        return [t for row in rows for t in (row.get("RepoTags") or []) if t != "<none>:<none>"]

    def image_exists(self, ref: str) -> bool:
        try:
            self._call(self.api.inspect_image, ref)
            return True
        except docker.errors.NotFound:
            return False

    def tag(self, image_id: str, tag: str) -> None:
        repo, _, version = tag.rpartition(":")
        self._call(self.api.tag, image_id, repo, version)

    def push(self, image: str, target: str) -> None:
        """Push ``image`` to a registry as ``target`` (``host:port/repo:tag``); the
        local ``target`` tag is dropped again (the image keeps its own)."""
        repo, _, version = target.rpartition(":")
        self.tag(image, target)
        try:
            for chunk in self._call(self.api.push, repo, tag=version, stream=True, decode=True):
                if chunk.get("error"):
                    raise DopqError(f"pushing {image} to {repo}: {chunk['error']}")
        finally:
            self.untag(target)

    def untag(self, tag: str) -> None:
        """Remove one tag; the image goes too when it was its last tag and unused."""
        try:
            self._call(self.api.remove_image, tag, force=False, noprune=False)
        except (docker.errors.NotFound, DopqError):
            pass

    # -- containers -------------------------------------------------------------
    def run(self, spec: ContainerSpec) -> str:
        """Create and start a container; return its id."""
        api = self.api
        env = dict(spec.env)
        device_requests = None
        ids = spec.device_ids or [str(g) for g in spec.gpus]
        if ids and spec.gpu_mode == "nvidia":
            device_requests = [
                DeviceRequest(driver="nvidia", device_ids=ids, capabilities=[["gpu"]])
            ]
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(ids) or "void"
        log_config = None
        if spec.log_max_bytes:
            log_config = LogConfig(
                type="json-file", config={"max-size": str(spec.log_max_bytes), "max-file": "1"}
            )
        host_config = api.create_host_config(
            binds=spec.binds or None,
            mem_limit=spec.mem_limit,
            memswap_limit=spec.mem_limit,
            nano_cpus=spec.nano_cpus,
            shm_size=spec.shm_size,
            pids_limit=spec.pids_limit,
            network_mode=spec.network,
            device_requests=device_requests,
            cap_drop=["ALL"],
            cap_add=spec.cap_add or None,
            security_opt=["no-new-privileges"],
            read_only=spec.read_only,
            log_config=log_config,
            ulimits=[Ulimit(name="core", soft=0, hard=0)]
            + [Ulimit(name=u["name"], soft=u["soft"], hard=u["hard"]) for u in spec.ulimits],
            init=True,
        )
        try:
            cid = str(self._create(api, spec, env, host_config)["Id"])
            self._call(api.start, cid)
        except docker.errors.NotFound as exc:  # the image (or the new container) is gone
            raise DopqError(f"docker: {exc.explanation or exc}") from None
        return cid

    def _create(self, api: Any, spec: ContainerSpec, env: dict[str, str], host_config: Any
                ) -> Any:
        return self._call(
            api.create_container,
            image=spec.image,
            command=spec.command,
            entrypoint=spec.entrypoint,
            working_dir=spec.working_dir,
            user=spec.user,
            name=spec.name,
            environment=env,
            labels=spec.labels,
            host_config=host_config,
            tty=spec.tty,
            stop_signal=spec.stop_signal,
            network_disabled=spec.network == "none",
        )

    def status(self, ref: str) -> ContainerStatus | None:
        try:
            info = self._call(self.api.inspect_container, ref)
        except docker.errors.NotFound:
            return None
        return _status(info)

    def list(self, instance: str, owner: str | None = None) -> builtins.list[ContainerStatus]:
        """All containers (running or not) labelled as this DoPQ instance's."""
        labels = [f"{LABEL_INSTANCE}={instance}"]
        if owner:
            labels.append(f"{LABEL_OWNER}={owner}")
        rows = self._call(self.api.containers, all=True, filters={"label": labels})
        out = []
        for row in rows:
            st = self.status(row["Id"])
            if st is not None:
                out.append(st)
        return out

    def foreign_gpu_envs(
        self, owner: str
    ) -> builtins.list[tuple[builtins.list[str], builtins.list[str]]]:
        """(env, device ids) of running containers that this server did not start."""
        out = []
        for row in self._call(self.api.containers):
            if (row.get("Labels") or {}).get(LABEL_OWNER) == owner:
                continue
            try:
                info = self._call(self.api.inspect_container, row["Id"])
            except docker.errors.NotFound:
                continue
            env = info.get("Config", {}).get("Env") or []
            ids: list[str] = []
            for req in info.get("HostConfig", {}).get("DeviceRequests") or []:
                if req.get("Count") == -1:
                    ids.append("all")
                ids.extend(req.get("DeviceIDs") or [])
            out.append((list(env), ids))
        return out

    def _owned(self, ref: str, owner: str) -> str | None:
        """The id of container ``ref`` if its owner label is ``owner``; else None."""
        st = self.status(ref)
        if st is None:
            return None
        if st.owner != owner:
            log.warning("not touching container %s: owner %r is not %r", ref, st.owner, owner)
            return None
        return st.id

    def stop(self, ref: str, grace: float, *, owner: str) -> None:
        """SIGTERM (or the image's stop signal), then SIGKILL after ``grace``.

        Only a container labelled as ``owner``'s: another server's is never touched.
        """
        cid = self._owned(ref, owner)
        if cid is None:
            return
        try:
            self._call(self.api.stop, cid, timeout=max(0, int(round(grace))))
        except docker.errors.NotFound:
            pass

    def remove(self, ref: str, *, owner: str) -> None:
        """Remove a container of ``owner``'s with its anonymous volumes."""
        cid = self._owned(ref, owner)
        if cid is None:
            return
        try:
            self._call(self.api.remove_container, cid, force=True, v=True)
        except docker.errors.NotFound:
            pass

    def logs(self, ref: str, *, tail: int | str = "all") -> bytes:
        try:
            return bytes(self._call(self.api.logs, ref, stdout=True, stderr=True, tail=tail))
        except docker.errors.NotFound:
            return b""

    def save_logs(self, ref: str, path: Path, cap: int) -> int:
        """Write the container's output to ``path`` (at most ``cap`` bytes)."""
        written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stream = self._call(self.api.logs, ref, stdout=True, stderr=True, stream=True)
            with path.open("wb") as fh:
                for chunk in stream:
                    room = cap - written
                    if room <= 0:
                        fh.write(b"\n[dopq: log truncated]\n")
                        break
                    fh.write(chunk[:room])
                    written += min(len(chunk), room)
        except docker.errors.NotFound:
            pass
        return written

    def stats(self, ref: str) -> dict[str, float] | None:
        """One sample of memory use and the raw CPU counters, or None.

        ``one_shot`` answers at once but without a previous CPU sample, so
        the caller computes the CPU share from two of these (``cpu_percent``).
        """
        try:
            s = self._call(self.api.stats, ref, stream=False, one_shot=True)
        except (docker.errors.NotFound, DopqError):
            return None
        cpu = s.get("cpu_stats") or {}
        return {
            "memory": float((s.get("memory_stats") or {}).get("usage") or 0),
            "cpu_total": float((cpu.get("cpu_usage") or {}).get("total_usage") or 0),
            "system_total": float(cpu.get("system_cpu_usage") or 0),
            "online_cpus": float(cpu.get("online_cpus") or 1),
        }

    def events(self, owner: str, stop: threading.Event) -> Iterator[dict[str, Any]]:
        """Container ``die`` events of this instance, until ``stop`` is set.

        The stream is read with a short timeout so ``stop`` is honoured; the
        caller reconnects when the engine goes away (``EngineUnavailable``).
        """
        api = docker.APIClient(base_url=self.base_url, timeout=None, version=API_VERSION)
        try:
            since = None
            while not stop.is_set():
                until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
                stream = api.events(
                    since=since, until=until, decode=True,
                    filters={"type": "container", "event": ["die", "oom"],
                             "label": f"{LABEL_OWNER}={owner}"},
                )
                yield from stream
                since = until
        except _CONNECTION_ERRORS as exc:
            raise EngineUnavailable(f"Docker engine unavailable: {exc}") from None
        finally:
            api.close()


def _chunk_text(chunk: dict[str, Any]) -> str:
    if "stream" in chunk:
        return str(chunk["stream"])
    if "status" in chunk:
        return str(chunk["status"]) + "\n"
    if "error" in chunk:
        return "ERROR: " + str(chunk["error"]) + "\n"
    if "aux" in chunk:
        return ""
    return json.dumps(chunk) + "\n"


def _status(info: dict[str, Any]) -> ContainerStatus:
    state = info.get("State") or {}
    labels = (info.get("Config") or {}).get("Labels") or {}
    job = labels.get(LABEL_JOB)
    running = bool(state.get("Running")) or state.get("Status") in ("created", "restarting")
    return ContainerStatus(
        id=str(info["Id"]),
        name=str(info.get("Name", "")).lstrip("/"),
        job_id=int(job) if job and job.isdigit() else None,
        running=running,
        exit_code=None if running else int(state.get("ExitCode", -1)),
        oom_killed=bool(state.get("OOMKilled")),
        started_at=_ts(state.get("StartedAt")),
        finished_at=None if running else _ts(state.get("FinishedAt")),
        pids=[int(state["Pid"])] if state.get("Pid") else [],
        owner=labels.get(LABEL_OWNER),
        created=state.get("Status") == "created",
    )


def cpu_percent(prev: dict[str, float] | None, cur: dict[str, float]) -> float | None:
    """CPU use between two ``stats`` samples, in percent of one core."""
    if prev is None:
        return None
    cpu = cur["cpu_total"] - prev["cpu_total"]
    system = cur["system_total"] - prev["system_total"]
    if system <= 0 or cpu < 0:
        return None
    return round(100.0 * cpu / system * cur["online_cpus"], 1)

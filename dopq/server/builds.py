"""Image builds under the job's limits (part of the Docker seam, with ``runtime``).

The engine's classic builder runs each ``RUN`` step in a container with
Docker's defaults: no pids or memory limit, the default network, as long as it
likes. Here a build gets:

- the job's memory (no swap beyond it) and CPU quota, and ``docker.pids_limit``,
  through a cgroup DoPQ makes for that build and hands to the builder as its
  ``cgroupparent`` (cgroupfs driver, cgroup v1 or v2); every RUN container is
  created inside it, and the cgroup's peaks tell afterwards which limit a
  failed build reached. Without usable cgroups (a remote engine, the systemd
  driver) memory and CPU still come from the build API's own limits;
- ``build.network`` (off: ``networkmode=none``);
- ``build.time_limit``: the build stream is cut (which cancels a classic
  build) and any RUN container left in the build's cgroup is removed.

The context goes to the engine as a tar streamed, as the engine reads it,
straight from the job's zip (``dopq.core.zipcontext.ZipContext.tar``: the
Provider never unpacks a context it builds) or from a folder
(``dopq.core.context.tar_stream``), ``.dockerignore`` applied as ``docker
build`` applies it: a checkpoint of gigabytes is neither written to disk nor
copied to a temporary tar first nor held in memory.

The classic builder cannot drop capabilities of RUN containers; that stays a
known limit (SECURITY.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from dopq.core import dockerignore
from dopq.core.context import tar_stream
from dopq.core.errors import BuildFailed, DopqError, EngineUnavailable, JobRejected
from dopq.core.zipcontext import ZipContext

log = logging.getLogger("dopq.server.builds")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_CONTROLLERS = ("pids", "memory", "cpu")


# A name no image has: as the only cache source it turns the layer cache off
# (an empty list would mean "every image on the engine").
NO_CACHE_SOURCE = "dopq-no-cache-source:none"


@dataclass
class BuildLimits:
    memory: int | None = None  # bytes; RUN steps get no swap beyond it
    cpus: float | None = None
    pids: int | None = None
    time_limit: float = 3600.0
    network: bool = True
    # Images whose layers the build may reuse: the user's own. The classic
    # builder otherwise reuses any matching layer on the engine, so an
    # identical RUN line would hand one user the output another user's step
    # produced. Empty: no layer is reused.
    cache_from: tuple[str, ...] = ()


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:g}g" if n % 2**30 == 0 else f"{n / 2**20:g}m"


def _fmt_seconds(s: float) -> str:
    return f"{s / 3600:g}h" if s >= 3600 and s % 3600 == 0 else (
        f"{s / 60:g}m" if s >= 60 and s % 60 == 0 else f"{s:g}s")


class BuildCgroup:
    """One build's cgroup parent (cgroupfs layout); made, read, then removed."""

    def __init__(self, limits: BuildLimits, owner: str = "", root: Path = CGROUP_ROOT,
                 name: str | None = None) -> None:
        self.limits = limits
        self.root = root
        self.name = name or f"{cgroup_prefix(owner)}{uuid.uuid4().hex[:16]}"
        self.version = _cgroup_version(root)

    @property
    def parent(self) -> str:
        return "/" + self.name

    def _dir(self, controller: str) -> Path:
        return self.root / self.name if self.version == 2 else self.root / controller / self.name

    def create(self) -> None:
        lim = self.limits
        if self.version == 2:
            d = self._dir("")
            d.mkdir(mode=0o755)
            _write(d / "pids.max", lim.pids or "max")
            if lim.memory:
                _write(d / "memory.max", lim.memory)
                _write(d / "memory.swap.max", 0, missing_ok=True)
            if lim.cpus:
                _write(d / "cpu.max", f"{int(lim.cpus * 100000)} 100000")
            return
        for ctrl in _CONTROLLERS:
            self._dir(ctrl).mkdir(mode=0o755)
        if lim.pids:
            _write(self._dir("pids") / "pids.max", lim.pids)
        if lim.memory:
            mem = self._dir("memory")
            _write(mem / "memory.limit_in_bytes", lim.memory)
            _write(mem / "memory.memsw.limit_in_bytes", lim.memory, missing_ok=True)
        if lim.cpus:
            cpu = self._dir("cpu")
            _write(cpu / "cpu.cfs_period_us", 100000)
            _write(cpu / "cpu.cfs_quota_us", int(lim.cpus * 100000))

    def containers(self) -> list[str]:
        """Ids of the containers (RUN steps) living in this build's cgroup now."""
        d = self._dir("pids")
        out = []
        with contextlib.suppress(OSError):
            for child in d.iterdir():
                name = child.name.removeprefix("docker-").removesuffix(".scope")
                if child.is_dir() and len(name) == 64:
                    out.append(name)
        return out

    def limits_reached(self) -> list[str]:
        """Which limits the build's processes reached (peaks at the limit)."""
        lim, hit = self.limits, []
        if self.version == 2:
            d = self._dir("")
            if lim.pids and (_read_int(d / "pids.peak") or 0) >= lim.pids or \
                    _event(d / "pids.events", "max"):
                hit.append(f"pids limit ({lim.pids})")
            if lim.memory and _event(d / "memory.events", "oom_kill"):
                hit.append(f"memory limit ({_fmt_bytes(lim.memory)})")
            return hit
        if lim.pids and (_read_int(self._dir("pids") / "pids.peak") or 0) >= lim.pids:
            hit.append(f"pids limit ({lim.pids})")
        peak = _read_int(self._dir("memory") / "memory.max_usage_in_bytes") or 0
        if lim.memory and peak >= lim.memory - 2**20:
            hit.append(f"memory limit ({_fmt_bytes(lim.memory)})")
        return hit

    def remove(self, timeout: float = 30.0) -> bool:
        """Remove the cgroup (and what runc left under it) in every hierarchy."""
        dirs = [self.root / self.name] if self.version == 2 else \
            [p / self.name for p in self.root.iterdir() if (p / self.name).is_dir()]
        deadline = time.monotonic() + timeout
        while True:
            left = []
            for d in dirs:
                if not d.exists():
                    continue
                for child in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                try:
                    d.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    left.append(d)
            if not left or time.monotonic() > deadline:
                return not left
            time.sleep(0.1)


def cgroup_prefix(owner: str) -> str:
    """Build cgroups are ``dopq-build-<owner>-<random>``: each server finds its own."""
    return f"dopq-build-{owner[:12] or 'x'}-"


_active: set[str] = set()  # build cgroups in use in this process
_active_lock = threading.Lock()


def remove_stale(owner: str, root: Path = CGROUP_ROOT) -> int:
    """Remove this server's build cgroups that no build of this process uses:
    left by a crash, or by a RUN container torn down after its build ended."""
    version = _cgroup_version(root)
    if version is None:
        return 0
    prefix = cgroup_prefix(owner)
    names = {p.name for p in root.glob(prefix + "*")} if version == 2 else \
        {p.name for p in root.glob(f"*/{prefix}*")}
    with _active_lock:
        names -= _active
    removed = 0
    for name in names:
        removed += BuildCgroup(BuildLimits(), root=root, name=name).remove(0.5)
    return removed


def _cgroup_version(root: Path) -> int | None:
    if (root / "cgroup.controllers").is_file():
        return 2
    if all((root / c).is_dir() for c in _CONTROLLERS):
        return 1
    return None


def _write(path: Path, value: object, missing_ok: bool = False) -> None:
    try:
        path.write_text(f"{value}\n")
    except FileNotFoundError:
        if not missing_ok:
            raise


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _event(path: Path, key: str) -> bool:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key and v.strip().isdigit() and int(v) > 0:
                return True
    return False


def usable_cgroups(api: docker.APIClient, base_url: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether DoPQ can give builds a cgroup parent: a local engine on cgroupfs."""
    if not base_url.startswith(("unix://", "/")) or _cgroup_version(root) is None:
        return False
    try:
        return str(api.info().get("CgroupDriver")) == "cgroupfs"
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError):
        return False


class _BuildClient(docker.APIClient):  # type: ignore[misc]
    """docker-py's client with the build API's ``cgroupparent`` and CPU quota
    (docker-py does not pass them) and a handle on the stream to cut it."""

    def __init__(self, extra: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.extra = extra
        self.response: Any = None

    def _post(self, url: str, *args: Any, **kwargs: Any) -> Any:
        if url.endswith("/build"):
            kwargs.setdefault("params", {}).update(self.extra)
        return super()._post(url, *args, **kwargs)

    def _stream_helper(self, response: Any, decode: bool = False) -> Any:
        self.response = response
        return super()._stream_helper(response, decode=decode)

    def cut(self) -> None:
        """Shut the build stream's socket down: the engine cancels the build."""
        raw = getattr(self.response, "raw", None)
        candidates = [getattr(getattr(raw, "_connection", None), "sock", None)]
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        candidates.append(getattr(getattr(fp, "raw", None), "_sock", None))
        for sock in candidates:
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def build(
    base_url: str,
    api_version: str,
    context: Path | ZipContext,
    tag: str,
    labels: dict[str, str],
    on_log: Callable[[str], None],
    limits: BuildLimits,
    chunk_text: Callable[[dict[str, Any]], str],
    owner: str = "",
) -> str | None:
    """Build the context's ``Dockerfile`` under ``limits``; return the image id if known.

    ``context``: a folder, or a job's zip read in place (``ZipContext``)."""
    extra: dict[str, Any] = {}
    container_limits: dict[str, Any] = {}
    api = _BuildClient(extra, base_url=base_url, version=api_version,
                       timeout=int(limits.time_limit) + 60)
    group: BuildCgroup | None = None
    timed_out = threading.Event()
    last_lines: list[str] = []
    image_id: str | None = None
    try:
        if usable_cgroups(api, base_url):
            group = BuildCgroup(limits, owner)
            with _active_lock:
                _active.add(group.name)
            try:
                group.create()
                extra["cgroupparent"] = group.parent
            except OSError as exc:
                on_log(f"[dopq] warning: no build cgroup ({exc.strerror}); "
                       "no pids limit for this build\n")
                group.remove(1.0)
                with _active_lock:
                    _active.discard(group.name)
                group = None
        if group is None and limits.memory:
            container_limits = {"memory": limits.memory, "memswap": limits.memory}
        if limits.cpus:
            extra.update(cpuperiod=100000, cpuquota=int(limits.cpus * 100000))

        def stop() -> None:
            timed_out.set()
            api.cut()
            if group is not None:
                _remove_containers(base_url, api_version, group.containers())

        pieces = _context_tar(context)
        timer = threading.Timer(limits.time_limit, stop)
        timer.daemon = True
        timer.start()
        try:
            # The tar is streamed as the engine reads it (docker-py's path= would
            # write all of it to a temporary file first).
            stream = api.build(
                fileobj=pieces, custom_context=True,
                dockerfile="Dockerfile", tag=tag, labels=labels,
                rm=True, forcerm=True, pull=False, decode=True,
                container_limits=container_limits or None,
                network_mode=None if limits.network else "none",
                cache_from=list(limits.cache_from) or [NO_CACHE_SOURCE],
            )
            for chunk in stream:
                text = chunk_text(chunk)
                if text:
                    on_log(text)
                    last_lines = (last_lines + text.splitlines())[-20:]
                if "error" in chunk:
                    raise BuildFailed(_reason(str(chunk["error"]), group, timed_out, limits),
                                      "\n".join(last_lines))
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    image_id = str(aux["ID"])
        finally:
            timer.cancel()
        if timed_out.is_set():
            raise BuildFailed(_reason("", group, timed_out, limits), "\n".join(last_lines))
    except docker.errors.APIError as exc:
        raise BuildFailed(_reason(str(exc.explanation or exc), group, timed_out, limits),
                          "\n".join(last_lines)) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
            docker.errors.DockerException, OSError, ValueError) as exc:
        if timed_out.is_set():
            raise BuildFailed(_reason("", group, timed_out, limits),
                              "\n".join(last_lines)) from None
        raise EngineUnavailable(f"Docker engine unavailable during build: {exc}") from None
    finally:
        if group is not None:
            _remove_containers(base_url, api_version, group.containers())
            if not group.remove():
                log.warning("build cgroup %s not removed yet; swept later", group.name)
            with _active_lock:
                _active.discard(group.name)
            with contextlib.suppress(OSError):
                remove_stale(owner)
        api.close()
    return image_id


def _context_tar(context: Path | ZipContext) -> Iterator[bytes]:
    """The context's tar: what .dockerignore leaves, as docker build reads it; the
    Dockerfile always. A bad .dockerignore fails the build before anything is sent."""
    try:
        if isinstance(context, ZipContext):
            return context.tar({"Dockerfile"})
        return tar_stream(list(dockerignore.context_files(context, {"Dockerfile"})))
    except JobRejected:
        raise  # the archive itself (ZipContext.verify): refused as at intake
    except (DopqError, OSError) as exc:
        raise BuildFailed(f"build context: {exc}", "") from None


def _reason(error: str, group: BuildCgroup | None, timed_out: threading.Event,
            limits: BuildLimits) -> str:
    error = error.strip().splitlines()[-1][:240] if error.strip() else ""
    hit = group.limits_reached() if group is not None else []
    if timed_out.is_set():
        text = f"stopped at the build time limit of {_fmt_seconds(limits.time_limit)}"
        return text + (f" (it reached its {' and '.join(hit)})" if hit else "")
    if hit:
        return f"reached its {' and '.join(hit)}: {error}"
    if group is None and limits.memory and "code: 137" in error:
        return f"{error} (killed: probably its memory limit of {_fmt_bytes(limits.memory)})"
    return error or "build failed"


def _remove_containers(base_url: str, api_version: str, ids: list[str]) -> None:
    if not ids:
        return
    with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException,
                             OSError), \
            docker.APIClient(base_url=base_url, version=api_version, timeout=30) as api:
        for cid in ids:
            with contextlib.suppress(docker.errors.DockerException,
                                     requests.exceptions.RequestException, OSError):
                api.remove_container(cid, force=True, v=True)

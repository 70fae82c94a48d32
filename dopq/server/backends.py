"""Where jobs' containers run: this host's Docker engine, or a Slurm cluster's nodes.

:class:`Backend` holds the two runtimes the server needs: ``images`` (always
this host's engine: builds, tags, pushes) and ``jobs`` (what the queue thread
starts, watches and stops containers through: the same engine, or
:class:`dopq.server.slurm.SlurmRuntime`). On a cluster it also

- pushes a job's image to ``[registry] url`` before its start (once per
  image id), and hands the node the registry's name for it;
- turns the cluster's nodes into the scheduler's :class:`NodeSeen` events;
- lets the queue name a job's container by its name, as on one host (the
  store keeps names; Slurm knows its own job ids).
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dopq.core import events as ev
from dopq.core.capacity import LOCAL
from dopq.core.errors import DopqError
from dopq.core.settings import Settings
from dopq.server.runspec import ContainerSpec, ContainerStatus, JobRuntime
from dopq.server.runtime import ContainerRuntime
from dopq.server.store import JobRow

log = logging.getLogger("dopq.server.backends")


class Backend:
    """The runtimes of one server and what differs between one host and a cluster."""

    def __init__(self, settings: Settings, docker: ContainerRuntime, owner: str,
                 jobs: JobRuntime | None = None) -> None:
        self.settings = settings
        self.owner = owner
        self.images = docker
        self.cluster = settings.runtime.backend == "slurm"
        if jobs is None and self.cluster:
            from dopq.server.slurm import SlurmRuntime  # only a cluster server needs it

            jobs = ClusterJobs(SlurmRuntime(settings, owner), settings)
        self.jobs: JobRuntime = jobs if jobs is not None else docker
        self._pushed: dict[str, str] = {}  # local image -> its name in the registry
        self._push_lock = threading.Lock()
        self._nodes: set[str] = set()

    # -- starting a job --------------------------------------------------------------------
    def adapt(self, spec: ContainerSpec, node: str, row: JobRow) -> ContainerSpec:
        """``spec`` as this backend runs it: on a cluster, on ``node``, from the registry."""
        if not self.cluster:
            return spec
        spec.node = "" if node == LOCAL else node
        spec.time_limit = row["time_limit"]
        spec.image = self.publish(spec.image)
        return spec

    def container_ref(self, name: str, started: str) -> str:
        """What the store keeps to find a job's container: its name on one host (found
        by name after a crash), this run's cluster id on a cluster (a rerun's differs,
        so removing the old run never touches the new one)."""
        return started if self.cluster else name

    def publish(self, image: str) -> str:
        """Push ``image`` to the registry (once per image id); its name there."""
        url = self.settings.registry.url
        info = self.images.inspect_image(image)
        if info is None:
            raise DopqError(f"image {image} is gone from the server's engine")
        key = str(info.get("Id") or image)
        with self._push_lock:
            if key in self._pushed:
                return self._pushed[key]
            # Named by content: jobs of one image share it, and a node's engine that
            # has it already need not pull (dopq.server.batch).
            target = f"{url}/dopq-images/{self.owner}:{key.rpartition(':')[2][:64]}"
            self.images.push(image, target)
            self._pushed[key] = target
        return target

    # -- the cluster's nodes --------------------------------------------------------------
    def largest_node(self) -> int:
        """GPUs of the cluster's largest node (what one job may ask for);
        ``[gpus] virtual_count`` when the cluster does not answer now."""
        try:
            nodes = self.jobs.nodes()  # type: ignore[attr-defined]
            return max((n.gpus for n in nodes), default=0)
        except DopqError as exc:
            log.warning("cluster nodes unknown at start (%s): assuming %d GPUs per node",
                        exc, self.settings.gpus.virtual_count)
            return self.settings.gpus.virtual_count

    def node_events(self) -> builtins.list[ev.NodeSeen]:
        """The nodes as the cluster reports them now (none on one host); a node that
        is no longer reported comes once more, with no devices and closed."""
        nodes = getattr(self.jobs, "nodes", None)
        if not self.cluster or nodes is None:
            return []
        seen = [ev.NodeSeen(n.name, n.gpus, n.usable, n.foreign_gpus) for n in nodes()]
        names = {e.name for e in seen}
        gone = [ev.NodeSeen(name, 0, False) for name in sorted(self._nodes - names)]
        self._nodes = names
        return seen + gone


class ClusterJobs:
    """A cluster runtime under the names the queue gives containers.

    The store keeps each run's cluster id (:meth:`Backend.container_ref`), but
    the queue still names a container by its name (``dopq-<owner>-<id>``) where
    it has no run at hand (a stop or a removal by job). Calls with a name are
    sent on with the cluster's id, found from the last :meth:`list` (read again
    when a name is new).
    """

    def __init__(self, runtime: Any, settings: Settings) -> None:
        self.runtime = runtime
        self.instance = settings.docker.name_prefix
        self._ids: dict[str, str] = {}
        self._lock = threading.Lock()

    def _ref(self, ref: str) -> str:
        with self._lock:
            known = self._ids.get(ref)
        if known is not None or ref.startswith("slurm-"):
            return known or ref
        self.list(self.instance)
        with self._lock:
            return self._ids.get(ref, ref)

    def _seen(self, st: ContainerStatus | None) -> ContainerStatus | None:
        if st is None:
            return None
        with self._lock:
            self._ids[st.name] = st.id
        return st

    def ping(self) -> bool:
        return bool(self.runtime.ping())

    def run(self, spec: ContainerSpec) -> str:
        ref = str(self.runtime.run(spec))
        with self._lock:
            self._ids[spec.name] = ref
        return ref

    def status(self, ref: str) -> ContainerStatus | None:
        return self._seen(self.runtime.status(self._ref(ref)))

    def list(self, instance: str, owner: str | None = None) -> builtins.list[ContainerStatus]:
        out = [self._seen(st) for st in self.runtime.list(instance, owner)]
        return [st for st in out if st is not None]

    def stop(self, ref: str, grace: float, *, owner: str) -> None:
        self.runtime.stop(self._ref(ref), grace, owner=owner)

    def remove(self, ref: str, *, owner: str) -> None:
        self.runtime.remove(self._ref(ref), owner=owner)

    def logs(self, ref: str, *, tail: int | str = "all") -> bytes:
        return bytes(self.runtime.logs(self._ref(ref), tail=tail))

    def save_logs(self, ref: str, path: Path, cap: int) -> int:
        return int(self.runtime.save_logs(self._ref(ref), path, cap))

    def stats(self, ref: str) -> dict[str, float] | None:
        return None  # the nodes' engines are not this server's to ask

    def events(self, owner: str, stop: threading.Event) -> Iterator[dict[str, Any]]:
        return iter(self.runtime.events(owner, stop))

    def foreign_gpu_envs(
            self, owner: str) -> builtins.list[tuple[builtins.list[str], builtins.list[str]]]:
        return []

    def has_nvidia_runtime(self) -> bool:
        return False

    def nodes(self) -> builtins.list[Any]:
        return list(self.runtime.nodes())

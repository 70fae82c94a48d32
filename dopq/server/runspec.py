"""What a job runtime is given and reports: the seam's data, shared by its backends.

``ContainerSpec`` is what the queue thread asks a runtime to run for one job,
``ContainerStatus`` what a runtime says about it. :class:`JobRuntime` lists
the calls the queue thread, the starter, the housekeeper and the supervisor
make, which both ``dopq.server.runtime.ContainerRuntime`` (this host's Docker
engine) and ``dopq.server.slurm.SlurmRuntime`` (a Slurm cluster) answer.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

LABEL_JOB = "dopq.job"
LABEL_INSTANCE = "dopq.instance"
LABEL_USER = "dopq.user"
LABEL_CONTEXT = "dopq.context"
LABEL_OWNER = "dopq.owner"  # the store's unique id: two servers never touch each other's


@dataclass
class ContainerSpec:
    """What the queue thread asks the engine to run for one job."""

    name: str
    image: str
    labels: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] | str | None = None
    entrypoint: list[str] | str | None = None
    working_dir: str | None = None
    user: str | None = None
    mem_limit: int | None = None
    nano_cpus: int | None = None
    shm_size: int | None = None
    pids_limit: int | None = None
    network: str = "none"
    binds: dict[str, dict[str, str]] = field(default_factory=dict)
    gpus: list[int] = field(default_factory=list)
    gpu_mode: str = "env"  # nvidia: DeviceRequest; env: NVIDIA_VISIBLE_DEVICES only
    device_ids: list[str] = field(default_factory=list)  # gpus by UUID (MIG); []: by index
    cap_add: list[str] = field(default_factory=list)
    read_only: bool = False
    log_max_bytes: int | None = None
    tty: bool = False
    stop_signal: str | None = None
    ulimits: list[dict[str, Any]] = field(default_factory=list)
    node: str = ""  # the node it runs on (a cluster backend); "" on this host
    time_limit: float | None = None  # seconds; a cluster backend enforces it too


@dataclass
class ContainerStatus:
    id: str
    name: str
    job_id: int | None
    running: bool
    exit_code: int | None
    oom_killed: bool
    started_at: float | None
    finished_at: float | None
    pids: list[int] = field(default_factory=list)
    owner: str | None = None
    created: bool = False  # created but never started
    node: str | None = None  # where it runs (a cluster backend)
    reason: str | None = None  # why it ended without an exit code (node failure, lost)


class JobRuntime(Protocol):
    """The calls made on whatever runs the jobs' containers."""

    def ping(self) -> bool: ...
    def run(self, spec: ContainerSpec) -> str: ...
    def status(self, ref: str) -> ContainerStatus | None: ...
    def list(self, instance: str, owner: str | None = None
             ) -> builtins.list[ContainerStatus]: ...
    def stop(self, ref: str, grace: float, *, owner: str) -> None: ...
    def remove(self, ref: str, *, owner: str) -> None: ...
    def logs(self, ref: str, *, tail: int | str = "all") -> bytes: ...
    def save_logs(self, ref: str, path: Path, cap: int) -> int: ...
    def stats(self, ref: str) -> dict[str, float] | None: ...
    def events(self, owner: str, stop: threading.Event) -> Iterator[dict[str, Any]]: ...
    def foreign_gpu_envs(
        self, owner: str) -> builtins.list[tuple[builtins.list[str], builtins.list[str]]]: ...
    def has_nvidia_runtime(self) -> bool: ...

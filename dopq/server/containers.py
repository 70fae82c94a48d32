"""What a job's container looks like: its name and its :class:`ContainerSpec`.

Built from the job's row, the settings and the GPUs the scheduler gave it;
the queue thread hands the spec to ``ContainerRuntime.run``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dopq.core.capacity import Device
from dopq.core.settings import Settings
from dopq.server.outputs import OutputFolders
from dopq.server.runtime import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_OWNER,
    LABEL_USER,
    ContainerSpec,
)
from dopq.server.store import JobRow


def container_name(instance: str, owner: str, job_id: int) -> str:
    """``<prefix>-<owner>-<job-id>``: unique per server, even with one prefix."""
    return f"{instance}-{owner[:8]}-{job_id}"


def container_spec(
    settings: Settings, folders: OutputFolders, row: JobRow, gpus: list[int], *,
    instance: str, owner: str, gpu_mode: str, devices: Mapping[int, Device] | None = None,
) -> ContainerSpec:
    """The container of ``row`` on ``gpus``; prepares the user's output folder.

    A device with a UUID in ``devices`` is given to the container by it (a MIG
    instance has no index the NVIDIA runtime understands); ``DOPQ_GPUS``
    keeps DoPQ's indices.
    """
    s = settings
    spec: dict[str, Any] = row["spec"] or {}
    user = row["user"]
    outdir = folders.prepare(user, row["id"])  # the user's, 0700, on the nosuid mount
    binds = {str(outdir): {"bind": "/outdir", "mode": "rw"}}
    for m in s.mounts:
        binds[m.source] = {"bind": m.target, "mode": "ro" if m.read_only else "rw"}
    env = {str(k): str(v) for k, v in (spec.get("env") or {}).items()}
    run_params: dict[str, Any] = spec.get("run_params") or {}
    env.update({str(k): str(v) for k, v in (run_params.get("environment") or {}).items()})
    env["DOPQ_JOB_ID"] = str(row["id"])
    env["DOPQ_GPUS"] = ",".join(str(g) for g in gpus)
    env["DOPQ_USER"] = user
    # 0 on the first run; after a preemption the job finds its /outdir as it left it
    env["DOPQ_RESTART_COUNT"] = str(row.get("restarts") or 0)
    if row["array_index"] is not None:
        env["DOPQ_ARRAY_INDEX"] = str(row["array_index"])
        env["DOPQ_ARRAY_JOB_ID"] = str(row["array_parent"])
    memory = spec.get("memory") or s.bytes_of("limits.default_memory")
    cpus = spec.get("cpus") or s.limits.default_cpus
    shm = spec.get("shm_size") or s.bytes_of("limits.default_shm")
    return ContainerSpec(
        name=container_name(instance, owner, row["id"]),
        image=row["image"],
        labels={**{str(k): str(v) for k, v in (run_params.get("labels") or {}).items()},
                LABEL_JOB: str(row["id"]), LABEL_INSTANCE: instance, LABEL_USER: user,
                LABEL_OWNER: owner},
        env=env,
        command=spec.get("command") or run_params.get("command"),
        entrypoint=run_params.get("entrypoint"),
        working_dir=run_params.get("working_dir"),
        user=run_params.get("user"),
        mem_limit=int(memory),
        nano_cpus=int(float(cpus) * 1e9),
        shm_size=int(shm),
        pids_limit=s.docker.pids_limit,
        network=s.docker.network,
        binds=binds,
        gpus=gpus,
        gpu_mode=gpu_mode,
        device_ids=device_ids(gpus, devices or {}),
        cap_add=list(s.docker.cap_add),
        read_only=s.docker.read_only_rootfs,
        log_max_bytes=s.bytes_of("docker.log_max_bytes"),
        tty=bool(run_params.get("tty", False)),
        stop_signal=run_params.get("stop_signal"),
        ulimits=list(run_params.get("ulimits") or []),
    )


def device_ids(gpus: list[int], devices: Mapping[int, Device]) -> list[str]:
    """How ``NVIDIA_VISIBLE_DEVICES`` and the DeviceRequest name ``gpus``: the UUID
    where the device has one, else its index."""
    return [devices[g].uuid if g in devices and devices[g].uuid else str(g) for g in gpus]

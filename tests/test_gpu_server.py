"""The server's side of GPU sharing: foreign processes, the GPU watch's stops, MIG containers.

The queue thread is driven by hand with the fake engine of test_scheduler_driver;
the last tests run a real server on virtual GPUs and the real Docker engine.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, make_config, wait_for
from hostile import good_job
from test_scheduler_driver import Clock, FakeEngine

from dopq.core import settings as settings_mod
from dopq.core.capacity import Device
from dopq.core.jobs import JobState
from dopq.server.containers import device_ids
from dopq.server.gpus import GIB, VirtualBackend, mig_index
from dopq.server.queue import PriorityQueueThread
from dopq.server.runtime import ContainerSpec
from dopq.server.store import Store

MIG_A, MIG_B = mig_index(0, 0), mig_index(0, 1)
DEVICES = [Device(MIG_A, "MIG-aaaa", 20 * GIB, 0), Device(MIG_B, "MIG-bbbb", 20 * GIB, 0),
           Device(1, "GPU-1111", 80 * GIB)]


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    settings = settings_mod.from_dict(make_config(tmp_path, docker={"stop_grace": 1.0}))
    store = Store(settings.db_path)
    clock = Clock()
    engine = FakeEngine(store.owner_id())
    q = PriorityQueueThread(settings, store, engine, DEVICES, "env", clock=clock)  # type: ignore[arg-type]
    specs: list[ContainerSpec] = []
    real_spec = q.container_spec

    def spec(row: Any, gpus: list[int]) -> ContainerSpec:
        made = real_spec(row, gpus)
        specs.append(made)
        return ContainerSpec(name=made.name, image="img", labels={"dopq.job": str(row["id"])},
                             gpus=gpus, device_ids=made.device_ids)

    q.container_spec = spec  # type: ignore[method-assign]

    class Rig:
        pass

    r = Rig()
    r.store, r.clock, r.engine, r.q, r.specs = store, clock, engine, q, specs  # type: ignore[attr-defined]

    def add(gpus: int = 1, **kw: Any) -> int:
        return store.add_job(name="job", user="alice", state=JobState.QUEUED, num_gpus=gpus,
                             submitted_at=clock.now, image="img", **kw)

    def step(advance: float = 0.0, exited: list[str] | None = None) -> None:
        clock.now += advance
        q.step(exited)
        q.scheduler.validate()

    r.add, r.step = add, step  # type: ignore[attr-defined]
    q.recover()
    yield r
    q._workers.shutdown(wait=True)
    store.close()


def test_node_has_the_devices_with_memory_and_the_reserve(rig: Any) -> None:
    node = rig.q.scheduler.capacity.default
    assert node.devices[MIG_A] == Device(MIG_A, "MIG-aaaa", 20 * GIB, 0)
    assert set(node.pool.total) == {MIG_A, MIG_B, 1}
    assert rig.q.scheduler.memory_reserve == GIB  # [gpus] memory_reserve, default 1g


def test_containers_get_mig_uuids_and_dopq_gpus_keeps_indices(rig: Any) -> None:
    jobs = [rig.add(), rig.add(), rig.add()]
    rig.step()
    assert [rig.store.job(j)["state"] for j in jobs] == ["running"] * 3
    by_gpu = {tuple(s.gpus): s for s in rig.specs}
    assert by_gpu[(MIG_A,)].device_ids == ["MIG-aaaa"]
    assert by_gpu[(MIG_A,)].env["DOPQ_GPUS"] == str(MIG_A)
    assert by_gpu[(1,)].device_ids == ["GPU-1111"]


def test_device_ids() -> None:
    devices = {d.index: d for d in DEVICES} | {2: Device(2)}
    assert device_ids([MIG_B, 2, 1], devices) == ["MIG-bbbb", "2", "GPU-1111"]
    assert device_ids([0], {}) == ["0"]


def test_runtime_names_devices_by_uuid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dopq.server import runtime as runtime_mod

    seen: dict[str, Any] = {}

    class Api:
        def create_host_config(self, **kw: Any) -> dict[str, Any]:
            seen["host"] = kw
            return kw

        def create_container(self, **kw: Any) -> dict[str, str]:
            seen["container"] = kw
            raise RuntimeError("stop here")

    rt = runtime_mod.ContainerRuntime.__new__(runtime_mod.ContainerRuntime)
    monkeypatch.setattr(rt, "_call", lambda fn, *a, **kw: fn(*a, **kw), raising=False)
    monkeypatch.setattr(runtime_mod.ContainerRuntime, "api", Api(), raising=False)
    spec = ContainerSpec(name="n", image="i", labels={}, gpus=[MIG_A], gpu_mode="nvidia",
                         device_ids=["MIG-aaaa"])
    with pytest.raises(Exception):  # noqa: B017 - only what was asked for matters
        rt.run(spec)
    assert seen["container"]["environment"]["NVIDIA_VISIBLE_DEVICES"] == "MIG-aaaa"
    (request,) = seen["host"]["device_requests"]
    assert request["DeviceIDs"] == ["MIG-aaaa"]


def test_foreign_memory_keeps_whole_gpu_jobs_off_the_device(rig: Any) -> None:
    rig.q.set_foreign({1: 3 * GIB, MIG_A: GIB, MIG_B: GIB})
    job = rig.add()
    rig.step()
    assert rig.store.job(job)["state"] == "queued"
    rig.q.set_foreign({MIG_A: GIB, MIG_B: GIB})  # the process on GPU 1 went
    rig.step(1.0)
    assert rig.store.job(job)["state"] == "running" and rig.store.job(job)["gpus"] == [1]


def test_stop_for_gpu_fails_the_job_with_the_reason(rig: Any) -> None:
    job = rig.add(gpu_memory=4 * GIB)
    rig.step()
    assert rig.store.job(job)["state"] == "running"
    reason = "used 14.2 GiB of GPU memory, declared 4 GiB"
    rig.q.stop_for_gpu(job, reason)
    name = rig.q.container_name(job)
    wait_for(lambda: name in rig.engine.stopped, 10)
    rig.engine.exit(name, 137, rig.clock.now)
    rig.step(1.0, [name])
    row = rig.store.job(job)
    assert (row["state"], row["error"]) == ("failed", reason)


# ----------------------------------------------------------- a real server, virtual GPUs


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


@pytest.mark.docker
def test_a_foreign_process_keeps_a_whole_gpu_job_off_and_the_status_names_it(
        server_factory: Any, jobs_dir: Path) -> None:
    server: Running = server_factory(gpus={"virtual_count": 1, "sample_interval": 0.1})
    backend = server.server.platform.workers.gpu_backend
    assert isinstance(backend, VirtualBackend)
    backend.set_processes(0, {os.getpid(): 2 * GIB})

    def named() -> Any:
        gpu = server["alice"].call("status")["gpus"][0]
        return gpu if gpu.get("foreign") else None

    gpu = wait_for(named, 30, 0.2)
    assert gpu["foreign"] == [{"pid": os.getpid(), "user": _me(), "memory": 2 * GIB}]
    assert gpu["external"] is True
    job = server["alice"].submit(good_job(jobs_dir, "alice", "whole", "echo ran", num_gpus=1))
    wait_for(lambda: server["alice"].call("job", job["id"])["state"] == "queued", 60, 0.2)
    wait_for(lambda: server["alice"].call("job", job["id"])["reason"] is not None, 10, 0.2)
    assert server["alice"].call("job", job["id"])["state"] == "queued"
    backend.set_processes(0, {})  # the process went: the device is used again
    done = server.wait_job(job["id"], 60)
    assert done["state"] == "succeeded" and done["gpus"] == [0]


@pytest.mark.docker
def test_a_shared_job_over_its_gpu_memory_is_warned_then_stopped(
        server_factory: Any, jobs_dir: Path) -> None:
    server: Running = server_factory(gpus={"virtual_count": 1, "sample_interval": 0.1})
    platform = server.server.platform
    backend = platform.workers.gpu_backend
    assert isinstance(backend, VirtualBackend)
    folder = good_job(jobs_dir, "alice", "greedy", "sleep 60", num_gpus=1,
                      config={"gpu_memory": "4g"})
    job = server["alice"].submit(folder)["id"]

    def first_pid() -> int | None:
        row = platform.store.job(job)
        st = platform.runtime.status(row["container"]) if row["container"] else None
        return st.pids[0] if st is not None and st.pids else None

    pid = wait_for(first_pid, 90, 0.2)
    backend.set_processes(0, {pid: 6 * GIB})
    done = server.wait_job(job, 60)
    reason = "used 6 GiB of GPU memory, declared 4 GiB"
    assert (done["state"], done["error"]) == ("failed", reason)
    details = [e["detail"] for e in server["alice"].call("job", job)["events"]]
    assert reason in details  # the warning, before the stop

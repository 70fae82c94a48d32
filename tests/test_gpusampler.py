"""The GPU sampler: processes mapped to jobs, foreign memory, the GPU watch's actions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dopq.core.gpuwatch import Act, Action, WatchConfig
from dopq.server.gpus import GIB, GpuInfo, GpuSample, VirtualBackend, mig_index
from dopq.server.gpusampler import GpuJob, GpuSampler, ProcFs

CID = "ab" * 32  # a container's full id


class FakeProc(ProcFs):
    """Processes as a table: pid -> (parent, cgroup, user)."""

    def __init__(self, table: dict[int, tuple[int, str, str]]) -> None:
        self.table = table

    def cgroup(self, pid: int) -> str:
        return self.table.get(pid, (0, "", ""))[1]

    def parent(self, pid: int) -> int | None:
        return self.table[pid][0] if pid in self.table else None

    def user(self, pid: int) -> str:
        return self.table.get(pid, (0, "", "?"))[2]


PROCS = FakeProc({
    500: (1, "0::/system.slice/containerd.service", "root"),  # job 1's first process
    501: (500, "0::/", "alice"),  # ... its child, found by ancestry
    502: (9, f"0::/system.slice/docker-{CID}.scope", "alice"),  # job 2, by cgroup
    900: (1, "0::/user.slice", "mallory"),  # nobody's job
    901: (1, "0::/user.slice", "mallory"),
})
DEVICES = [GpuInfo(0, "GPU-a", "G", 16 * GIB, 0), GpuInfo(1, "GPU-b", "G", 16 * GIB, 1)]
CFG = WatchConfig(enforcement="kill", tolerance=256 * 1024**2, idle_after=60.0)


def sample(index: int, procs: dict[int, int | None], used: int | None = None,
           util: float | None = None) -> GpuSample:
    known = tuple(sorted((p, m) for p, m in procs.items() if m is not None))
    return GpuSample(index, util, used, 16 * GIB, tuple(sorted(procs)), known)


def test_processes_are_mapped_to_jobs_by_pid_cgroup_and_ancestry() -> None:
    sampler = GpuSampler(DEVICES, CFG, PROCS)
    jobs = [GpuJob(1, "alice", (0,), 4 * GIB, "x" * 64, (500,)),
            GpuJob(2, "alice", (1,), 0, CID, (700,))]
    got = sampler.observe([sample(0, {500: GIB, 501: 2 * GIB}, util=50.0),
                           sample(1, {502: 5 * GIB}, util=70.0)], jobs, 0.0)
    assert got.foreign == {}
    assert got.jobs == {
        1: {"gpu_memory_used": 3 * GIB, "gpu_utilisation": 50.0, "idle_since": None},
        2: {"gpu_memory_used": 5 * GIB, "gpu_utilisation": 70.0, "idle_since": None},
    }
    assert got.devices[0] == {"index": 0, "uuid": "GPU-a", "memory": 16 * GIB, "used": None,
                              "holders": [{"job": 1, "user": "alice", "memory": 3 * GIB}],
                              "foreign": []}
    assert got.actions == []


def test_foreign_processes_memory_and_one_warning_each(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    sampler = GpuSampler(DEVICES, CFG, PROCS)
    jobs = [GpuJob(1, "alice", (0,), 4 * GIB, "", (500,))]
    caplog.set_level(logging.WARNING, "dopq.server.gpusampler")
    rounds = [
        [sample(0, {500: GIB, 900: 3 * GIB}), sample(1, {901: 2 * GIB})],
        [sample(0, {500: GIB, 900: 3 * GIB}), sample(1, {901: 2 * GIB})],
    ]
    for r in rounds:
        got = sampler.observe(r, jobs, 0.0)
        assert got.foreign == {0: 3 * GIB, 1: 2 * GIB}
    assert got.devices[0]["foreign"] == [{"pid": 900, "user": "mallory", "memory": 3 * GIB}]
    assert got.devices[1]["holders"] == []
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "process 900 of user mallory" in warned[0]
    # gone, then back: warned again
    sampler.observe([sample(0, {500: GIB}), sample(1, {})], jobs, 0.0)
    assert sampler.observe([sample(0, {900: GIB}), sample(1, {})], jobs, 0.0).foreign == {
        0: GIB}
    assert len(caplog.records) == 3


def test_foreign_memory_without_figures() -> None:
    sampler = GpuSampler(DEVICES, CFG, PROCS)
    jobs = [GpuJob(1, "alice", (0,), 0, "", (500,))]
    # no figure for 900: the device's use less ours; no device figure: the whole device
    got = sampler.observe([sample(0, {500: GIB, 900: None}, used=6 * GIB),
                           sample(1, {901: None})], jobs, 0.0)
    assert got.foreign == {0: 5 * GIB, 1: 16 * GIB}


def test_devices_named_by_foreign_containers_and_mig_parents() -> None:
    devices = [GpuInfo(0, "GPU-a", "G", 16 * GIB, 0),
               GpuInfo(mig_index(1, 0), "MIG-x", "M", 8 * GIB, None, parent=1),
               GpuInfo(mig_index(1, 1), "MIG-y", "M", 8 * GIB, None, parent=1)]
    sampler = GpuSampler(devices, CFG, PROCS)
    samples = [sample(0, {}, used=GIB), sample(1032, {}), sample(1033, {})]
    got = sampler.observe(samples, [], 0.0, busy={0, 1, 7})
    assert got.foreign == {0: GIB, 1032: 8 * GIB, 1033: 8 * GIB}  # 7: not here


def test_the_watch_warns_then_stops_a_shared_job_over_its_memory() -> None:
    sampler = GpuSampler(DEVICES, CFG, PROCS)
    jobs = [GpuJob(1, "alice", (0,), 4 * GIB, "", (500,)),
            GpuJob(2, "bob", (1,), 0, CID, ())]  # whole GPU: never memory-enforced
    over = [sample(0, {500: 5 * GIB}, util=90.0), sample(1, {502: 15 * GIB}, util=90.0)]
    reason = "used 5 GiB of GPU memory, declared 4 GiB"
    assert sampler.observe(over, jobs, 0.0).actions == [Action(Act.WARN, 1, reason)]
    assert sampler.observe(over, jobs, 5.0).actions == [Action(Act.STOP, 1, reason)]
    assert sampler.observe(over, jobs, 10.0).actions == []
    assert sampler.observe(over, jobs[1:], 15.0).actions == []
    assert set(sampler.watch) == {2}  # the state of a job that ended goes


def test_idle_jobs_are_marked_and_reported() -> None:
    sampler = GpuSampler(DEVICES, CFG, PROCS)
    jobs = [GpuJob(1, "alice", (0, 1), 0, "", (500,))]
    quiet = [sample(0, {500: GIB}, util=0.0), sample(1, {}, util=3.0)]
    assert sampler.observe(quiet, jobs, 100.0).jobs[1]["idle_since"] is None
    got = sampler.observe(quiet, jobs, 160.0)
    assert got.actions == [Action(Act.IDLE, 1, "idle: GPUs at 3% for 1m")]
    assert got.jobs[1]["idle_since"] == 100.0
    busy = [sample(0, {500: GIB}, util=0.0), sample(1, {}, util=30.0)]
    assert sampler.observe(busy, jobs, 170.0).jobs[1]["idle_since"] is None


def test_virtual_backend_through_the_sampler() -> None:
    backend = VirtualBackend(2, 16 * GIB)
    sampler = GpuSampler(backend.devices(), CFG, PROCS)
    backend.set_processes(1, {900: 2 * GIB})
    got = sampler.observe(backend.sample(), [], 0.0)
    assert got.foreign == {1: 2 * GIB}
    assert got.devices[1]["foreign"] == [{"pid": 900, "user": "mallory", "memory": 2 * GIB}]


def test_procfs_reads_this_process(tmp_path: Path) -> None:
    proc = ProcFs()
    me = os.getpid()
    assert proc.parent(me) == os.getppid()
    assert proc.user(me) not in ("", "?")
    assert isinstance(proc.cgroup(me), str)
    fake = tmp_path / "42"
    fake.mkdir()
    (fake / "stat").write_text("42 (a (b) c) S 17 42 42 0 -1")
    assert ProcFs(tmp_path).parent(42) == 17
    assert ProcFs(tmp_path).parent(43) is None and ProcFs(tmp_path).user(43) == "?"
    assert ProcFs(tmp_path).cgroup(43) == ""

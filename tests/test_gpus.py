"""GPU pool accounting, the pure helpers, and both backends (NVML through a fake)."""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest

from dopq.core.capacity import Device
from dopq.core.errors import ConfigError, Conflict, DopqError
from dopq.server.gpus import (
    GIB,
    VIRTUAL_MEMORY,
    GpuInfo,
    GpuPool,
    GpuSample,
    NvmlBackend,
    VirtualBackend,
    as_devices,
    external_busy,
    mig_children,
    mig_index,
    open_backend,
    parse_visible,
    uuid_index,
    visible_devices_in_env,
)

# ------------------------------------------------------------------------- pool


def test_pool_acquire_release_keeps_invariants() -> None:
    pool = GpuPool(range(4))
    pool.validate()
    assert pool.free() == {0, 1, 2, 3}

    pool.acquire(10, [2, 0])
    pool.validate()
    assert pool.free() == {1, 3}
    assert pool.held() == {0: 10, 2: 10}
    assert pool.holder(2) == 10 and pool.holder(1) is None
    assert pool.of(10) == (2, 0)

    pool.acquire(11, [1])
    pool.validate()
    assert pool.free() == {3}

    assert pool.release(10) == (2, 0)
    pool.validate()
    assert pool.free() == {0, 2, 3}
    assert pool.held() == {1: 11}

    assert pool.release(10) == ()  # twice is harmless
    assert pool.release(11) == (1,)
    pool.validate()
    assert pool.free() == pool.total == {0, 1, 2, 3}


def test_pool_cpu_only_job_holds_nothing() -> None:
    pool = GpuPool(range(2))
    pool.acquire(1, [])
    pool.validate()
    assert pool.free() == {0, 1}
    assert pool.release(1) == ()
    pool.validate()


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ([0], "held by job 1"),
        ([1, 0], "held by job 1"),
        ([7], "unknown GPU 7"),
        ([1, 1], "twice"),
        ([3], "outside DoPQ"),
    ],
)
def test_pool_conflicts_change_nothing(gpus: list[int], message: str) -> None:
    pool = GpuPool(range(4))
    pool.acquire(1, [0])
    pool.set_external({3})
    before = (pool.free(), pool.held(), pool.external())
    with pytest.raises(Conflict, match=message) as info:
        pool.acquire(2, gpus)
    assert isinstance(info.value, DopqError)
    assert (pool.free(), pool.held(), pool.external()) == before
    pool.validate()


def test_pool_same_job_cannot_acquire_twice() -> None:
    pool = GpuPool(range(4))
    pool.acquire(1, [0])
    with pytest.raises(Conflict, match="already holds"):
        pool.acquire(1, [1])
    pool.validate()
    assert pool.of(1) == (0,)


def test_pool_external_gpus_are_neither_free_nor_held() -> None:
    pool = GpuPool(range(4))
    pool.acquire(5, [1])
    pool.set_external({0, 1, 9})  # 1 is ours, 9 is not on this host
    pool.validate()
    assert pool.external() == {0}
    assert pool.free() == {2, 3}
    assert pool.held() == {1: 5}

    pool.set_external(set())
    pool.validate()
    assert pool.free() == {0, 2, 3}


def test_pool_validate_reports_corruption() -> None:
    pool = GpuPool(range(2))
    pool.acquire(1, [0])
    pool._holder[1] = 2  # a GPU recorded held with no job behind it
    with pytest.raises(AssertionError, match="disagrees"):
        pool.validate()

    pool = GpuPool(range(2))
    pool.acquire(1, [0])
    pool._external = frozenset({0})
    with pytest.raises(AssertionError, match="both held and external"):
        pool.validate()

    pool = GpuPool(range(2))
    pool.acquire(1, [0])
    pool._jobs[2] = (0,)
    with pytest.raises(AssertionError, match="GPU 0 held by jobs 1 and 2"):
        pool.validate()


# ----------------------------------------------------------------- pure helpers


def _sample(index: int, *pids: int) -> GpuSample:
    return GpuSample(index, None, None, None, tuple(pids))


def test_external_busy() -> None:
    samples = [_sample(0), _sample(1, 100), _sample(2, 100, 200), _sample(3, 300)]
    assert external_busy(samples, {100}) == {2, 3}
    assert external_busy(samples, {100, 200, 300}) == set()
    assert external_busy(samples, set()) == {1, 2, 3}
    assert external_busy([], {1}) == set()


UUIDS = {"GPU-aaaa-1111": 0, "GPU-bbbb-2222": 1, "GPU-cccc-3333": 2}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", None),
        (" ALL ", None),
        ("", set()),
        ("none", set()),
        ("void", set()),
        ("0", {0}),
        ("0,2", {0, 2}),
        (" 1 , 3 ", {1, 3}),
        ("GPU-bbbb-2222", {1}),
        ("gpu-CCCC-3333,0", {0, 2}),
        ("0:1,2:0", {0, 2}),  # MIG instances count as their whole GPU
        ("GPU-unknown,1", {1}),
        ("MIG-abc", set()),
    ],
)
def test_parse_visible(value: str, expected: set[int] | None) -> None:
    assert parse_visible(value, UUIDS) == expected


def test_visible_devices_in_env() -> None:
    assert visible_devices_in_env(["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=0,2"]) == {0, 2}
    assert visible_devices_in_env(["NVIDIA_VISIBLE_DEVICES=all"]) is None
    assert visible_devices_in_env(["NVIDIA_VISIBLE_DEVICES=none"]) == set()
    assert visible_devices_in_env(["PATH=/bin", "NVIDIA_VISIBLE_DEVICES_X=1"]) == set()
    assert visible_devices_in_env([]) == set()
    # the image sets all, the container narrows it: the later entry wins
    env = ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_VISIBLE_DEVICES=GPU-aaaa-1111"]
    assert visible_devices_in_env(env, UUIDS) == {0}
    assert visible_devices_in_env(env) == set()  # no map, nothing to resolve


def test_uuid_index_skips_missing_uuids() -> None:
    devices = [GpuInfo(0, "GPU-a", "x", 1, 0), GpuInfo(1, "", "y", 1, None)]
    assert uuid_index(devices) == {"GPU-a": 0}


# ---------------------------------------------------------------------- virtual


def test_virtual_backend() -> None:
    backend = open_backend("virtual", 3)
    assert backend.kind == "virtual"
    devices = backend.devices()
    assert [d.index for d in devices] == [0, 1, 2]
    assert devices[1] == GpuInfo(1, "GPU-virtual-1", "Virtual GPU", VIRTUAL_MEMORY, 1)
    samples = backend.sample()
    assert [s.index for s in samples] == [0, 1, 2]
    assert all(s.utilization is None and s.processes == () for s in samples)
    assert samples[0].memory_total == 16 * 1024**3
    backend.close()


def test_virtual_backend_pretend_processes() -> None:
    backend = VirtualBackend(2)
    backend.set_processes(1, [42, 7, 42])
    assert backend.sample()[1].processes == (7, 42)
    assert external_busy(backend.sample(), {7}) == {1}
    with pytest.raises(IndexError):
        backend.set_processes(2, [1])


def test_virtual_zero_and_bad_counts() -> None:
    assert open_backend("virtual", 0).devices() == []
    with pytest.raises(ConfigError) as info:
        open_backend("virtual", -1)
    assert info.value.key == "gpus.virtual_count"


def test_unknown_backend_kind() -> None:
    with pytest.raises(ConfigError, match="gpus.backend") as info:
        open_backend("cuda", 1)
    assert info.value.key == "gpus.backend"


# ----------------------------------------------------- NVML on this GPU-less host


def _real_nvml_works() -> bool:
    try:
        backend = NvmlBackend()
    except ConfigError:
        return False
    backend.close()
    return True


needs_no_nvml = pytest.mark.skipif(_real_nvml_works(), reason="this host has NVML")


@needs_no_nvml
def test_auto_falls_back_to_virtual_without_nvml() -> None:
    backend = open_backend("auto", 2)
    assert backend.kind == "virtual"
    assert len(backend.devices()) == 2


@needs_no_nvml
def test_nvml_requested_without_nvml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NVML is not available") as info:
        open_backend("nvml", 2)
    assert info.value.key == "gpus.backend"


def test_nvml_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes the import fail
    with pytest.raises(ConfigError, match="pynvml is not installed"):
        open_backend("nvml", 1)
    assert open_backend("auto", 1).kind == "virtual"


# ------------------------------------------------------- NVML through a fake pynvml


NOT_SUPPORTED = 3
NO_PERMISSION = 4
LIBRARY_NOT_FOUND = 12


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NOT_SUPPORTED: "Not Supported", LIBRARY_NOT_FOUND: "Library Not Found"}.get(
            self.value, "Unknown Error"
        )


class FakeMismatch(Exception):
    """pynvml's NVMLLibraryMismatchError: not an NVMLError subclass."""


def _fake_nvml(
    gpus: list[dict[str, Any]], *, init_error: int | None = None
) -> tuple[types.ModuleType, dict[str, int]]:
    """A stand-in for the pynvml module; a field given as an exception raises it."""
    calls = {"init": 0, "shutdown": 0}
    mod = types.ModuleType("pynvml")

    def entry(handle: Any) -> dict[str, Any]:
        if isinstance(handle, tuple):  # a MIG instance: (gpu, slot)
            return dict(gpus[handle[0]]["mig"][handle[1]])
        return gpus[handle]

    def field(name: str, wrap: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Any]:
        def get(handle: Any) -> Any:
            value = entry(handle)[name]
            if isinstance(value, Exception):
                raise value
            return wrap(value)

        return get

    def init() -> None:
        calls["init"] += 1
        if init_error is not None:
            raise FakeNVMLError(init_error)

    def shutdown() -> None:
        calls["shutdown"] += 1

    def handle_by_index(index: int) -> int:
        if gpus[index].get("lost"):
            raise FakeNVMLError(15)
        return index

    def memory(v: tuple[int, int]) -> Any:
        return types.SimpleNamespace(total=v[0], used=v[1], free=v[0] - v[1])

    def procs(pids: list[int | tuple[int, int]]) -> list[Any]:
        # a bare pid: NVML has no memory figure for it (usedGpuMemory None)
        return [types.SimpleNamespace(pid=p[0], usedGpuMemory=p[1]) if isinstance(p, tuple)
                else types.SimpleNamespace(pid=p, usedGpuMemory=None) for p in pids]

    def mig_mode(handle: Any) -> list[int]:
        mig = entry(handle).get("mig")
        if isinstance(mig, Exception):
            raise mig
        return [1, 1] if mig is not None else [0, 0]

    def mig_count(handle: Any) -> int:
        return len(entry(handle)["mig"])

    def mig_handle(handle: Any, slot: int) -> tuple[int, int]:
        if entry(handle)["mig"][slot] is None:
            raise FakeNVMLError(6)  # NVML_ERROR_NOT_FOUND: an empty slot
        return (handle, slot)

    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    mod.NVMLLibraryMismatchError = FakeMismatch  # type: ignore[attr-defined]
    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = handle_by_index  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = field("uuid")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = field("name")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMinorNumber = field("minor")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = field("memory", memory)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUtilizationRates = field(  # type: ignore[attr-defined]
        "util", lambda v: types.SimpleNamespace(gpu=v[0], memory=v[1])
    )
    mod.nvmlDeviceGetComputeRunningProcesses = field("compute", procs)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetGraphicsRunningProcesses = field("graphics", procs)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMigMode = mig_mode  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMaxMigDeviceCount = mig_count  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle  # type: ignore[attr-defined]
    return mod, calls


def _gpu(**overrides: Any) -> dict[str, Any]:
    gpu: dict[str, Any] = {
        "uuid": "GPU-0000",
        "name": "NVIDIA H100 80GB HBM3",
        "minor": 0,
        "memory": (80 * 1024**3, 1024**3),
        "util": (37, 5),
        "compute": [300, 100],
        "graphics": [],
    }
    gpu.update(overrides)
    return gpu


def test_nvml_backend_reads_devices_and_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [
        _gpu(),
        _gpu(uuid="GPU-1111", name=b"Tesla K80", minor=3, compute=[], graphics=[55]),
    ]
    fake, calls = _fake_nvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    backend = open_backend("auto", 5)
    assert isinstance(backend, NvmlBackend)
    assert backend.kind == "nvml"
    assert backend.devices() == [
        GpuInfo(0, "GPU-0000", "NVIDIA H100 80GB HBM3", 80 * 1024**3, 0),
        GpuInfo(1, "GPU-1111", "Tesla K80", 80 * 1024**3, 3),  # bytes name decoded
    ]
    assert backend.sample() == [
        GpuSample(0, 37.0, 1024**3, 80 * 1024**3, (100, 300)),
        GpuSample(1, 37.0, 1024**3, 80 * 1024**3, (55,)),
    ]
    assert external_busy(backend.sample(), {100, 300}) == {1}
    backend.close()
    backend.close()
    assert calls == {"init": 1, "shutdown": 1}


def test_nvml_backend_unsupported_fields_become_none(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [
        _gpu(
            uuid=FakeNVMLError(NO_PERMISSION),
            name=FakeNVMLError(NOT_SUPPORTED),
            minor=FakeNVMLError(NOT_SUPPORTED),
            memory=FakeNVMLError(NOT_SUPPORTED),
            util=FakeNVMLError(NOT_SUPPORTED),
            compute=FakeMismatch("old driver, new bindings"),
            graphics=FakeNVMLError(NOT_SUPPORTED),
        ),
        _gpu(lost=True),  # no handle: left out, not scheduled
        _gpu(uuid="GPU-2222", compute=FakeNVMLError(NOT_SUPPORTED), graphics=[9, 9]),
    ]
    fake, _ = _fake_nvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", fake)

    backend = open_backend("nvml", 0)
    devices = backend.devices()
    assert [d.index for d in devices] == [0, 2]
    assert devices[0] == GpuInfo(0, "", "Unknown GPU", 0, None)
    assert uuid_index(devices) == {"GPU-2222": 2}
    samples = backend.sample()
    assert samples[0] == GpuSample(0, None, None, None, ())
    assert samples[1].processes == (9,)
    backend.close()


def test_nvml_init_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = _fake_nvml([_gpu()], init_error=LIBRARY_NOT_FOUND)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(ConfigError, match="Library Not Found") as info:
        open_backend("nvml", 1)
    assert info.value.key == "gpus.backend"
    assert open_backend("auto", 1).kind == "virtual"
    assert calls["shutdown"] == 0


def test_nvml_count_failure_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = _fake_nvml([])

    def broken_count() -> int:
        raise FakeNVMLError(999)

    fake.nvmlDeviceGetCount = broken_count  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(ConfigError, match="cannot count devices: Unknown Error"):
        open_backend("nvml", 1)
    assert calls == {"init": 1, "shutdown": 1}


def test_auto_ignores_nvml_without_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = _fake_nvml([])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = open_backend("auto", 2)
    assert backend.kind == "virtual" and len(backend.devices()) == 2
    assert calls == {"init": 1, "shutdown": 1}
    nvml = open_backend("nvml", 2)  # asked for explicitly: honoured, with no GPUs
    assert nvml.kind == "nvml" and nvml.devices() == [] and nvml.sample() == []
    nvml.close()


def test_nvml_without_graphics_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = _fake_nvml([_gpu()])
    del fake.nvmlDeviceGetGraphicsRunningProcesses  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = NvmlBackend()
    assert backend.sample()[0].processes == (100, 300)
    backend.close()


# ------------------------------------------------- per-process memory, MIG, virtual memory


def test_nvml_per_process_memory_and_utilisation(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [_gpu(compute=[(300, 3 * GIB), 100], graphics=[(300, GIB)], util=(64, 10))]
    fake, _ = _fake_nvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = NvmlBackend()
    (sample,) = backend.sample()
    assert sample.processes == (100, 300)
    assert sample.memory_of() == {300: 3 * GIB}  # 100: no figure; 300 listed twice: once
    assert sample.utilization == 64.0
    backend.close()


def _mig_slice(uuid: str, gib: int, compute: list[Any]) -> dict[str, Any]:
    return {"uuid": uuid, "name": "NVIDIA A100 MIG 3g.20gb", "minor": FakeNVMLError(3),
            "memory": (gib * GIB, 0), "util": FakeNVMLError(NOT_SUPPORTED),
            "compute": compute, "graphics": []}


def test_nvml_mig_instances_are_devices_and_the_parent_never_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [
        _gpu(uuid="GPU-whole", compute=[]),
        _gpu(uuid="GPU-parent", memory=(40 * GIB, 0),
             mig=[_mig_slice("MIG-aaaa", 20, [(77, 2 * GIB)]), None,
                  _mig_slice("MIG-bbbb", 10, [])]),
        _gpu(uuid="GPU-old-driver", mig=FakeNVMLError(NOT_SUPPORTED), compute=[]),
    ]
    fake, _ = _fake_nvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = NvmlBackend()
    devices = backend.devices()
    assert [(d.index, d.uuid, d.memory_total, d.parent) for d in devices] == [
        (0, "GPU-whole", 80 * GIB, None),
        (mig_index(1, 0), "MIG-aaaa", 20 * GIB, 1),
        (mig_index(1, 2), "MIG-bbbb", 10 * GIB, 1),
        (2, "GPU-old-driver", 80 * GIB, None),  # MIG mode unknown: a whole GPU
    ]
    assert mig_index(1, 0) == 1032 and mig_index(1, 2) == 1034
    assert 1 not in {d.index for d in devices}  # the parent is not handed out whole
    assert as_devices(devices)[1] == Device(1032, "MIG-aaaa", 20 * GIB, 1)
    assert mig_children(devices) == {1: {1032, 1034}}
    assert uuid_index(devices)["MIG-bbbb"] == 1034
    samples = {s.index: s for s in backend.sample()}
    assert set(samples) == {0, 1032, 1034, 2}
    assert samples[1032].utilization is None  # MIG: not reported
    assert samples[1032].processes == (77,) and samples[1032].memory_of() == {77: 2 * GIB}
    backend.close()


def test_virtual_memory_processes_and_utilisation() -> None:
    backend = open_backend("virtual", 2, 8 * GIB)
    assert [(d.uuid, d.memory_total) for d in backend.devices()] == [
        ("GPU-virtual-0", 8 * GIB), ("GPU-virtual-1", 8 * GIB)]
    assert as_devices(backend.devices())[0] == Device(0, "GPU-virtual-0", 8 * GIB, None)
    assert isinstance(backend, VirtualBackend)
    backend.set_processes(0, {501: 3 * GIB, 502: GIB})
    backend.set_utilisation(0, 40.0)
    s0, s1 = backend.sample()
    assert s0.processes == (501, 502) and s0.memory_of() == {501: 3 * GIB, 502: GIB}
    assert s0.memory_used == 4 * GIB and s0.utilization == 40.0
    assert s1.memory_used is None and s1.utilization is None
    with pytest.raises(IndexError):
        backend.set_utilisation(5, 1.0)


def _nvml_check() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "nvml_check.py"
    spec = importlib.util.spec_from_file_location("nvml_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nvml_check_script(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    gpus = [_gpu(uuid="GPU-whole", compute=[(os.getpid(), 3 * GIB)]),
            _gpu(uuid="GPU-parent", mig=[_mig_slice("MIG-aaaa", 20, [(77, GIB)])])]
    fake, _ = _fake_nvml(gpus)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    check = _nvml_check()
    assert check.main([]) == 0
    out = capsys.readouterr().out
    assert "0: NVIDIA H100 80GB HBM3  GPU-whole" in out and "MIG off" in out
    assert "1: NVIDIA H100 80GB HBM3  GPU-parent" in out and "MIG on" in out
    assert "1032: MIG instance of GPU 1  MIG-aaaa  memory 20480 MiB" in out
    assert f"pid {os.getpid()}  user " in out and "3072 MiB" in out
    assert check.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["uuid"] for d in data["devices"]] == ["GPU-whole", "MIG-aaaa"]
    (proc,) = data["devices"][1]["processes"]
    assert (proc["pid"], proc["memory"]) == (77, GIB) and proc["user"]


def test_nvml_check_without_nvml(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert _nvml_check().main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NVML is not usable here" in err


def test_nvml_older_process_listing_when_the_default_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = _fake_nvml([_gpu(compute=FakeMismatch("no _v3 in this driver"))])
    fake.nvmlDeviceGetComputeRunningProcesses_v2 = (  # type: ignore[attr-defined]
        lambda handle: [types.SimpleNamespace(pid=5, usedGpuMemory=GIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    backend = NvmlBackend()
    assert backend.sample()[0].memory_of() == {5: GIB}
    backend.close()

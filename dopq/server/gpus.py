"""The GPUs of the host: the one seam around NVML, and the pool that counts them.

Two halves, kept apart on purpose:

* The *seam* (``GpuBackend``): ``NvmlBackend`` reads real devices through
  ``pynvml``; ``VirtualBackend`` stands in on machines without a GPU (tests, the
  simulator, a laptop demo). ``open_backend`` picks one from the settings.
* The *pure helpers* (``external_busy``, ``parse_visible``): no I/O, so the
  scheduler and its tests can use them without hardware. The pool that counts
  GPUs is ``dopq.core.capacity.GpuPool`` (imported here for older callers).

GPU indices are NVML indices, the same numbers ``NVIDIA_VISIBLE_DEVICES`` and
Docker's ``DeviceRequest(device_ids=...)`` understand. A GPU in MIG mode is
not listed itself: its MIG instances are, each a device of its own with its
own UUID (``MIG-...``) and memory, numbered ``mig_index(parent, slot)``
(1000 + 32 * parent + slot), so that the GPU is never also handed out whole.
A container is given a device by UUID where it has one (containers.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dopq.core.capacity import Device
from dopq.core.capacity import GpuPool as GpuPool  # its old home; tests import it here
from dopq.core.errors import ConfigError

GIB = 1024**3
VIRTUAL_MEMORY = 16 * GIB
BACKEND_KINDS = ("auto", "nvml", "virtual")
MIG_BASE = 1000  # MIG instances are numbered from here, 32 slots per parent GPU
MIG_SLOTS = 32
MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE

T = TypeVar("T")


@dataclass(frozen=True)
class GpuInfo:
    """What does not change about a GPU while the server runs."""

    index: int
    uuid: str  # "" when NVML would not say
    name: str
    memory_total: int  # bytes; 0 when NVML would not say
    minor: int | None  # N of /dev/nvidiaN
    parent: int | None = None  # a MIG instance: the index of its GPU


@dataclass(frozen=True)
class GpuSample:
    """One reading of a GPU; a field is None where the card does not report it."""

    index: int
    utilization: float | None  # percent of time a kernel ran, last sample period
    memory_used: int | None  # bytes
    memory_total: int | None  # bytes
    processes: tuple[int, ...]  # host PIDs of compute (and graphics) processes
    process_memory: tuple[tuple[int, int], ...] = ()  # (pid, bytes) where NVML says

    def memory_of(self) -> dict[int, int]:
        """PID -> GPU memory in bytes, for the processes whose use is known."""
        return dict(self.process_memory)


def mig_index(parent: int, slot: int) -> int:
    """The device index of MIG slot ``slot`` of GPU ``parent``."""
    return MIG_BASE + MIG_SLOTS * parent + slot


class GpuBackend(Protocol):
    kind: str  # "nvml" | "virtual"

    def devices(self) -> list[GpuInfo]: ...

    def sample(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- NVML


class NvmlBackend:
    """Real GPUs through ``pynvml`` (the nvidia-ml-py package).

    NVML is initialised once here and shut down by ``close()``. A call that fails
    for one device or one field (``NOT_SUPPORTED`` on consumer cards,
    ``NO_PERMISSION``, a lost GPU) gives None for that field, never an exception:
    a monitoring read must not take the server down.

    Raises ``ConfigError("gpus.backend", ...)`` when NVML cannot be loaded or
    initialised; ``open_backend`` is the usual way in.
    """

    kind = "nvml"

    def __init__(self) -> None:
        try:
            # Imported here, not at the top, so that the module imports (and the
            # virtual backend works) where nvidia-ml-py is not installed.
            nvml: Any = importlib.import_module("pynvml")
        except ImportError as exc:
            raise _unavailable(f"pynvml is not installed ({exc})") from exc
        self._nvml = nvml
        # pynvml raises NVMLLibraryMismatchError (not an NVMLError) from
        # unversioned calls when the driver is older than the bindings.
        self._errors: tuple[type[BaseException], ...] = tuple(
            {nvml.NVMLError, getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError)}
        )
        try:
            nvml.nvmlInit()
        except self._errors as exc:
            raise _unavailable(_describe(exc)) from exc
        self._open = True
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except self._errors as exc:
            self.close()
            raise _unavailable(f"cannot count devices: {_describe(exc)}") from exc
        self._handles: dict[int, Any] = {}
        self._devices: list[GpuInfo] = []
        for index in range(count):
            handle = self._try(nvml.nvmlDeviceGetHandleByIndex, index)
            if handle is None:  # an unreadable GPU is left out, not scheduled
                continue
            migs = self._mig_handles(handle)
            if migs is None:
                self._handles[index] = handle
                self._devices.append(self._describe_device(index, handle))
                continue
            for slot, mig in migs:
                self._handles[mig_index(index, slot)] = mig
                self._devices.append(self._describe_device(mig_index(index, slot), mig, index))

    def _mig_handles(self, handle: Any) -> list[tuple[int, Any]] | None:
        """(slot, handle) of the GPU's MIG instances; None when MIG is off (or unknown)."""
        nvml = self._nvml
        get_mode = getattr(nvml, "nvmlDeviceGetMigMode", None)
        mode = self._try(get_mode, handle) if get_mode is not None else None
        if not mode or int(mode[0]) != MIG_ENABLED:
            return None
        slots = self._try(nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
        found = []
        for slot in range(min(int(slots), MIG_SLOTS)):
            mig = self._try(nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
            if mig is not None:  # an empty slot raises NOT_FOUND
                found.append((slot, mig))
        return found

    def _try(self, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except self._errors:
            return None

    def _describe_device(self, index: int, handle: Any, parent: int | None = None) -> GpuInfo:
        nvml = self._nvml
        memory = self._try(nvml.nvmlDeviceGetMemoryInfo, handle)
        minor = self._try(nvml.nvmlDeviceGetMinorNumber, handle)
        return GpuInfo(
            index=index,
            uuid=_text(self._try(nvml.nvmlDeviceGetUUID, handle)) or "",
            name=_text(self._try(nvml.nvmlDeviceGetName, handle)) or "Unknown GPU",
            memory_total=int(memory.total) if memory is not None else 0,
            minor=int(minor) if minor is not None else None,
            parent=parent,
        )

    def devices(self) -> list[GpuInfo]:
        return list(self._devices)

    def sample(self) -> list[GpuSample]:
        nvml = self._nvml
        samples = []
        for index, handle in self._handles.items():
            # MIG instances report no utilisation (NOT_SUPPORTED): None.
            rates = self._try(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = self._try(nvml.nvmlDeviceGetMemoryInfo, handle)
            pids: set[int] = set()
            used: dict[int, int] = {}
            for kind in ("Compute", "Graphics"):
                for proc in self._processes(kind, handle):
                    pid = int(proc.pid)
                    pids.add(pid)
                    # None where NVML has no figure (NVML_VALUE_NOT_AVAILABLE, or
                    # no permission); a process listed twice is counted once.
                    mem = getattr(proc, "usedGpuMemory", None)
                    if mem is not None:
                        used[pid] = max(used.get(pid, 0), int(mem))
            samples.append(
                GpuSample(
                    index=index,
                    utilization=float(rates.gpu) if rates is not None else None,
                    memory_used=int(memory.used) if memory is not None else None,
                    memory_total=int(memory.total) if memory is not None else None,
                    processes=tuple(sorted(pids)),
                    process_memory=tuple(sorted(used.items())),
                )
            )
        return samples

    def _processes(self, kind: str, handle: Any) -> list[Any]:
        """``nvmlDevice<kind>RunningProcesses``: the bindings' default version, else
        the older ones (bindings newer than the driver lack the default's symbol)."""
        name = f"nvmlDeviceGet{kind}RunningProcesses"
        for fn in (getattr(self._nvml, name + suffix, None) for suffix in ("", "_v2")):
            if fn is None:
                continue
            try:
                return list(fn(handle) or ())
            except self._errors:
                continue
        return []

    def close(self) -> None:
        """Shut NVML down; safe to call twice."""
        if self._open:
            self._open = False
            self._try(self._nvml.nvmlShutdown)


def _unavailable(reason: str) -> ConfigError:
    return ConfigError("gpus.backend", f"nvml requested but NVML is not available: {reason}")


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # NVMLError.__str__ itself calls into the library
        text = ""
    return text or type(exc).__name__


def _text(value: object) -> str | None:
    # Old pynvml releases return bytes, new ones str.
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


# ------------------------------------------------------------------------ virtual


class VirtualBackend:
    """``count`` pretend GPUs of ``memory`` bytes each, for machines without one.

    Nothing runs on them, so they report no utilisation and no memory in use
    until a test (or the simulator) says otherwise: ``set_processes`` puts
    processes on one (a mapping gives each its memory), ``set_utilisation``
    its load.
    """

    kind = "virtual"

    def __init__(self, count: int, memory: int = VIRTUAL_MEMORY) -> None:
        if count < 0:
            raise ConfigError("gpus.virtual_count", f"must be >= 0, not {count}")
        self._devices = [
            GpuInfo(
                index=i,
                uuid=f"GPU-virtual-{i}",
                name="Virtual GPU",
                memory_total=memory,
                minor=i,
            )
            for i in range(count)
        ]
        self._processes: dict[int, dict[int, int | None]] = {}
        self._utilisation: dict[int, float | None] = {}

    def devices(self) -> list[GpuInfo]:
        return list(self._devices)

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self._devices):
            raise IndexError(f"no virtual GPU {index}")

    def set_processes(self, index: int, processes: Iterable[int] | Mapping[int, int]) -> None:
        """What runs on GPU ``index`` now: PIDs, or PID -> bytes of GPU memory."""
        self._check(index)
        if isinstance(processes, Mapping):
            self._processes[index] = {int(p): int(m) for p, m in processes.items()}
        else:
            self._processes[index] = dict.fromkeys((int(p) for p in processes), None)

    def set_utilisation(self, index: int, percent: float | None) -> None:
        self._check(index)
        self._utilisation[index] = percent

    def sample(self) -> list[GpuSample]:
        out = []
        for d in self._devices:
            procs = self._processes.get(d.index, {})
            known = {p: m for p, m in procs.items() if m is not None}
            out.append(GpuSample(
                index=d.index,
                utilization=self._utilisation.get(d.index),
                memory_used=sum(known.values()) if procs else None,
                memory_total=d.memory_total,
                processes=tuple(sorted(procs)),
                process_memory=tuple(sorted(known.items())),
            ))
        return out

    def close(self) -> None:
        pass


def open_backend(kind: str, virtual_count: int,
                 virtual_memory: int = VIRTUAL_MEMORY) -> GpuBackend:
    """The backend the settings ask for.

    ``"nvml"`` insists on NVML (``ConfigError`` naming ``gpus.backend`` if it is
    missing); ``"virtual"`` gives ``virtual_count`` pretend GPUs of
    ``virtual_memory`` bytes; ``"auto"`` takes NVML when it initialises and
    reports at least one GPU, else virtual ones.
    """
    if kind == "nvml":
        return NvmlBackend()
    if kind == "virtual":
        return VirtualBackend(virtual_count, virtual_memory)
    if kind == "auto":
        try:
            backend = NvmlBackend()
        except ConfigError:
            return VirtualBackend(virtual_count, virtual_memory)
        if backend.devices():
            return backend
        backend.close()
        return VirtualBackend(virtual_count, virtual_memory)
    raise ConfigError("gpus.backend", f"must be one of {', '.join(BACKEND_KINDS)}, not {kind!r}")


# ----------------------------------------------------------------- pure helpers


def external_busy(samples: Sequence[GpuSample], our_pids: set[int]) -> set[int]:
    """Indices of GPUs running a process that is not one of ``our_pids``.

    ``our_pids`` are the host PIDs inside DoPQ's own containers; anything else on
    a GPU belongs to someone working around the queue, and that GPU is not free.
    """
    return {s.index for s in samples if any(pid not in our_pids for pid in s.processes)}


def parse_visible(value: str, uuids: Mapping[str, int]) -> set[int] | None:
    """GPU indices named by an ``NVIDIA_VISIBLE_DEVICES`` value; None means all.

    Accepts indices (``"0,2"``), GPU UUIDs (looked up in ``uuids``, UUID ->
    index), MIG ``"gpu:instance"`` pairs (counted as their whole GPU), ``"all"``,
    and ``"none"``/``"void"``/empty for no GPU. Names it cannot resolve are
    skipped: there is nothing on this host to mark busy for them.
    """
    text = value.strip()
    if text.lower() == "all":
        return None
    if text.lower() in ("", "none", "void"):
        return set()
    by_uuid = {u.lower(): i for u, i in uuids.items() if u}
    found: set[int] = set()
    for token in (t.strip() for t in text.split(",")):
        head = token.split(":", 1)[0]
        if head.isdigit():
            found.add(int(head))
        elif token.lower() in by_uuid:
            found.add(by_uuid[token.lower()])
    return found


def visible_devices_in_env(
    env: Sequence[str], uuids: Mapping[str, int] | None = None
) -> set[int] | None:
    """GPUs a container sees, from its ``Config.Env`` list; None means all.

    A container without ``NVIDIA_VISIBLE_DEVICES`` sees none. The image's own
    environment is part of ``Config.Env``, so CUDA base images (which set
    ``all``) count as using every GPU, as they do under the NVIDIA runtime.
    """
    value: str | None = None
    for entry in env:
        name, sep, rest = entry.partition("=")
        if sep and name == "NVIDIA_VISIBLE_DEVICES":
            value = rest  # the last one wins, as in a shell
    if value is None:
        return set()
    return parse_visible(value, uuids or {})


def uuid_index(devices: Iterable[GpuInfo]) -> dict[str, int]:
    """UUID -> index for ``parse_visible``, leaving out GPUs without a UUID."""
    return {d.uuid: d.index for d in devices if d.uuid}


# ------------------------------------------------------------------------- pool


def as_devices(infos: Iterable[GpuInfo]) -> list[Device]:
    """The scheduler's view of the backend's devices (:mod:`dopq.core.capacity`)."""
    return [Device(i.index, i.uuid, i.memory_total, i.parent) for i in infos]


def mig_children(infos: Iterable[GpuInfo]) -> dict[int, set[int]]:
    """GPU index -> the indices of its MIG instances (GPUs in MIG mode only)."""
    out: dict[int, set[int]] = {}
    for i in infos:
        if i.parent is not None:
            out.setdefault(i.parent, set()).add(i.index)
    return out

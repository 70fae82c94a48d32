#!/usr/bin/env python3
"""Check what DoPQ sees of the NVIDIA GPUs on this host (no Docker needed).

Prints each GPU (index, name, UUID, memory total and used, utilisation, MIG
mode), the devices DoPQ would schedule (whole GPUs, and for a GPU in MIG mode
its MIG instances with their UUID, memory and parent), and the processes NVML
sees on each device with their pid, user and GPU memory. Takes a few seconds.
Exits 0; exits 1 with one line on stderr when NVML is not usable. Run from the
repository root: ``python scripts/nvml_check.py`` (``--json`` for JSON).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

# Works from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopq.core.errors import ConfigError  # noqa: E402
from dopq.server.gpus import NvmlBackend  # noqa: E402
from dopq.server.gpusampler import ProcFs  # noqa: E402

MIB = 1024**2


def _gpus(nvml: Any) -> list[dict[str, Any]]:
    """Every physical GPU, MIG parents included (the backend lists their instances)."""
    def get(fn: str, *args: Any) -> Any:
        try:
            return getattr(nvml, fn)(*args)
        except Exception:  # noqa: BLE001 - NVMLError, or a call this driver lacks
            return None

    out = []
    for index in range(get("nvmlDeviceGetCount") or 0):
        h = get("nvmlDeviceGetHandleByIndex", index)
        if h is None:
            out.append({"index": index, "error": "no handle"})
            continue
        mem, rates, mig = (get("nvmlDeviceGetMemoryInfo", h),
                           get("nvmlDeviceGetUtilizationRates", h), get("nvmlDeviceGetMigMode", h))
        name, uuid = get("nvmlDeviceGetName", h), get("nvmlDeviceGetUUID", h)
        out.append({
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else name,
            "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
            "memory_total": getattr(mem, "total", None),
            "memory_used": getattr(mem, "used", None),
            "utilisation": getattr(rates, "gpu", None),
            "mig": None if mig is None else {1: "on", 0: "off"}.get(int(mig[0]), str(mig[0])),
        })
    return out


def report() -> dict[str, Any]:
    backend = NvmlBackend()  # ConfigError when NVML is not usable
    try:
        gpus = _gpus(importlib.import_module("pynvml"))
        devices = backend.devices()
        samples = {s.index: s for s in backend.sample()}
    finally:
        backend.close()
    proc = ProcFs()
    scheduled = []
    for d in devices:
        s = samples.get(d.index)
        memory = s.memory_of() if s is not None else {}
        scheduled.append({
            "index": d.index, "uuid": d.uuid, "name": d.name, "memory": d.memory_total,
            "parent": d.parent, "used": s.memory_used if s else None,
            "utilisation": s.utilization if s else None,
            "processes": [{"pid": pid, "user": proc.user(pid), "memory": memory.get(pid)}
                          for pid in (s.processes if s else ())],
        })
    return {"gpus": gpus, "devices": scheduled}


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / MIB:.0f} MiB"


def show(data: dict[str, Any]) -> str:
    lines = ["GPUs:"]
    for g in data["gpus"]:
        if "error" in g:
            lines.append(f"  {g['index']}: {g['error']}")
            continue
        util = "?" if g["utilisation"] is None else f"{g['utilisation']}%"
        lines.append(f"  {g['index']}: {g['name']}  {g['uuid']}  memory"
                     f" {_mib(g['memory_used'])} / {_mib(g['memory_total'])}  util {util}"
                     f"  MIG {g['mig'] or 'n/a'}")
    lines.append("Devices DoPQ schedules:")
    for d in data["devices"]:
        kind = "whole GPU" if d["parent"] is None else f"MIG instance of GPU {d['parent']}"
        lines.append(f"  {d['index']}: {kind}  {d['uuid']}  memory {_mib(d['memory'])}"
                     f"  used {_mib(d['used'])}")
        for p in d["processes"]:
            lines.append(f"      pid {p['pid']}  user {p['user']}  {_mib(p['memory'])}")
        if not d["processes"]:
            lines.append("      no processes")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        data = report()
    except ConfigError as exc:
        print(f"nvml_check: NVML is not usable here: {exc.problem}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if "--json" in args else show(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

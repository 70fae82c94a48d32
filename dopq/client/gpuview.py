"""How the CLI and the GUI write a job's GPUs and a device's holders, as short text.

A job asks for whole GPUs (``num_gpus``, shown as the count, as before
sharing) or for a share of each (``gpu_memory`` bytes per device, shown as
``1x10G``). The server's views (``dopq.wire.views``) carry bytes and percent;
these turn them into the cells both clients show.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

Row = Mapping[str, Any]


def size_text(n: float | None) -> str:
    """``10G``, ``1.5G``, ``512M``: the unit letters ``dopq submit --gpu-memory`` takes."""
    if n is None:
        return "-"
    size, unit = float(n), "B"
    for bigger in ("K", "M", "G", "T"):
        if abs(size) < 1024:
            break
        size, unit = size / 1024, bigger
    if unit == "B":
        return f"{size:.0f}B" if size else "0"
    return f"{size:.0f}{unit}" if abs(size) >= 100 else f"{size:.3g}{unit}"


def gpu_request(row: Row) -> str:
    """What a job asked for: ``2`` whole GPUs, or ``1x10G`` (10 GiB on one shared GPU)."""
    count = row.get("num_gpus")
    count = 0 if count is None else int(count)
    memory = row.get("gpu_memory")
    if memory:
        return f"{count}x{size_text(memory)}"
    return str(count)


def gpu_request_tip(row: Row) -> str:
    count = int(row.get("num_gpus") or 0)
    memory = row.get("gpu_memory")
    if not count:
        return "no GPU (CPU only)"
    if memory:
        return (f"{size_text(memory)} of GPU memory on each of {count} shared GPU"
                + ("s" if count != 1 else ""))
    return f"{count} whole GPU" + ("s" if count != 1 else "") + " (not shared)"


def gpu_memory_used(row: Row) -> str:
    """A running job's GPU memory in use, against its declared share when it has one."""
    used = row.get("gpu_memory_used")
    if used is None:
        return "-"
    declared = row.get("gpu_memory")
    count = int(row.get("num_gpus") or 0)
    if declared and count:
        return f"{size_text(used)}/{size_text(int(declared) * count)}"
    return size_text(used)


def gpu_utilisation(row: Row) -> str:
    """``45%``, with ``IDLE`` when the server marked the job's GPUs idle."""
    util = row.get("gpu_utilisation")
    text = "-" if util is None else f"{float(util):.0f}%"
    return f"{text} IDLE" if row.get("idle_since") else text


def gpu_use_line(row: Row) -> str:
    """``dopq show``'s line for a running job: memory, utilisation, since when idle."""
    if row.get("gpu_memory_used") is None and row.get("gpu_utilisation") is None \
            and not row.get("idle_since"):
        return "not sampled (yet)"
    idle = f" since {row['idle_since']}" if row.get("idle_since") else ""
    return f"{gpu_memory_used(row)} memory, {gpu_utilisation(row)}{idle}"


def device_memory(g: Row) -> str:
    """``6G/16G``: a device's memory in use (by anyone) and its size."""
    total = g.get("memory", g.get("memory_total"))
    used = g.get("used", g.get("memory_used"))
    if not total:
        return size_text(used) if used is not None else "-"
    return f"{size_text(used) if used is not None else '?'}/{size_text(total)}"


def holding(h: Row) -> str:
    """A job's hold on a device: ``3G/4G`` (in use of its share), ``12G/whole``;
    ``?`` where its use was not sampled."""
    used = h.get("memory")
    declared = h.get("declared")
    if "declared" not in h:  # a sampler's row: the memory in use only
        return size_text(used) if used is not None else "?"
    shown = "?" if used is None else size_text(used)
    return f"{shown}/{size_text(declared) if declared else 'whole'}"


def job_lines(g: Row) -> Iterator[str]:
    """The jobs on a device with the GPU memory each holds: ``job 7 (alice) 3G/4G``."""
    for h in g.get("holders") or ():
        yield f"job {h.get('job')} ({h.get('user') or '?'}) {holding(h)}"
    if not g.get("holders") and g.get("job") is not None:  # a server from before sharing
        yield f"job {g['job']} ({g.get('user') or '?'})"


def foreign_lines(g: Row) -> Iterator[str]:
    """Processes on a device that no DoPQ job started: ``pid 4242 (carl) 2G``."""
    for f in g.get("foreign") or ():
        yield f"pid {f.get('pid')} ({f.get('user') or '?'}) {size_text(f.get('memory'))}"


def device_lines(g: Row) -> Iterator[str]:
    """Who holds how much of a device: one line per job, then per foreign process."""
    yield from job_lines(g)
    for line in foreign_lines(g):
        yield line + " outside DoPQ"
    if not g.get("holders") and g.get("job") is None and not g.get("foreign") \
            and g.get("external"):
        yield "busy outside DoPQ"


def device_holders(g: Row) -> str:
    """The jobs of ``job_lines`` in one cell (the GUI's System view), or what else it is."""
    return "; ".join(job_lines(g)) or (
        "busy outside DoPQ" if g.get("external") or g.get("foreign") else "free")


def device_foreign(g: Row) -> str:
    return "; ".join(foreign_lines(g)) or "-"

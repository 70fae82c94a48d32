"""What the five views show: the columns of each, and how values are written.

A ``Column`` has a title, the raw value (what sorting compares) and the text
shown; ``coloured`` columns take the state colours of the style sheet, keyed
by ``Column.value`` (a job state, or free/busy/running for a GPU).
"""

from __future__ import annotations

import datetime as dt
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import Qt

from dopq.client import gpuview
from dopq.core.eta import start_text
from dopq.core.jobs import format_duration
from dopq.core.text import printable

Row = Mapping[str, Any]  # a view's row (dopq.wire.views), read only
LEFT = Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter
RIGHT = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter


# -- formatting ----------------------------------------------------------------------------
def fmt_time(iso: str | None) -> str:
    """An API timestamp (ISO 8601 UTC) in local time, to the second."""
    if not iso:
        return "-"
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return str(iso)
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # unreachable


def fmt_number(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def fmt_percent(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def fmt_gpus(gpus: Sequence[int] | None) -> str:
    return ", ".join(str(g) for g in gpus) if gpus else "-"


GPUS_TIP = ("how many GPUs the job asked for: 2 whole GPUs, or 1x10G: 10 GiB of memory on"
            " 1 GPU it shares with other such jobs (0: CPU only)")
ON_GPUS_TIP = "the indices of the GPUs the job runs (or ran) on"


def job_gpu_util(r: Row) -> str:
    """A running job's GPU use: the server's per-job figure (with IDLE when marked), or
    each of its GPUs' utilisation from a server that has none."""
    if "gpu_utilisation" in r or r.get("idle_since"):
        return gpuview.gpu_utilisation(r)
    return fmt_gpu_util(r.get("gpu_samples"))


def job_gpu_memory(r: Row) -> str:
    """A running job's GPU memory in use (of its share), or its GPUs' from an older server."""
    if r.get("gpu_memory_used") is not None:
        return gpuview.gpu_memory_used(r)
    return fmt_gpu_memory(r.get("gpu_samples"))


def fmt_gpu_util(samples: Sequence[Row] | None) -> str:
    parts = [f"{s['index']}: {fmt_percent(s.get('utilization'))}"
             for s in samples or () if s.get("utilization") is not None]
    return "  ".join(parts) or "-"


def fmt_gpu_memory(samples: Sequence[Row] | None) -> str:
    parts = []
    for s in samples or ():
        used, total = s.get("memory_used"), s.get("memory_total")
        if used is not None:
            parts.append(f"{s['index']}: {fmt_bytes(used)}"
                         + (f" / {fmt_bytes(total)}" if total else ""))
    return "  ".join(parts) or "-"


def gpu_holder(g: Row) -> str:
    """The jobs on the device and how much each holds (or busy outside DoPQ, or free)."""
    return gpuview.device_holders(g)


def gpu_state(g: Row) -> str:
    if g.get("job") is not None or g.get("holders"):
        return "running"
    return "busy" if g.get("external") or g.get("foreign") else "free"


def gpu_memory_text(g: Row) -> str:
    """``10.5G/16G``: in use (by anyone) of the device's memory; ``-`` until sampled."""
    return "-" if g.get("used", g.get("memory_used")) is None else gpuview.device_memory(g)


def job_state(row: Row) -> str:
    """The colour key of a job: its state, or ``held`` for a held queued job."""
    state = str(row.get("state") or "")
    return "held" if row.get("held") and state in ("received", "building", "queued") else state


# -- columns -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column: its title, the raw value (sorting) and the text shown."""

    title: str
    value: Callable[[Row], Any]
    text: Callable[[Row], str] | None = None
    align: Qt.AlignmentFlag = LEFT
    coloured: bool = False  # foreground/background from the state colours
    tip: str = ""
    searchable: bool = True  # False for values that tick (times, usage)

    def display(self, row: Row) -> str:
        """The cell's text; stored control characters (a job name with ESC or a
        bidi override) are shown as escapes, so they cannot reorder or hide text."""
        if self.text is not None:
            return printable(self.text(row))
        v = self.value(row)
        return "-" if v is None else printable(v)


def field(name: str) -> Callable[[Row], Any]:
    return lambda r: r.get(name)


def col(title: str, name: str, text: Callable[[Row], str] | None = None, *,
        right: bool = False, coloured: bool = False, tip: str = "",
        searchable: bool = True) -> Column:
    return Column(title, field(name), text, RIGHT if right else LEFT, coloured, tip, searchable)


def _dur(name: str) -> Callable[[Row], str]:
    return lambda r: format_duration(r.get(name))


def _time(name: str) -> Callable[[Row], str]:
    return lambda r: fmt_time(r.get(name))


START_TIP = ("expected start, local time (~: an estimate): the policy run forward with the"
             " running jobs' time limits, else their users' typical run time; - : unknown")


def _start(r: Row) -> str:
    return start_text(r.get("expected_start"), time.time())


def wrap_tip(text: str, width: int = 100) -> str:
    """A long cell's text for its tooltip, in full, wrapped (Qt does not wrap plain text)."""
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines() or [""])


def queued_tip(r: Row) -> str | None:
    """A queued row's tooltip: why it waits, in full, and when it is expected to start."""
    reason = r.get("reason")
    if not reason:
        return None
    start = r.get("expected_start")
    return printable(str(reason)) + (f"\nexpected start: {fmt_time(start)}" if start else "")


def _state_text(r: Row) -> str:
    s = str(r.get("state") or "-")
    return f"{s} (held)" if job_state(r) == "held" else s


def _result_text(r: Row) -> str:
    s = str(r.get("state") or "-")
    code = r.get("exit_code")
    return s if code is None else f"{s} ({code})"


RESTARTS_TIP = ("how often the job was preempted (stopped for a user under their fair share"
                " and queued again); - : it may not be preempted")


def on_gpus_text(r: Row) -> str:
    """The job's GPUs, and on a cluster the node they are on (``0, 1 on dopq-n1``)."""
    node = r.get("node")
    text = fmt_gpus(r.get("gpus"))
    return f"{text} on {node}" if node and node != "local" and r.get("gpus") else text


def restarts_text(r: Row) -> str:
    """The job's restarts; ``-`` for a job that may not be preempted and never was."""
    n = int(r.get("restarts") or 0)
    return str(n) if n or r.get("preemptible") else "-"


RUNNING_COLUMNS = (
    col("ID", "id", right=True),
    col("Job", "name"),
    col("User", "user"),
    Column("State", job_state, _state_text, coloured=True),
    col("Restarts", "restarts", restarts_text, right=True, tip=RESTARTS_TIP),
    col("GPUs", "num_gpus", gpuview.gpu_request, right=True, tip=GPUS_TIP),
    Column("On GPUs", lambda r: tuple(r.get("gpus") or ()), on_gpus_text,
           tip=ON_GPUS_TIP),
    col("Running", "run_s", _dur("run_s"), right=True, searchable=False),
    col("Limit", "time_limit", _dur("time_limit"), right=True),
    col("CPU", "cpu_percent", lambda r: fmt_percent(r.get("cpu_percent")), right=True,
        searchable=False),
    col("Memory", "memory_bytes", lambda r: fmt_bytes(r.get("memory_bytes")), right=True,
        searchable=False),
    Column("GPU use", lambda r: r.get("gpu_utilisation"), job_gpu_util,
           tip="the job's GPU utilisation (NVML); IDLE: at (near) 0% for [gpus] idle_after",
           searchable=False),
    Column("GPU memory", lambda r: r.get("gpu_memory_used"), job_gpu_memory,
           tip="GPU memory the job's processes use, of its share when it declared one",
           searchable=False),
    col("Started", "started_at", _time("started_at")),
)

QUEUED_COLUMNS = (
    col("Pos", "position", right=True, tip="place in the queue", searchable=False),
    col("ID", "id", right=True),
    col("Job", "name"),
    col("User", "user"),
    Column("State", job_state, _state_text, coloured=True),
    col("Restarts", "restarts", restarts_text, right=True, tip=RESTARTS_TIP),
    col("GPUs", "num_gpus", gpuview.gpu_request, right=True, tip=GPUS_TIP),
    col("Priority", "priority_value", lambda r: fmt_number(r.get("priority_value"), 3),
        right=True, tip="the policy's priority (higher runs first)", searchable=False),
    col("Boost", "priority", right=True,
        tip="the priority the job was submitted with (--priority, -1000..1000; 0 is normal,"
            " above 0 only for admins); it adds 0..1000 to the policy's priority"),
    col("Waiting", "wait_s", _dur("wait_s"), right=True, searchable=False),
    Column("Start", field("expected_start"), _start, tip=START_TIP, searchable=False),
    col("Reason", "reason", tip="why it waits (hover a row for all of it)"),
    col("Submitted", "submitted_at", _time("submitted_at")),
)

FINISHED_COLUMNS = (
    col("ID", "id", right=True),
    col("Job", "name"),
    col("User", "user"),
    Column("Result", job_state, _result_text, coloured=True),
    col("Exit", "exit_code", right=True),
    col("GPUs", "num_gpus", gpuview.gpu_request, right=True, tip=GPUS_TIP),
    Column("On GPUs", lambda r: tuple(r.get("gpus") or ()), on_gpus_text,
           tip=ON_GPUS_TIP),
    col("Ran", "run_s", _dur("run_s"), right=True),
    col("Waited", "wait_s", _dur("wait_s"), right=True),
    col("Finished", "finished_at", _time("finished_at")),
    col("Error", "error", tip="why it failed (hover a row for all of it; the details show it"
        " wrapped)"),
)

USER_COLUMNS = (
    col("User", "user"),
    Column("Usage / share", field("gpu_hours"), lambda r: "", searchable=False,
           tip="bar: the user's part of all GPU-hours counted; mark: their fair share"),
    col("Running", "running", right=True),
    col("Queued", "queued", right=True),
    col("Finished", "finished", right=True),
    col("Failed", "failed", right=True),
    col("GPU-hours", "gpu_hours", lambda r: fmt_number(r.get("gpu_hours")), right=True),
    col("Weight", "weight", lambda r: fmt_number(r.get("weight")), right=True),
    col("Share", "share", lambda r: fmt_percent(100 * r["share"])
        if r.get("share") is not None else "-", right=True),
    col("Fair-share", "fairshare", lambda r: fmt_number(r.get("fairshare"), 3), right=True,
        tip="2^(-usage/share): 1 is an unused share, small is over-used"),
    col("Penalty", "penalty", lambda r: fmt_number(r.get("penalty"), 3), right=True),
)

USAGE_COLUMN = 1  # painted by dopq.client.gui.pictures.UsageBars

GPU_COLUMNS = (
    col("GPU", "index", right=True),
    col("Name", "name"),
    col("Util", "utilization", lambda r: fmt_percent(r.get("utilization")), right=True),
    Column("Recent use", field("utilization"), lambda r: "", searchable=False,
           tip="utilisation over the last minutes, as this window saw it (where NVML reads it)"),
    Column("Memory", lambda r: r.get("used", r.get("memory_used")), gpu_memory_text, RIGHT,
           tip="GPU memory in use (by anyone) of the device's total"),
    Column("Holder", gpu_state, gpu_holder, coloured=True,
           tip="the jobs on the device, with the GPU memory each holds"),
    Column("Outside DoPQ", lambda r: len(r.get("foreign") or ()), gpuview.device_foreign,
           tip="processes on the device that no DoPQ job started: pid, user, GPU memory"),
    col("UUID", "uuid"),
)

SPARK_COLUMN = 3  # "Recent use", painted by dopq.client.gui.pictures.Sparklines


# every field a searchable job column shows
JOB_SEARCH = ("id", "name", "user", "state", "held", "reason", "error", "exit_code", "gpus",
              "num_gpus", "priority", "time_limit", "submitted_at", "started_at",
              "finished_at", "run_s")

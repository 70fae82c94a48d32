"""Job traces for ``dopq simulate``: JSON lines, one job each.

A bad line raises :class:`TraceError` naming the file and line; the format
is in ``TRACE_HELP`` (the simulator's ``--help``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dopq.core.errors import DopqError, JobRejected
from dopq.core.forms import parse_size

TRACE_KEYS = {"submit", "user", "gpus", "duration", "time_limit", "priority", "gpu_memory",
              "preemptible"}


class TraceError(DopqError):
    """A trace line is not a valid job; names the file and line."""

    def __init__(self, where: str, line: int, problem: str) -> None:
        super().__init__(f"{where}:{line}: {problem}")
        self.where = where
        self.line = line
        self.problem = problem


@dataclass(frozen=True)
class TraceJob:
    id: int
    submit: float
    user: str
    gpus: int
    duration: float
    time_limit: float | None = None
    priority: int = 0
    gpu_memory: int = 0  # bytes on each device, shared; 0: whole GPUs
    preemptible: bool | None = None  # None: the simulation's preemptible_default


def _number(job: dict[str, Any], key: str, positive: bool) -> float:
    value = job[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{key}: must be {'positive' if positive else 'at least 0'}")
    return float(value)


def _parse_job(text: str, job_id: int) -> TraceJob:
    job = json.loads(text)
    if not isinstance(job, dict):
        raise ValueError("expected a JSON object")
    unknown = sorted(set(job) - TRACE_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    missing = sorted({"submit", "user", "gpus", "duration"} - set(job))
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    user = job["user"]
    if not isinstance(user, str) or not user.strip():
        raise ValueError("user: expected a non-empty string")
    gpus = job["gpus"]
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus: expected a whole number >= 0, got {gpus!r}")
    priority = job.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority: expected an integer, got {priority!r}")
    limit = None
    if job.get("time_limit") is not None:
        limit = _number(job, "time_limit", positive=True)
    memory = 0
    if job.get("gpu_memory") is not None:
        try:
            memory = parse_size(job["gpu_memory"], "gpu_memory")
        except JobRejected as err:
            raise ValueError(str(err)) from None
        if memory and not gpus:
            raise ValueError("gpu_memory: needs gpus >= 1")
    preemptible = job.get("preemptible")
    if preemptible is not None and not isinstance(preemptible, bool):
        raise ValueError(f"preemptible: expected true or false, got {preemptible!r}")
    return TraceJob(
        id=job_id,
        submit=_number(job, "submit", positive=False),
        user=user.strip(),
        gpus=gpus,
        duration=_number(job, "duration", positive=True),
        time_limit=limit,
        priority=priority,
        gpu_memory=memory,
        preemptible=preemptible,
    )


def parse_trace(lines: Iterable[str], where: str = "<trace>") -> list[TraceJob]:
    jobs: list[TraceJob] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            jobs.append(_parse_job(text, len(jobs) + 1))
        except json.JSONDecodeError as err:
            raise TraceError(where, number, f"not JSON: {err.msg}") from None
        except ValueError as err:
            raise TraceError(where, number, str(err)) from None
    return jobs


def load_trace(path: str | Path) -> list[TraceJob]:
    """Read a JSON-lines trace; a bad line raises :class:`TraceError` with its number."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return parse_trace(f, str(path))
    except OSError as err:
        raise TraceError(str(path), 0, err.strerror or "cannot read") from None
    except UnicodeDecodeError:
        raise TraceError(str(path), 0, "not UTF-8 text") from None


TRACE_HELP = """\
trace format: JSON lines, one job each; blank lines and # comments are skipped.
  {"submit": 0, "user": "ana", "gpus": 1, "duration": 3600, "time_limit": 7200}
  submit      seconds from the start of the trace when the job is submitted (required)
  user        who submits it (required)
  gpus        whole GPUs, 0 = CPU only (required)
  duration    seconds it runs (required)
  time_limit  seconds; a job running past it is killed at the limit (optional)
  priority    an integer, as `dopq submit --priority` (optional, default 0)
  gpu_memory  bytes, or a size such as "10g", on each of its GPUs: the job shares
              devices with others (optional; without it, whole GPUs)
  preemptible true or false: may be preempted with --preemption fairshare
              (optional; default --preemptible-default)
Jobs are numbered from 1 in file order.

example: dopq simulate bench/traces/mixed_day.jsonl --gpus 8 --policy recency --json
"""



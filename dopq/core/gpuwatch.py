"""What a running job's GPU samples mean: memory breaches and idleness.

Pure: :func:`observe` takes one job's declared memory, its latest sample, the
state kept from earlier samples and ``now``, and returns the actions that
follow, each with its one-line reason. The server's sampler
(:mod:`dopq.server.gpusampler`) carries them out: a warning or an idle mark
becomes a job event, a stop goes through the queue thread.

Memory: a job that declared ``gpu_memory`` (bytes per device) and uses more
than that plus the tolerance on any of its devices is warned; if the next
sample still shows the breach, it is stopped (``enforcement = "kill"``) or
left alone (``"warn"``). A job that asked for whole GPUs owns them and is
never memory-enforced.

Idleness: a job whose GPUs all stay at or below ``idle_utilisation`` percent
for ``idle_after`` seconds is marked idle once (until it works again); with
``idle_action = "cancel"`` it is also stopped. A sample without utilisation
(a card or a virtual GPU that does not report it) says nothing either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dopq.core.exits import GPU_IDLE, GPU_MEMORY

GIB = 1024**3


class Act(StrEnum):
    WARN = "warn"  # a memory breach: tell the job's events
    IDLE = "idle"  # idle for idle_after: mark it
    STOP = "stop"  # stop the job with the reason


@dataclass(frozen=True)
class Action:
    kind: Act
    job_id: int
    reason: str


@dataclass(frozen=True)
class WatchConfig:
    enforcement: str = "kill"  # kill | warn
    tolerance: int = 256 * 1024**2  # bytes
    idle_after: float = 1800.0  # seconds
    idle_action: str = "warn"  # warn | cancel
    idle_utilisation: float = 5.0  # percent

    @classmethod
    def of(cls, settings: Any) -> WatchConfig:
        """From a validated :class:`dopq.core.settings.Settings`."""
        g = settings.gpus
        return cls(g.memory_enforcement, settings.bytes_of("gpus.memory_tolerance"),
                   settings.gpu_idle_after(), g.idle_action, float(g.idle_utilisation))


@dataclass(frozen=True)
class JobSample:
    """One job's share of one GPU sample.

    ``memory``: the most GPU memory it used on any one of its devices (bytes;
    None: NVML would not say); ``utilisation``: the busiest of its devices
    (percent; None: not reported).
    """

    memory: int | None
    utilisation: float | None


@dataclass
class JobWatch:
    """What :func:`observe` remembers about one job between samples."""

    warned: bool = False  # the breach now going on was warned about
    idle_since: float | None = None
    idle_marked: bool = False
    stopped: bool = False  # a stop was asked: nothing more to say


def observe(job_id: int, declared: int, sample: JobSample, state: JobWatch, now: float,
            cfg: WatchConfig) -> list[Action]:
    """The actions one new sample of ``job_id`` calls for; updates ``state``.

    ``declared`` is the job's ``gpu_memory`` in bytes per device (0: whole GPUs).
    """
    out: list[Action] = []
    if state.stopped:
        return out
    if declared > 0 and sample.memory is not None and sample.memory > declared + cfg.tolerance:
        reason = f"used {gib(sample.memory)} {GPU_MEMORY} {gib(declared)} GiB"
        if not state.warned:
            state.warned = True
            out.append(Action(Act.WARN, job_id, reason))
        elif cfg.enforcement == "kill":
            state.stopped = True
            out.append(Action(Act.STOP, job_id, reason))
            return out
    elif sample.memory is not None:
        state.warned = False  # back within bounds: a new breach is warned again
    if sample.utilisation is None:
        return out
    if sample.utilisation > cfg.idle_utilisation:
        state.idle_since, state.idle_marked = None, False
        return out
    if state.idle_since is None:
        state.idle_since = now
    if not state.idle_marked and now - state.idle_since >= cfg.idle_after:
        state.idle_marked = True
        # "for idle_after": it has been at least that long (samples come every few s)
        reason = f"{GPU_IDLE} {sample.utilisation:.0f}% for {short_duration(cfg.idle_after)}"
        out.append(Action(Act.IDLE, job_id, reason))
        if cfg.idle_action == "cancel":
            state.stopped = True
            out.append(Action(Act.STOP, job_id, reason))
    return out


def gib(n: int) -> str:
    """Bytes as GiB with one decimal, ``.0`` left off: ``14.2``, ``10``."""
    text = f"{n / GIB:.1f}"
    return text[:-2] if text.endswith(".0") else text


def short_duration(seconds: float) -> str:
    """``30m``, ``1h30m``, ``2h``, ``45s``: the parts that are not zero."""
    total = int(round(seconds))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v]
    return "".join(parts) or "0s"

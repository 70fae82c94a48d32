"""How a container's end is classified: the job's final state and reason.

Pure: :func:`classify` takes what the scheduler knows of the end (the job's
stop reason, the exit code, a vanished container, an out-of-memory kill,
whether an engine outage was around) and returns the state and the reason
to commit, first match:

the job's stop reason (cancelled, timeout, output limit, GPU memory or
idleness enforced by the GPU watch), a vanished
container, out of memory, a signal exit around an engine outage (requeued or
failed per ``requeue_on_engine_restart``), exit 0, a signal from outside, any
other exit code.

A job whose stop reason starts :data:`PREEMPTED_PREFIX` does not end: the
scheduler queues it again (:func:`dopq.core.preemption.requeue`) before asking here.
"""

from __future__ import annotations

from dopq.core.jobs import JobState

SIGNAL_EXITS = (137, 143)  # SIGKILL, SIGTERM
CANCELLED_PREFIX = "cancelled"
PREEMPTED_PREFIX = "preempted"  # "preempted by job 17 of bob (...)": requeued, not ended
TIMEOUT = "timeout"
OUTPUT_LIMIT = "wrote more than limits.max_output"  # dopq.server.outputs starts its reason so
OOM = "out of memory (killed at the memory limit)"
REQUEUED_PREFIX = "requeued: "  # a reason the runtime gives when the job should run again
# dopq.core.gpuwatch's stop reasons: "used 14.2 GiB of GPU memory, declared 10 GiB"
# and "idle: GPUs at 0% for 30m" (sent as OutputLimitReached, failed with them).
GPU_MEMORY = "GiB of GPU memory, declared"
GPU_IDLE = "idle: GPUs at"


def classify(marker: str, exit_code: int | None, *, vanished: str | None, oom: bool,
             in_outage: bool, requeue: bool) -> tuple[JobState | None, str | None]:
    """The job's final state and reason; state None: requeue it (reason says why)."""
    if marker.startswith(CANCELLED_PREFIX):
        return JobState.CANCELLED, marker
    if marker == TIMEOUT:
        return JobState.FAILED, TIMEOUT
    if (marker.startswith((OUTPUT_LIMIT, GPU_IDLE))
            or (marker.startswith("used ") and GPU_MEMORY in marker)):
        return JobState.FAILED, marker
    if vanished:
        if vanished.startswith(REQUEUED_PREFIX):  # the runtime says: run it again
            return None, vanished
        return JobState.FAILED, vanished
    if oom:
        return JobState.FAILED, OOM
    if exit_code in SIGNAL_EXITS and in_outage:
        if requeue:
            return None, f"requeued: Docker engine restart (exit code {exit_code})"
        return JobState.FAILED, f"killed by a Docker engine restart (exit code {exit_code})"
    if exit_code == 0:
        return JobState.SUCCEEDED, None
    if exit_code in SIGNAL_EXITS:
        assert exit_code is not None
        return JobState.FAILED, (
            f"exit code {exit_code} (killed by signal {exit_code - 128} from outside DoPQ)")
    return JobState.FAILED, f"exit code {exit_code}"

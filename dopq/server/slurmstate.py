"""What Slurm says, read: pure parsing of ``squeue`` and ``scontrol`` output, the
``sbatch`` arguments of a job, and what a job's state means for DoPQ.

No I/O here (``dopq.server.slurm`` runs the commands): every function takes
text or values and returns values, so all of it is tested without a cluster.
"""

from __future__ import annotations

import builtins
import datetime as dt
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dopq.core.exits import REQUEUED_PREFIX
from dopq.core.settings import Settings
from dopq.server.runspec import ContainerSpec, ContainerStatus

STATUS_WAIT = 30.0  # seconds after Slurm's end time to wait for the status file (NFS lag)
# squeue fields; the two a user chooses (name, comment) come last, the comment
# last of all, so a "|" in them cannot move the others.
SQUEUE_FORMAT = "%i|%U|%T|%N|%b|%S|%e|%j|%k"
ALIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                   "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT",
                   "STOPPED", "RESV_DEL_HOLD"})
NOT_STARTED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
HOLDING = frozenset({"CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "SIGNALING",
                     "STAGE_OUT", "STOPPED", "RESIZING"})  # states that hold a node's GPUs
UNUSABLE = frozenset({"DOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "NOT_RESPONDING",
                      "UNKNOWN", "FUTURE", "NO_RESPOND", "INVALID", "INVALID_REG",
                      "REBOOT_ISSUED", "POWERING_DOWN", "POWER_DOWN", "MAINTENANCE"})
KEY = re.compile(r"\s+(?=[A-Za-z][A-Za-z0-9_:/.]*=)")


@dataclass(frozen=True)
class SlurmNode:
    name: str
    state: str  # Slurm's state, lower case, as sinfo shows it ("idle", "mixed", "down*", "drained")
    usable: bool  # takes new jobs: not down / drain / fail / not responding / unknown
    gpus: int  # gres gpu:N
    cpus: int
    memory: int  # bytes
    foreign_gpus: int  # GPUs on it held by Slurm jobs that are not this server's


@dataclass(frozen=True)
class SlurmJob:
    """One row of ``squeue``."""

    id: int
    uid: int
    state: str
    node: str
    gpus: int
    start: float | None
    end: float | None
    name: str
    comment: str


# -- parsing (pure) ----------------------------------------------------------------

def key_values(line: str) -> dict[str, str]:
    """One line of ``scontrol show ... -o``: ``Key=value`` words (a value may hold spaces).

    The first of two equal keys wins: a later one can only come from a value.
    """
    out: dict[str, str] = {}
    for word in KEY.split(line.strip()):
        key, sep, value = word.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def gres_gpus(text: str) -> int:
    """GPUs in a gres string: ``gpu:2``, ``gpu:tesla:2(S:0-1)``, ``gres:gpu:1``, ``gres/gpu=2``."""
    text = re.sub(r"\([^)]*\)", "", text or "")
    total = 0
    for entry in text.split(","):
        entry = re.sub(r"^gres[:/]", "", entry.strip())
        parts = re.split(r"[:=]", entry)
        if parts[0] != "gpu":
            continue
        count = next((p for p in reversed(parts[1:]) if p.isdigit()), None)
        total += int(count) if count is not None else 1
    return total


def tres_gpus(text: str) -> int | None:
    """``gres/gpu=N`` of a TRES list (typed entries are summed only without it)."""
    typed = 0
    found = False
    for entry in (text or "").split(","):
        key, _, value = entry.partition("=")
        if key == "gres/gpu" and value.isdigit():
            return int(value)
        if key.startswith("gres/gpu:") and value.isdigit():
            typed += int(value)
            found = True
    return typed if found else None


def node_state(raw: str) -> tuple[str, bool]:
    """``State=`` of scontrol (``IDLE+DRAIN``, ``DOWN*``) -> (sinfo's words, usable)."""
    words = raw.upper().split("+")
    star = words[0].endswith("*")
    base = words[0].rstrip("*~#!%$@^-")
    flags = set(words[1:])
    if star:
        flags.add("NOT_RESPONDING")
    usable = base not in UNUSABLE and not (flags & UNUSABLE)
    if "DRAIN" in flags:
        text = "drained" if base in ("IDLE", "DOWN") else "draining"
    elif "FAIL" in flags:
        text = "fail"
    else:
        text = base.lower()
    if "NOT_RESPONDING" in flags and not text.endswith("*"):
        text += "*"
    return text, usable


def parse_nodes(text: str) -> builtins.list[dict[str, str]]:
    return [key_values(line) for line in text.splitlines() if line.startswith("NodeName=")]


def _local_time(text: str) -> float | None:
    """squeue's ``2026-12-03T17:20:00`` (local time) -> epoch seconds."""
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def parse_jobs(text: str) -> builtins.list[SlurmJob]:
    out = []
    for line in text.splitlines():
        head = line.split("|", 7)
        if len(head) < 8:
            continue
        job, uid, state, node, gres, start, end, rest = head
        name, _, comment = rest.rpartition("|")
        if not job.isdigit() or not uid.isdigit():
            continue  # an array or heterogeneous job: never one of ours
        out.append(SlurmJob(int(job), int(uid), state.split()[0] if state else "", node,
                            gres_gpus(gres), _local_time(start), _local_time(end), name,
                            comment))
    return out


def _docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 (nanoseconds) -> epoch seconds; the zero time -> None."""
    if not text or text.startswith("0001-"):
        return None
    main, _, frac = text.rstrip("Z").partition(".")
    frac = "".join(c for c in frac if c.isdigit())[:6]
    try:
        base = dt.datetime.fromisoformat(main).replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return base.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


NODE_FAILURES = ("NODE_FAIL", "BOOT_FAIL")  # the job's node, not the job, failed


def ended_reason(job: SlurmJob) -> str:
    """Why a Slurm job that left no status file ended."""
    node = job.node or "?"
    return {
        "NODE_FAIL": f"node {node} failed",
        "BOOT_FAIL": f"node {node} failed to boot",
        "TIMEOUT": "time limit (Slurm)",
        "CANCELLED": "cancelled in Slurm",
        "PREEMPTED": "preempted by Slurm",
        "DEADLINE": "deadline passed (Slurm)",
        "OUT_OF_MEMORY": "out of memory (Slurm)",
    }.get(job.state, f"batch script ended without a status (Slurm: {job.state.lower()}); "
                     "see slurm.out")


def job_status(ref: str, name: str, job_id: int | None, owner: str, job: SlurmJob | None,
               status: dict[str, Any] | None, now: float,
               requeue_node_failure: bool = False) -> ContainerStatus:
    """What a job is, from Slurm's row (None: Slurm forgot it) and its status file.

    ``requeue_node_failure``: a job whose node failed ends with a reason that asks
    the scheduler to queue it again (``dopq.core.exits.REQUEUED_PREFIX``)."""
    node = job.node if job and job.node else None
    if status is not None:
        reason = str(status.get("reason") or "") or None
        if reason is None and job is not None and job.state == "TIMEOUT":
            reason = "time limit (Slurm)"
        code = status.get("exit_code")
        return ContainerStatus(
            id=ref, name=name, job_id=job_id, running=False,
            exit_code=int(code) if isinstance(code, int) else None,
            oom_killed=status.get("oom_killed") is True,
            started_at=_docker_time(status.get("started_at")),
            finished_at=_docker_time(status.get("finished_at")),
            owner=owner, node=str(status.get("node") or "") or node,
            reason=reason if isinstance(code, int) or reason else "status file unreadable")
    # An ended script's status file may reach this host a moment late (NFS);
    # a job that never ran on a node (cancelled while pending) has none to wait for.
    waiting = (job is not None and job.state not in ALIVE and bool(job.node)
               and job.state not in NODE_FAILURES
               and (job.end is None or now - job.end < STATUS_WAIT))
    if job is not None and (job.state in ALIVE or waiting):
        started = job.start if job.state not in NOT_STARTED else None
        return ContainerStatus(id=ref, name=name, job_id=job_id, running=True, exit_code=None,
                               oom_killed=False, started_at=started, finished_at=None,
                               owner=owner, node=node)
    reason = ended_reason(job) if job is not None else "Slurm lost the job"
    if requeue_node_failure and job is not None and job.state in NODE_FAILURES:
        reason = REQUEUED_PREFIX + reason
    return ContainerStatus(
        id=ref, name=name, job_id=job_id, running=False, exit_code=None, oom_killed=False,
        started_at=job.start if job else None, finished_at=job.end if job else None,
        owner=owner, node=node, reason=reason)


def sbatch_argv(settings: Settings, spec: ContainerSpec, job_dir: Path, owner: str,
                job_id: int, grace: float) -> builtins.list[str]:
    s = settings.slurm
    argv = ["sbatch", "--parsable", "--nodes=1", "--ntasks=1", f"--job-name={spec.name}",
            f"--comment=dopq:{owner}:{job_id}", f"--output={job_dir}/slurm.out",
            # DoPQ requeues (requeue_on_node_failure) and places the job again itself:
            # Slurm's own requeue would keep it pinned to the node that died.
            f"--chdir={job_dir}", "--no-requeue"]
    if spec.node:
        argv.append(f"--nodelist={spec.node}")
    if spec.gpus:
        argv.append(f"--gres=gpu:{len(spec.gpus)}")
    if spec.nano_cpus:
        argv.append(f"--cpus-per-task={max(1, math.ceil(spec.nano_cpus / 1e9))}")
    if spec.mem_limit:
        argv.append(f"--mem={max(1, math.ceil(spec.mem_limit / 2**20))}M")
    if spec.time_limit:
        argv.append(f"--time={max(1, math.ceil((spec.time_limit + grace) / 60))}")
    if s.partition:
        argv.append(f"--partition={s.partition}")
    return [*argv, *s.extra_args, str(job_dir / "job.sh")]

"""The Slurm batch script that runs one job's container on a node: pure text, no I/O.

``batch_script(spec, job_dir, grace)`` turns a :class:`ContainerSpec` into a
bash script for ``sbatch``. On the node it pulls the image, creates the
container with the same limits and confinement as ``ContainerRuntime.run``
(the docker CLI's flags for docker-py's host config), hands it exactly the
GPUs Slurm bound, streams its output to ``<job_dir>/log``, turns SIGTERM
into ``docker stop -t <grace>``, writes ``<job_dir>/status`` (JSON: exit_code,
oom_killed, started_at, finished_at, reason, slurm_job, node) and removes
the container.

Every value taken from the spec is quoted with ``shlex.quote`` and passed as
one ``--flag=value`` word, so no value is read by the shell or taken for
another flag; the only unquoted words are this module's own. ``docker_argv``
gives the ``docker create`` arguments as a list (the tests compare it with
what a fake ``docker`` received).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from dopq.core.errors import DopqError
from dopq.server.runspec import ContainerSpec

# Values the script fills in on the node (shell fragments, not spec values).
GPUS_VAR = '"$GPUS"'
NODE_VAR = '"${SLURMD_NODENAME:-}"'
JOB_VAR = '"${SLURM_JOB_ID:-}"'
OWN_ENV = ("NVIDIA_VISIBLE_DEVICES", "DOPQ_NODE", "DOPQ_SLURM_JOB")
INSPECT_FORMAT = ("{{.State.ExitCode}} {{.State.OOMKilled}} {{.State.StartedAt}} "
                  "{{.State.FinishedAt}}")


class Shell(str):
    """A word of the script's own (expands a variable on the node); never quoted."""


def _split(value: list[str] | str | None) -> list[str] | None:
    """docker-py's reading of a command or entrypoint: a string is shlex-split."""
    if value is None:
        return None
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def _cpus(nano: int) -> str:
    whole, frac = divmod(int(nano), 10**9)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def docker_argv(spec: ContainerSpec) -> list[str]:
    """The ``docker create`` arguments (after ``create``) for ``spec``.

    Three words are ``Shell`` fragments the node fills in: the GPUs Slurm bound,
    the node's name and the Slurm job id.
    """
    if not spec.image or spec.image.startswith("-"):
        raise DopqError(f"slurm: bad image name {spec.image[:80]!r}")
    args: list[str] = [f"--name={spec.name}"]
    for key, value in spec.labels.items():
        if not key or "=" in key:  # the CLI splits at the first "=": another label
            raise DopqError(f"slurm: bad label name {key[:80]!r}")
        args.append(f"--label={key}={value}")
    for key, value in spec.env.items():
        if not key or "=" in key:
            raise DopqError(f"slurm: bad environment variable name {key[:80]!r}")
        if key not in OWN_ENV:
            args.append(f"--env={key}={value}")
    args += [Shell(f"--env=NVIDIA_VISIBLE_DEVICES={GPUS_VAR}"),
             Shell(f"--env=DOPQ_NODE={NODE_VAR}"),
             Shell(f"--env=DOPQ_SLURM_JOB={JOB_VAR}")]
    if spec.mem_limit:
        args += [f"--memory={int(spec.mem_limit)}", f"--memory-swap={int(spec.mem_limit)}"]
    if spec.nano_cpus:
        args.append(f"--cpus={_cpus(spec.nano_cpus)}")
    if spec.shm_size:
        args.append(f"--shm-size={int(spec.shm_size)}")
    if spec.pids_limit:
        args.append(f"--pids-limit={int(spec.pids_limit)}")
    args.append(f"--network={spec.network}")
    for src, bind in spec.binds.items():
        mode = bind.get("mode", "rw")
        if mode not in ("ro", "rw"):
            raise DopqError(f"slurm: bad bind mode {mode[:20]!r} for {bind.get('bind', '')[:80]!r}")
        args.append(f"--volume={src}:{bind['bind']}:{mode}")
    args.append("--cap-drop=ALL")
    args += [f"--cap-add={cap}" for cap in spec.cap_add]
    args.append("--security-opt=no-new-privileges")
    if spec.read_only:
        args.append("--read-only")
    args.append("--ulimit=core=0:0")
    args += [f"--ulimit={u['name']}={int(u['soft'])}:{int(u['hard'])}" for u in spec.ulimits]
    args.append("--init")
    if spec.user is not None:
        args.append(f"--user={spec.user}")
    if spec.working_dir is not None:
        args.append(f"--workdir={spec.working_dir}")
    command = _split(spec.command) or []
    entrypoint = _split(spec.entrypoint)
    if entrypoint is not None:
        # The CLI takes one word for --entrypoint; the rest lead the command,
        # which gives the engine the same argv as docker-py's list.
        args.append(f"--entrypoint={entrypoint[0] if entrypoint else ''}")
        command = entrypoint[1:] + command
    if spec.stop_signal:
        args.append(f"--stop-signal={spec.stop_signal}")
    if spec.log_max_bytes:
        args += ["--log-driver=json-file", f"--log-opt=max-size={int(spec.log_max_bytes)}",
                 "--log-opt=max-file=1"]
    if spec.tty:
        args.append("--tty")
    return [*args, spec.image, *command]


def _words(items: Iterable[str]) -> str:
    return "\n".join("  " + (w if isinstance(w, Shell) else shlex.quote(w)) for w in items)


def batch_script(spec: ContainerSpec, job_dir: str, grace: float, docker: str = "docker") -> str:
    """The bash script sbatch runs for ``spec``, working in ``job_dir``.

    ``docker`` is the command on the nodes (split like a shell would, each word
    quoted). Exit status: the container's, 125 when it could not be started.
    """
    q = shlex.quote
    docker_cmd = " ".join(q(w) for w in shlex.split(docker)) or "docker"
    log_cap = int(spec.log_max_bytes or 0)
    # head's output is buffered by stdio: stdbuf makes the log stream (no stdbuf: no cap)
    follow = ('"${DOCKER[@]}" logs -f "$CID" 2>&1 | "${CAP[@]}"' if log_cap
              else '"${DOCKER[@]}" logs -f "$CID" 2>&1')
    return f"""#!/bin/bash
# DoPQ: one job's container on this node's Docker engine (made by dopq.server.batch).
set -u
DOCKER=({docker_cmd})
JOB_DIR={q(str(job_dir))}
NAME={q(spec.name)}
IMAGE={q(spec.image)}
GRACE={max(0, int(round(grace)))}
LOG_CAP={log_cap}
CAP=(cat)
! command -v stdbuf >/dev/null 2>&1 || CAP=(stdbuf -o0 head -c "$LOG_CAP")
LOG="$JOB_DIR/log"
CID=
TERMINATED=0
trap 'TERMINATED=1' TERM
GPUS="${{SLURM_JOB_GPUS:-${{CUDA_VISIBLE_DEVICES:-}}}}"
[ -n "$GPUS" ] || GPUS=void
cd "$JOB_DIR" || exit 125
: >>"$LOG"

write_status() {{  # exit_code oom_killed started_at finished_at reason
  node="${{SLURMD_NODENAME:-}}"
  printf '{{"exit_code": %d, "oom_killed": %s, "started_at": "%s", "finished_at": "%s", \
"reason": "%s", "slurm_job": "%s", "node": "%s"}}\\n' \\
    "$1" "$2" "$3" "$4" "$5" "${{SLURM_JOB_ID:-}}" "${{node//[\\"\\\\]/}}" \\
    >"$JOB_DIR/status.tmp" && mv -f "$JOB_DIR/status.tmp" "$JOB_DIR/status"
}}

fail() {{  # exit_code reason: the container never ran
  if [ "$TERMINATED" = 1 ]; then  # a stop, not the failure it caused
    set -- 143 "stopped before the container started"
  fi
  echo "[dopq: $2]" >>"$LOG"
  [ -z "$CID" ] || "${{DOCKER[@]}}" rm -f "$CID" >/dev/null 2>&1
  write_status "$1" false "" "" "$2"
  exit "$1"
}}

# The registry's tags name the image's content (dopq.server.backends): one this
# node's engine has is the same image, and the registry is not asked again.
if ! "${{DOCKER[@]}}" image inspect "$IMAGE" >/dev/null 2>&1 \
    && ! "${{DOCKER[@]}}" pull -q "$IMAGE" >/dev/null 2>>"$LOG"; then
  fail 125 "docker pull failed"
fi
# A container of this job left on this node by an earlier, killed run.
"${{DOCKER[@]}}" rm -f "$NAME" >/dev/null 2>&1
ARGS=(
{_words(docker_argv(spec))}
)
CID=$("${{DOCKER[@]}}" create "${{ARGS[@]}}" 2>>"$LOG") || fail 125 "docker create failed"
[ "$TERMINATED" = 0 ] || fail 143 "stopped before the container started"
on_term() {{
  TERMINATED=1
  "${{DOCKER[@]}}" stop -t "$GRACE" "$CID" >/dev/null 2>&1
}}
trap on_term TERM
STARTED=1
"${{DOCKER[@]}}" start "$CID" >/dev/null 2>>"$LOG" || STARTED=0
[ "$TERMINATED" = 0 ] || on_term  # a stop that came while it was starting
# The helpers ignore SIGTERM (Slurm signals every process of the job): the
# container's end ends them, and the trap above does the stopping.
( trap '' TERM; {follow} ) >>"$LOG" &
LOGGER=$!
( trap '' TERM; exec "${{DOCKER[@]}}" wait "$CID" ) >/dev/null 2>&1 &
WAITER=$!
while kill -0 "$WAITER" 2>/dev/null; do
  wait "$WAITER"
done
for ((i = 0; i < 40; i++)); do
  kill -0 "$LOGGER" 2>/dev/null || break
  sleep 0.25
done
kill -KILL "$LOGGER" 2>/dev/null
if [ "$LOG_CAP" -gt 0 ] && [ "$(stat -c %s "$LOG" 2>/dev/null || echo 0)" -ge "$LOG_CAP" ]; then
  printf '\\n[dopq: log truncated]\\n' >>"$LOG"
fi
INFO=$("${{DOCKER[@]}}" inspect --format {q(INSPECT_FORMAT)} "$CID" 2>>"$LOG")
read -r CODE OOM STARTED_AT FINISHED_AT _ <<<"$INFO"
REASON=""
case "${{CODE:-}}" in ''|*[!0-9]*) CODE=125; REASON="docker inspect failed" ;; esac
[ "${{OOM:-}}" = true ] || OOM=false
case "${{STARTED_AT:-}}" in *[!0-9TZ:.+-]*) STARTED_AT="" ;; esac
case "${{FINISHED_AT:-}}" in *[!0-9TZ:.+-]*) FINISHED_AT="" ;; esac
if [ "$STARTED" = 0 ]; then
  REASON="docker start failed"
  [ "$CODE" != 0 ] || CODE=125
fi
"${{DOCKER[@]}}" rm -f "$CID" >/dev/null 2>&1
write_status "$CODE" "$OOM" "${{STARTED_AT:-}}" "${{FINISHED_AT:-}}" "$REASON"
exit "$CODE"
"""

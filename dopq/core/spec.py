"""Turn a ``container_config.json`` (plus command-line overrides) into a ``JobSpec``.

Strict on purpose, like the settings: an unknown key, a wrong type or a value
out of range is a ``JobRejected`` that names the key. Every function here
raises nothing else for bad input.

The checks of single values are ``dopq.core.fields``; ``run_params`` (the few
``docker create`` options a job may set) is ``dopq.core.runparams``; image
tags are ``dopq.core.tags``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dopq.core.errors import JobRejected
from dopq.core.fields import (
    ENV_KEY_RE,
    MAX_ARRAY,
    MAX_ARRAY_INDEX,
    MAX_CPUS,
    MAX_DURATION,
    MAX_GPUS,
    MAX_PRIORITY,
    MAX_SLOTS,
    USER_RE,
    check_command,
    check_env,
    check_int,
    check_job_ids,
    check_name,
    check_size,
    check_user_name,
    kind,
    reject_unknown,
    show,
)
from dopq.core.forms import parse_array, parse_duration
from dopq.core.jobs import JobSpec
from dopq.core.runparams import MOVED, split_run_params
from dopq.core.tags import normalise_tag

# Where callers and tests have always found them.
__all__ = ["ENV_KEY_RE", "USER_RE", "check_overrides", "normalise_tag", "parse_array",
           "parse_spec"]

_CONFIG_KEYS = (
    "name",
    "executor_name",
    "required_memory",
    "num_gpus",
    "gpu_memory",
    "num_slots",
    "build_flag",
    "run_params",
    "command",
    "env",
    "cpus",
    "shm_size",
    "time_limit",
    "priority",
    "preemptible",
)
# CLI flag name -> config key
_OVERRIDE_KEYS = {
    "name": "name",
    "gpus": "num_gpus",
    "gpu_memory": "gpu_memory",
    "memory": "required_memory",
    "cpus": "cpus",
    "time_limit": "time_limit",
    "shm_size": "shm_size",
    "priority": "priority",
    "command": "command",
    "env": "env",
    "after": "after",
    "after_any": "after_any",
    "array": "array",
    "preemptible": "preemptible",
}


def parse_spec(
    config: Mapping[str, Any],
    *,
    submitter: str | None,
    overrides: Mapping[str, Any] | None,
    allowed_users: Sequence[str],
) -> JobSpec:
    """Validate ``config`` and ``overrides`` (CLI flags, applied last) into a ``JobSpec``.

    ``submitter`` is the authenticated user or the inbox folder's owner; the
    job runs as that user and ``executor_name`` may only repeat it. A value of
    ``null`` (or an override of ``None``) means "use the default".
    """
    if not isinstance(config, Mapping):
        raise JobRejected(f"job config: expected a JSON object, got {kind(config)}")
    reject_unknown(config, _CONFIG_KEYS, "container_config.json")
    raw = {k: v for k, v in config.items() if v is not None}
    user = _resolve_user(raw.get("executor_name"), submitter, allowed_users)
    if "name" not in raw:
        raise JobRejected("name: required (a job name of at least 3 characters)")
    spec = JobSpec(name=check_name(raw["name"], "name"), user=user)

    for key in ("required_memory", "num_gpus", "gpu_memory", "num_slots", "build_flag", "cpus",
                "shm_size", "time_limit", "priority", "command", "preemptible"):
        if key in raw:
            _FIELDS[key](spec, raw[key], key)
    # Environment: run_params.environment first, then env on top.
    run_params, moved = split_run_params(raw.get("run_params", {}))
    spec.run_params = run_params
    for key, value in moved.items():
        _apply_moved(spec, raw, key, value)
    if "env" in raw:
        spec.env.update(check_env(raw["env"], "env"))

    _apply_overrides(spec, overrides)
    _check_gpu_memory(spec)
    return spec


def check_overrides(overrides: Mapping[str, Any] | None) -> JobSpec:
    """Validate submit options alone, before anything is stored (an upload's
    options arrive with its first call); returns them applied to a blank spec,
    so that e.g. ``len(spec.array)`` is known."""
    spec = JobSpec(name="job", user="nobody")
    _apply_overrides(spec, overrides)
    _check_gpu_memory(spec)
    return spec


def _apply_overrides(spec: JobSpec, overrides: Mapping[str, Any] | None) -> None:
    if overrides is not None and not isinstance(overrides, Mapping):
        raise JobRejected(f"overrides: expected a mapping, got {kind(overrides)}")
    for flag, value in (overrides or {}).items():
        if not isinstance(flag, str) or flag not in _OVERRIDE_KEYS:
            raise JobRejected(f"unknown override {show(flag)}")
        if value is not None:
            _OVERRIDES[_OVERRIDE_KEYS[flag]](spec, value, f"--{flag.replace('_', '-')}")


# --- users -------------------------------------------------------------------


def _resolve_user(executor: Any, submitter: str | None, allowed: Sequence[str]) -> str:
    if executor is not None:
        user = check_user_name(executor, "executor_name")
    elif submitter is not None:
        user = check_user_name(submitter, "submitting user")
    else:
        raise JobRejected("executor_name: required (the user the job runs for)")
    if submitter is not None:
        who = check_user_name(submitter, "submitting user")
        if who != user:
            raise JobRejected(f"executor_name '{user}' differs from submitting user '{who}'")
    if allowed and user not in {str(a).lower() for a in allowed}:
        raise JobRejected(f"executor_name '{user}' is not an allowed user")
    return user


# --- fields ------------------------------------------------------------------


def _set_memory(spec: JobSpec, value: Any, what: str) -> None:
    memory = check_size(value, what)
    if memory < 6 * 2**20:  # Docker refuses less, when the container is created
        raise JobRejected(f"{what}: {memory} bytes is below the minimum of 6m "
                          f"(a number alone is bytes: did you mean '{str(value).strip()[:20]}g'?)")
    spec.memory = memory


def _set_gpus(spec: JobSpec, value: Any, what: str) -> None:
    spec.num_gpus = check_int(value, what, 0, MAX_GPUS)


def _set_gpu_memory(spec: JobSpec, value: Any, what: str) -> None:
    spec.gpu_memory = check_size(value, what)


def _check_gpu_memory(spec: JobSpec) -> None:
    """GPU memory is asked per device: a job without devices cannot ask for it."""
    if spec.gpu_memory is not None and spec.num_gpus == 0:
        raise JobRejected("gpu_memory: needs num_gpus of at least 1 (it is memory on each "
                          "GPU the job gets), got num_gpus 0")


def _set_slots(spec: JobSpec, value: Any, what: str) -> None:
    spec.num_slots = check_int(value, what, 1, MAX_SLOTS)  # accepted for compatibility; unused


def _set_build_flag(spec: JobSpec, value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise JobRejected(f"{what}: expected true or false, got {kind(value)}")
    spec.build_flag = value


def _set_preemptible(spec: JobSpec, value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise JobRejected(f"{what}: expected true or false, got {kind(value)}")
    spec.preemptible = value


def _set_cpus(spec: JobSpec, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobRejected(f"{what}: expected a number, got {kind(value)}")
    if not (math.isfinite(value) and 0 < value <= MAX_CPUS):
        raise JobRejected(f"{what}: must be a number above 0 and at most {MAX_CPUS:g}")
    spec.cpus = float(value)


def _set_shm(spec: JobSpec, value: Any, what: str) -> None:
    spec.shm_size = check_size(value, what)


def _set_time_limit(spec: JobSpec, value: Any, what: str) -> None:
    try:
        seconds = parse_duration(value, what)
    except (OverflowError, ValueError):
        raise JobRejected(f"{what}: duration is out of range") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_DURATION):
        raise JobRejected(f"{what}: duration is out of range")
    spec.time_limit = seconds


def _set_priority(spec: JobSpec, value: Any, what: str) -> None:
    spec.priority = check_int(value, what, -MAX_PRIORITY, MAX_PRIORITY)


def _set_command(spec: JobSpec, value: Any, what: str) -> None:
    spec.command = check_command(value, what)


def _set_name(spec: JobSpec, value: Any, what: str) -> None:
    spec.name = check_name(value, what)


def _set_env(spec: JobSpec, value: Any, what: str) -> None:
    spec.env.update(check_env(value, what))


def _set_after(spec: JobSpec, value: Any, what: str) -> None:
    spec.after = check_job_ids(value, what)


def _set_after_any(spec: JobSpec, value: Any, what: str) -> None:
    spec.after_any = check_job_ids(value, what)


def _set_array(spec: JobSpec, value: Any, what: str) -> None:
    if isinstance(value, str):
        spec.array = parse_array(value, what)
    elif isinstance(value, list):
        if len(value) > MAX_ARRAY:
            raise JobRejected(f"{what}: at most {MAX_ARRAY} array elements")
        spec.array = sorted({check_int(v, what, 0, MAX_ARRAY_INDEX) for v in value})
    else:
        raise JobRejected(f"{what}: expected indices like '0-9', got {kind(value)}")


_Setter = Callable[[JobSpec, Any, str], None]
_FIELDS: dict[str, _Setter] = {
    "required_memory": _set_memory,
    "num_gpus": _set_gpus,
    "gpu_memory": _set_gpu_memory,
    "num_slots": _set_slots,
    "build_flag": _set_build_flag,
    "cpus": _set_cpus,
    "shm_size": _set_shm,
    "time_limit": _set_time_limit,
    "priority": _set_priority,
    "command": _set_command,
    "preemptible": _set_preemptible,
}
_OVERRIDES: dict[str, _Setter] = {
    **_FIELDS,
    "name": _set_name,
    "env": _set_env,
    "after": _set_after,
    "after_any": _set_after_any,
    "array": _set_array,
}


# --- run_params --------------------------------------------------------------


def _apply_moved(spec: JobSpec, raw: Mapping[str, Any], key: str, value: Any) -> None:
    what = f"run_params.{key}"
    if key == "environment":
        spec.env.update(check_env(value, what))
        return
    config_key, attr = MOVED[key]
    before = getattr(spec, attr)
    _FIELDS[config_key](spec, value, what)
    if config_key in raw and getattr(spec, attr) != before:
        raise JobRejected(f"{what} conflicts with {config_key}; give only one")

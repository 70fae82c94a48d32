"""Turn a ``container_config.json`` (plus command-line overrides) into a ``JobSpec``.

Strict on purpose, like the settings: an unknown key, a wrong type or a value
out of range is a ``JobRejected`` that names the key. Every function here
raises nothing else for bad input.

``run_params`` once went straight to ``docker create``, which made every user
root on the host. Now only an allow-list of harmless options passes; options
that have a ``JobSpec`` field (environment, command, shm_size, mem_limit) are
moved into that field, so the runtime has one place to read each of them.
"""

from __future__ import annotations

import difflib
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dopq.core.errors import JobRejected
from dopq.core.forms import parse_array, parse_duration, parse_size
from dopq.core.jobs import JobSpec
from dopq.core.text import check_display_text

USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_ENV_PREFIXES = ("DOPQ_", "NVIDIA_")

MAX_NAME_CHARS = 128
MAX_GPUS = 1024
MAX_SLOTS = 1024
MAX_CPUS = 4096.0
MAX_SIZE = 2**50  # 1 PiB: far above any real limit, far below SQLite's int64
MAX_DURATION = 10 * 366 * 86400.0
MAX_PRIORITY = 1000
MAX_ARRAY = 10000
MAX_ARRAY_INDEX = 999_999
MAX_ENV = 1000
MAX_ARGS = 4096
MAX_TEXT = 65536  # one command string or environment value

_CONFIG_KEYS = (
    "name",
    "executor_name",
    "required_memory",
    "num_gpus",
    "num_slots",
    "build_flag",
    "run_params",
    "command",
    "env",
    "cpus",
    "shm_size",
    "time_limit",
    "priority",
)
# CLI flag name -> config key
_OVERRIDE_KEYS = {
    "name": "name",
    "gpus": "num_gpus",
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
}
_ULIMITS = frozenset({"nofile", "memlock", "stack"})
_SIGNAL_RE = re.compile(r"(SIG)?[A-Z][A-Z0-9+-]{0,15}|\d{1,2}")
_DOCKER_ID = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}"
_DOCKER_USER_RE = re.compile(rf"{_DOCKER_ID}(?::{_DOCKER_ID})?")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,127}")


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
        raise JobRejected(f"job config: expected a JSON object, got {_kind(config)}")
    _reject_unknown(config, _CONFIG_KEYS, "container_config.json")
    raw = {k: v for k, v in config.items() if v is not None}
    user = _resolve_user(raw.get("executor_name"), submitter, allowed_users)
    if "name" not in raw:
        raise JobRejected("name: required (a job name of at least 3 characters)")
    spec = JobSpec(name=_name(raw["name"], "name"), user=user)

    for key in ("required_memory", "num_gpus", "num_slots", "build_flag", "cpus",
                "shm_size", "time_limit", "priority", "command"):
        if key in raw:
            _FIELDS[key](spec, raw[key], key)
    # Environment: run_params.environment first, then env on top.
    run_params, moved = _run_params(raw.get("run_params", {}))
    spec.run_params = run_params
    for key, value in moved.items():
        _apply_moved(spec, raw, key, value)
    if "env" in raw:
        spec.env.update(_env(raw["env"], "env"))

    _apply_overrides(spec, overrides)
    return spec


def check_overrides(overrides: Mapping[str, Any] | None) -> JobSpec:
    """Validate submit options alone, before anything is stored (an upload's
    options arrive with its first call); returns them applied to a blank spec,
    so that e.g. ``len(spec.array)`` is known."""
    spec = JobSpec(name="job", user="nobody")
    _apply_overrides(spec, overrides)
    return spec


def _apply_overrides(spec: JobSpec, overrides: Mapping[str, Any] | None) -> None:
    if overrides is not None and not isinstance(overrides, Mapping):
        raise JobRejected(f"overrides: expected a mapping, got {_kind(overrides)}")
    for flag, value in (overrides or {}).items():
        if not isinstance(flag, str) or flag not in _OVERRIDE_KEYS:
            raise JobRejected(f"unknown override {_show(flag)}")
        if value is not None:
            _OVERRIDES[_OVERRIDE_KEYS[flag]](spec, value, f"--{flag.replace('_', '-')}")


# --- users -------------------------------------------------------------------


def _resolve_user(executor: Any, submitter: str | None, allowed: Sequence[str]) -> str:
    if executor is not None:
        user = _user_name(executor, "executor_name")
    elif submitter is not None:
        user = _user_name(submitter, "submitting user")
    else:
        raise JobRejected("executor_name: required (the user the job runs for)")
    if submitter is not None:
        who = _user_name(submitter, "submitting user")
        if who != user:
            raise JobRejected(f"executor_name '{user}' differs from submitting user '{who}'")
    if allowed and user not in {str(a).lower() for a in allowed}:
        raise JobRejected(f"executor_name '{user}' is not an allowed user")
    return user


def _user_name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise JobRejected(f"{what}: expected a string, got {_kind(value)}")
    # isascii first: str.lower() maps some non-ASCII letters (KELVIN SIGN) to ASCII.
    user = value.strip()
    user = user.lower() if user.isascii() else user
    if not USER_RE.fullmatch(user):
        raise JobRejected(
            f"{what}: {_show(value)} is not a valid user name (letters, digits, _ . -; "
            "at most 32)"
        )
    return user


# --- fields ------------------------------------------------------------------


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise JobRejected(f"{what}: expected a string, got {_kind(value)}")
    # Control and format characters first, named: other users see the name.
    name = check_display_text(value, what).strip()
    if len(name) < 3:
        raise JobRejected(f"{what}: must have at least 3 characters")
    if len(name) > MAX_NAME_CHARS:
        raise JobRejected(f"{what}: must have at most {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise JobRejected(f"{what}: must not contain control characters")
    return name


def _size(value: Any, what: str) -> int:
    try:
        size = parse_size(value, what)
    except (OverflowError, ValueError):  # "1e400"-sized numbers
        raise JobRejected(f"{what}: size is out of range") from None
    if size <= 0:
        raise JobRejected(f"{what}: must be positive")
    if size > MAX_SIZE:
        raise JobRejected(f"{what}: size is out of range")
    return size


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobRejected(f"{what}: expected an integer, got {_kind(value)}")
    if not low <= value <= high:
        raise JobRejected(f"{what}: must be between {low} and {high}, got {value}")
    return value


def _set_memory(spec: JobSpec, value: Any, what: str) -> None:
    memory = _size(value, what)
    if memory < 6 * 2**20:  # Docker refuses less, when the container is created
        raise JobRejected(f"{what}: {memory} bytes is below the minimum of 6m "
                          f"(a number alone is bytes: did you mean '{str(value).strip()[:20]}g'?)")
    spec.memory = memory


def _set_gpus(spec: JobSpec, value: Any, what: str) -> None:
    spec.num_gpus = _int(value, what, 0, MAX_GPUS)


def _set_slots(spec: JobSpec, value: Any, what: str) -> None:
    spec.num_slots = _int(value, what, 1, MAX_SLOTS)  # accepted for compatibility; unused


def _set_build_flag(spec: JobSpec, value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise JobRejected(f"{what}: expected true or false, got {_kind(value)}")
    spec.build_flag = value


def _set_cpus(spec: JobSpec, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JobRejected(f"{what}: expected a number, got {_kind(value)}")
    if not (math.isfinite(value) and 0 < value <= MAX_CPUS):
        raise JobRejected(f"{what}: must be a number above 0 and at most {MAX_CPUS:g}")
    spec.cpus = float(value)


def _set_shm(spec: JobSpec, value: Any, what: str) -> None:
    spec.shm_size = _size(value, what)


def _set_time_limit(spec: JobSpec, value: Any, what: str) -> None:
    try:
        seconds = parse_duration(value, what)
    except (OverflowError, ValueError):
        raise JobRejected(f"{what}: duration is out of range") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_DURATION):
        raise JobRejected(f"{what}: duration is out of range")
    spec.time_limit = seconds


def _set_priority(spec: JobSpec, value: Any, what: str) -> None:
    spec.priority = _int(value, what, -MAX_PRIORITY, MAX_PRIORITY)


def _set_command(spec: JobSpec, value: Any, what: str) -> None:
    spec.command = _command(value, what)


def _set_name(spec: JobSpec, value: Any, what: str) -> None:
    spec.name = _name(value, what)


def _set_env(spec: JobSpec, value: Any, what: str) -> None:
    spec.env.update(_env(value, what))


def _set_after(spec: JobSpec, value: Any, what: str) -> None:
    spec.after = _job_ids(value, what)


def _set_after_any(spec: JobSpec, value: Any, what: str) -> None:
    spec.after_any = _job_ids(value, what)


def _set_array(spec: JobSpec, value: Any, what: str) -> None:
    if isinstance(value, str):
        spec.array = parse_array(value, what)
    elif isinstance(value, list):
        if len(value) > MAX_ARRAY:
            raise JobRejected(f"{what}: at most {MAX_ARRAY} array elements")
        spec.array = sorted({_int(v, what, 0, MAX_ARRAY_INDEX) for v in value})
    else:
        raise JobRejected(f"{what}: expected indices like '0-9', got {_kind(value)}")


_Setter = Callable[[JobSpec, Any, str], None]
_FIELDS: dict[str, _Setter] = {
    "required_memory": _set_memory,
    "num_gpus": _set_gpus,
    "num_slots": _set_slots,
    "build_flag": _set_build_flag,
    "cpus": _set_cpus,
    "shm_size": _set_shm,
    "time_limit": _set_time_limit,
    "priority": _set_priority,
    "command": _set_command,
}
_OVERRIDES: dict[str, _Setter] = {
    **_FIELDS,
    "name": _set_name,
    "env": _set_env,
    "after": _set_after,
    "after_any": _set_after_any,
    "array": _set_array,
}


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise JobRejected(f"{what}: expected a string, got {_kind(value)}")
    if "\x00" in value:
        raise JobRejected(f"{what}: must not contain NUL characters")
    if len(value) > MAX_TEXT:
        raise JobRejected(f"{what}: longer than {MAX_TEXT} characters")
    return value


def _command(value: Any, what: str) -> str | list[str]:
    if isinstance(value, str):
        if not value.strip():
            raise JobRejected(f"{what}: must not be empty")
        return _text(value, what)
    if isinstance(value, list):
        if not value or len(value) > MAX_ARGS:
            raise JobRejected(f"{what}: expected 1 to {MAX_ARGS} arguments")
        return [_text(arg, f"{what} argument") for arg in value]
    raise JobRejected(f"{what}: expected a string or a list of strings, got {_kind(value)}")


def _env(value: Any, what: str) -> dict[str, str]:
    """An environment as a dict, or as a list of ``KEY=VALUE`` strings."""
    if isinstance(value, list):
        pairs: list[tuple[Any, Any]] = []
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise JobRejected(f"{what}: expected KEY=VALUE strings, got {_show(item)}")
            key, _, val = item.partition("=")
            pairs.append((key, val))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise JobRejected(f"{what}: expected an object of strings, got {_kind(value)}")
    if len(pairs) > MAX_ENV:
        raise JobRejected(f"{what}: at most {MAX_ENV} variables")
    env: dict[str, str] = {}
    for key, val in pairs:
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key) or len(key) > 256:
            raise JobRejected(f"{what}: {_show(key)} is not a valid variable name")
        if key.upper().startswith(RESERVED_ENV_PREFIXES):
            raise JobRejected(f"{what}: {key} is reserved (DOPQ_* and NVIDIA_* are set by DoPQ)")
        env[key] = _text(val, f"{what}.{key}")
    return env


def _job_ids(value: Any, what: str) -> list[int]:
    if isinstance(value, str):
        items: list[Any] = []
        for part in value.replace(" ", "").split(","):
            if not part.isdecimal() or len(part) > 18:
                raise JobRejected(f"{what}: expected job ids like '12,13', got {_show(value)}")
            items.append(int(part))
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise JobRejected(f"{what}: expected job ids, got {_kind(value)}")
    if len(items) > MAX_ARRAY:
        raise JobRejected(f"{what}: at most {MAX_ARRAY} job ids")
    ids: list[int] = []
    for item in items:
        job_id = _int(item, what, 1, 2**62)
        if job_id not in ids:
            ids.append(job_id)
    return ids


# --- run_params --------------------------------------------------------------


def _rp_working_dir(value: Any, what: str) -> str:
    path = _text(value, what)
    if not path.startswith("/"):
        raise JobRejected(f"{what}: must be an absolute path inside the container")
    return path


def _rp_user(value: Any, what: str) -> str:
    user = _text(value, what)
    if not _DOCKER_USER_RE.fullmatch(user):
        raise JobRejected(f"{what}: expected 'user', 'uid' or 'uid:gid', got {_show(value)}")
    return user


def _rp_tty(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise JobRejected(f"{what}: expected true or false, got {_kind(value)}")
    return value


def _rp_stop_signal(value: Any, what: str) -> str:
    text = _text(value, what)
    if not _SIGNAL_RE.fullmatch(text):
        raise JobRejected(f"{what}: expected a signal like 'SIGINT', got {_show(value)}")
    return text


def _rp_labels(value: Any, what: str) -> dict[str, str]:
    if isinstance(value, list):
        value = {_text(k, what): "" for k in value}
    if not isinstance(value, Mapping):
        raise JobRejected(f"{what}: expected an object of strings, got {_kind(value)}")
    if len(value) > MAX_ENV:
        raise JobRejected(f"{what}: at most {MAX_ENV} labels")
    labels: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.fullmatch(key):
            raise JobRejected(f"{what}: {_show(key)} is not a valid label name")
        if key.lower().startswith("dopq."):
            raise JobRejected(f"{what}: {key} is reserved (dopq.* labels are set by DoPQ)")
        labels[key] = _text(val, f"{what}.{key}")
    return labels


def _rp_ulimits(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > len(_ULIMITS):
        raise JobRejected(f"{what}: expected a list of {{name, soft, hard}} objects")
    out: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) - {"name", "soft", "hard"}:
            raise JobRejected(f"{what}: expected a list of {{name, soft, hard}} objects")
        name = item.get("name")
        if name not in _ULIMITS:
            allowed = ", ".join(sorted(_ULIMITS))
            raise JobRejected(f"{what}: {_show(name)} is not allowed (only {allowed})")
        soft = _int(item.get("soft", -1), f"{what}.{name}.soft", -1, 2**62)
        hard = _int(item.get("hard", soft), f"{what}.{name}.hard", -1, 2**62)
        if hard != -1 and (soft == -1 or soft > hard):
            raise JobRejected(f"{what}.{name}: soft limit is above the hard limit")
        out.append({"name": name, "soft": soft, "hard": hard})
    return out


def _rp_entrypoint(value: Any, what: str) -> str | list[str]:
    return _command(value, what)


def _rp_memswap(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == -1:
        return -1  # docker's "unlimited swap"; the runtime caps it
    return _size(value, what)


# Kept in JobSpec.run_params (docker create keyword -> validator).
_RUN_PARAMS: dict[str, Callable[[Any, str], Any]] = {
    "working_dir": _rp_working_dir,
    "entrypoint": _rp_entrypoint,
    "user": _rp_user,
    "tty": _rp_tty,
    "stop_signal": _rp_stop_signal,
    "labels": _rp_labels,
    "ulimits": _rp_ulimits,
    "memswap_limit": _rp_memswap,
}
# Moved into a JobSpec field: run_params key -> (config key, JobSpec attribute).
_MOVED = {
    "environment": ("env", "env"),
    "command": ("command", "command"),
    "shm_size": ("shm_size", "shm_size"),
    "mem_limit": ("required_memory", "memory"),
}


def _run_params(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split run_params into the allowed docker options and the moved fields."""
    if not isinstance(value, Mapping):
        raise JobRejected(f"run_params: expected a JSON object, got {_kind(value)}")
    kept: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, val in value.items():
        if not isinstance(key, str) or (key not in _RUN_PARAMS and key not in _MOVED):
            raise JobRejected(f"run_params: {_show(key)} is not allowed")
        if val is None:
            continue
        if key in _MOVED:
            moved[key] = val
        else:
            kept[key] = _RUN_PARAMS[key](val, f"run_params.{key}")
    return kept, moved


def _apply_moved(spec: JobSpec, raw: Mapping[str, Any], key: str, value: Any) -> None:
    what = f"run_params.{key}"
    if key == "environment":
        spec.env.update(_env(value, what))
        return
    config_key, attr = _MOVED[key]
    before = getattr(spec, attr)
    _FIELDS[config_key](spec, value, what)
    if config_key in raw and getattr(spec, attr) != before:
        raise JobRejected(f"{what} conflicts with {config_key}; give only one")


# --- arrays and tags ---------------------------------------------------------


_TAG_BAD = re.compile(r"[^a-z0-9._-]+")
_TAG_SEPS = re.compile(r"[._-]{2,}")


def normalise_tag(user: str, name: str, job_id: int) -> str:
    """The image reference ``dopq/<user>/<name>:<job-id>``, valid for Docker.

    Each component is lower-cased, folded to ASCII, reduced to ``[a-z0-9._-]``
    with separator runs collapsed, starts and ends with a letter or digit, and
    is capped in length; the job id keeps tags of same-named jobs apart.
    """
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 <= job_id < 2**63:
        raise JobRejected(f"image tag: bad job id {_show(job_id)}")
    if not isinstance(user, str) or not isinstance(name, str):
        raise JobRejected("image tag: user and name must be strings")
    return f"dopq/{_component(user, 'user', 32)}/{_component(name, 'job', 64)}:{job_id}"


def _component(text: str, fallback: str, cap: int) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    comp = _TAG_BAD.sub("-", folded)
    # Docker allows one '.', one or two '_', or any number of '-' between parts.
    comp = _TAG_SEPS.sub(lambda m: "-" if "-" in m.group() or "." in m.group() else "__", comp)
    comp = comp.strip("._-")[:cap].rstrip("._-")
    return comp or fallback


# --- helpers -----------------------------------------------------------------


def _reject_unknown(config: Mapping[Any, Any], known: Sequence[str], where: str) -> None:
    for key in config:
        if not isinstance(key, str) or key not in known:
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise JobRejected(f"{where}: unknown key {_show(key)}{hint}")


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} ({_show(value, 40)})"


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__; the message must still be made
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

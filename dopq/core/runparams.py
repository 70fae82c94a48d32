"""``run_params``: the few ``docker create`` options a job may set itself.

``run_params`` once went straight to ``docker create``, which made every user
root on the host. Now only an allow-list of harmless options passes
(``RUN_PARAMS``, each with its check); options that have a ``JobSpec`` field
(environment, command, shm_size, mem_limit) are moved into that field
(``MOVED``), so the runtime has one place to read each of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from dopq.core.errors import JobRejected
from dopq.core.fields import (
    MAX_ENV,
    check_command,
    check_int,
    check_size,
    check_text,
    kind,
    show,
)

_ULIMITS = frozenset({"nofile", "memlock", "stack"})
_SIGNAL_RE = re.compile(r"(SIG)?[A-Z][A-Z0-9+-]{0,15}|\d{1,2}")
_DOCKER_ID = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}"
_DOCKER_USER_RE = re.compile(rf"{_DOCKER_ID}(?::{_DOCKER_ID})?")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,127}")


def _rp_working_dir(value: Any, what: str) -> str:
    path = check_text(value, what)
    if not path.startswith("/"):
        raise JobRejected(f"{what}: must be an absolute path inside the container")
    return path


def _rp_user(value: Any, what: str) -> str:
    user = check_text(value, what)
    if not _DOCKER_USER_RE.fullmatch(user):
        raise JobRejected(f"{what}: expected 'user', 'uid' or 'uid:gid', got {show(value)}")
    return user


def _rp_tty(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise JobRejected(f"{what}: expected true or false, got {kind(value)}")
    return value


def _rp_stop_signal(value: Any, what: str) -> str:
    text = check_text(value, what)
    if not _SIGNAL_RE.fullmatch(text):
        raise JobRejected(f"{what}: expected a signal like 'SIGINT', got {show(value)}")
    return text


def _rp_labels(value: Any, what: str) -> dict[str, str]:
    if isinstance(value, list):
        value = {check_text(k, what): "" for k in value}
    if not isinstance(value, Mapping):
        raise JobRejected(f"{what}: expected an object of strings, got {kind(value)}")
    if len(value) > MAX_ENV:
        raise JobRejected(f"{what}: at most {MAX_ENV} labels")
    labels: dict[str, str] = {}
    for key, val in value.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.fullmatch(key):
            raise JobRejected(f"{what}: {show(key)} is not a valid label name")
        if key.lower().startswith("dopq."):
            raise JobRejected(f"{what}: {key} is reserved (dopq.* labels are set by DoPQ)")
        labels[key] = check_text(val, f"{what}.{key}")
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
            raise JobRejected(f"{what}: {show(name)} is not allowed (only {allowed})")
        soft = check_int(item.get("soft", -1), f"{what}.{name}.soft", -1, 2**62)
        hard = check_int(item.get("hard", soft), f"{what}.{name}.hard", -1, 2**62)
        if hard != -1 and (soft == -1 or soft > hard):
            raise JobRejected(f"{what}.{name}: soft limit is above the hard limit")
        out.append({"name": name, "soft": soft, "hard": hard})
    return out


def _rp_entrypoint(value: Any, what: str) -> str | list[str]:
    return check_command(value, what)


def _rp_memswap(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == -1:
        return -1  # docker's "unlimited swap"; the runtime caps it
    return check_size(value, what)


# Kept in JobSpec.run_params (docker create keyword -> validator).
RUN_PARAMS: dict[str, Callable[[Any, str], Any]] = {
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
MOVED = {
    "environment": ("env", "env"),
    "command": ("command", "command"),
    "shm_size": ("shm_size", "shm_size"),
    "mem_limit": ("required_memory", "memory"),
}


def split_run_params(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split run_params into the allowed docker options and the moved fields."""
    if not isinstance(value, Mapping):
        raise JobRejected(f"run_params: expected a JSON object, got {kind(value)}")
    kept: dict[str, Any] = {}
    moved: dict[str, Any] = {}
    for key, val in value.items():
        if not isinstance(key, str) or (key not in RUN_PARAMS and key not in MOVED):
            raise JobRejected(f"run_params: {show(key)} is not allowed")
        if val is None:
            continue
        if key in MOVED:
            moved[key] = val
        else:
            kept[key] = RUN_PARAMS[key](val, f"run_params.{key}")
    return kept, moved

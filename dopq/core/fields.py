"""Checks of one job-config value each, for ``dopq.core.spec`` and ``dopq.core.runparams``.

Each takes the untrusted value and ``what`` (the key or flag it came from,
e.g. ``num_gpus`` or ``--gpus``) and returns the value in its one accepted
form, or raises ``JobRejected`` naming ``what``. Nothing else is raised for
bad input, however hostile (``show`` survives a ``__repr__`` that raises).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dopq.core.errors import JobRejected
from dopq.core.forms import parse_size
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


def check_user_name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise JobRejected(f"{what}: expected a string, got {kind(value)}")
    # isascii first: str.lower() maps some non-ASCII letters (KELVIN SIGN) to ASCII.
    user = value.strip()
    user = user.lower() if user.isascii() else user
    if not USER_RE.fullmatch(user):
        raise JobRejected(
            f"{what}: {show(value)} is not a valid user name (letters, digits, _ . -; "
            "at most 32)"
        )
    return user


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise JobRejected(f"{what}: expected a string, got {kind(value)}")
    # Control and format characters first, named: other users see the name.
    name = check_display_text(value, what).strip()
    if len(name) < 3:
        raise JobRejected(f"{what}: must have at least 3 characters")
    if len(name) > MAX_NAME_CHARS:
        raise JobRejected(f"{what}: must have at most {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise JobRejected(f"{what}: must not contain control characters")
    return name


def check_size(value: Any, what: str) -> int:
    try:
        size = parse_size(value, what)
    except (OverflowError, ValueError):  # "1e400"-sized numbers
        raise JobRejected(f"{what}: size is out of range") from None
    if size <= 0:
        raise JobRejected(f"{what}: must be positive")
    if size > MAX_SIZE:
        raise JobRejected(f"{what}: size is out of range")
    return size


def check_int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobRejected(f"{what}: expected an integer, got {kind(value)}")
    if not low <= value <= high:
        raise JobRejected(f"{what}: must be between {low} and {high}, got {value}")
    return value


def check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise JobRejected(f"{what}: expected a string, got {kind(value)}")
    if "\x00" in value:
        raise JobRejected(f"{what}: must not contain NUL characters")
    if len(value) > MAX_TEXT:
        raise JobRejected(f"{what}: longer than {MAX_TEXT} characters")
    return value


def check_command(value: Any, what: str) -> str | list[str]:
    if isinstance(value, str):
        if not value.strip():
            raise JobRejected(f"{what}: must not be empty")
        return check_text(value, what)
    if isinstance(value, list):
        if not value or len(value) > MAX_ARGS:
            raise JobRejected(f"{what}: expected 1 to {MAX_ARGS} arguments")
        return [check_text(arg, f"{what} argument") for arg in value]
    raise JobRejected(f"{what}: expected a string or a list of strings, got {kind(value)}")


def check_env(value: Any, what: str) -> dict[str, str]:
    """An environment as a dict, or as a list of ``KEY=VALUE`` strings."""
    if isinstance(value, list):
        pairs: list[tuple[Any, Any]] = []
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise JobRejected(f"{what}: expected KEY=VALUE strings, got {show(item)}")
            key, _, val = item.partition("=")
            pairs.append((key, val))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise JobRejected(f"{what}: expected an object of strings, got {kind(value)}")
    if len(pairs) > MAX_ENV:
        raise JobRejected(f"{what}: at most {MAX_ENV} variables")
    env: dict[str, str] = {}
    for key, val in pairs:
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key) or len(key) > 256:
            raise JobRejected(f"{what}: {show(key)} is not a valid variable name")
        if key.upper().startswith(RESERVED_ENV_PREFIXES):
            raise JobRejected(f"{what}: {key} is reserved (DOPQ_* and NVIDIA_* are set by DoPQ)")
        env[key] = check_text(val, f"{what}.{key}")
    return env


def check_job_ids(value: Any, what: str) -> list[int]:
    if isinstance(value, str):
        items: list[Any] = []
        for part in value.replace(" ", "").split(","):
            if not part.isdecimal() or len(part) > 18:
                raise JobRejected(f"{what}: expected job ids like '12,13', got {show(value)}")
            items.append(int(part))
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, list):
        items = value
    else:
        raise JobRejected(f"{what}: expected job ids, got {kind(value)}")
    if len(items) > MAX_ARRAY:
        raise JobRejected(f"{what}: at most {MAX_ARRAY} job ids")
    ids: list[int] = []
    for item in items:
        job_id = check_int(item, what, 1, 2**62)
        if job_id not in ids:
            ids.append(job_id)
    return ids


def reject_unknown(config: Mapping[Any, Any], known: Sequence[str], where: str) -> None:
    for key in config:
        if not isinstance(key, str) or key not in known:
            hint = ""
            if isinstance(key, str):
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise JobRejected(f"{where}: unknown key {show(key)}{hint}")


def kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return f"{names.get(type(value), type(value).__name__)} ({show(value, 40)})"


def show(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__; the message must still be made
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""The forms people write for sizes, durations and job arrays, parsed in one place.

Used for ``container_config.json``, the ``dopq submit`` options and the
settings file alike. Every parser scans its text once, left to right (no
regular expression that could backtrack on a long hostile string), and
refuses anything else with a one-line ``JobRejected`` that names the field
and shows the accepted forms.

- sizes: ``8g``, ``8G``, ``8GB``, ``8GiB``, ``512m``, ``512MB``, ``1.5g``,
  ``8 GB``, a number of bytes. As for Docker, every unit is binary:
  ``8GB`` is ``8GiB``.
- durations: ``2h``, ``90m``, ``1h30m``, ``45s``, ``1.5h``, ``2 hours``,
  ``1 hour 30 minutes``, ``30 min``, ``1 day``; Slurm's clock forms
  ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``
  (``01:30:00``, ``1-00:00:00``); a bare number is seconds.
- arrays: ``0-3``, ``1,3,5``, ``0-9:2`` and ``0-9%2`` (both a step: 0, 2, 4,
  6, 8), and lists of these (``0-3,10-20:5``). Slurm reads ``%N`` as "at most
  N at once"; DoPQ has no such throttle, fair share spaces the elements out.
"""

from __future__ import annotations

import math
from typing import Any

from dopq.core.errors import JobRejected

MAX_ARRAY = 10000
MAX_ARRAY_INDEX = 999_999
MAX_TEXT = 64  # a size or duration written by a person is short

SIZE_FORMS = "a size like 8g, 512m, 8GB or 8GiB"
DURATION_FORMS = "a duration like 2h, 90m, 1h30m, '2 hours', 01:30:00 or 1-00:00:00"
ARRAY_FORMS = "indices like 0-9, 1,3,5 or 0-9:2"

_SIZE_UNITS = {"": 1, "b": 1, "byte": 1, "bytes": 1}
for _i, _u in enumerate("kmgt", 1):
    for _form in (_u, _u + "b", _u + "ib"):
        _SIZE_UNITS[_form] = 1024**_i

_DURATION_UNITS: dict[str, int] = {}
for _secs, _names in (
    (1, ("s", "sec", "secs", "second", "seconds")),
    (60, ("m", "min", "mins", "minute", "minutes")),
    (3600, ("h", "hr", "hrs", "hour", "hours")),
    (86400, ("d", "day", "days")),
    (604800, ("w", "week", "weeks")),
):
    for _name in _names:
        _DURATION_UNITS[_name] = _secs

_DIGITS = frozenset("0123456789")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(text: str, i: int) -> tuple[str, int]:
    """The decimal number at ``text[i:]`` (digits, optionally ``.digits``) and its end."""
    start = i
    while i < len(text) and text[i] in _DIGITS:
        i += 1
    if i < len(text) and text[i] == "." and i > start:
        j = i + 1
        while j < len(text) and text[j] in _DIGITS:
            j += 1
        if j > i + 1:
            i = j
    return text[start:i], i


def _word(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i].isascii() and text[i].isalpha():
        i += 1
    return text[start:i], i


def _spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes in ``"20g"``, ``"512MB"``, ``"1.5G"``, ``"64MiB"`` or an int of bytes."""
    if isinstance(value, bool):
        raise JobRejected(f"{what}: expected {SIZE_FORMS}, got {_short(value)}")
    if isinstance(value, int):
        if value < 0:
            raise JobRejected(f"{what}: must not be negative")
        return value
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return int(value)
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        text = value.strip().lower()
        num, i = _number(text, 0)
        unit, end = _word(text, _spaces(text, i))
        if num and len(num) <= 25 and end == len(text) and unit in _SIZE_UNITS:
            return int(float(num) * _SIZE_UNITS[unit])
    raise JobRejected(f"{what}: expected {SIZE_FORMS}, got {_short(value)}")


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds in any of the forms in the module docstring (or a number of seconds)."""
    if isinstance(value, bool):
        raise JobRejected(f"{what}: expected {DURATION_FORMS}, got {_short(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value <= 0 or value > 1e9:
            raise JobRejected(f"{what}: must be a positive number of seconds")
        return float(value)
    total: float | None = None
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        text = value.strip().lower()
        if ":" in text or ("-" in text and text[:1] in _DIGITS):
            total = _clock(text)
        else:
            total = _with_units(text)
    if total is None:
        raise JobRejected(f"{what}: expected {DURATION_FORMS}, got {_short(value)}")
    if not 0 < total <= 1e9:
        raise JobRejected(f"{what}: must be a positive duration (at most about 30 years)")
    return total


def _with_units(text: str) -> float | None:
    """``2h``, ``1h30m``, ``1 hour 30 minutes``, ``1.5h``; a lone number is seconds."""
    num, i = _number(text, 0)
    if num and i == len(text):
        return float(num) if len(num) <= 25 else None
    total, i, parts = 0.0, 0, 0
    while i < len(text):
        num, i = _number(text, _spaces(text, i))
        unit, i = _word(text, _spaces(text, i))
        if not num or len(num) > 25 or unit not in _DURATION_UNITS:
            return None
        total += float(num) * _DURATION_UNITS[unit]
        parts += 1
        i = _spaces(text, i)
        if text.startswith(",", i):
            i = _spaces(text, i + 1)
        if text.startswith("and ", i):
            i = _spaces(text, i + 4)
    return total if parts else None


def _clock(text: str) -> float | None:
    """Slurm's ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    days_text, dash, rest = text.partition("-")
    if not dash:
        days_text, rest = "", text
    elif not (days_text.isdecimal() and days_text.isascii() and len(days_text) <= 6):
        return None
    fields = rest.split(":")
    if not all(f.isdecimal() and f.isascii() and 1 <= len(f) <= 9 for f in fields):
        return None
    nums = [int(f) for f in fields]
    if dash:  # days-hours[:minutes[:seconds]]
        if len(nums) > 3:
            return None
        nums += [0] * (3 - len(nums))
    elif len(nums) == 2:  # minutes:seconds
        nums = [0, *nums]
    elif len(nums) != 3:
        return None
    hours, minutes, seconds = nums
    if (len(fields) > 1 and seconds > 59) or ((len(fields) == 3 or dash) and minutes > 59):
        return None
    return float(int(days_text or 0) * 86400 + hours * 3600 + minutes * 60 + seconds)


def parse_array(text: Any, what: str = "array") -> list[int]:
    """Sorted, distinct indices of ``"0-9"``, ``"1,3,5"``, ``"0-9:2"``, ``"0-9%2"``.

    At most ``MAX_ARRAY`` indices, each at most ``MAX_ARRAY_INDEX``.
    """
    if not isinstance(text, str):
        raise JobRejected(f"{what}: expected {ARRAY_FORMS}, got {_short(text)}")
    body = text.replace(" ", "")
    if ".." in body:
        raise JobRejected(f"{what}: expected {ARRAY_FORMS}, got {_short(text)} "
                          f"(write {body.replace('..', '-')})")
    indices: set[int] = set()
    for part in body.split(","):
        first, last, step = _array_part(part)
        if first is None or len(part) > 24:
            raise JobRejected(f"{what}: expected {ARRAY_FORMS}, got {_short(text)}")
        if last < first or last > MAX_ARRAY_INDEX:
            raise JobRejected(f"{what}: bad range {_short(part)} (indices 0 to {MAX_ARRAY_INDEX},"
                              " the first not above the last)")
        if step < 1:
            raise JobRejected(f"{what}: bad step in {_short(part)} (a step is at least 1)")
        if len(indices) + (last - first) // step + 1 > MAX_ARRAY:
            raise JobRejected(f"{what}: more than {MAX_ARRAY} elements")
        indices.update(range(first, last + 1, step))
    return sorted(indices)


def _array_part(part: str) -> tuple[Any, int, int]:
    """(first, last, step) of ``A``, ``A-B``, ``A-B:S`` or ``A-B%S``; first None if bad."""
    rng, sep, step_text = part, "", "1"
    for mark in (":", "%"):
        if mark in part:
            if sep:
                return None, 0, 0  # both a ':' and a '%'
            rng, sep, step_text = part.partition(mark)
    first_text, dash, last_text = rng.partition("-")
    if not dash:
        last_text = first_text
        if sep:
            return None, 0, 0  # a step needs a range
    for t in (first_text, last_text, step_text):
        if not (t.isdecimal() and t.isascii() and len(t) <= 7):
            return None, 0, 0
    return int(first_text), int(last_text), int(step_text)

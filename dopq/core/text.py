"""Text that users give and other users see: checked at intake, escaped on show.

A job name (``--name``, ``container_config.json``, an inbox file name) is
printed in every user's ``dopq queue``/``history`` and the GUI. A control
character in it could drive another user's terminal (``ESC]0;...BEL`` sets
the window title, ``ESC[2J`` clears the screen) or, with a bidi override,
show text in an order other than it is stored. So such text is refused at
intake (``check_display_text``) and anything already stored is shown with
its control characters written out as escapes (``printable``).

Refused (and escaped): the Unicode categories Cc (C0, DEL, C1), Cf (format
characters: bidi overrides and isolates U+202A-U+202E, U+2066-U+2069, zero
widths, ...), Cs (lone surrogates), Zl and Zp (line and paragraph
separators).
"""

from __future__ import annotations

import unicodedata
from typing import Any

from dopq.core.errors import JobRejected

_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _is_bad(ch: str) -> bool:
    return unicodedata.category(ch) in _BAD_CATEGORIES


def escape_char(ch: str) -> str:
    """``\\x1b``, ``\\u202e``, ``\\U000e0001``: how a refused character is written out."""
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def bad_char(text: str) -> tuple[int, str] | None:
    """The first control or format character in ``text`` (position, char), or None."""
    if text.isprintable():  # fast path: no Cc, Cf, Cs, Zl, Zp (nor other separators)
        return None
    return next(((i, ch) for i, ch in enumerate(text) if _is_bad(ch)), None)


def check_display_text(text: str, what: str = "name") -> str:
    """``text`` unchanged, or ``JobRejected`` naming the first control character.

    For free text that other users see (job names). The message shows the
    character escaped, never raw, so the error itself is safe to print.
    """
    found = bad_char(text)
    if found is not None:
        pos, ch = found
        raise JobRejected(
            f"{what}: control character {escape_char(ch)} at position {pos + 1} is not allowed"
        )
    return text


def safe_name(text: str, fallback: str = "job") -> str:
    """A display name derived from untrusted text (an inbox file name): control
    characters become ``_``; empty or blank becomes ``fallback``."""
    cleaned = "".join("_" if _is_bad(ch) else ch for ch in text).strip()
    return cleaned or fallback


def printable(value: Any) -> str:
    """``str(value)`` with every control and format character written out as an
    escape (``\\x1b``), so that stored text cannot drive a terminal or reorder
    what a table shows."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(escape_char(ch) if _is_bad(ch) else ch for ch in text)


def printable_lines(text: str) -> str:
    """``printable`` for multi-line text (event lists, logs of others): newlines
    and tabs stay, every other control character is escaped."""
    return "\n".join(
        "\t".join(printable(part) for part in line.split("\t")) for line in text.split("\n")
    )

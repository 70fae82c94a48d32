"""Writing for a person at a terminal: JSON, tables, wrapped text, passwords.

Shared by the client's commands (``dopq.client.commands``) and the commands
that run on the server host (``dopq.server.host_commands``), which must not
import each other. Stored text (another user's job name) reaches the
terminal only through ``printable``: a control character in it is written
out as an escape, never sent.
"""

from __future__ import annotations

import getpass
import json
import shutil
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from typing import Any

from dopq.core.errors import DopqError
from dopq.core.jobs import format_duration
from dopq.core.text import printable

Columns = Sequence[tuple[str, str]]  # (field, heading)


def out_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


def table(rows: Sequence[dict[str, Any]], cols: Columns) -> None:
    """``rows`` as a table of ``cols``, or ``(none)``."""
    if not rows:
        print("(none)")
        return
    text = [[cell(r.get(key)) for key, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in text)) for i, (_, h) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(cols, widths, strict=True)).rstrip())
    for t in text:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())


def cell(v: Any) -> str:
    """A table cell: escaped, and shortened to 60 characters."""
    if v is None:
        return "-"
    if isinstance(v, list):
        return printable(",".join(str(x) for x in v)) or "-"
    if isinstance(v, float):
        return f"{v:g}"
    text = printable(v)
    if len(text) > 60:
        return text[:57] + "..."
    return text


def wrapped(title: str, text: str) -> str:
    """``title: text`` as ``dopq show`` prints it, the text wrapped to the terminal."""
    width = max(40, shutil.get_terminal_size((100, 24)).columns - 1)
    lines = textwrap.wrap(text, width - 15, break_long_words=True) or ["-"]
    return f"{title:>13}: " + ("\n" + " " * 15).join(lines)


def add_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the durations (``wait``, ``run``, ``time_limit_h``) and ``start`` as text."""
    from dopq.core.eta import start_text  # the policy behind it: only for listings

    now = time.time()
    for r in rows:
        r["wait"] = format_duration(r.get("wait_s"))
        r["run"] = format_duration(r.get("run_s"))
        r["time_limit_h"] = format_duration(r.get("time_limit"))
        if "expected_start" in r:
            r["start"] = start_text(r["expected_start"], now)
    return rows


def read_password(from_stdin: bool, confirm: bool = False, prompt: str = "Password: ") -> str:
    """The first line of standard input, or asked on the terminal (twice with ``confirm``)."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            pw = getpass.getpass(prompt)
            if confirm and getpass.getpass("Again: ") != pw:
                raise DopqError("passwords differ")
    except (getpass.GetPassWarning, EOFError):
        raise DopqError("no terminal to ask the password on: "
                        "pipe it in with --password-stdin") from None
    return pw


USER_COLUMNS: Columns = [("name", "USER"), ("role", "ROLE"), ("share", "WEIGHT")]


def warn_not_allowed(name: str, allowed: bool) -> None:
    """After ``dopq user add``: a user outside ``users.allowed`` cannot submit yet."""
    if not allowed:
        print(f"dopq: warning: {name.lower()} is not in users.allowed: they may sign in "
              "but not submit until an admin adds them there", file=sys.stderr)

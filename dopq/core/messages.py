"""What a notification says, and which targets hear it: pure, no sending.

``dopq.server.notify`` carries messages out with apprise; everything it
decides is here, so it is tested without a network: which job events a user
may subscribe to, what a job's or the server's message says, how a target
URL is shown to someone who may not see its secrets (``mask_url``), and how
a row of the store's event log maps to a job event (``event_kind``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from dopq.core.errors import DopqError
from dopq.core.exits import GPU_IDLE, PREEMPTED_PREFIX

JOB_EVENTS = ("started", "finished", "failed", "cancelled", "preempted", "idle")
DEFAULT_EVENTS = ("finished", "failed", "cancelled")  # a job's end, however it ended
SERVER_EVENTS = ("engine-down", "provider-restarted", "disk-low", "foreign-gpu")
MAX_TARGETS = 10  # per user
MAX_URL = 2000  # characters
# apprise's targets on the server host itself (its syslog, its desktop): never a user's.
HOST_SCHEMES = frozenset({"syslog", "dbus", "kde", "qt", "glib", "gnome", "windows", "macosx"})
# The state a job's end is stored as -> the event users subscribe to.
END_STATES = {"succeeded": "finished", "failed": "failed", "cancelled": "cancelled"}


def parse_events(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"finished,failed"`` -> the events, checked; empty or None: the default."""
    if text is None:
        return DEFAULT_EVENTS
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(str(i).strip().lower() for i in items if str(i).strip()))
    if not names:
        return DEFAULT_EVENTS
    bad = [n for n in names if n not in JOB_EVENTS]
    if bad:
        raise DopqError(f"unknown notification event {bad[0]!r}: expected some of "
                        + ",".join(JOB_EVENTS))
    return names


def check_url(url: str, allow_schemes: Sequence[str] = ()) -> str:
    """The URL stripped, or a one-line ``DopqError`` on its shape (apprise checks the rest)."""
    url = str(url).strip()
    if not url:
        raise DopqError("empty notification URL")
    if len(url) > MAX_URL:
        raise DopqError(f"notification URL too long ({len(url)} characters; at most {MAX_URL})")
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise DopqError("notification URL with control characters")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if not scheme:
        raise DopqError(f"not a notification URL: {mask_url(url)} (expected scheme://...,"
                        " e.g. mailto://, slack://, json://)")
    if scheme in HOST_SCHEMES:
        raise DopqError(f"notification scheme {scheme}:// would notify the server host itself:"
                        " use a service or address of yours")
    if allow_schemes and scheme not in {s.lower() for s in allow_schemes}:
        raise DopqError(f"notification scheme {scheme}:// is not allowed on this server"
                        f" (allowed: {', '.join(allow_schemes)})")
    return url


def mask_url(url: str) -> str:
    """The scheme and host only: ``json://user:secret@host:8080/hook?k=v`` -> ``json://host/…``.

    The path, query and credentials of a target hold its secrets (Slack and
    Discord tokens are path segments), so none of them is shown.
    """
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
    except ValueError:
        host = ""
    scheme = str(url).split("://", 1)[0] if "://" in str(url) else "?"
    if not scheme.isalnum():
        scheme = "?"
    return f"{scheme}://{host}/…" if host else f"{scheme}://…"


def event_kind(state: str, detail: str) -> str | None:
    """The job event a row of the store's event log stands for, or None.

    A start is the transition to running (its detail names the GPUs); an
    idle mark and a GPU memory warning are notes on a running job; a
    preempted job goes back to the queue with the preemption as its detail.
    """
    if state in END_STATES:
        return END_STATES[state]
    if state == "running":
        if detail.startswith("gpus "):
            return "started"
        return "idle" if detail.startswith(GPU_IDLE) else None
    if state == "queued" and detail.startswith(PREEMPTED_PREFIX):
        return "preempted"
    return None


def duration(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h05m``, ``1d03h``; ``-`` for none."""
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def job_message(row: Mapping[str, Any], kind: str, now: float, server: str,
                log_tail: Sequence[str] = ()) -> tuple[str, str]:
    """(title, body) for a job event: what, how it ended, its wait and run, its last lines."""
    name = row.get("name") or ""
    what = f"job {row.get('id')}" + (f" ({name})" if name else "") + f" of {row.get('user')}"
    title = f"[{server}] {what}: {kind}"
    lines = [f"{what} {kind} on {server}."]
    state = row.get("state")
    if kind in ("finished", "failed", "cancelled"):
        how = f"state: {state}"
        if row.get("exit_code") is not None:
            how += f", exit code {row.get('exit_code')}"
        lines.append(how)
        if row.get("error"):
            lines.append(f"reason: {row.get('error')}")
    elif kind == "preempted" and row.get("error"):
        lines.append(f"reason: {row.get('error')}")
    submitted, started = row.get("submitted_at"), row.get("started_at")
    finished = row.get("finished_at") or (now if started else None)
    if submitted is not None:
        waited = (started if started else now) - submitted
        lines.append(f"waited: {duration(waited)}" + ("" if started else " (never started)"))
    if started:
        lines.append(f"ran: {duration((finished or now) - started)}")
    gpus = row.get("gpus")
    if gpus:
        lines.append("gpus: " + ",".join(map(str, gpus)))
    if log_tail:
        lines += ["", f"last {len(log_tail)} log lines:", *log_tail]
    return title, "\n".join(lines)


def server_message(kind: str, text: str, server: str) -> tuple[str, str]:
    return f"[{server}] {kind}", f"{server}: {text}"


def tail_lines(data: bytes, count: int, width: int = 500) -> list[str]:
    """The last ``count`` lines of a log, decoded leniently, each cut at ``width``."""
    if count <= 0 or not data:
        return []
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return [ln[:width] for ln in lines[-count:]]

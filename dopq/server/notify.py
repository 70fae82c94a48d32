"""Notifications: users' targets (``dopq notify``) and the thread that sends to them.

The one seam to apprise: every message goes out through ``apprise_send``, one
``apprise.Apprise`` per send with the target's URL, so mail, Slack, Matrix,
Discord, Teams and plain JSON webhooks all work from one URL each. What a
message says and which events exist is decided in ``dopq.core.messages``.

``Notifier`` is a thread of its own with a bounded queue, so nothing the
queue thread or an API call does waits on a mail server. It learns of jobs'
events by reading the store's event log (every state change and note of a
job writes a row there, from this process or the Provider's), so the queue
thread carries no hook and a job's end is heard even when another process
recorded it. Server events come from the supervisor (``server_event``) and
from its own check of the free space under the state dir. A send that fails
is tried ``[notify] retries`` more times with a doubling wait, then logged;
nothing here raises into a caller.

The URLs hold secrets (tokens, passwords): they are shown whole only to
their owner and admins, and logs carry ``mask_url``'s scheme and host.
"""

from __future__ import annotations

import collections
import logging
import queue as queue_mod
import shutil
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dopq.core import messages as msg
from dopq.core.errors import DopqError, NotFound
from dopq.core.settings import Settings
from dopq.server import authz
from dopq.server.auth import Principal
from dopq.server.authz import Action
from dopq.server.eventlog import events_after
from dopq.server.provider import job_dir
from dopq.server.store import Store

log = logging.getLogger("dopq.server.notify")

QUEUE_SIZE = 1000  # messages waiting to be sent; past it new ones are dropped (and logged)
LOG_WAIT = 10.0  # seconds to wait for a finished job's run log (a worker saves it)
DISK_EVERY = 60.0  # seconds between checks of the free space
EVENT_BATCH = 1000

Send = Callable[[str, str, str], bool]  # (url, title, body) -> delivered


def apprise_send(url: str, title: str, body: str) -> bool:
    """Send one message to one apprise URL; False when apprise refuses or fails."""
    sender = _apprise().Apprise()
    if not sender.add(url):
        return False
    return bool(sender.notify(body=body, title=title))


def apprise_accepts(url: str) -> bool:
    return _apprise().Apprise.instantiate(url) is not None


def _apprise() -> Any:
    """apprise, loaded on first use (a server nobody notifies never loads it). Its
    plugins import modules Python deprecates (imghdr): not ours to warn about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import apprise
        import apprise.utils.pgp  # noqa: F401 - the mail plugin's, loaded with it: imghdr
    return apprise


# -- users' targets ------------------------------------------------------------------------
class Targets:
    """The ``notify_targets`` table and who may see or change which row."""

    def __init__(self, settings: Settings, store: Store,
                 accepts: Callable[[str], bool] = apprise_accepts) -> None:
        self.settings = settings
        self.store = store
        self.accepts = accepts

    def add(self, who: Principal, url: str, events: Iterable[str] | str | None = None,
            now: float | None = None) -> dict[str, Any]:
        authz.require(who, Action.NOTIFY)
        url = msg.check_url(url, self.settings.notify.allow_schemes)
        kinds = msg.parse_events(events)
        if not self.accepts(url):
            raise DopqError(f"apprise does not understand the notification URL "
                            f"{msg.mask_url(url)} (see https://github.com/caronc/apprise/wiki)")
        with self.store.transaction() as db:
            count = db.execute("SELECT COUNT(*) FROM notify_targets WHERE user = ?",
                               (who.name,)).fetchone()[0]
            if count >= msg.MAX_TARGETS:
                raise DopqError(f"you have {count} notification targets already (at most "
                                f"{msg.MAX_TARGETS}): remove one first (dopq notify remove N)")
            cur = db.execute(
                "INSERT INTO notify_targets (user, url, events, created_at) VALUES (?, ?, ?, ?)",
                (who.name, url, ",".join(kinds), time.time() if now is None else now))
            target_id = int(cur.lastrowid or 0)
        return {"id": target_id, "user": who.name, "url": url, "events": list(kinds)}

    def visible(self, who: Principal) -> list[dict[str, Any]]:
        """The caller's targets; an admin's: everyone's. Whole URLs: the caller may see them."""
        authz.require(who, Action.NOTIFY)
        sql, args = "SELECT * FROM notify_targets", tuple[str, ...]()
        if not who.is_admin:
            sql, args = sql + " WHERE user = ?", (who.name,)
        return [self._shown(dict(r), who) for r in self.store.read(sql + " ORDER BY id", args)]

    def remove(self, who: Principal, target_id: int) -> dict[str, Any]:
        target_id = int(target_id)
        rows = self.store.read("SELECT user FROM notify_targets WHERE id = ?", (target_id,))
        # Another user's target is "not found" to them: its existence is not theirs to learn.
        if not rows or not authz.may(who, Action.NOTIFY, rows[0]["user"], job=target_id):
            raise NotFound(f"no notification target {target_id} of yours (see dopq notify list)")
        with self.store.transaction() as db:
            db.execute("DELETE FROM notify_targets WHERE id = ?", (target_id,))
        return {"removed": target_id}

    @staticmethod
    def _shown(row: dict[str, Any], who: Principal) -> dict[str, Any]:
        if row["user"] != who.name and not who.is_admin:  # not reached today: belt and braces
            row["url"] = msg.mask_url(row["url"])
        row["events"] = [e for e in str(row["events"]).split(",") if e]
        return row

    def urls_for(self, user: str, kind: str) -> list[str]:
        rows = self.store.read("SELECT url, events FROM notify_targets WHERE user = ?", (user,))
        return [r["url"] for r in rows if kind in str(r["events"]).split(",")]

    def any(self) -> bool:
        return bool(self.store.read("SELECT 1 FROM notify_targets LIMIT 1"))


# -- the sending thread --------------------------------------------------------------------
class Notifier(threading.Thread):
    """Hears jobs' and the server's events and sends their messages, off every other thread."""

    def __init__(self, settings: Settings, store: Store, *, send: Send = apprise_send,
                 backoff: float = 1.0, poll: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="dopq-notify", daemon=True)
        self.settings = settings
        self.store = store
        self.targets = Targets(settings, store)
        self.send = send
        self.backoff = backoff
        self.poll = poll
        self.clock = clock
        self.halt = threading.Event()
        self._queue: queue_mod.Queue[tuple[str, Any, str]] = queue_mod.Queue(QUEUE_SIZE)
        self._mark = store.last_event_id()  # events before the start were told by the last run
        self._ended: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._last_disk = -float("inf")
        self._disk_low = False
        self.sent = 0  # delivered messages (tests, the log)
        self.failed = 0  # messages given up on

    # -- what callers hand in (never raises, never waits) -------------------------------
    def job_event(self, row: Mapping[str, Any], kind: str) -> None:
        self._put(("job", dict(row), kind))

    def server_event(self, kind: str, text: str) -> None:
        log.warning("server event %s: %s", kind, text)
        self._put(("server", text, kind))

    def _put(self, item: tuple[str, Any, str]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue_mod.Full:
            log.warning("notification queue full: %s %s dropped", item[0], item[2])

    def stop(self) -> None:
        self.halt.set()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the thread must live on (the store may be busy)
                log.warning("notifications failed\n%s", traceback.format_exc())
                self.halt.wait(self.poll)

    def step(self, wait: float | None = None) -> None:
        """Read new job events, check the disk, then send what is queued (waiting up to
        ``wait`` seconds, default ``poll``, for something to send)."""
        behind = self.read_events() == EVENT_BATCH  # more to read: no waiting
        self.check_disk(self.clock())
        try:
            item = self._queue.get(timeout=0 if behind else self.poll if wait is None else wait)
        except queue_mod.Empty:
            return
        what, payload, kind = item
        if what == "job":
            self._job(payload, kind)
        else:
            self._deliver(self.settings.notify.urls,
                          *msg.server_message(kind, payload, self.settings.server_name))

    def read_events(self) -> int:
        """Turn the store's new event rows into job events for users with targets;
        return how many rows were read."""
        if not self.targets.any():  # nobody listens: skip what happened meanwhile
            self._mark = self.store.last_event_id()
            return 0
        rows = events_after(self.store, self._mark, EVENT_BATCH)
        if not rows:
            return 0
        self._mark = int(rows[-1]["id"])
        for r in rows:
            if r["user"] is None:
                continue  # the job was deleted since
            kind = msg.event_kind(str(r["state"]), str(r["detail"] or ""))
            if kind is None or not self.targets.urls_for(r["user"], kind):
                continue
            if kind in msg.END_STATES.values():
                if r["job_id"] in self._ended:  # one end per job
                    continue
                self._ended[r["job_id"]] = None
                if len(self._ended) > 10_000:
                    self._ended.popitem(last=False)
            try:
                self.job_event(self.store.job(r["job_id"]), kind)
            except DopqError:
                continue
        return len(rows)

    def check_disk(self, now: float) -> None:
        """A server event when the free space under the state dir falls below ``disk_low``."""
        if now - self._last_disk < DISK_EVERY:
            return
        self._last_disk = now
        limit = self.settings.bytes_of("notify.disk_low")
        if limit <= 0:
            return
        free = shutil.disk_usage(self.settings.state_path).free
        low = free < limit
        if low and not self._disk_low:
            self.server_event("disk-low", f"{free / 1024**3:.1f} GiB free under "
                              f"{self.settings.state_path} (below {self.settings.notify.disk_low})")
        self._disk_low = low

    # -- sending -----------------------------------------------------------------------------
    def _job(self, row: dict[str, Any], kind: str) -> None:
        urls = self.targets.urls_for(row["user"], kind)
        if not urls:
            return
        tail: list[str] = []
        if kind in ("finished", "failed", "cancelled", "idle", "preempted"):
            tail = msg.tail_lines(self._log_bytes(row, kind), self.settings.notify.log_lines)
        title, body = msg.job_message(row, kind, self.clock(), self.settings.server_name, tail)
        self._deliver(urls, title, body)

    def _log_bytes(self, row: Mapping[str, Any], kind: str) -> bytes:
        """The end of the job's run log (its build log if it never ran). After an end,
        wait a little for the worker that saves the run log."""
        folder = job_dir(self.settings, int(row["id"]))
        run, build = folder / "run.log", folder / "build.log"
        deadline = time.monotonic() + (LOG_WAIT if row.get("started_at") and kind in
                                       ("finished", "failed", "cancelled") else 0)
        while not run.exists() and time.monotonic() < deadline and not self.halt.is_set():
            self.halt.wait(0.2)
        # A running job's log is the engine's, not a file: none then (its build log is
        # the last thing it wrote only if it never started).
        path = run if run.exists() else build if not row.get("started_at") else None
        if path is None:
            return b""
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, 2)
                fh.seek(max(0, size - 64 * 1024))
                return fh.read()
        except OSError:
            return b""

    def _deliver(self, urls: Iterable[str], title: str, body: str) -> None:
        for url in urls:
            if self._send_one(url, title, body):
                self.sent += 1
            else:
                self.failed += 1

    def _send_one(self, url: str, title: str, body: str) -> bool:
        tries = 1 + max(0, self.settings.notify.retries)
        for attempt in range(tries):
            try:
                if self.send(url, title, body):
                    return True
                why = "not delivered"
            except Exception as exc:  # noqa: BLE001 - a plugin's error must not end the thread
                why = f"{type(exc).__name__}: {exc}"
            log.info("notification to %s: %s (try %d of %d)", msg.mask_url(url), why,
                     attempt + 1, tries)
            if attempt + 1 < tries and self.halt.wait(self.backoff * 2 ** attempt):
                break
        log.warning("notification to %s given up: %s", msg.mask_url(url), title)
        return False

    def drained(self) -> bool:
        """Nothing waits to be sent (tests)."""
        return self._queue.empty()


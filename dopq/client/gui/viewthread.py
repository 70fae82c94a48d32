"""Everything that talks to the server, off the GUI thread.

``ViewThread`` polls ``snapshot()`` and emits one signal per view, then
``cycle_done``; it waits for the window to ``acknowledge()`` a cycle before it
fetches the next, so a slow GUI thread never piles up stale snapshots. It never
dies: every error becomes ``disconnected`` (or ``unauthenticated``) with a
one-line message, and it retries with a growing pause until the server answers.

``Runner`` runs commands (edit, cancel, login, submit, ...) as ``Task``\\ s on
its own thread pool and calls back on the GUI thread with the result or the
exception, as git-cola's ``RunTask`` does. The ``Client`` keeps one Pyro5
proxy per thread, so one client serves all these threads.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from PySide6.QtCore import QObject, QRunnable, QThread, QThreadPool, Signal, Slot

from dopq.client.gui.compat import emit
from dopq.client.remote import SnapshotFollower
from dopq.core.errors import DopqError, NotAuthenticated, ServerIdentityChanged, UnknownServer
from dopq.core.text import printable
from dopq.wire.views import Snapshot

VIEWS = ("running", "queued", "finished", "users", "system")
HISTORY_LIMIT = 1000
MAX_BACKOFF = 5.0


class ClientLike(Protocol):
    """What the GUI needs of ``dopq.client.remote.Client`` (tests pass a fake)."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def one_line(exc: BaseException) -> str:
    """A short message for the status bar or a message box."""
    text = str(exc) if isinstance(exc, DopqError) else f"{type(exc).__name__}: {exc}"
    text = printable((text.strip().splitlines() or [type(exc).__name__])[0])
    return text if len(text) <= 300 else text[:297] + "..."


class ViewThread(QThread):
    """Polls the server's snapshot and emits the five views."""

    view_running = Signal(object)  # list of running jobs
    view_queued = Signal(object)  # list of queued jobs, in queue order
    view_finished = Signal(object)  # list of finished jobs, newest first
    view_users = Signal(object)  # list of per-user statistics
    view_system = Signal(object)  # the status dict (server, queue, GPUs)
    view_whoami = Signal(object)  # {"user", "role"}
    view_timeline = Signal(object)  # {"bars": the snapshot's timeline, "now": its clock}
    cycle_done = Signal(int)  # after the views of one snapshot; the cycle number
    connected = Signal(str)  # the server answered (again); its name
    disconnected = Signal(str)  # a poll failed; the one-line reason
    unauthenticated = Signal(str)  # the server answered: not signed in
    untrusted = Signal(str, str)  # "unknown" (nothing pinned) or "changed"; the reason

    def __init__(self, client: ClientLike, interval: float = 1.0,
                 history_limit: int = HISTORY_LIMIT, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.client = client
        self.interval = max(0.01, float(interval))
        self.history_limit = history_limit
        self.setObjectName("dopq-viewthread")
        self._cond = threading.Condition()
        self._stopping = False
        self._poked = False
        self._pending = 0
        self._state = "unknown"  # up / down / auth
        self.max_backoff = MAX_BACKOFF
        self.last_error = ""
        self._follower: SnapshotFollower | None = None

    def view_signal(self, name: str) -> Any:
        return getattr(self, f"view_{name}")

    # -- control (any thread) --------------------------------------------------------------
    def stop(self, wait_ms: int = 5000) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.isRunning():
            self.wait(wait_ms)

    def poke(self) -> None:
        """Fetch now rather than at the end of the pause."""
        with self._cond:
            self._poked = True
            self._cond.notify_all()

    @Slot()
    def acknowledge(self) -> None:
        """The window has applied a cycle; the next one may be fetched."""
        with self._cond:
            self._pending = max(0, self._pending - 1)
            self._cond.notify_all()

    def _pause(self, seconds: float) -> None:
        """Sleep until the pause is over, a poke, or stop; then until acknowledged."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopping and not self._poked:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._poked = False
            # back-pressure: never queue a second snapshot the GUI has not taken yet
            limit = time.monotonic() + max(10.0, 10 * self.interval)
            while not self._stopping and self._pending > 0:
                left = limit - time.monotonic()
                if left <= 0:
                    self._pending = 0
                    break
                self._cond.wait(left)

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        failures = 0
        for cycle in itertools.count(1):
            if self._stopping:
                return
            delay = self.interval
            try:
                snap: Mapping[str, Any] = self.fetch()
                views = {name: snap[name] for name in VIEWS}
                whoami = snap.get("whoami") or {}
                timeline = {"bars": snap.get("timeline") or [], "now": snap.get("now")}
            except (UnknownServer, ServerIdentityChanged) as exc:
                failures += 1  # nothing was sent; ask the user (Pipeline), then try again
                self._state, self.last_error = "trust", one_line(exc)
                kind = "changed" if isinstance(exc, ServerIdentityChanged) else "unknown"
                emit(self.untrusted, kind, self.last_error)
                self._reconnect()
                delay = min(self.max_backoff, self.interval * 2 ** min(failures, 8))
            except NotAuthenticated as exc:
                failures += 1
                self._fail("auth", exc)
                delay = min(self.max_backoff, self.interval * 2)
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any error
                failures += 1
                self._fail("down", exc)
                self._reconnect()
                delay = min(self.max_backoff, self.interval * 2 ** min(failures, 8))
            else:
                failures = 0
                if self._state != "up":
                    self._state = "up"
                    self.last_error = ""
                    emit(self.connected, str((views["system"] or {}).get("name") or ""))
                with self._cond:
                    self._pending += 1
                emit(self.view_whoami, whoami)
                for name in VIEWS:
                    emit(self.view_signal(name), views[name])
                emit(self.view_timeline, timeline)
                emit(self.cycle_done, cycle)
            self._pause(delay)

    def fetch(self) -> Snapshot:
        """One snapshot: after the first, only the queued jobs that changed travel."""
        if self._follower is None or self._follower.client is not self.client:
            self._follower = SnapshotFollower(self.client, self.history_limit)
        return self._follower.update()

    def _reconnect(self) -> None:
        """Drop this thread's connection, so the next poll looks the server up again.

        A server that failed may come back elsewhere (a new port after a restart)
        while its old connection still answers, with errors: never stay on it.
        """
        close = getattr(self.client, "close", None)
        if callable(close):
            try:
                close()
            except Exception:  # noqa: BLE001
                pass

    def _fail(self, state: str, exc: BaseException) -> None:
        self._state = state
        self.last_error = one_line(exc)
        emit(self.unauthenticated if state == "auth" else self.disconnected,
             self.last_error)


# -- commands off the GUI thread -----------------------------------------------------------
class TaskSignals(QObject):
    finished = Signal(int, bool, object)  # task id, ok, result or exception
    progress = Signal(int, object, object)  # task id, done, total


class Cancelled(DopqError):
    """The user cancelled a running task."""


class Task(QRunnable):
    """One call to run on the pool; ``report`` may be passed as a progress callback."""

    def __init__(self, task_id: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.setAutoDelete(False)  # the Runner holds it until its result is delivered
        self.id = task_id
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.signals = TaskSignals()
        self.cancelled = threading.Event()

    def report(self, done: Any, total: Any) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled")
        emit(self.signals.progress, self.id, done, total)

    def run(self) -> None:
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - delivered to the GUI thread
            emit(self.signals.finished, self.id, False, exc)
        else:
            emit(self.signals.finished, self.id, True, result)


class Runner(QObject):
    """Starts tasks on a private pool; callbacks run on the GUI thread."""

    def __init__(self, parent: QObject | None = None, threads: int = 4) -> None:
        super().__init__(parent)
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(threads)
        self._ids = itertools.count(1)
        # finished tasks are kept a while: a worker may still be returning from run()
        self._done: deque[Task] = deque(maxlen=32)
        self._tasks: dict[int, tuple[Task, Callable[..., Any] | None,
                                     Callable[..., Any] | None, Callable[..., Any] | None]] = {}

    def start(self, fn: Callable[..., Any], *args: Any,
              on_done: Callable[[Any], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None,
              on_progress: Callable[[Any, Any], None] | None = None,
              progress_kwarg: str | None = None, **kwargs: Any) -> Task:
        """Run ``fn(*args, **kwargs)``; with ``progress_kwarg`` it gets ``task.report``."""
        task = Task(next(self._ids), fn, *args, **kwargs)
        if progress_kwarg:
            task.kwargs[progress_kwarg] = task.report
        task.signals.finished.connect(self._finished)
        task.signals.progress.connect(self._progress)
        self._tasks[task.id] = (task, on_done, on_error, on_progress)
        self.pool.start(task)
        return task

    def busy(self) -> int:
        return len(self._tasks)

    def wait(self, ms: int = 3000) -> bool:
        return bool(self.pool.waitForDone(ms))

    @Slot(int, bool, object)
    def _finished(self, task_id: int, ok: bool, payload: object) -> None:
        entry = self._tasks.pop(task_id, None)
        if entry is None:
            return
        task, on_done, on_error, _ = entry
        self._done.append(task)
        if ok:
            if on_done is not None:
                on_done(payload)
        elif on_error is not None:
            on_error(payload)  # type: ignore[arg-type]

    @Slot(int, object, object)
    def _progress(self, task_id: int, done: object, total: object) -> None:
        entry = self._tasks.get(task_id)
        if entry is not None and entry[3] is not None:
            entry[3](done, total)

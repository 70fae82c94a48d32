"""The job details dialog: a job's fields as people read them, its run and build logs.

Values are written for a reader, not as Python prints them: lists as
``0, 1``, booleans yes/no, times in local time, durations ``1h 05m``, sizes
``8 GiB``, nothing as ``—``. The job is followed live until it ends.
"""

from __future__ import annotations

import functools
import shlex
from typing import Any

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QCloseEvent, QTextCursor
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from dopq.client.gui.columns import fmt_time, wrap_tip
from dopq.client.gui.viewthread import ClientLike, Runner, one_line
from dopq.core.text import printable

FINAL = ("succeeded", "failed", "cancelled")
NONE = "—"
TIMES = ("submitted_at", "started_at", "finished_at", "expected_start",
         "expected_start_first", "expected_start_last", "idle_since")
DURATIONS = ("wait_s", "run_s", "time_limit")
SIZES = ("memory", "shm_size", "gpu_memory", "gpu_memory_used")
WRAP = 90  # characters per line of a long value (an error, a reason)


def human_duration(seconds: float | None) -> str:
    """``1h 05m``, ``2d 03h``, ``4m 10s``, ``12s``; None as ``—``."""
    if seconds is None:
        return NONE
    s = int(round(float(seconds)))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{sec}s"


def human_bytes(n: float | None) -> str:
    """``8 GiB``, ``1.5 GiB``, ``512 MiB``; None as ``—``."""
    if n is None:
        return NONE
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{size:.1f}".rstrip("0").rstrip(".") + f" {unit}"
        size /= 1024
    return NONE  # unreachable


def human(key: str, value: Any) -> str:
    """One job field as a person reads it (stored control characters escaped)."""
    if value is None or value == "" or value == [] or value == {}:
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in TIMES or key.endswith("_at"):
        return fmt_time(str(value))
    if key in DURATIONS:
        return human_duration(value)
    if key in SIZES:
        return human_bytes(value)
    if key == "command" and isinstance(value, list):
        return printable(shlex.join(str(v) for v in value))  # as it would be typed
    if isinstance(value, list | tuple):
        return printable(", ".join(human("", v) for v in value))
    if isinstance(value, dict):
        return printable(", ".join(f"{k}={human('', v)}" for k, v in value.items()))
    if isinstance(value, float):
        return f"{value:g}"
    return printable(value)


def job_fields(job: dict[str, Any]) -> dict[str, Any]:
    """The job with its resources from the spec (shown to its owner and admins)."""
    spec = job.get("spec") or {}
    util = job.get("gpu_utilisation")
    return {**job, "memory": spec.get("memory"), "cpus": spec.get("cpus"),
            "shm_size": spec.get("shm_size"), "command": spec.get("command"),
            "gpu_memory": job.get("gpu_memory") or None,  # 0: whole GPUs, shown as none
            "gpu_utilisation": None if util is None else f"{float(util):.0f}%"}


class JobDialog(QDialog):
    """A job's fields and its run and build logs; follows a live job until it ends."""

    FIELDS = (("id", "ID"), ("name", "Name"), ("user", "User"), ("state", "State"),
              ("exit_code", "Exit code"), ("error", "Error"), ("num_gpus", "GPUs"),
              ("gpu_memory", "GPU memory each"), ("gpus", "On GPUs"), ("node", "On node"),
              ("gpu_memory_used", "GPU memory used"), ("gpu_utilisation", "GPU use"),
              ("idle_since", "GPUs idle since"), ("memory", "Memory"), ("cpus", "CPUs"),
              ("shm_size", "Shared memory"), ("priority", "Priority"), ("nice", "Nice"),
              ("held", "Held"), ("preemptible", "Preemptible"), ("restarts", "Restarts"),
              ("preempted_by", "Preempted for job"), ("time_limit", "Time limit"),
              ("submitted_at", "Submitted"),
              ("started_at", "Started"), ("finished_at", "Finished"), ("wait_s", "Waited"),
              ("run_s", "Ran"), ("expected_start", "Expected start"),
              ("reason", "Waiting for"), ("expected_start_first", "First estimate"),
              ("expected_start_last", "Last estimate"), ("command", "Command"),
              ("image", "Image"), ("container", "Container"), ("outputs", "Outputs"),
              ("origin", "Origin"), ("after", "After"), ("after_any", "After any"),
              ("array_parent", "Array of"), ("array_index", "Array index"))
    LOGS = ("run", "build")

    def __init__(self, client: ClientLike, runner: Runner, job_id: int,
                 interval: float = 1.0, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("jobDialog")
        self.client, self.runner, self.job_id = client, runner, job_id
        self.setWindowTitle(f"Job {job_id}")
        self.resize(840, 720)
        self._closed = False
        self._state = ""
        self._busy: set[str] = set()
        self._offset = dict.fromkeys(self.LOGS, 0)
        self._done = dict.fromkeys(self.LOGS, False)

        self.values: dict[str, QLabel] = {}
        form_host = QWidget()
        form_host.setObjectName("detailsForm")
        form = QFormLayout(form_host)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop)
        form.setHorizontalSpacing(14)
        for key, title in self.FIELDS:
            name = QLabel(title)
            name.setObjectName("detailsKey")
            label = QLabel(NONE)
            label.setObjectName("detailsValue")
            label.setTextFormat(Qt.TextFormat.PlainText)  # a job name is no HTML
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            # wrapped here (``WRAP``), not by Qt: a word-wrapped label in a form gets a
            # height guessed for a narrow width, and leaves a gap under a long error
            label.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
            form.addRow(name, label)
            self.values[key] = label
        self.events = QPlainTextEdit(readOnly=True)
        self.events.setObjectName("logView")
        self.events.setMinimumHeight(120)
        events_title = QLabel("Events")
        events_title.setObjectName("detailsKey")
        form.addRow(events_title, self.events)
        scroll = QScrollArea()
        scroll.setObjectName("detailsArea")
        scroll.viewport().setObjectName("detailsViewport")  # styled, not the default palette
        scroll.setWidgetResizable(True)
        scroll.setWidget(form_host)
        self.details = scroll

        self.tabs = QTabWidget(self)
        self.tabs.addTab(scroll, "Details")
        self.logs: dict[str, QPlainTextEdit] = {}
        self.log_buttons: dict[str, QPushButton] = {}
        for kind in self.LOGS:
            view = QPlainTextEdit(readOnly=True)
            view.setObjectName("logView")
            view.setMaximumBlockCount(200_000)
            view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
            self.logs[kind] = view
            self.tabs.addTab(view, f"{kind.capitalize()} log")
            button = QPushButton(f"{kind.capitalize()} log", self)
            button.setObjectName(f"{kind}LogButton")
            button.setToolTip(f"show the {kind} log")
            button.clicked.connect(lambda _=False, k=kind: self.show_log(k))
            self.log_buttons[kind] = button
        self.status = QLabel(self)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.close)
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs, 1)
        row = QHBoxLayout()
        row.addWidget(self.status, 1)
        for button in self.log_buttons.values():
            row.addWidget(button)
        row.addWidget(buttons)
        lay.addLayout(row)

        self.timer = QTimer(self)
        self.timer.setInterval(max(200, int(interval * 1000)))
        self.timer.timeout.connect(self.tick)
        self.timer.start()
        self.tick()

    def show_log(self, kind: str) -> None:
        """Bring the run or build log tab to the front."""
        self.tabs.setCurrentWidget(self.logs[kind])

    def show_details(self) -> None:
        self.tabs.setCurrentWidget(self.details)

    def tick(self) -> None:
        """Fetch the job (while it is not final) and whatever log is not complete."""
        if self._closed:
            return
        if "job" not in self._busy and self._state not in FINAL:
            self._busy.add("job")
            self.runner.start(self.client.call, "job", self.job_id,
                              on_done=self._got_job, on_error=lambda e: self._failed("job", e))
        for kind in self.LOGS:
            if kind not in self._busy and not self._done[kind]:
                self._busy.add(kind)
                self.runner.start(self.client.call, "logs", self.job_id, kind, self._offset[kind],
                                  on_done=functools.partial(self._got_log, kind),
                                  on_error=functools.partial(self._failed, kind))
        if self._state in FINAL and all(self._done.values()) and not self._busy:
            self.timer.stop()
            self.status.setText(f"{self._state}: logs complete")

    def _got_job(self, job: dict[str, Any]) -> None:
        self._busy.discard("job")
        if self._closed:
            return
        self._state = str(job.get("state") or "")
        self.setWindowTitle(printable(f"Job {self.job_id}: {job.get('name', '')} ({self._state})"))
        fields = job_fields(job)
        for key, label in self.values.items():
            label.setText(wrap_tip(human(key, fields.get(key)), WRAP))  # in full, wrapped
        self.events.setPlainText("\n".join(
            printable(f"{fmt_time(e.get('at'))}  {e.get('state', '')}  {e.get('detail') or ''}")
            for e in job.get("events") or ()))

    def _got_log(self, kind: str, result: dict[str, Any]) -> None:
        self._busy.discard(kind)
        if self._closed:
            return
        data = str(result.get("data") or "")
        if data:
            view = self.logs[kind]
            bar = view.verticalScrollBar()
            at_end = bar.value() >= bar.maximum() - 2
            cursor = view.textCursor()
            cursor.movePosition(QTextCursor.MoveOperation.End)
            cursor.insertText(data)
            if at_end:
                bar.setValue(bar.maximum())
        self._offset[kind] = int(result.get("offset", self._offset[kind]))
        self._done[kind] = bool(result.get("done"))
        if data and not self._done[kind]:
            QTimer.singleShot(0, self.tick)  # more is waiting: fetch it now

    def _failed(self, what: str, exc: BaseException) -> None:
        self._busy.discard(what)
        if self._closed:
            return
        self.status.setText(f"{what}: {one_line(exc)}")
        if what in self._done:
            self._done[what] = True  # e.g. forbidden: do not ask again every second
        elif what == "job":
            self._state = "failed" if not self._state else self._state

    def closeEvent(self, event: QCloseEvent) -> None:
        self._closed = True
        self.timer.stop()
        super().closeEvent(event)

    def done(self, result: int) -> None:
        self._closed = True
        self.timer.stop()
        super().done(result)

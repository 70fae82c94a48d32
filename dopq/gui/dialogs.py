"""Dialogs: job details with live logs, queue editing, sign-in, submission, and
the small message-box helpers every command goes through (tests patch these)."""

from __future__ import annotations

import functools
import getpass
import json
from collections.abc import Hashable, Sequence
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from dopq.gui.columns import fmt_bytes, fmt_time
from dopq.gui.compat import emit
from dopq.gui.models import QueuedModel
from dopq.gui.viewthread import ClientLike, Runner, one_line
from dopq.gui.widgets import TablePanel
from dopq.jobs import format_duration
from dopq.text import printable

FINAL = ("succeeded", "failed", "cancelled")
ALL_USERS = "(all users)"


# -- message boxes -------------------------------------------------------------------------
def confirm(parent: QWidget | None, title: str, text: str) -> bool:
    answer = QMessageBox.question(parent, title, text,
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


def choose(parent: QWidget | None, title: str, text: str, options: Sequence[str]) -> int | None:
    """Ask with one button per option (and Cancel); the index chosen, or None."""
    box = QMessageBox(QMessageBox.Icon.Question, title, text, QMessageBox.StandardButton.Cancel,
                      parent)
    buttons = [box.addButton(o, QMessageBox.ButtonRole.AcceptRole) for o in options]
    box.exec()
    clicked = box.clickedButton()
    return next((i for i, b in enumerate(buttons) if b is clicked), None)


def show_error(parent: QWidget | None, title: str, error: BaseException | str) -> None:
    text = error if isinstance(error, str) else one_line(error)
    QMessageBox.warning(parent, title, text)


def pick_user(parent: QWidget | None, title: str, users: Sequence[str]) -> str | None:
    """One user or all (``""``); None when cancelled."""
    items = [ALL_USERS, *users]
    item, ok = QInputDialog.getItem(parent, title, "User:", items, 0, False)
    if not ok:
        return None
    return "" if item == ALL_USERS else str(item)


# -- job details ---------------------------------------------------------------------------
class JobDialog(QDialog):
    """A job's fields and its run and build logs; follows a live job until it ends."""

    FIELDS = (("id", "ID"), ("name", "Name"), ("user", "User"), ("state", "State"),
              ("exit_code", "Exit code"), ("error", "Error"), ("num_gpus", "GPUs wanted"),
              ("gpus", "GPUs held"), ("priority", "Priority"), ("nice", "Nice"),
              ("held", "Held"), ("time_limit", "Time limit"), ("submitted_at", "Submitted"),
              ("started_at", "Started"), ("finished_at", "Finished"), ("wait_s", "Waited"),
              ("run_s", "Ran"), ("image", "Image"), ("container", "Container"),
              ("origin", "Origin"), ("after", "After"), ("array_parent", "Array of"),
              ("expected_start", "Expected start"), ("reason", "Waiting for"),
              ("expected_start_first", "First estimate"),
              ("expected_start_last", "Last estimate"))
    LOGS = ("run", "build")

    def __init__(self, client: ClientLike, runner: Runner, job_id: int,
                 interval: float = 1.0, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.client, self.runner, self.job_id = client, runner, job_id
        self.setWindowTitle(f"Job {job_id}")
        self.resize(820, 600)
        self._closed = False
        self._state = ""
        self._busy: set[str] = set()
        self._offset = dict.fromkeys(self.LOGS, 0)
        self._done = dict.fromkeys(self.LOGS, False)

        self.values: dict[str, QLabel] = {}
        form_host = QWidget()
        form = QFormLayout(form_host)
        for key, title in self.FIELDS:
            label = QLabel("-")
            label.setTextFormat(Qt.TextFormat.PlainText)  # a job name is no HTML
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            label.setWordWrap(True)
            form.addRow(title, label)
            self.values[key] = label
        self.events = QPlainTextEdit(readOnly=True)
        self.events.setObjectName("logView")
        form.addRow("Events", self.events)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(form_host)

        self.tabs = QTabWidget(self)
        self.tabs.addTab(scroll, "Details")
        self.logs: dict[str, QPlainTextEdit] = {}
        for kind in self.LOGS:
            view = QPlainTextEdit(readOnly=True)
            view.setObjectName("logView")
            view.setMaximumBlockCount(200_000)
            view.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
            self.logs[kind] = view
            self.tabs.addTab(view, f"{kind.capitalize()} log")
        self.status = QLabel(self)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.close)
        lay = QVBoxLayout(self)
        lay.addWidget(self.tabs, 1)
        row = QHBoxLayout()
        row.addWidget(self.status, 1)
        row.addWidget(buttons)
        lay.addLayout(row)

        self.timer = QTimer(self)
        self.timer.setInterval(max(200, int(interval * 1000)))
        self.timer.timeout.connect(self.tick)
        self.timer.start()
        self.tick()

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
        for key, label in self.values.items():
            label.setText(self._text(key, job.get(key)))
        self.events.setPlainText("\n".join(
            printable(f"{fmt_time(e.get('at'))}  {e.get('state', '')}  {e.get('detail') or ''}")
            for e in job.get("events") or ()))

    @staticmethod
    def _text(key: str, value: Any) -> str:
        if value is None or value == []:
            return "-"
        if key.endswith("_at") or key.startswith("expected_start"):
            return fmt_time(value)
        if key in ("wait_s", "run_s", "time_limit"):
            return format_duration(value)
        if isinstance(value, list | dict):
            return json.dumps(value)
        return printable(value)

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


# -- editing the queue ---------------------------------------------------------------------
class EditQueuedDialog(QDialog):
    """Update enqueued containers: select queued jobs, then one batch action."""

    requested = Signal(list, str, object)  # ids, action, value

    def __init__(self, model: QueuedModel, selected: Sequence[Hashable] = (),
                 admin: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Update enqueued containers")
        self.resize(900, 520)
        self.panel = TablePanel(model, "editQueued", self)
        self.panel.view.setSortingEnabled(False)  # the model's order is the main window's
        self.panel.view.selectionModel().selectionChanged.connect(self._selection_changed)
        hint = QLabel("Select jobs (Ctrl/Shift for several), then choose what to do with them.")
        self.buttons: dict[str, QPushButton] = {}
        row = QHBoxLayout()
        for action, title in (("delete", "Delete…"), ("priority", "Set priority…"),
                              ("hold", "Hold"), ("release", "Release"), ("top", "Move to top")):
            b = QPushButton(title, self)
            b.setObjectName(f"{action}Button")
            b.clicked.connect(lambda _=False, a=action: self.request(a))
            row.addWidget(b)
            self.buttons[action] = b
        row.addStretch(1)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        row.addWidget(close)
        lay = QVBoxLayout(self)
        lay.addWidget(hint)
        lay.addWidget(self.panel, 1)
        lay.addLayout(row)
        self.set_admin(admin)
        self.panel.select_keys(selected)
        self._selection_changed()

    def set_admin(self, admin: bool) -> None:
        self._admin = admin
        for action in ("hold", "release", "top"):
            self.buttons[action].setToolTip("" if admin else "admins only")
        self._selection_changed()

    def _selection_changed(self, *_: Any) -> None:
        any_selected = bool(self.panel.view.selectionModel().selectedRows())
        for action, b in self.buttons.items():
            b.setEnabled(any_selected and (self._admin or action in ("delete", "priority")))

    def request(self, action: str) -> None:
        ids = [int(k) for k in self.panel.selected_keys()]  # type: ignore[call-overload]
        if not ids:
            return
        value: Any = None
        if action == "delete":
            if not confirm(self, "Delete jobs", f"Delete {len(ids)} queued job(s): "
                           f"{', '.join(map(str, ids[:20]))}{' …' if len(ids) > 20 else ''}?"):
                return
        elif action == "priority":
            current = (self.panel.model.get(ids[0]) or {}).get("priority") or 0
            value, ok = QInputDialog.getInt(self, "Set priority",
                                            f"Priority for {len(ids)} job(s):", int(current),
                                            -1000, 1000)
            if not ok:
                return
        emit(self.requested, ids, action, value)


# -- sign-in and submission ----------------------------------------------------------------
class LoginDialog(QDialog):
    def __init__(self, server: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Sign in to {server}" if server else "Sign in")
        self.user = QLineEdit(getpass.getuser(), self)
        self.password = QLineEdit(self)
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.remember = QCheckBox("Remember me on this computer", self)
        self.remember.setChecked(True)
        form = QFormLayout(self)
        form.addRow("User", self.user)
        form.addRow("Password", self.password)
        form.addRow("", self.remember)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.password.setFocus()

    def values(self) -> tuple[str, str, bool]:
        return self.user.text().strip(), self.password.text(), self.remember.isChecked()


class SubmitDialog(QDialog):
    """Pick a folder or a zip and the options that override its container_config.json."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Submit job")
        self.path = QLineEdit(self)
        self.path.setPlaceholderText("folder with a Dockerfile, or a .zip")
        folder = QPushButton("Folder…", self)
        folder.clicked.connect(self._pick_folder)
        archive = QPushButton("Zip…", self)
        archive.clicked.connect(self._pick_zip)
        pick = QHBoxLayout()
        pick.addWidget(self.path, 1)
        pick.addWidget(folder)
        pick.addWidget(archive)
        self.name = QLineEdit(self)
        self.name.setPlaceholderText("from container_config.json")
        self.gpus = QSpinBox(self)
        self.gpus.setRange(-1, 64)
        self.gpus.setValue(-1)
        self.gpus.setSpecialValueText("from container_config.json")
        self.memory = QLineEdit(self)
        self.memory.setPlaceholderText("e.g. 20g")
        self.time_limit = QLineEdit(self)
        self.time_limit.setPlaceholderText("e.g. 12h, 2d")
        form = QFormLayout(self)
        form.addRow("Job", pick)
        form.addRow("Name", self.name)
        form.addRow("GPUs", self.gpus)
        form.addRow("Memory", self.memory)
        form.addRow("Time limit", self.time_limit)
        self.box = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        self.box.button(QDialogButtonBox.StandardButton.Ok).setText("Submit")
        self.box.accepted.connect(self.accept)
        self.box.rejected.connect(self.reject)
        form.addRow(self.box)
        self.path.textChanged.connect(self._check)
        self._check()

    def _pick_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Job folder")
        if path:
            self.path.setText(path)

    def _pick_zip(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Job archive", "", "Zip archives (*.zip)")
        if path:
            self.path.setText(path)

    def _check(self) -> None:
        self.box.button(QDialogButtonBox.StandardButton.Ok).setEnabled(
            bool(self.path.text().strip()))

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.name.text().strip():
            opts["name"] = self.name.text().strip()
        if self.gpus.value() >= 0:
            opts["gpus"] = self.gpus.value()
        if self.memory.text().strip():
            opts["memory"] = self.memory.text().strip()
        if self.time_limit.text().strip():
            opts["time_limit"] = self.time_limit.text().strip()
        return opts


def describe_upload(done: int, total: int) -> str:
    return f"Uploading {fmt_bytes(done)} of {fmt_bytes(total)}"

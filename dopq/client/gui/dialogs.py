"""Dialogs: job details with live logs, queue editing, sign-in, submission, and
the small message-box helpers every command goes through (tests patch these)."""

from __future__ import annotations

import getpass
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from dopq.client.gui.columns import fmt_bytes
from dopq.client.gui.compat import emit
from dopq.client.gui.details import JobDialog as JobDialog  # where the window and tests find it
from dopq.client.gui.models import QueuedModel
from dopq.client.gui.viewthread import one_line
from dopq.client.gui.widgets import TablePanel
from dopq.core.text import printable

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
        self.may_act: Callable[[list[Mapping[str, Any]]], bool] = lambda _rows: True
        self.set_admin(admin)
        self.panel.select_keys(selected)
        self._selection_changed()

    def set_admin(self, admin: bool) -> None:
        self._admin = admin
        self.buttons["top"].setToolTip("" if admin else "admins only")
        self._selection_changed()

    def _selection_changed(self, *_: Any) -> None:
        rows = [r for k in self.panel.selected_keys() if (r := self.panel.model.get(k))]
        any_selected = bool(rows) and self.may_act(rows)  # others' jobs: admins only
        for action, b in self.buttons.items():
            b.setEnabled(any_selected and (self._admin or action != "top"))

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
def default_login_name() -> str:
    """The Unix name to offer, but never ``root``: a lab member running the GUI
    under sudo should not sign in as the admin by accident."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        return ""
    return "" if name == "root" else name


class LoginDialog(QDialog):
    def __init__(self, server: str = "", parent: QWidget | None = None,
                 reason: str = "", user: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(f"Sign in to {server}" if server else "Sign in")
        why = QLabel(printable(reason) if reason else
                     f"Sign in to {printable(server) or 'the DoPQ server'} with your DoPQ "
                     "account to see and submit jobs.", self)
        why.setObjectName("loginReason")
        why.setWordWrap(True)
        self.user = QLineEdit(default_login_name() if user is None else user, self)
        self.user.setPlaceholderText("your DoPQ user name")
        self.password = QLineEdit(self)
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.remember = QCheckBox("Remember me on this computer", self)
        self.remember.setChecked(True)
        form = QFormLayout(self)
        form.addRow(why)
        form.addRow("User", self.user)
        form.addRow("Password", self.password)
        form.addRow("", self.remember)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        (self.password if self.user.text() else self.user).setFocus()

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
        self.gpu_memory = QLineEdit(self)
        self.gpu_memory.setPlaceholderText("whole GPUs; e.g. 10g to share them")
        self.gpu_memory.setToolTip("GPU memory on each GPU (container_config.json: gpu_memory):"
                                   " the job shares its GPUs with other such jobs")
        self.memory = QLineEdit(self)
        self.memory.setPlaceholderText("e.g. 20g")
        self.time_limit = QLineEdit(self)
        self.time_limit.setPlaceholderText("e.g. 12h, 2d")
        self.preemptible = QComboBox(self)
        self.preemptible.addItems(["from container_config.json", "yes", "no"])
        self.preemptible.setToolTip(
            "yes: the job may be stopped (its stop signal, then a grace to save a checkpoint"
            " in /outdir) for a user under their fair share, and run again later with"
            " DOPQ_RESTART_COUNT set (container_config.json: preemptible)")
        form = QFormLayout(self)
        form.addRow("Job", pick)
        form.addRow("Name", self.name)
        form.addRow("GPUs", self.gpus)
        form.addRow("GPU memory", self.gpu_memory)
        form.addRow("Memory", self.memory)
        form.addRow("Time limit", self.time_limit)
        form.addRow("Preemptible", self.preemptible)
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
        if self.gpu_memory.text().strip():
            opts["gpu_memory"] = self.gpu_memory.text().strip()
        if self.memory.text().strip():
            opts["memory"] = self.memory.text().strip()
        if self.time_limit.text().strip():
            opts["time_limit"] = self.time_limit.text().strip()
        if self.preemptible.currentIndex() > 0:
            opts["preemptible"] = self.preemptible.currentIndex() == 1
        return opts


def describe_upload(done: int, total: int) -> str:
    return f"Uploading {fmt_bytes(done)} of {fmt_bytes(total)}"

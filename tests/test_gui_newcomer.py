"""What a newcomer meets first in the GUI: readable details, visible logs, commands
enabled only where they may act, one meaning per column, errors in full.

Against the fake client of ``test_gui`` (offscreen, no server).
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import datetime as dt  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from PySide6.QtCore import QPoint, Qt  # noqa: E402
from PySide6.QtGui import QColor  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402
from test_gui import FakeClient, cell, job, open_window, snapshot  # noqa: E402

from dopq.client.gui.details import human, human_bytes, human_duration  # noqa: E402
from dopq.client.gui.pipeline import Pipeline  # noqa: E402

LONG_ERROR = ("rejected: container_config.json: run_params.privileged is not allowed "
              "(only working_dir, entrypoint, user, tty, stop_signal, labels, ulimits, "
              "environment, command, shm_size, mem_limit); nothing was built")


def detailed_job(job_id: int) -> dict[str, Any]:
    return {**job(job_id, "failed", exit_code=1, error=LONG_ERROR, gpus=[0, 1], num_gpus=2,
                  held=False, started_at="2024-05-01T10:00:05.000Z",
                  finished_at="2024-05-01T11:05:10.000Z", wait_s=5.0, run_s=3905.0,
                  after=[3, 4], outputs="/var/lib/dopq/outputs/alice/1"),
            "spec": {"memory": 8 * 2**30, "cpus": 4.0, "shm_size": None,
                     "command": ["python", "train.py"]},
            "events": [{"at": "2024-05-01T10:00:00.000Z", "state": "queued", "detail": ""}]}


class DetailClient(FakeClient):
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "job":
            with self.lock:
                self.calls.append((method, *args))
            return detailed_job(args[0])
        return super().call(method, *args, **kwargs)


@pytest.fixture
def client() -> DetailClient:
    return DetailClient(snapshot(role="user"))


@pytest.fixture
def window(qtbot: Any, client: DetailClient, tmp_path: Path) -> Pipeline:
    return open_window(qtbot, client, tmp_path)


# -- values as people read them ------------------------------------------------------------
def test_values_are_written_for_people() -> None:
    assert human("gpus", [0, 1]) == "0, 1"
    assert human("held", False) == "no" and human("held", True) == "yes"
    assert human("exit_code", None) == "—" and human("after", []) == "—"
    assert human_duration(3905) == "1h 05m" and human_duration(70) == "1m 10s"
    assert human_duration(2 * 86400 + 3 * 3600) == "2d 03h"
    assert human_bytes(8 * 2**30) == "8 GiB" and human_bytes(1536 * 2**20) == "1.5 GiB"
    local = dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M")
    assert human("submitted_at", "2024-05-01T10:00:00.000Z").startswith(local)
    assert human("name", "evil\x1b[2Jname") == "evil\\x1b[2Jname"


def test_details_are_formatted_and_the_error_is_whole(window: Pipeline, qtbot: Any) -> None:
    window.panels["finished"].select_keys([2])
    dlg = window.open_selected()
    assert dlg is not None
    v = dlg.values
    qtbot.waitUntil(lambda: v["name"].text() == "job-2", timeout=3000)
    assert v["gpus"].text() == "0, 1" and v["num_gpus"].text() == "2"
    assert v["held"].text() == "no" and v["after"].text() == "3, 4"
    assert v["run_s"].text() == "1h 05m" and v["memory"].text() == "8 GiB"
    assert v["shm_size"].text() == "—" and v["command"].text() == "python train.py"
    assert v["outputs"].text() == "/var/lib/dopq/outputs/alice/1"
    shown = v["error"].text()
    assert shown.replace("\n", " ") == LONG_ERROR and max(map(len, shown.splitlines())) <= 90
    assert not any(t.text().startswith(("[", "{")) or t.text() in ("False", "True", "None")
                   for t in v.values())
    dlg.close()


def _luminance(c: QColor) -> float:
    return 0.2126 * c.redF() + 0.7152 * c.greenF() + 0.0722 * c.blueF()


@pytest.mark.parametrize("theme", ["dark", "light"])
def test_details_are_readable_in_both_themes(window: Pipeline, qtbot: Any, theme: str,
                                             tmp_path: Path) -> None:
    window.set_style(theme)
    dlg = window.open_job(2)
    qtbot.waitUntil(lambda: dlg.values["name"].text() == "job-2", timeout=3000)
    QApplication.processEvents()
    image = dlg.grab().toImage()
    label = dlg.values["error"]
    viewport = dlg.details.viewport()
    corner = viewport.rect().topRight() + QPoint(-4, 4)  # beside the values, never on them
    background = image.pixelColor(viewport.mapTo(dlg, corner) * dlg.devicePixelRatioF())
    text = label.palette().color(label.foregroundRole())
    contrast = abs(_luminance(background) - _luminance(text))
    assert contrast > 0.5, (theme, background.name(), text.name())
    assert (theme == "dark") == (_luminance(background) < 0.3)
    dlg.grab().save(str(tmp_path / f"details-{theme}.png"))
    dlg.close()


# -- logs from a button or a context menu ---------------------------------------------------
def test_logs_open_from_a_button_and_the_context_menu(window: Pipeline, client: DetailClient,
                                                       qtbot: Any) -> None:
    client.logs = {("run", 0): {"data": "epoch 1\n", "offset": 8, "done": True},
                   ("build", 0): {"data": "Step 1/3\n", "offset": 9, "done": True}}
    for name in ("running", "queued", "finished"):
        titles = [a.text() for a in window.panels[name].view.actions()]
        assert {"&Details and logs…", "Run &log…", "&Build log…"} <= set(titles), name
    assert not window.act["run_log"].isEnabled()  # nothing selected yet
    window.panels["running"].select_keys([1])
    assert window.act["run_log"].isEnabled() and window.act["details"].isEnabled()
    window.act["run_log"].trigger()  # what the context menu entry does
    dlg = window._job_dialogs[1]
    assert dlg.tabs.currentWidget() is dlg.logs["run"]
    qtbot.waitUntil(lambda: dlg.logs["run"].toPlainText() == "epoch 1\n", timeout=3000)
    dlg.log_buttons["build"].click()  # the visible buttons in the dialog
    assert dlg.tabs.currentWidget() is dlg.logs["build"]
    qtbot.waitUntil(lambda: dlg.logs["build"].toPlainText() == "Step 1/3\n", timeout=3000)
    assert dlg.log_buttons["run"].isVisible()
    dlg.close()


# -- commands only where the user may act ---------------------------------------------------
def test_cancel_only_for_own_jobs_unless_admin(window: Pipeline, client: DetailClient,
                                               qtbot: Any) -> None:
    cancel = window.act["cancel"]
    assert window.whoami == {"user": "alice", "role": "user"}
    assert not cancel.isEnabled()  # nothing selected
    window.panels["queued"].select_keys([10])  # alice's
    assert cancel.isEnabled()
    window.panels["queued"].select_keys([11])  # bob's
    assert not cancel.isEnabled() and "owners" in cancel.toolTip()
    window.panels["queued"].select_keys([10, 11])
    assert not cancel.isEnabled()
    dlg = window.open_edit_queued()
    assert not dlg.buttons["delete"].isEnabled() and not dlg.buttons["priority"].isEnabled()
    dlg.panel.select_keys([10])
    assert all(dlg.buttons[a].isEnabled() for a in ("delete", "priority", "hold", "release"))
    assert not dlg.buttons["top"].isEnabled()  # the admins'
    dlg.close()

    with client.lock:
        client.snap = snapshot(role="admin")
    qtbot.waitUntil(lambda: window.whoami.get("role") == "admin", timeout=3000)
    window.panels["queued"].select_keys([10, 11])
    assert cancel.isEnabled()


# -- one meaning per column -----------------------------------------------------------------
def test_gpus_is_a_count_and_on_gpus_the_indices(window: Pipeline) -> None:
    running = window.models["running"]
    assert cell(running, 0, "GPUs") == "1" and cell(running, 0, "On GPUs") == "0"
    finished = window.models["finished"]
    assert "On GPUs" in [c.title for c in finished.columns]
    for name in ("running", "queued", "finished"):
        col = next(c for c in window.models[name].columns if c.title == "GPUs")
        assert col.display({"num_gpus": 2, "gpus": [0, 1]}) == "2", name


def test_a_long_error_is_shown_whole(window: Pipeline, client: DetailClient, qtbot: Any) -> None:
    snap = snapshot(role="user")
    snap["finished"][1]["error"] = LONG_ERROR
    with client.lock:
        client.snap = snap
    m = window.models["finished"]
    qtbot.waitUntil(lambda: cell(m, 1, "Error") == LONG_ERROR, timeout=3000)
    tip = cell(m, 1, "Error", Qt.ItemDataRole.ToolTipRole)
    assert tip.replace("\n", " ") == LONG_ERROR and max(map(len, tip.splitlines())) <= 100


def test_the_sign_in_dialog_says_why_and_never_offers_root(
    qtbot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PySide6.QtWidgets import QLabel

    from dopq.client.gui import dialogs

    monkeypatch.setattr(dialogs.getpass, "getuser", lambda: "root")
    dlg = dialogs.LoginDialog("gpu1", reason="You are not signed in to gpu1 (token expired).")
    qtbot.addWidget(dlg)
    assert dlg.user.text() == "" and dlg.user.placeholderText()
    why = dlg.findChild(QLabel, "loginReason")
    assert why is not None and "token expired" in why.text()
    monkeypatch.setattr(dialogs.getpass, "getuser", lambda: "alice")
    plain = dialogs.LoginDialog("gpu1")
    qtbot.addWidget(plain)
    assert plain.user.text() == "alice"
    assert "Sign in to gpu1" in plain.findChild(QLabel, "loginReason").text()
    last = dialogs.LoginDialog("gpu1", user="bob")  # the name last signed in with
    qtbot.addWidget(last)
    assert last.user.text() == "bob"

"""The Qt client against a fake client: views, in-place updates, commands, style.

Offscreen, no server: ``FakeClient`` has the ``Client`` interface and returns
canned snapshots. Tests against a real server use the same public classes.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import argparse  # noqa: E402
import copy  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from PySide6.QtCore import QPersistentModelIndex, QSettings, Qt  # noqa: E402
from PySide6.QtGui import QColor  # noqa: E402
from PySide6.QtWidgets import QInputDialog, QMessageBox  # noqa: E402

from dopq.client.gui import app as gui_app  # noqa: E402
from dopq.client.gui import dialogs  # noqa: E402
from dopq.client.gui.models import KEY_ROLE, QueuedModel, UsersModel  # noqa: E402
from dopq.client.gui.pipeline import Pipeline  # noqa: E402
from dopq.client.gui.style import STYLES_DIR  # noqa: E402
from dopq.core.errors import Forbidden, NotAuthenticated, ServerUnavailable  # noqa: E402

POLL = 0.02


# -- a fake server -------------------------------------------------------------------------
def job(i: int, state: str, user: str = "alice", **extra: Any) -> dict[str, Any]:
    row = {"id": i, "name": f"job-{i}", "user": user, "state": state, "num_gpus": 1,
           "gpus": [0] if state == "running" else [], "exit_code": None, "error": None,
           "submitted_at": "2024-05-01T10:00:00.000Z", "started_at": None,
           "finished_at": None, "image": None, "container": None, "time_limit": 3600,
           "priority": 0, "nice": 0, "held": False, "array_index": None, "array_parent": None,
           "after": [], "after_any": [], "origin": "api", "wait_s": 5.0, "run_s": None}
    row.update(extra)
    return row


def snapshot(role: str = "admin", queued: int = 3) -> dict[str, Any]:
    q = [job(10 + n, "queued", ("alice", "bob")[n % 2], position=n + 1,
             priority_value=1.0 / (n + 1), reason="Priority", factors={})
         for n in range(queued)]
    return {
        "whoami": {"user": "alice", "role": role},
        "running": [job(1, "running", cpu_percent=50.0, memory_bytes=2**30, run_s=60.0,
                        gpu_samples=[{"index": 0, "utilization": 87, "memory_used": 2**32,
                                      "memory_total": 2**34}])],
        "queued": q,
        "finished": [job(2, "succeeded", exit_code=0), job(3, "failed", "bob", exit_code=2,
                                                             error="exit code 2")],
        "users": [{"user": "alice", "queued": 2, "running": 1, "finished": 1, "succeeded": 1,
                   "failed": 0, "gpu_hours": 1.5, "weight": 1.0, "share": 0.5,
                   "fairshare": 0.7, "penalty": 0.5},
                  {"user": "bob", "queued": 1, "running": 0, "finished": 1, "succeeded": 0,
                   "failed": 1, "gpu_hours": 0.0, "weight": 1.0, "share": 0.5,
                   "fairshare": 1.0, "penalty": 0.0}],
        "system": {"name": "testbox", "version": "2.0.0", "queue_state": "running",
                   "provider_state": "running", "engine_state": "up",
                   "started_at": "2024-05-01T09:00:00.000Z", "uptime_s": 3600.0,
                   "gpu_backend": "virtual", "gpu_mode": "env", "policy": "fairshare",
                   "counts": {"queued": queued, "running": 1}, "provider_restarts": 0,
                   "queue_restarts": 0,
                   "gpus": [{"index": 0, "name": "Virtual GPU", "uuid": "GPU-0",
                             "memory_total": 2**34, "job": 1, "user": "alice",
                             "external": False},
                            {"index": 1, "name": "Virtual GPU", "uuid": "GPU-1",
                             "memory_total": 2**34, "job": None, "user": None,
                             "external": False}]},
    }


class FakeClient:
    """``Client.call`` over canned data; ``fail`` makes every call raise it."""

    def __init__(self, snap: dict[str, Any]) -> None:
        self.snap = snap
        self.fail: BaseException | None = None
        self.refuse: BaseException | None = None  # raised by commands only
        self.calls: list[tuple[Any, ...]] = []
        self.logs: dict[tuple[str, int], dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.server = "testbox"

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            if method != "snapshot":
                self.calls.append((method, *args))
            if self.fail is not None:
                raise self.fail
            if method == "snapshot":
                return copy.deepcopy(self.snap)
            if self.refuse is not None:
                raise self.refuse
            if method == "job":
                return {**job(args[0], "running"), "events": [
                    {"at": "2024-05-01T10:00:00.000Z", "state": "queued", "detail": ""}],
                    "spec": {}}
            if method == "logs":
                return self.logs.get((args[1], args[2]), {"data": "", "offset": args[2],
                                                          "done": True})
            return {"ok": method}

    def submit(self, path: str, options: dict[str, Any], progress: Any = None) -> Any:
        self.call("submit_begin", path, options)
        for sent in (512, 1024):
            progress(sent, 1024)
        return {"id": 77, "user": "alice", "state": "received"}

    def login(self, user: str, password: str, remember: bool = True) -> Any:
        self.call("login", user, password)
        return {"user": user, "role": "user", "token": "t"}

    def made(self, method: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [c for c in self.calls if c[0] == method]


@pytest.fixture
def client() -> FakeClient:
    return FakeClient(snapshot())


@pytest.fixture
def window(qtbot: Any, client: FakeClient, tmp_path: Path) -> Pipeline:
    return open_window(qtbot, client, tmp_path)


def open_window(qtbot: Any, client: FakeClient, tmp_path: Path,
                style: str | None = None) -> Pipeline:
    settings = QSettings(str(tmp_path / "gui.ini"), QSettings.Format.IniFormat)
    w = Pipeline(client, POLL, style, settings=settings)
    w.poller.max_backoff = 0.1
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.refreshed, timeout=5000):
        w.show()
    return w


def cell(model: Any, row: int, title: str, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
    column = [c.title for c in model.columns].index(title)
    return model.data(model.index(row, column), role)


def wait_for(qtbot: Any, w: Pipeline, client: FakeClient, snap: dict[str, Any]) -> None:
    """Serve ``snap`` and wait until the window has applied it."""
    with client.lock:
        client.snap = snap
    target = [r["id"] for r in snap["queued"]]
    qtbot.waitUntil(lambda: w.models["queued"].keys() == target, timeout=3000)


# -- the views -----------------------------------------------------------------------------
def test_five_views_show_the_snapshot(window: Pipeline) -> None:
    m = window.models
    assert m["running"].keys() == [1]
    assert cell(m["running"], 0, "GPU use") == "0: 87%"
    assert cell(m["running"], 0, "CPU") == "50%"
    assert m["queued"].keys() == [10, 11, 12]
    assert [cell(m["queued"], r, "User") for r in range(3)] == ["alice", "bob", "alice"]
    assert cell(m["queued"], 1, "Pos") == "2"
    assert m["finished"].keys() == [2, 3]
    assert cell(m["finished"], 1, "Result") == "failed (2)"
    assert cell(m["finished"], 1, "Error") == "exit code 2"
    assert m["users"].keys() == ["alice", "bob"]
    assert cell(m["users"], 0, "GPU-hours") == "1.50"
    assert m["system"].keys() == [0, 1]
    assert cell(m["system"], 0, "Holder") == "job 1 (alice)"
    assert cell(m["system"], 1, "Holder") == "free"
    summary = window.system_panel.summary.values
    assert summary["name"].text() == "testbox"
    assert summary["queue_state"].text() == "running"
    assert window.state == "up" and "testbox" in window.connection.text()
    # state colours come from the shipped dark style sheet
    assert cell(m["finished"], 1, "Result", Qt.ItemDataRole.ForegroundRole) == QColor("#ef5350")
    assert cell(m["finished"], 0, "Job", Qt.ItemDataRole.ForegroundRole) is None


def test_filter_box_filters_rows(window: Pipeline, qtbot: Any) -> None:
    panel = window.panels["queued"]
    panel.filter.setText("bob")
    assert panel.proxy.rowCount() == 1 and panel.proxy.key_at(0) == 11
    assert panel.count.text() == "1 of 3"
    panel.filter.setText("")
    assert panel.proxy.rowCount() == 3


def test_update_in_place_keeps_selection_and_scroll(window: Pipeline, client: FakeClient,
                                                    qtbot: Any) -> None:
    wait_for(qtbot, window, client, snapshot(queued=300))
    panel = window.panels["queued"]
    resets: list[int] = []
    window.models["queued"].modelReset.connect(lambda: resets.append(1))
    panel.select_keys([250])
    bar = panel.view.verticalScrollBar()
    assert bar.value() > 0
    scrolled = bar.value()

    snap = snapshot(queued=300)
    snap["queued"] = snap["queued"][5:]  # five started
    for n, row in enumerate(snap["queued"]):
        row["position"], row["wait_s"] = n + 1, 60.0  # every row changed
    snap["queued"].insert(40, job(999, "queued", position=41))
    wait_for(qtbot, window, client, snap)
    assert panel.selected_keys() == [250]
    assert panel.count.text() == "296"
    current = panel.view.selectionModel().currentIndex()
    assert current.data(KEY_ROLE) == 250
    assert abs(bar.value() - scrolled) <= 6 and not resets
    assert cell(window.models["queued"], 0, "Waiting") == "1m00s"

    # sorted by a column, a refresh still keeps the row selected
    panel.view.sortByColumn(2, Qt.SortOrder.DescendingOrder)
    assert panel.selected_keys() == [250]
    wait_for_sorted = snapshot(queued=300)
    with client.lock:
        client.snap = wait_for_sorted
    qtbot.waitUntil(lambda: 10 in window.models["queued"].keys(), timeout=3000)
    assert panel.selected_keys() == [250]
    names = [cell(window.models["queued"], r, "Job") for r in range(3)]
    assert names == sorted(names, reverse=True)


def test_model_diff_matches_any_sequence_of_lists(qtbot: Any) -> None:
    rng = random.Random(5)
    model = UsersModel()
    keep: list[tuple[str, QPersistentModelIndex]] = []
    for _step in range(60):
        names = [f"u{n}" for n in rng.sample(range(60), rng.randrange(0, 40))]
        rows = [{"user": u, "queued": rng.randrange(3)} for u in names]
        if rng.random() < 0.3:
            model.sort(rng.choice([-1, 0, 2]), rng.choice(list(Qt.SortOrder)))
        model.apply(rows)
        shown = [str(k) for k in model.keys()]
        assert sorted(shown) == sorted(names)
        if model._sort_column < 0:
            assert shown == names
        for r, u in enumerate(shown):
            assert model.row_of(u) == r
            assert model.get(u) == next(x for x in rows if x["user"] == u)
        for u, ix in keep:  # persistent indexes follow their rows, or die with them
            assert (ix.isValid() and ix.data(KEY_ROLE) == u) or (u not in shown
                                                                 and not ix.isValid())
        keep = [(u, QPersistentModelIndex(model.index(model.row_of(u), 1)))
                for u in shown[::3]]


# -- commands ------------------------------------------------------------------------------
def test_edit_sends_the_selected_ids_and_shows_a_refusal(
        window: Pipeline, client: FakeClient, qtbot: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(QMessageBox, "question",
                        lambda *a, **k: QMessageBox.StandardButton.Yes)
    monkeypatch.setattr(QMessageBox, "warning", lambda _p, _t, text, *a: warnings.append(text))
    monkeypatch.setattr(QInputDialog, "getInt", lambda *a, **k: (5, True))
    window.panels["queued"].select_keys([10, 12])
    dlg = window.open_edit_queued()
    assert dlg.panel.selected_keys() == [10, 12]
    dlg.buttons["delete"].click()
    qtbot.waitUntil(lambda: client.made("edit") == [("edit", [10, 12], "delete", None)])

    client.refuse = Forbidden("job 12 belongs to bob; nothing changed")
    dlg.buttons["priority"].click()
    qtbot.waitUntil(lambda: warnings == ["job 12 belongs to bob; nothing changed"])
    assert client.made("edit")[-1] == ("edit", [10, 12], "priority", 5)
    dlg.close()


def test_admin_commands_confirm_then_call(window: Pipeline, client: FakeClient, qtbot: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([False, True])
    monkeypatch.setattr(dialogs, "pick_user", lambda *a: "bob")
    monkeypatch.setattr(dialogs, "confirm", lambda *a: next(answers))
    window.act["clear_status"].trigger()  # declined: nothing sent
    window.act["clear_history"].trigger()
    qtbot.waitUntil(lambda: client.made("clear_history") == [("clear_history", "bob")])
    assert not client.made("clear_status")
    monkeypatch.setattr(dialogs, "choose", lambda *a: 1)
    window.act["shutdown"].trigger()
    qtbot.waitUntil(lambda: client.made("shutdown") == [("shutdown", True)])


def test_admin_only_actions_follow_the_role(window: Pipeline, client: FakeClient,
                                            qtbot: Any) -> None:
    admin_only = ("clear_history", "clear_status", "shutdown")
    assert all(window.act[a].isEnabled() for a in admin_only)
    with client.lock:
        client.snap = snapshot(role="user")
    qtbot.waitUntil(lambda: window.whoami.get("role") == "user", timeout=3000)
    assert not any(window.act[a].isEnabled() for a in admin_only)
    assert window.act["edit"].isEnabled() and window.act["submit"].isEnabled()
    window.panels["queued"].select_keys([10])
    dlg = window.open_edit_queued()
    assert all(dlg.buttons[a].isEnabled() for a in ("delete", "priority", "hold", "release"))
    assert not dlg.buttons["top"].isEnabled()  # their own jobs: all but moving to the top
    dlg.close()


def test_submit_and_sign_in_run_off_the_gui_thread(
        window: Pipeline, client: FakeClient, qtbot: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[tuple[int, int]] = []

    def describe(done: int, total: int) -> str:
        steps.append((done, total))
        return "uploading"

    monkeypatch.setattr(dialogs, "describe_upload", describe)
    window.submit(str(tmp_path), {"gpus": 1})
    qtbot.waitUntil(lambda: "submitted job 77" in window.statusBar().currentMessage())
    assert client.made("submit_begin") == [("submit_begin", str(tmp_path), {"gpus": 1})]
    assert steps == [(512, 1024), (1024, 1024)]  # progress came back to the GUI thread
    window.login("bob", "secret", False)
    qtbot.waitUntil(lambda: "signed in as bob" in window.statusBar().currentMessage())
    assert client.made("login") == [("login", "bob", "secret")]


# -- connection ----------------------------------------------------------------------------
def test_disconnected_greys_out_and_recovers(window: Pipeline, client: FakeClient,
                                             qtbot: Any) -> None:
    tables = [window.docks[n].widget() for n in window.docks]
    client.fail = ServerUnavailable("no name server at 127.0.0.1:9090")
    qtbot.waitUntil(lambda: window.state == "down", timeout=3000)
    assert not any(t.isEnabled() for t in tables)
    assert "no name server at 127.0.0.1:9090" in window.connection.text()
    assert window.models["queued"].keys() == [10, 11, 12]  # the last view stays visible

    client.fail = RuntimeError("something unexpected")  # the poller must survive it too
    qtbot.waitUntil(lambda: "RuntimeError: something" in window.connection.text(), timeout=3000)
    client.fail = NotAuthenticated("token expired; sign in again")
    qtbot.waitUntil(lambda: window.state == "auth", timeout=3000)
    client.fail = None
    with qtbot.waitSignal(window.refreshed, timeout=3000):
        pass
    assert window.state == "up" and all(t.isEnabled() for t in tables)


# -- details and logs ----------------------------------------------------------------------
def test_job_details_follow_the_log(window: Pipeline, client: FakeClient, qtbot: Any) -> None:
    client.logs = {("run", 0): {"data": "epoch 1\n", "offset": 8, "done": False},
                   ("run", 8): {"data": "epoch 2\n", "offset": 16, "done": True},
                   ("build", 0): {"data": "Step 1/3\n", "offset": 9, "done": True}}
    dlg = window.open_job(1)
    qtbot.waitUntil(lambda: dlg.logs["run"].toPlainText() == "epoch 1\nepoch 2\n",
                    timeout=3000)
    assert dlg.logs["build"].toPlainText() == "Step 1/3\n"
    qtbot.waitUntil(lambda: dlg.values["name"].text() == "job-1")
    assert ("logs", 1, "run", 8) in client.made("logs")
    dlg.close()


# -- style ---------------------------------------------------------------------------------
def test_style_file_applied_and_reloaded(qtbot: Any, client: FakeClient, tmp_path: Path) -> None:
    sheet = tmp_path / "mine.qss"
    dark = (STYLES_DIR / "dark.qss").read_text()
    sheet.write_text(dark.replace("qproperty-failed: #ef5350", "qproperty-failed: #123456"))
    w = open_window(qtbot, client, tmp_path, str(sheet))
    finished = w.models["finished"]
    assert "qproperty-failed: #123456" in w.styleSheet()
    assert cell(finished, 1, "Result", Qt.ItemDataRole.ForegroundRole) == QColor("#123456")

    sheet.write_text(dark.replace("qproperty-failed: #ef5350", "qproperty-failed: #abcdef"))
    qtbot.waitUntil(lambda: cell(finished, 1, "Result", Qt.ItemDataRole.ForegroundRole)
                    == QColor("#abcdef"), timeout=5000)
    w.set_style("light")
    assert cell(finished, 1, "Result", Qt.ItemDataRole.ForegroundRole) == QColor("#c62828")
    assert w.theme_actions["light"].isChecked()


# -- dopq gui --screenshot -----------------------------------------------------------------
def _args(shot: Path) -> argparse.Namespace:
    return argparse.Namespace(ns_host=None, ns_port=None, server=None, style=None,
                              screenshot=str(shot), poll=POLL)


def test_screenshot_saves_the_window(qtbot: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gui_app, "Client", lambda *a: FakeClient(snapshot()))
    shot = tmp_path / "window.png"
    assert gui_app.main(_args(shot)) == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_screenshot_fails_without_a_server(qtbot: Any, tmp_path: Path, capsys: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    down = FakeClient(snapshot())
    down.fail = ServerUnavailable("no name server at 127.0.0.1:9090")
    monkeypatch.setattr(gui_app, "Client", lambda *a: down)
    monkeypatch.setattr(gui_app, "SCREENSHOT_TIMEOUT", 0.3)
    assert gui_app.main(_args(tmp_path / "x.png")) == 1
    err = capsys.readouterr().err.strip()
    assert err == "dopq gui: cannot reach the server: no name server at 127.0.0.1:9090"
    assert not (tmp_path / "x.png").exists()


def test_queued_model_has_no_widget_code() -> None:
    import dopq.client.gui.models as models

    assert "QtWidgets" not in Path(models.__file__).read_text()
    assert QueuedModel.key_field == "id"


# -- GPU sharing (issue #13) ----------------------------------------------------------------
G = 2**30


def shared_snapshot() -> dict[str, Any]:
    """Two jobs sharing GPU 0 (one idle), a whole-GPU job on GPU 1 and a foreign process."""
    snap = snapshot()
    snap["running"] = [
        job(1, "running", num_gpus=1, gpu_memory=4 * G, gpus=[0], run_s=60.0,
            gpu_memory_used=3 * G, gpu_utilisation=41.0, idle_since=None),
        job(4, "running", "bob", num_gpus=1, gpu_memory=6 * G, gpus=[0], run_s=2000.0,
            gpu_memory_used=int(5.5 * G), gpu_utilisation=0.0,
            idle_since="2024-05-01T10:30:00.000Z"),
        job(5, "running", "bob", num_gpus=1, gpus=[1], run_s=100.0,
            gpu_memory_used=12 * G, gpu_utilisation=97.0, idle_since=None),
    ]
    snap["queued"][0].update(gpu_memory=10 * G, num_gpus=2)
    snap["system"]["gpus"] = [
        {"index": 0, "name": "Virtual GPU", "uuid": "GPU-0", "memory_total": 16 * G,
         "job": 1, "user": "alice", "external": True, "utilization": 41.0,
         "memory_used": int(10.5 * G), "memory": 16 * G, "used": int(10.5 * G),
         "holders": [{"job": 1, "user": "alice", "declared": 4 * G, "memory": 3 * G},
                     {"job": 4, "user": "bob", "declared": 6 * G, "memory": int(5.5 * G)}],
         "foreign": [{"pid": 4242, "user": "carl", "memory": 2 * G}]},
        {"index": 1, "name": "Virtual GPU", "uuid": "GPU-1", "memory_total": 16 * G,
         "job": 5, "user": "bob", "external": False, "utilization": 97.0,
         "memory_used": 12 * G, "memory": 16 * G, "used": 12 * G,
         "holders": [{"job": 5, "user": "bob", "declared": 0, "memory": 12 * G}],
         "foreign": []},
        {"index": 2, "name": "Virtual GPU", "uuid": "GPU-2", "memory_total": 16 * G,
         "job": None, "user": None, "external": False, "utilization": None,
         "memory_used": None, "memory": 16 * G, "used": None, "holders": [], "foreign": []},
    ]
    return snap


def test_running_and_system_views_show_gpu_sharing(qtbot: Any, tmp_path: Path) -> None:
    w = open_window(qtbot, FakeClient(shared_snapshot()), tmp_path)
    running, queued, system = w.models["running"], w.models["queued"], w.models["system"]
    assert running.keys() == [1, 4, 5]
    assert [cell(running, r, "GPUs") for r in range(3)] == ["1x4G", "1x6G", "1"]
    assert [cell(running, r, "GPU use") for r in range(3)] == ["41%", "0% IDLE", "97%"]
    assert [cell(running, r, "GPU memory") for r in range(3)] == ["3G/4G", "5.5G/6G", "12G"]
    assert cell(queued, 0, "GPUs") == "2x10G"
    assert system.keys() == [0, 1, 2]
    assert cell(system, 0, "Holder") == "job 1 (alice) 3G/4G; job 4 (bob) 5.5G/6G"
    assert cell(system, 0, "Outside DoPQ") == "pid 4242 (carl) 2G"
    assert cell(system, 1, "Holder") == "job 5 (bob) 12G/whole"
    assert cell(system, 1, "Outside DoPQ") == "-"
    assert cell(system, 2, "Holder") == "free"
    assert cell(system, 0, "Memory") == "10.5G/16G"
    assert cell(system, 2, "Memory") == "-"


def test_screenshot_of_gpu_sharing(qtbot: Any, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The window with shared GPUs (``DOPQ_SHOT_DIR`` keeps the picture for a look)."""
    monkeypatch.setattr(gui_app, "Client", lambda *a: FakeClient(shared_snapshot()))
    shot = Path(os.environ.get("DOPQ_SHOT_DIR") or tmp_path) / "gpu-sharing.png"
    assert gui_app.main(_args(shot)) == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submit_dialog_passes_gpu_memory(qtbot: Any) -> None:
    box = dialogs.SubmitDialog()
    qtbot.addWidget(box)
    assert "gpu_memory" not in box.options()  # empty: whole GPUs, from the config
    box.gpus.setValue(1)
    box.gpu_memory.setText(" 10g ")
    assert box.options() == {"gpus": 1, "gpu_memory": "10g"}


def cluster_snapshot() -> dict[str, Any]:
    """A server on a Slurm cluster: its status lists every node's GPUs by name."""
    snap = snapshot()
    snap["running"] = [job(1, "running", num_gpus=2, gpus=[0, 1], run_s=60.0, node="dopq-n1"),
                       job(5, "running", "bob", num_gpus=1, gpus=[0], run_s=100.0,
                           node="dopq-n2")]
    held = {("dopq-n1", 0): (1, "alice"), ("dopq-n1", 1): (1, "alice"),
            ("dopq-n2", 0): (5, "bob")}
    snap["system"]["gpu_backend"] = "slurm"
    snap["system"]["gpus"] = [
        {"index": n * 2 + i, "node": node, "node_index": i, "name": f"{node} GPU {i}",
         "uuid": "", "memory_total": None, "job": held.get((node, i), (None, None))[0],
         "user": held.get((node, i), (None, None))[1], "external": False, "memory": None,
         "used": None, "foreign": [],
         "holders": [{"job": held[(node, i)][0], "user": held[(node, i)][1], "declared": 0,
                      "memory": None}] if (node, i) in held else []}
        for n, node in enumerate(("dopq-n1", "dopq-n2")) for i in (0, 1)]
    return snap


def test_screenshot_of_a_cluster(qtbot: Any, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The system view names each node's GPUs (``DOPQ_SHOT_DIR`` keeps the picture)."""
    w = open_window(qtbot, FakeClient(cluster_snapshot()), tmp_path)
    system = w.models["system"]
    assert system.keys() == [0, 1, 2, 3]
    assert cell(system, 3, "Holder") == "free"
    monkeypatch.setattr(gui_app, "Client", lambda *a: FakeClient(cluster_snapshot()))
    shot = Path(os.environ.get("DOPQ_SHOT_DIR") or tmp_path) / "cluster.png"
    assert gui_app.main(_args(shot)) == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cell(w.models["running"], 0, "On GPUs") == "0, 1 on dopq-n1"

"""The GUI's pictures: the GPU timeline, usage against share, utilisation sparklines.

The server's half (the snapshot's ``timeline``) against a real SQLite store;
the window's half against ``FakeClient`` (tests/test_gui.py), offscreen.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from PySide6.QtCore import QPoint, QPointF, QRectF, Qt  # noqa: E402
from PySide6.QtGui import QWheelEvent  # noqa: E402
from test_gui import FakeClient, _args, open_window, snapshot  # noqa: E402

from dopq.client.gui import app as gui_app  # noqa: E402
from dopq.client.gui import pictures, timeline  # noqa: E402
from dopq.client.gui.columns import (  # noqa: E402
    GPU_COLUMNS,
    SPARK_COLUMN,
    USAGE_COLUMN,
    USER_COLUMNS,
)
from dopq.server import viewbuilder  # noqa: E402
from dopq.server.store import Store  # noqa: E402

NOW = 1_700_000_000.0


# -- the server: the snapshot's timeline -------------------------------------------------
def test_timeline_has_running_and_recent_jobs_on_gpus(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "dopq.sqlite3")
    now = time.time()

    def add(state: str, gpus: list[int], start: float | None, end: float | None,
            **extra: Any) -> int:
        return store.add_job(name=f"{state}-{start}", user="alice", state=state, gpus=gpus,
                             num_gpus=len(gpus), submitted_at=now - 90000,
                             started_at=start, finished_at=end, **extra)

    running = add("running", [0, 1], now - 600, None)
    recent = add("succeeded", [1], now - 7200, now - 3600)
    add("failed", [0], now - 100000, now - 90000)  # ended before the last 24 h
    add("succeeded", [], now - 500, now - 400)  # CPU only: not on the timeline
    add("queued", [], None, None)
    add("cancelled", [2], now - 300, now - 200, hidden=True)  # cleared from the history
    bars = viewbuilder.timeline_bars(store, now)
    assert [b["id"] for b in bars] == [running, recent]  # newest start first
    assert bars[0] == {"id": running, "name": f"running-{now - 600}", "user": "alice",
                       "state": "running", "gpus": [0, 1], "start": now - 600, "end": None}
    assert bars[1]["end"] == now - 3600 and bars[1]["gpus"] == [1]
    monkeypatch.setattr(viewbuilder, "TIMELINE_LIMIT", 1)  # capped, the newest kept
    assert [b["id"] for b in viewbuilder.timeline_bars(store, now)] == [running]


# -- what a server sends is read defensively ---------------------------------------------
def test_bad_timeline_entries_are_dropped_not_fatal() -> None:
    good = {"id": 1, "name": "ok", "user": "bob", "state": "running", "gpus": [0],
            "start": NOW, "end": None}
    raw = [good, "junk", {"id": "x", "start": NOW, "gpus": [0]}, {"id": 2, "gpus": [0]},
           {**good, "id": 3, "start": math.nan}, {**good, "id": 4, "gpus": [10**9]},
           {**good, "id": 5, "gpus": None}, {**good, "id": 6, "start": 1e400},
           {**good, "id": 8, "end": 1e300},
           {**good, "id": 7, "name": "evil\x1b[2J\u202e", "user": "u" * 500}]
    bars = timeline.parse_bars(raw)
    assert [b.id for b in bars] == [1, 7]
    assert "\x1b" not in bars[1].name and "\u202e" not in bars[1].name  # shown as escapes
    assert len(bars[1].user) == 64
    assert timeline.parse_bars({"not": "a list"}) == []
    assert len(timeline.parse_bars([good] * 6000)) == timeline.MAX_BARS


def test_user_colours_are_stable_and_distinct() -> None:
    assert timeline.user_color("alice") == timeline.user_color("alice")
    assert timeline.user_color("alice") != timeline.user_color("bob")


# -- the window --------------------------------------------------------------------------
def picture_snapshot(now: float = NOW) -> dict[str, Any]:
    snap = snapshot()
    snap["now"] = now
    snap["timeline"] = [
        {"id": 1, "name": "job-1", "user": "alice", "state": "running", "gpus": [0],
         "start": now - 1800, "end": None},
        {"id": 3, "name": "job-3", "user": "bob", "state": "failed", "gpus": [1],
         "start": now - 23 * 3600, "end": now - 18 * 3600},
    ]
    return snap


def _centre(view: timeline.TimelineView, job_id: int) -> QPoint:
    rect = next(r for r, b in view._rects() if b.id == job_id)
    return rect.center().toPoint()


def test_timeline_shows_bars_hover_and_zooms(qtbot: Any, tmp_path: Path) -> None:
    w = open_window(qtbot, FakeClient(picture_snapshot()), tmp_path)
    panel = w.timeline
    view = panel.view
    view.resize(800, 200)
    assert view.rows() == [0, 1]  # the system's GPUs
    assert [b.id for b in view.visible()] == [1, 3]  # running and finished, last 24 h
    assert view.span == 86400 and panel.range.currentText() == "24 hours"
    text = view.hover_text(_centre(view, 1))
    assert "job 1: job-1" in text and "user alice" in text and "end running" in text
    assert "(failed)" in view.hover_text(_centre(view, 3))
    assert view.hover_text(QPoint(1, 1)) == ""
    panel.zoom_in.click()  # zoom in: the finished job leaves the window
    assert view.span == 86400 / timeline.ZOOM
    assert [b.id for b in view.visible()] == [1]
    panel.range.setCurrentIndex(0)
    panel.range.activated.emit(0)
    assert view.span == 3600 and panel.range.currentText() == "1 hour"
    wheel = QWheelEvent(QPointF(100, 50), QPointF(100, 50), QPoint(), QPoint(0, -120),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                        Qt.ScrollPhase.NoScrollPhase, False)
    view.wheelEvent(wheel)  # wheel down: zoom out
    assert view.span == 3600 * timeline.ZOOM
    for _ in range(20):
        panel.zoom_out.click()
    assert view.span == timeline.MAX_SPAN  # never past what the server sends
    assert not view.grab().isNull()  # paints


def test_a_window_without_timeline_from_an_older_server(qtbot: Any, tmp_path: Path) -> None:
    w = open_window(qtbot, FakeClient(snapshot()), tmp_path)  # no "timeline" key
    assert w.timeline.view.visible() == [] and w.timeline.view.rows() == [0, 1]
    assert not w.timeline.view.grab().isNull()


def test_users_view_paints_usage_against_share(qtbot: Any, tmp_path: Path) -> None:
    w = open_window(qtbot, FakeClient(picture_snapshot()), tmp_path)
    bars = w.usage_bars
    assert bars.total == 1.5  # alice 1.5 GPU-hours, bob none
    users = w.models["users"].rows()
    assert [pictures.usage_text(r, bars.total) for r in users] == ["100% of 50%", "0% of 50%"]
    assert pictures.usage_text({"gpu_hours": None, "share": None}, 0) == "- of -"
    view = w.panels["users"].view
    assert USER_COLUMNS[USAGE_COLUMN].title == "Usage / share"
    assert view.itemDelegateForColumn(USAGE_COLUMN) is bars
    assert not view.grab().isNull()


class MovingClient(FakeClient):
    """GPU 0's utilisation changes with every snapshot; GPU 1 is never read."""

    def __init__(self, snap: dict[str, Any]) -> None:
        super().__init__(snap)
        self.n = 0

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        got = super().call(method, *args, **kwargs)
        if method == "snapshot":
            self.n += 1
            got["now"] = NOW + self.n
            gpus = got["system"]["gpus"]
            gpus[0]["utilization"] = 50 + 45 * math.sin(self.n / 3)
            if len(gpus) > 2:
                gpus[2]["utilization"] = (self.n * 7) % 100
        return got


def test_system_view_keeps_a_sparkline_per_gpu(qtbot: Any, tmp_path: Path) -> None:
    w = open_window(qtbot, MovingClient(picture_snapshot()), tmp_path)
    qtbot.waitUntil(lambda: len(w.util_history.of(0)) >= 5, timeout=5000)
    assert w.util_history.of(1) == []  # no reading where NVML reads nothing
    assert all(0 <= v <= 100 for v in w.util_history.of(0))
    view = w.panels["system"].view
    assert GPU_COLUMNS[SPARK_COLUMN].title == "Recent use"
    assert view.itemDelegateForColumn(SPARK_COLUMN) is w.sparklines
    assert not view.grab().isNull()
    history = pictures.UtilHistory(size=3)
    for u in (10, 250, -5, 40):
        history.add([{"index": 0, "utilization": u}, {"index": 1}])
    assert history.of(0) == [100.0, 0.0, 40.0]  # clamped, the last 3 kept
    history.add([{"index": 1, "utilization": 5}])
    assert history.of(0) == [] and history.of(1) == [5.0]  # a vanished GPU is forgotten
    history.add("junk")  # type: ignore[arg-type]
    points = pictures.spark_points([0.0, 100.0], QRectF(0, 0, 20, 10), 3)
    assert [(p.x(), p.y()) for p in points] == [(10.0, 10.0), (20.0, 0.0)]


def test_screenshot_shows_the_pictures(qtbot: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``dopq gui --screenshot`` with the timeline (``DOPQ_SHOT_DIR`` keeps the picture)."""
    monkeypatch.setattr(gui_app, "Client", lambda *a: MovingClient(picture_snapshot()))
    shot = Path(os.environ.get("DOPQ_SHOT_DIR") or tmp_path) / "pictures.png"
    assert gui_app.main(_args(shot)) == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_void_qt_calls_cannot_bring_none_to_zero() -> None:
    """PySide6 6.12 on CPython 3.11 drops a reference to None per void call (compat)."""
    from PySide6.QtCore import QObject

    from dopq.client.gui import compat

    probe = QObject()
    for _ in range(20000):  # what a few paints of the timeline do
        probe.setObjectName("x")
    compat.keep_none()
    assert not compat.VOID_DROPS_NONE or sys.getrefcount(None) >= compat.NONE_FLOOR

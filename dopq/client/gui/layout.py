"""The main window's layout: its five docks, their default sizes, and the layout
remembered between runs (``QSettings``: geometry, dock state, table headers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray, Qt
from PySide6.QtWidgets import QDockWidget, QWidget

from dopq.client.gui import pictures
from dopq.client.gui.columns import SPARK_COLUMN, USAGE_COLUMN
from dopq.client.gui.timeline import TimelinePanel
from dopq.client.gui.viewthread import VIEWS
from dopq.client.gui.widgets import SystemPanel, TablePanel

if TYPE_CHECKING:
    from dopq.client.gui.pipeline import Pipeline

TITLES = {"running": "Running", "queued": "Queued", "finished": "Finished",
          "users": "Users", "system": "System"}
# of the saved dock state (2: the timeline dock): a layout saved by another is not restored
VERSION = 2


def build_docks(w: Pipeline) -> None:
    """One dock per view (``w.panels``, ``w.docks``): the three job tables on the left,
    System and Users on the right, the GPU timeline below; the tables' pictures."""
    w.system_panel = SystemPanel(w.models["system"], w)
    for name in VIEWS:
        widget: QWidget
        if name == "system":
            panel, widget = w.system_panel.table, w.system_panel
        else:
            panel = TablePanel(w.models[name], name, w)
            widget = panel
        w.panels[name] = panel
        dock = QDockWidget(TITLES[name], w)
        dock.setObjectName(f"{name}Dock")
        dock.setWidget(widget)
        w.docks[name] = dock
    w.timeline = TimelinePanel(w)
    dock = QDockWidget("GPU timeline", w)
    dock.setObjectName("timelineDock")
    dock.setWidget(w.timeline)
    w.docks["timeline"] = dock
    w.usage_bars = pictures.UsageBars(w)
    w.panels["users"].view.setItemDelegateForColumn(USAGE_COLUMN, w.usage_bars)
    w.util_history = pictures.UtilHistory()
    w.sparklines = pictures.Sparklines(w.util_history, w)
    w.panels["system"].view.setItemDelegateForColumn(SPARK_COLUMN, w.sparklines)
    for name in ("running", "queued", "finished"):
        w.panels[name].activated.connect(w.open_job)
    w.setDockNestingEnabled(True)
    d = w.docks
    # the three job tables (many columns) on the left, System and Users on the right
    w.addDockWidget(Qt.DockWidgetArea.LeftDockWidgetArea, d["running"])
    w.splitDockWidget(d["running"], d["queued"], Qt.Orientation.Vertical)
    w.splitDockWidget(d["queued"], d["finished"], Qt.Orientation.Vertical)
    w.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, d["system"])
    w.splitDockWidget(d["system"], d["users"], Qt.Orientation.Vertical)
    w.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, d["timeline"])


def default_sizes(w: Pipeline) -> None:
    """Share the window between the docks (once laid out: before, Qt ignores it)."""
    d = w.docks
    width, height = max(w.width(), 800), max(w.height(), 500)
    left = int(width * 0.6)
    w.resizeDocks([d["running"], d["system"]], [left, width - left],
                  Qt.Orientation.Horizontal)
    w.resizeDocks([d["running"], d["queued"], d["finished"]],
                  [int(height * 0.27), int(height * 0.33), int(height * 0.40)],
                  Qt.Orientation.Vertical)
    w.resizeDocks([d["system"], d["users"]], [int(height * 0.42), int(height * 0.58)],
                  Qt.Orientation.Vertical)
    w.resizeDocks([d["timeline"]], [int(height * 0.24)], Qt.Orientation.Vertical)


def restore(w: Pipeline) -> bool:
    """Put back the remembered layout; True when the docks' state was restored."""
    s = w.settings
    geometry = s.value("window/geometry")
    if isinstance(geometry, QByteArray | bytes):
        w.restoreGeometry(geometry)
    restored = False
    state = s.value("window/state")
    if isinstance(state, QByteArray | bytes):
        restored = w.restoreState(state, VERSION)
    for name, panel in w.panels.items():
        header = s.value(f"tables/{name}")
        if isinstance(header, QByteArray | bytes):
            panel.restore_header(header)
    return restored


def save(w: Pipeline) -> None:
    s = w.settings
    s.setValue("window/geometry", w.saveGeometry())
    s.setValue("window/state", w.saveState(VERSION))
    for name, panel in w.panels.items():
        s.setValue(f"tables/{name}", QByteArray(panel.header_state()))
    s.sync()

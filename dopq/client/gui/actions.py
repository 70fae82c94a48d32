"""The main window's commands: actions, context menus of the job views, menus, tool bar."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence

from dopq.client.gui.style import THEMES

if TYPE_CHECKING:
    from dopq.client.gui.pipeline import Pipeline


def _action(w: Pipeline, text: str, slot: Callable[[], Any], shortcut: str | None = None,
            tip: str = "") -> QAction:
    act = QAction(text, w)
    act.triggered.connect(lambda _=False: slot())
    if shortcut:
        act.setShortcut(QKeySequence(shortcut))
    if tip:
        act.setStatusTip(tip)
    return act


def build_actions(w: Pipeline) -> tuple[dict[str, QAction], dict[str, QAction]]:
    """The window's commands, and its theme choices; job views get their context menus."""

    def a(text: str, slot: Callable[[], Any], shortcut: str | None = None,
          tip: str = "") -> QAction:
        return _action(w, text, slot, shortcut, tip)

    act: dict[str, QAction] = {
        "submit": a("&Submit job…", w.submit_job, "Ctrl+N", "upload a folder or a zip"),
        "sign_in": a("Sign &in…", w.sign_in, tip="sign in and keep a token"),
        "sign_out": a("Sign &out", w.sign_out),
        "switch": a("S&witch server…", w.switch_server),
        "quit": a("&Quit", w.close, "Ctrl+Q"),
        "edit": a("&Update enqueued containers…", w.open_edit_queued, "Ctrl+E",
                  "delete, re-prioritise, hold or release queued jobs"),
        "cancel": a("&Cancel selected jobs", w.cancel_selected, "Del",
                    "cancel the selected running or queued jobs (yours; admins: any)"),
        "details": a("&Details and logs…", w.open_selected, "Ctrl+I",
                     "the selected job's fields, events and logs"),
        "run_log": a("Run &log…", functools.partial(w.open_selected, "run"), "Ctrl+L",
                     "the selected job's run log"),
        "build_log": a("&Build log…", functools.partial(w.open_selected, "build"),
                       "Ctrl+B", "the selected job's build log"),
        "clear_history": a("Clear user &history…", w.clear_history,
                           tip="hide finished jobs (admins)"),
        "clear_status": a("Clear user s&tatus…", w.clear_status,
                          tip="forget recorded GPU usage (admins)"),
        "shutdown": a("Shut&down server…", w.shutdown_server,
                      tip="stop the server (admins)"),
        "refresh": a("&Refresh now", w.thread_poke, "F5"),
        "reset_layout": a("Reset &layout", w.reset_layout),
        "style_file": a("Style sheet &file…", w.pick_style),
        "about": a("&About DoPQ", w.about),
    }
    group = QActionGroup(w)
    themes: dict[str, QAction] = {}
    for theme in THEMES:
        t = a(theme.capitalize(), functools.partial(w.set_style, theme))
        t.setCheckable(True)
        group.addAction(t)
        themes[theme] = t
    logs = ("details", "run_log", "build_log")
    for name, acts in (("running", (*logs, "cancel")), ("queued", (*logs, "edit", "cancel")),
                       ("finished", logs)):
        view = w.panels[name].view
        view.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        for key in acts:
            view.addAction(act[key])
        view.selectionModel().selectionChanged.connect(
            lambda *_a, n=name: w._selection_changed(n))
    return act, themes


def build_menus(w: Pipeline) -> None:
    """The menu bar and the tool bar."""
    act = w.act
    bar = w.menuBar()
    m = bar.addMenu("&DoPQ")
    for key in ("submit", None, "sign_in", "sign_out", "switch", None, "quit"):
        m.addSeparator() if key is None else m.addAction(act[key])
    m = bar.addMenu("&Commands")
    for key in ("details", "run_log", "build_log", None, "edit", "cancel", None,
                "clear_history", "clear_status", None, "shutdown"):
        m.addSeparator() if key is None else m.addAction(act[key])
    m = bar.addMenu("&View")
    for dock in w.docks.values():
        m.addAction(dock.toggleViewAction())
    m.addSeparator()
    m.addAction(act["refresh"])
    m.addAction(act["reset_layout"])
    theme = m.addMenu("&Theme")
    for t in w.theme_actions.values():
        theme.addAction(t)
    theme.addAction(act["style_file"])
    bar.addMenu("&Help").addAction(act["about"])
    tb = w.addToolBar("Commands")
    tb.setObjectName("commandsToolBar")
    for key in ("submit", "details", "edit", "cancel", None, "clear_history", "clear_status",
                "shutdown", None, "sign_in", "refresh"):
        tb.addSeparator() if key is None else tb.addAction(act[key])


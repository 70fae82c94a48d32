"""``dopq gui``: start the window, or take a screenshot of it and exit."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication

from dopq.client.gui.pipeline import Pipeline
from dopq.client.remote import Client
from dopq.core import settings as settings_mod
from dopq.core.errors import DopqError

SCREENSHOT_TIMEOUT = 20.0


def _gui_settings() -> settings_mod.GuiSettings:
    try:
        return settings_mod.load().gui
    except DopqError as exc:
        print(f"dopq gui: {exc}; using the default settings", file=sys.stderr)
        return settings_mod.GuiSettings()


def main(args: argparse.Namespace) -> int:
    """Run the desktop client; with ``args.screenshot`` save a picture and exit."""
    shot = getattr(args, "screenshot", None)
    if shot and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    gui = _gui_settings()
    poll = getattr(args, "poll", None) or gui.poll_interval
    style = getattr(args, "style", None) or gui.style or None
    if style and style not in ("dark", "light") and not Path(style).expanduser().is_file():
        print(f"dopq gui: no style sheet {style}", file=sys.stderr)
        return 2

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "dopq"])
    assert isinstance(app, QApplication)
    app.setOrganizationName("dopq")
    app.setApplicationName("DoPQ")
    app.setStyle("Fusion")
    client = Client(args.ns_host, args.ns_port, args.server)

    tmp: tempfile.TemporaryDirectory[str] | None = None
    qsettings = None
    if shot:  # the default layout, and the user's remembered one left alone
        tmp = tempfile.TemporaryDirectory(prefix="dopq-gui-")
        qsettings = QSettings(str(Path(tmp.name) / "gui.ini"), QSettings.Format.IniFormat)
    window = Pipeline(client, poll, style, settings=qsettings, ask_login=not shot)
    window.styles.failed.connect(lambda msg: print(f"dopq gui: {msg}", file=sys.stderr))
    result = {"code": 0, "over": False}

    def fail(message: str) -> None:
        if result["over"]:
            return
        result["over"] = True
        print(f"dopq gui: {message}", file=sys.stderr)
        result["code"] = 1
        app.exit(1)

    if shot:
        def grab() -> None:
            if result["over"]:
                return
            if window.grab().save(str(shot)):
                result["over"] = True
                print(f"dopq gui: saved {shot}")
                app.exit(0)
            else:
                fail(f"cannot write {shot}")

        settle = QTimer(window)  # let the docks lay out once more before the picture
        settle.setSingleShot(True)
        settle.setInterval(300)
        settle.timeout.connect(grab)
        window.refreshed.connect(lambda: settle.isActive() or settle.start())
        window.poller.unauthenticated.connect(
            lambda msg: fail(f"not signed in ({msg}); run `dopq login` first"))
        window.poller.untrusted.connect(lambda _kind, msg: fail(msg))
        deadline = QTimer(window)  # dies with the window: never fires after main returns
        deadline.setSingleShot(True)
        deadline.timeout.connect(lambda: fail(
            "cannot reach the server: " + (window.poller.last_error or "no answer")))
        deadline.start(int(SCREENSHOT_TIMEOUT * 1000))
    window.show()
    code = app.exec()
    result["over"] = True  # events still queued for the window must not act any more
    window.close()
    for timer in window.findChildren(QTimer):
        timer.stop()
    window.deleteLater()
    if tmp is not None:
        tmp.cleanup()
    if window.poller.isRunning():  # stuck in a network call: do not wait for its timeout
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or result["code"])
    return int(code or result["code"])

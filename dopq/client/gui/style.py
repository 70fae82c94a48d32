"""The window's look: a Qt style sheet file, reloaded when it changes.

The shipped themes are ``styles/dark.qss`` (default) and ``styles/light.qss``;
``--style FILE`` or the setting ``gui.style`` names a user's own copy (or
``dark`` / ``light``). The colours of job states are defined in the sheet too,
as properties of the hidden ``StateColors`` widget::

    StateColors {
        qproperty-failed: #ef5350;            /* text of a failed job's state */
        qproperty-failedBackground: #3a1f1f;  /* and its cell, if wanted */
    }

Keys: received, building, queued, held, running, succeeded, failed, cancelled
(jobs) and free, busy, running (GPUs). A key the sheet leaves out has no colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Property, QFileSystemWatcher, QObject, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QWidget

from dopq.client.gui.compat import emit

STYLES_DIR = Path(__file__).resolve().parent / "styles"
THEMES = ("dark", "light")
STATES = ("received", "building", "queued", "held", "running", "succeeded", "failed",
          "cancelled", "free", "busy")


def resolve_style(spec: str | None) -> Path:
    """A theme name or a file path -> the style sheet file (default: dark)."""
    if not spec or spec in THEMES:
        return STYLES_DIR / f"{spec or 'dark'}.qss"
    return Path(spec).expanduser().resolve()


def _color_property(key: str) -> Any:
    def get(self: StateColors) -> QColor:
        return QColor(self._colors.get(key) or QColor())

    def set_(self: StateColors, value: QColor) -> None:
        self._colors[key] = QColor(value)

    return Property(QColor, get, set_)


class StateColors(QWidget):
    """A hidden widget that only carries the state colours the style sheet sets."""

    received = _color_property("received")
    receivedBackground = _color_property("receivedBackground")
    building = _color_property("building")
    buildingBackground = _color_property("buildingBackground")
    queued = _color_property("queued")
    queuedBackground = _color_property("queuedBackground")
    held = _color_property("held")
    heldBackground = _color_property("heldBackground")
    running = _color_property("running")
    runningBackground = _color_property("runningBackground")
    succeeded = _color_property("succeeded")
    succeededBackground = _color_property("succeededBackground")
    failed = _color_property("failed")
    failedBackground = _color_property("failedBackground")
    cancelled = _color_property("cancelled")
    cancelledBackground = _color_property("cancelledBackground")
    free = _color_property("free")
    freeBackground = _color_property("freeBackground")
    busy = _color_property("busy")
    busyBackground = _color_property("busyBackground")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._colors: dict[str, QColor] = {}
        self.setObjectName("stateColors")
        self.hide()

    def reset(self) -> None:
        self._colors.clear()

    def colors(self) -> dict[str, tuple[QColor | None, QColor | None]]:
        """State -> (foreground, background); None where the sheet sets nothing."""
        out: dict[str, tuple[QColor | None, QColor | None]] = {}
        for state in STATES:
            fg = self._colors.get(state)
            bg = self._colors.get(state + "Background")
            if fg is not None or bg is not None:
                out[state] = (fg if fg is not None and fg.isValid() else None,
                              bg if bg is not None and bg.isValid() else None)
        return out


class StyleManager(QObject):
    """Applies a style sheet file to a window and reloads it when the file changes."""

    applied = Signal(str)  # the file now in use
    failed = Signal(str)  # a one-line reason the file could not be read

    def __init__(self, target: QWidget, colors: StateColors, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.target = target
        self.colors = colors
        self.path: Path | None = None
        self._text: str | None = None
        self.watcher = QFileSystemWatcher(self)
        self.watcher.fileChanged.connect(self._changed)
        self.watcher.directoryChanged.connect(self._changed)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(100)
        self._debounce.timeout.connect(self.reload)

    def load(self, spec: str | None) -> bool:
        """Use the named theme or file from now on (and watch it)."""
        path = resolve_style(spec)
        if self.watcher.files():
            self.watcher.removePaths(self.watcher.files())
        if self.watcher.directories():
            self.watcher.removePaths(self.watcher.directories())
        self.path = path
        if path.parent.is_dir():
            self.watcher.addPath(str(path.parent))  # editors replace files by renaming
        return self.reload(force=True)

    def reload(self, force: bool = False) -> bool:
        """Read the file again and apply it if it changed (or ``force``)."""
        if self.path is None:
            return False
        path = self.path
        if path.exists() and str(path) not in self.watcher.files():
            self.watcher.addPath(str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            emit(self.failed, f"style sheet {path}: {getattr(exc, 'strerror', None) or exc}")
            return False
        if text == self._text and not force:
            return True
        self._text = text
        self.colors.reset()
        self.target.setStyleSheet(text)
        style = self.colors.style()
        style.unpolish(self.colors)
        style.polish(self.colors)
        emit(self.applied, str(path))
        return True

    def _changed(self, _path: str) -> None:
        self._debounce.start()

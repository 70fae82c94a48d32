"""Small pictures in the tables: usage against share (Users), utilisation sparklines (System).

Both are item delegates painting into one column: the models stay plain
tables (``columns.py`` gives the columns a sortable value) and a picture
costs one paint per visible cell. ``UsageBars`` keeps the users' total usage
from the last snapshot; ``UtilHistory`` keeps the last ``HISTORY`` utilisation
readings of each GPU from successive snapshots, as the server's status holds
only the latest (and none where NVML does not read it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from PySide6.QtCore import QModelIndex, QObject, QPersistentModelIndex, QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPen, QPolygonF
from PySide6.QtWidgets import QStyledItemDelegate, QStyleOptionViewItem

from dopq.client.gui.compat import keep_none
from dopq.client.gui.models import ROW_ROLE
from dopq.client.gui.timeline import user_color

HISTORY = 120  # readings kept per GPU: two minutes at the default poll
Index = QModelIndex | QPersistentModelIndex


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v == v else None


def usage_part(row: Mapping[str, Any], total: float) -> float | None:
    """A user's part (0..1) of all the GPU-hours counted; None when nobody used any."""
    hours = _number(row.get("gpu_hours"))
    if hours is None or total <= 0:
        return None
    return min(1.0, max(0.0, hours / total))


def usage_text(row: Mapping[str, Any], total: float) -> str:
    part, share = usage_part(row, total), _number(row.get("share"))
    used = "-" if part is None else f"{100 * part:.0f}%"
    return f"{used} of {'-' if share is None else f'{100 * share:.0f}%'}"


class _Cell(QStyledItemDelegate):
    """The selection and alternating background, then ``draw`` paints the picture."""

    width = 120  # pixels the column asks for (``TablePanel.fit_columns``)

    def sizeHint(self, option: QStyleOptionViewItem, index: Index) -> QSize:  # noqa: N802
        hint = super().sizeHint(option, index)
        return QSize(max(hint.width(), self.width), hint.height())

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: Index) -> None:
        # The column's text is empty: the base class draws just the background. Not
        # ``option.widget``: PySide6 drops a reference to None on each read of it.
        keep_none()  # void QPainter calls (compat.keep_none)
        super().paint(painter, option, index)
        row = index.data(ROW_ROLE)
        if isinstance(row, Mapping):
            painter.save()
            painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
            rect = QRectF(option.rect).adjusted(4, 3, -4, -3)  # type: ignore[attr-defined]
            palette = option.palette  # type: ignore[attr-defined]
            self.draw(painter, rect, row, palette.color(palette.ColorRole.Text))
            painter.restore()

    def draw(self, painter: QPainter, rect: QRectF, row: Mapping[str, Any],
             text: QColor) -> None:
        raise NotImplementedError


class UsageBars(_Cell):
    """Users: a bar of the user's part of the usage, a mark at their share."""

    width = 190

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.total = 0.0

    def set_users(self, users: Any) -> None:
        rows = users if isinstance(users, list) else []
        self.total = sum(_number(r.get("gpu_hours")) or 0.0 for r in rows
                         if isinstance(r, Mapping))

    def draw(self, painter: QPainter, rect: QRectF, row: Mapping[str, Any],
             text: QColor) -> None:
        part, share = usage_part(row, self.total), _number(row.get("share"))
        room = painter.fontMetrics().horizontalAdvance("100% of 100%") + 8  # for the text
        track = QRectF(rect.left(), rect.top() + 1, max(8.0, rect.width() - room),
                       rect.height() - 2)
        painter.setPen(QPen(text, 1))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRect(track)
        if part:
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(user_color(str(row.get("user") or "")))
            painter.drawRect(QRectF(track.left(), track.top(), track.width() * part,
                                    track.height()))
        if share is not None:
            x = track.left() + track.width() * min(1.0, max(0.0, share))
            painter.setPen(QPen(text, 2))
            painter.drawLine(QPointF(x, track.top() - 1), QPointF(x, track.bottom() + 1))
        painter.setPen(text)
        painter.drawText(QRectF(track.right() + 6, rect.top(), room, rect.height()),
                         Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                         usage_text(row, self.total))


class UtilHistory:
    """The last ``HISTORY`` utilisation readings (percent) of each GPU."""

    def __init__(self, size: int = HISTORY) -> None:
        self.size = size
        self.readings: dict[int, deque[float]] = {}

    def add(self, gpus: Iterable[Any]) -> None:
        """One status's GPUs: a reading for each that has one; vanished GPUs forgotten."""
        seen = set()
        for g in gpus if isinstance(gpus, list) else ():
            if not isinstance(g, Mapping) or not isinstance(g.get("index"), int):
                continue
            seen.add(g["index"])
            value = _number(g.get("utilization"))
            if value is not None:
                self.readings.setdefault(g["index"], deque(maxlen=self.size)).append(
                    min(100.0, max(0.0, value)))
        for index in set(self.readings) - seen:
            del self.readings[index]

    def of(self, index: int) -> list[float]:
        return list(self.readings.get(index, ()))


def spark_points(values: list[float], rect: QRectF, size: int) -> list[QPointF]:
    """The line's points, newest at the right edge; 100% at the top."""
    step = rect.width() / max(1, size - 1)
    right = rect.right()
    n = len(values)
    return [QPointF(right - (n - 1 - i) * step, rect.bottom() - v / 100 * rect.height())
            for i, v in enumerate(values)]


class Sparklines(_Cell):
    """System: each GPU's recent utilisation as a line (none where NVML reads nothing)."""

    def __init__(self, history: UtilHistory, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.history = history

    def draw(self, painter: QPainter, rect: QRectF, row: Mapping[str, Any],
             text: QColor) -> None:
        index = row.get("index")
        values = self.history.of(index) if isinstance(index, int) else []
        if not values:
            painter.setPen(text)
            painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, "-")
            return
        points = spark_points(values, rect, self.history.size)
        fill = QColor(text)
        fill.setAlpha(50)
        area = QPolygonF([QPointF(points[0].x(), rect.bottom()), *points,
                          QPointF(points[-1].x(), rect.bottom())])
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(fill)
        painter.drawPolygon(area)
        painter.setPen(QPen(text, 1.2))
        painter.drawPolyline(QPolygonF(points))

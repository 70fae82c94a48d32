"""The GPU timeline: one row per GPU, a bar per job, coloured by its user.

The bars come with each snapshot (``timeline``: ``dopq.wire.views.TimelineBar``,
the running jobs and those finished in the last 24 hours). ``parse_bars``
reads them defensively: the list crosses the network, and a bad entry is
dropped, never a reason for the window to fail. The window shows the last
``span`` seconds up to the server's clock; the wheel, the +/- buttons and the
range box change ``span``. Drawn with ``QPainter``: only the bars in the
window are painted, so 5,000 bars cost a few milliseconds.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QPoint, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QMouseEvent, QPainter, QPaintEvent, QWheelEvent
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QToolButton,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from dopq.client.gui.compat import emit, keep_none
from dopq.core.jobs import format_duration
from dopq.core.text import printable

RANGES = (("1 hour", 3600.0), ("3 hours", 3 * 3600.0), ("6 hours", 6 * 3600.0),
          ("12 hours", 12 * 3600.0), ("24 hours", 86400.0))
MIN_SPAN, MAX_SPAN, DEFAULT_SPAN = 600.0, 86400.0, 86400.0
ZOOM = 1.5  # one +/- click or wheel notch
MAX_BARS = 5000  # the server's cap; more from a server is cut here
GUTTER, AXIS, LEGEND = 52, 18, 18  # pixels: the GPU labels, the time axis, the users


def user_color(user: str) -> QColor:
    """A stable colour for a user: the same on every run and every client."""
    h = zlib.crc32(user.encode("utf-8", "replace")) * 0x9E3779B1 >> 7
    # near hues happen: a second choice of saturation and brightness keeps most apart
    sat, val = ((110, 250), (170, 205), (230, 235), (150, 160))[(h >> 20) % 4]
    return QColor.fromHsv(h % 360, sat, val)


@dataclass(frozen=True, slots=True)
class Bar:
    id: int
    name: str
    user: str
    state: str
    gpus: tuple[int, ...]
    start: float
    end: float | None  # None: running


def parse_bars(raw: Any, limit: int = MAX_BARS,
               known: dict[int, tuple[Mapping[str, Any], Bar]] | None = None) -> list[Bar]:
    """The snapshot's ``timeline`` as bars; anything malformed is left out.

    ``known`` (id -> the entry and its bar, from the last call, updated here)
    spares re-reading the entries that did not change: most, between snapshots.
    """
    if not isinstance(raw, list):
        return []
    out = []
    seen: dict[int, tuple[Mapping[str, Any], Bar]] = {}
    for r in raw[:limit]:
        if not isinstance(r, Mapping):
            continue
        old = known.get(r.get("id")) if known is not None else None  # type: ignore[arg-type]
        bar = old[1] if old is not None and old[0] == r else _bar(r)
        if bar is not None:
            out.append(bar)
            seen[bar.id] = (r, bar)
    if known is not None:
        known.clear()
        known.update(seen)
    return out


def _bar(r: Mapping[str, Any]) -> Bar | None:
    try:
        start = float(r["start"])
        end = None if r.get("end") is None else float(r["end"])
        gpus = tuple(int(g) for g in r.get("gpus") or () if 0 <= int(g) < 4096)
        bar = Bar(int(r["id"]), printable(str(r.get("name") or ""))[:200],
                  printable(str(r.get("user") or "?"))[:64],
                  printable(str(r.get("state") or ""))[:16], gpus[:64], start, end)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if gpus and _plausible(start) and (end is None or _plausible(end)):
        return bar
    return None


def _plausible(ts: float) -> bool:
    """A Unix time a clock can show: no NaN, no infinity, no year 5000."""
    return 0.0 <= ts < 1e11


def _clock(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def bar_text(bar: Bar, now: float) -> str:
    """The hover text of one bar."""
    end = "running" if bar.end is None else f"{_clock(bar.end)} ({bar.state})"
    ran = format_duration(max(0.0, (bar.end if bar.end is not None else now) - bar.start))
    gpus = ", ".join(str(g) for g in bar.gpus)
    return (f"job {bar.id}: {bar.name}\nuser {bar.user}\nGPUs {gpus}\n"
            f"start {_clock(bar.start)}\nend {end}\nran {ran}")


class TimelineView(QWidget):
    """The painted timeline over ``[now - span, now]``."""

    span_changed = Signal(float)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("timelineView")
        self.setMouseTracking(True)
        self.setMinimumHeight(90)
        self.bars: list[Bar] = []
        self.gpus: list[int] = []
        self.now = 0.0
        self.span = DEFAULT_SPAN
        self._raw: Any = None
        self._known: dict[int, tuple[Mapping[str, Any], Bar]] = {}
        self._bar_gpus: set[int] = set()
        self._cache_key: Any = None
        self._cache: list[tuple[QRectF, Bar]] = []

    # -- data ------------------------------------------------------------------------------
    def set_bars(self, raw: Any, now: float | None = None) -> None:
        if raw != self._raw:  # the server's list changes only when a job starts or ends
            self._raw = raw
            self.bars = parse_bars(raw, known=self._known)
            self._bar_gpus = {g for b in self.bars for g in b.gpus}
            self._fit()
        if isinstance(now, int | float) and now == now:
            self.now = float(now)
        elif self.bars:
            self.now = max(self.now, max(b.end or b.start for b in self.bars))
        self.update()

    def set_gpus(self, indices: Iterable[int]) -> None:
        gpus = sorted({int(i) for i in indices})
        if gpus != self.gpus:
            self.gpus = gpus
            self._fit()
            self.update()

    def _fit(self) -> None:
        """Room for a readable lane per GPU (the dock grows to it)."""
        lane = self.fontMetrics().height() + 2
        self.setMinimumHeight(max(90, LEGEND + AXIS + lane * min(len(self.rows()), 16)))

    def rows(self) -> list[int]:
        """The GPUs shown: the server's, and any a bar ran on (a GPU since removed)."""
        return sorted(set(self.gpus) | self._bar_gpus)

    def visible(self) -> list[Bar]:
        t0 = self.now - self.span
        return [b for b in self.bars if (b.end if b.end is not None else self.now) >= t0
                and b.start <= self.now]

    def users(self) -> list[str]:
        return sorted({b.user for b in self.visible()})

    # -- zoom ------------------------------------------------------------------------------
    def set_span(self, seconds: float) -> None:
        span = min(MAX_SPAN, max(MIN_SPAN, float(seconds)))
        if span != self.span:
            self.span = span
            self.update()
            emit(self.span_changed, span)

    def zoom(self, steps: float) -> None:
        """Zoom in (``steps`` > 0: a shorter span) or out, around the present."""
        self.set_span(self.span / ZOOM ** steps)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802 - Qt's name
        notches = event.angleDelta().y() / 120
        if notches:
            self.zoom(notches)
        event.accept()

    # -- geometry --------------------------------------------------------------------------
    def _plot(self) -> QRectF:
        return QRectF(GUTTER, LEGEND, max(1, self.width() - GUTTER - 6),
                      max(1, self.height() - LEGEND - AXIS))

    def _x(self, ts: float, plot: QRectF) -> float:
        return plot.left() + (ts - (self.now - self.span)) / self.span * plot.width()

    def _rects(self) -> list[tuple[QRectF, Bar]]:
        """Each visible bar's rectangle on each of its GPUs (kept until anything moves)."""
        key = (id(self.bars), self.now, self.span, self.width(), self.height(), self.gpus)
        if key == self._cache_key:
            return self._cache
        plot = self._plot()
        rows = self.rows()
        out: list[tuple[QRectF, Bar]] = []
        if rows:
            lane = plot.height() / len(rows)
            height = max(2.0, lane - 4)
            tops = {g: plot.top() + n * lane + 2 for n, g in enumerate(rows)}
            now, t0, left, right = self.now, self.now - self.span, plot.left(), plot.right()
            scale = plot.width() / self.span
            for b in self.bars:
                end = now if b.end is None else b.end
                if end < t0 or b.start > now:
                    continue
                x0 = max(left, left + (b.start - t0) * scale)
                x1 = min(right, left + (end - t0) * scale)
                for g in b.gpus:
                    out.append((QRectF(x0, tops[g], max(2.0, x1 - x0), height), b))
        self._cache_key, self._cache = key, out
        return out

    def bar_at(self, pos: QPoint) -> Bar | None:
        """The bar under a point (the latest started, where shared GPUs overlap)."""
        hit = [b for r, b in self._rects() if r.contains(pos.toPointF())]
        return max(hit, key=lambda b: b.start) if hit else None

    def hover_text(self, pos: QPoint) -> str:
        bar = self.bar_at(pos)
        return bar_text(bar, self.now) if bar else ""

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802 - Qt's name
        text = self.hover_text(event.position().toPoint())
        if text:
            QToolTip.showText(event.globalPosition().toPoint(), text, self)
        else:
            QToolTip.hideText()

    # -- painting --------------------------------------------------------------------------
    def paintEvent(self, _event: QPaintEvent) -> None:  # noqa: N802 - Qt's name
        keep_none()  # thousands of void QPainter calls below (compat.keep_none)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        pal = self.palette()
        text, grid = pal.color(pal.ColorRole.WindowText), pal.color(pal.ColorRole.Mid)
        plot = self._plot()
        rows = self.rows()
        fm = self.fontMetrics()
        p.setPen(text)
        if not rows:
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no GPUs")
            p.end()
            return
        lane = plot.height() / len(rows)
        for n, g in enumerate(rows):  # GPU labels and lane lines
            top = plot.top() + n * lane
            p.setPen(text)
            p.drawText(QRectF(2, top, GUTTER - 6, lane),
                       Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, f"GPU {g}")
            p.setPen(grid)
            p.drawLine(int(plot.left()), int(top + lane), int(plot.right()), int(top + lane))
        self._paint_axis(p, plot, text, grid)
        groups: dict[tuple[str, bool], list[QRectF]] = {}  # one brush, one call per group
        for r, b in self._rects():
            groups.setdefault((b.user, b.end is None), []).append(r)
        colours = {u: user_color(u) for u, _ in groups}
        p.setPen(Qt.PenStyle.NoPen)
        for (user, running), rects in groups.items():
            p.setBrush(colours[user] if running else colours[user].darker(125))
            p.drawRects(rects)
        x = float(GUTTER)  # the legend: each user shown, as far as it fits
        for user in self.users():
            w = fm.horizontalAdvance(user) + 22
            if x + w > self.width():
                break
            p.setPen(Qt.PenStyle.NoPen)
            p.setBrush(colours.get(user) or user_color(user))
            p.drawRect(QRectF(x, 4, 10, 10))
            p.setPen(text)
            p.drawText(QRectF(x + 13, 0, w, LEGEND), Qt.AlignmentFlag.AlignVCenter, user)
            x += w
        p.end()

    def _paint_axis(self, p: QPainter, plot: QRectF, text: QColor, grid: QColor) -> None:
        """Ticks at round times: every 10 min up to every 4 h, about 6 across."""
        step = next((s for s in (600, 1800, 3600, 7200, 14400) if self.span / s <= 7), 14400)
        t = (self.now - self.span) // step * step + step
        while t <= self.now:
            x = self._x(t, plot)
            p.setPen(grid)
            p.drawLine(int(x), int(plot.top()), int(x), int(plot.bottom()))
            p.setPen(text)
            p.drawText(QRectF(x - 30, plot.bottom() + 1, 60, AXIS - 2),
                       Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop,
                       dt.datetime.fromtimestamp(t).strftime("%H:%M"))
            t += step


class TimelinePanel(QWidget):
    """The timeline with its zoom buttons and range box."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("timelinePanel")
        self.view = TimelineView(self)
        self.range = QComboBox(self)
        self.range.setObjectName("timelineRange")
        for title, seconds in RANGES:
            self.range.addItem(title, seconds)
        self.range.setCurrentIndex(len(RANGES) - 1)
        self.range.activated.connect(lambda i: self.view.set_span(float(self.range.itemData(i))))
        self.zoom_in = QToolButton(self)
        self.zoom_in.setText("+")
        self.zoom_in.setToolTip("zoom in (or the mouse wheel)")
        self.zoom_in.clicked.connect(lambda: self.view.zoom(1))
        self.zoom_out = QToolButton(self)
        self.zoom_out.setText("−")
        self.zoom_out.setToolTip("zoom out (at most the last 24 hours)")
        self.zoom_out.clicked.connect(lambda: self.view.zoom(-1))
        self.caption = QLabel(self)
        self.caption.setObjectName("countLabel")
        self.view.span_changed.connect(self._span_changed)
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(QLabel("Last", self))
        top.addWidget(self.range)
        top.addWidget(self.zoom_in)
        top.addWidget(self.zoom_out)
        top.addStretch(1)
        top.addWidget(self.caption)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(2)
        lay.addLayout(top)
        lay.addWidget(self.view, 1)
        self._span_changed(self.view.span)

    def apply(self, timeline: Any) -> None:
        """``{"bars": the snapshot's timeline, "now": its clock}`` from the ViewThread."""
        if not isinstance(timeline, Mapping):
            timeline = {}
        self.view.set_bars(timeline.get("bars"), timeline.get("now"))
        self.caption.setText(f"{len(self.view.visible())} jobs")

    def _span_changed(self, span: float) -> None:
        exact = [n for n, (_t, s) in enumerate(RANGES) if s == span]
        if exact:
            self.range.setCurrentIndex(exact[0])
        else:  # a zoom between the fixed ranges: shown as typed text
            self.range.setCurrentIndex(-1)
            self.range.setPlaceholderText(format_duration(span))
        self.caption.setText(f"{len(self.view.visible())} jobs")

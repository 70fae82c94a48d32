"""Widgets shared by the window and its dialogs: a filtered table, the system summary."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from PySide6.QtCore import QItemSelection, QItemSelectionModel, QModelIndex, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QSizePolicy,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from dopq.client.gui.columns import fmt_time
from dopq.client.gui.compat import emit
from dopq.client.gui.models import FilterProxy, RowModel
from dopq.core.jobs import format_duration
from dopq.wire.views import StatusView

TITLE_MARGIN = 26  # pixels beside a column title: the section's padding and a sort arrow


class TablePanel(QWidget):
    """A filter box, a row count and a sortable table over one ``RowModel``."""

    activated = Signal(object)  # the key of a double-clicked row

    def __init__(self, model: RowModel, name: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName(f"{name}Panel")
        self.model = model
        self.proxy = FilterProxy(model, self)
        self.filter = QLineEdit(self)
        self.filter.setObjectName("filterEdit")
        self.filter.setPlaceholderText("Filter (words, all must match)")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self.proxy.set_filter_text)
        self.count = QLabel(self)
        self.count.setObjectName("countLabel")

        self.view = QTableView(self)
        self.view.setObjectName(f"{name}Table")
        self.view.setModel(self.proxy)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setAlternatingRowColors(True)
        self.view.setWordWrap(False)
        self.view.setShowGrid(False)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        vh = self.view.verticalHeader()
        vh.hide()
        vh.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)  # no per-row measuring
        vh.setDefaultSectionSize(self.fontMetrics().height() + 8)
        hh = self.view.horizontalHeader()
        hh.setSectionsMovable(True)
        hh.setStretchLastSection(True)
        hh.setResizeContentsPrecision(64)  # measure a few rows, not 10,000
        hh.setSortIndicatorClearable(True)
        hh.setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.view.setSortingEnabled(True)
        self.view.doubleClicked.connect(self._double_clicked)
        self.fit_columns()  # to the titles until rows arrive
        self._sized = False

        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(self.filter, 1)
        top.addWidget(self.count)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(2)
        lay.addLayout(top)
        lay.addWidget(self.view, 1)
        # the proxy drops rows before the source has (rowsAboutToBeRemoved): count after both
        for m in (self.proxy, model):
            for sig in (m.rowsInserted, m.rowsRemoved, m.modelReset, m.layoutChanged):
                sig.connect(self._count_changed)
        self._count_changed()

    # -- rows ------------------------------------------------------------------------------
    def selected_keys(self) -> list[Hashable]:
        """Keys of the selected rows, top to bottom as shown."""
        rows = sorted(ix.row() for ix in self.view.selectionModel().selectedRows())
        return [self.proxy.key_at(r) for r in rows]

    def select_keys(self, keys: Iterable[Hashable]) -> None:
        selection = QItemSelection()
        last = self.proxy.columnCount() - 1
        current = QModelIndex()
        for key in keys:
            src = self.model.row_of(key)
            if src < 0:
                continue
            ix = self.proxy.mapFromSource(self.model.index(src, 0))
            if ix.isValid():
                selection.select(ix, self.proxy.index(ix.row(), last))
                current = current if current.isValid() else ix
        flags = (QItemSelectionModel.SelectionFlag.ClearAndSelect
                 | QItemSelectionModel.SelectionFlag.Rows)
        sm = self.view.selectionModel()
        sm.select(selection, flags)
        if current.isValid():
            sm.setCurrentIndex(current, QItemSelectionModel.SelectionFlag.NoUpdate)
            self.view.scrollTo(current)

    def _double_clicked(self, index: QModelIndex) -> None:
        if index.isValid():
            emit(self.activated, self.proxy.key_at(index.row()))

    def _count_changed(self, *_: Any) -> None:
        shown, total = self.proxy.rowCount(), self.model.rowCount()
        self.count.setText(f"{total}" if shown == total else f"{shown} of {total}")
        if total and not self._sized:
            self._sized = True
            self.fit_columns()

    def fit_columns(self) -> None:
        """Each column as wide as its cells (a few rows measured) or its title.

        Not ``resizeColumnsToContents``: with sorting on, Qt widens every title
        by the room of a sort arrow, which makes short numeric columns twice as
        wide as they need be; here a title gets a small margin instead.
        """
        hh = self.view.horizontalHeader()
        fm = hh.fontMetrics()
        for c in range(self.proxy.columnCount()):
            title = str(self.proxy.headerData(c, Qt.Orientation.Horizontal) or "")
            hh.resizeSection(c, max(self.view.sizeHintForColumn(c),
                                    fm.horizontalAdvance(title) + TITLE_MARGIN))

    # -- layout memory ---------------------------------------------------------------------
    def header_state(self) -> bytes:
        return bytes(self.view.horizontalHeader().saveState().data())

    def restore_header(self, state: Any) -> None:
        if state:
            self._sized = self.view.horizontalHeader().restoreState(state)


class SummaryPanel(QWidget):
    """Server name and version, queue/provider/engine state, uptime and job counts."""

    FIELDS = (("name", "Server"), ("version", "Version"), ("queue_state", "Queue"),
              ("provider_state", "Provider"), ("engine_state", "Docker engine"),
              ("uptime", "Uptime"), ("started", "Started"), ("policy", "Policy"),
              ("gpu_backend", "GPUs"), ("counts", "Jobs"))

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("summaryPanel")
        grid = QGridLayout(self)
        grid.setContentsMargins(6, 4, 6, 4)
        grid.setHorizontalSpacing(12)
        grid.setVerticalSpacing(2)
        self.values: dict[str, QLabel] = {}
        for n, (key, title) in enumerate(self.FIELDS):
            k = QLabel(title, self)
            k.setObjectName("summaryKey")
            v = QLabel("-", self)
            v.setObjectName("summaryValue")
            v.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            # a long value (the job counts) must not widen the dock: wrap it instead
            v.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
            v.setWordWrap(True)
            row, pair = divmod(n, 2)
            grid.addWidget(k, row, pair * 2)
            grid.addWidget(v, row, pair * 2 + 1)
            self.values[key] = v
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)

    def show_status(self, s: StatusView) -> None:
        counts = s.get("counts") or {}
        provider = s.get("provider_state")
        if provider and s.get("provider_restarts"):
            provider = f"{provider} ({s['provider_restarts']} restarts)"
        text = {
            "name": s.get("name"),
            "version": s.get("version"),
            "queue_state": s.get("queue_state"),
            "provider_state": provider,
            "engine_state": s.get("engine_state"),
            "uptime": format_duration(s.get("uptime_s")),
            "started": fmt_time(s.get("started_at")),
            "policy": s.get("policy"),
            "gpu_backend": f"{len(s.get('gpus') or ())} via {s.get('gpu_backend', '?')}"
            + (f" ({s['gpu_mode']})" if s.get("gpu_mode") else ""),
            "counts": "  ".join(f"{k} {v}" for k, v in counts.items() if v) or "none",
        }
        for key, label in self.values.items():
            value = text.get(key)
            label.setText("-" if value is None else str(value))


class SystemPanel(QWidget):
    """The System view: the summary above the GPU table."""

    def __init__(self, model: RowModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.summary = SummaryPanel(self)
        self.table = TablePanel(model, "system", self)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        lay.addWidget(self.summary)
        lay.addWidget(self.table, 1)

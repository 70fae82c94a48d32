"""Table models for the five views, and the filter proxy in front of each.

``RowModel`` holds the rows of one view keyed by a stable id (job id, user
name, GPU index) and applies a new list of rows as a *diff*: changed rows get
``dataChanged``, vanished rows ``removeRows``, new rows ``insertRows``, and a
changed order a ``layoutChanged`` that moves the persistent indexes with their
rows. Whatever the change, it costs a constant number of signals, so the views'
selection, current row and scroll position survive a refresh of 10,000 rows.

Sorting is done here, in Python, with one ``list.sort`` per refresh:
``FilterProxy.sort`` forwards the header click to the source model and keeps
no sort of its own (a C++ proxy sort would call ``data()`` back into Python
for every comparison). The proxy only filters, against a cached lower-case
text of each row.

The columns of each view are in ``columns.py``. No widget code: the colours
for job states arrive as a plain dict (``set_state_colors``), read by the
window from the style sheet.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QModelIndex,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
)
from PySide6.QtGui import QColor

from dopq.client.gui.columns import (
    FINISHED_COLUMNS,
    GPU_COLUMNS,
    JOB_SEARCH,
    QUEUED_COLUMNS,
    RUNNING_COLUMNS,
    USER_COLUMNS,
    Column,
    Row,
    queued_tip,
    wrap_tip,
)
from dopq.client.gui.compat import emit

Index = QModelIndex | QPersistentModelIndex

KEY_ROLE = Qt.ItemDataRole.UserRole + 1  # the row's key (job id, user, GPU index)
ROW_ROLE = Qt.ItemDataRole.UserRole + 2  # the whole row dict
RUN_GROUPING = 16  # more changed runs than this: one dataChanged over their span


# -- the model -----------------------------------------------------------------------------
class RowModel(QAbstractTableModel):
    """Rows of one view, keyed by ``key_field``, updated in place by ``apply``."""

    columns: tuple[Column, ...] = ()
    key_field = "id"
    # the fields whose change re-formats the filter text (empty: any field)
    search_fields: tuple[str, ...] = ()

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._keys: list[Hashable] = []
        self._rows: dict[Hashable, Row] = {}
        self._pos: dict[Hashable, int] = {}
        self._search: dict[Hashable, tuple[Any, str]] = {}
        self._colors: dict[str, tuple[QColor | None, QColor | None]] = {}
        self._sort_column = -1
        self._sort_order = Qt.SortOrder.AscendingOrder
        self._server_order: list[Hashable] = []
        self._coloured = tuple(i for i, c in enumerate(self.columns) if c.coloured)

    # -- Qt model interface ----------------------------------------------------------------
    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._keys)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return None
        c = self.columns[section]
        if role == Qt.ItemDataRole.DisplayRole:
            return c.title
        if role == Qt.ItemDataRole.ToolTipRole and c.tip:
            return c.tip
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(c.align)
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        r = index.row()
        if not 0 <= r < len(self._keys):
            return None
        key = self._keys[r]
        row = self._rows[key]
        c = self.columns[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return c.display(row)
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(c.align)
        if role in (Qt.ItemDataRole.ForegroundRole, Qt.ItemDataRole.BackgroundRole):
            if not c.coloured:
                return None
            fg, bg = self._colors.get(str(c.value(row)), (None, None))
            return fg if role == Qt.ItemDataRole.ForegroundRole else bg
        if role == Qt.ItemDataRole.ToolTipRole:
            text = c.display(row)
            return wrap_tip(text) if len(text) > 40 else None
        if role == KEY_ROLE:
            return key
        if role == ROW_ROLE:
            return row
        return None

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        """Sort by a column; -1 restores the order the server sent."""
        self._sort_column = column if 0 <= column < len(self.columns) else -1
        self._sort_order = order
        order_keys = self._ordered(self._server_order, self._rows)
        if order_keys != self._keys:
            self._relayout(order_keys)

    # -- reading ---------------------------------------------------------------------------
    def key_at(self, row: int) -> Hashable:
        return self._keys[row]

    def row_of(self, key: Hashable) -> int:
        """The row that shows ``key``, or -1."""
        return self._pos.get(key, -1)

    def get(self, key: Hashable) -> Row | None:
        return self._rows.get(key)

    def keys(self) -> list[Hashable]:
        return list(self._keys)

    def rows(self) -> list[Row]:
        return [self._rows[k] for k in self._keys]

    def search_text(self, row: int) -> str:
        """The row's cells joined and lower-cased, for the filter box.

        Cached per row and rebuilt only when one of ``search_fields`` changed:
        times that tick every second (waiting, running) would otherwise make
        every refresh re-format every cell of every row while a filter is set.
        """
        key = self._keys[row]
        r = self._rows[key]
        sig = tuple(r.get(f) for f in self.search_fields) if self.search_fields else r
        cached = self._search.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        text = "\x1f".join(c.display(r) for c in self.columns if c.searchable).lower()
        self._search[key] = (sig, text)
        return text

    # -- colours ---------------------------------------------------------------------------
    def set_state_colors(self, colors: dict[str, tuple[QColor | None, QColor | None]]) -> None:
        """Foreground and background per state key (from the style sheet)."""
        self._colors = dict(colors)
        if self._keys and self._coloured:
            last = len(self._keys) - 1
            for c in self._coloured:
                emit(self.dataChanged, self.index(0, c), self.index(last, c),
                     [Qt.ItemDataRole.ForegroundRole, Qt.ItemDataRole.BackgroundRole])

    # -- applying a new list of rows -------------------------------------------------------
    def apply(self, rows: Sequence[Row]) -> None:
        """Show ``rows`` (in the server's order), changing only what changed."""
        kf = self.key_field
        new: dict[Hashable, Row] = {r[kf]: r for r in rows}
        self._server_order = list(new)
        target = self._ordered(self._server_order, new)
        old_rows = self._rows
        if target == self._keys:
            changed = [i for i, k in enumerate(target)
                       if new[k] is not old_rows[k] and new[k] != old_rows[k]]
            self._rows = new
            self._emit_changed(changed)
            return

        self._remove([k for k in self._keys if k not in new])
        # the survivors, in their new relative order, with their new data
        survivors = [k for k in target if k in old_rows]
        if survivors != self._keys:
            self._relayout(survivors)
        changed_keys = [k for k in survivors
                        if new[k] is not old_rows[k] and new[k] != old_rows[k]]
        for k in survivors:
            self._rows[k] = new[k]
        self._insert(target, new)
        self._emit_changed(sorted(self._pos[k] for k in changed_keys))

    def clear(self) -> None:
        self.apply([])

    # -- internals -------------------------------------------------------------------------
    def _ordered(self, server_order: list[Hashable], rows: dict[Hashable, Row]) -> list[Hashable]:
        if self._sort_column < 0:
            return list(server_order)
        value = self.columns[self._sort_column].value
        desc = self._sort_order == Qt.SortOrder.DescendingOrder

        def key(k: Hashable) -> tuple[bool, Any]:
            v = value(rows[k])
            return (v is not None, v) if desc else (v is None, v)

        try:
            return sorted(server_order, key=key, reverse=desc)
        except TypeError:  # mixed types in one column: compare as text
            return sorted(server_order, key=lambda k: str(value(rows[k])), reverse=desc)

    def _remove(self, gone: list[Hashable]) -> None:
        """Remove rows: run by run if they are few runs, else moved to the end first."""
        if not gone:
            return
        runs = _runs(sorted(self._pos[k] for k in gone))
        if len(runs) > RUN_GROUPING:
            gone_set = set(gone)
            self._relayout([k for k in self._keys if k not in gone_set] + gone)
            runs = [[len(self._keys) - len(gone), len(self._keys) - 1]]
        for a, b in reversed(runs):
            self.beginRemoveRows(QModelIndex(), a, b)
            for k in self._keys[a:b + 1]:
                del self._rows[k]
                self._search.pop(k, None)
            del self._keys[a:b + 1]
            self.endRemoveRows()
        self._pos = {k: i for i, k in enumerate(self._keys)}

    def _insert(self, target: list[Hashable], new: dict[Hashable, Row]) -> None:
        """Insert the rows of ``target`` not shown yet, at their places in it."""
        added = [i for i, k in enumerate(target) if k not in self._rows]
        if not added:
            return
        runs = _runs(added)
        if len(runs) > RUN_GROUPING:  # append them all, then one move into place
            first = len(self._keys)
            runs = [[first, first + len(added) - 1]]
            keys = [target[i] for i in added]
        else:
            keys = []
        for a, b in runs:
            block = keys or target[a:b + 1]
            self.beginInsertRows(QModelIndex(), a, b)
            for k in block:
                self._rows[k] = new[k]
            self._keys[a:a] = block
            self.endInsertRows()
        self._pos = {k: i for i, k in enumerate(self._keys)}
        if self._keys != target:
            self._relayout(target)

    def _relayout(self, new_keys: list[Hashable]) -> None:
        """Reorder rows (``new_keys`` is a permutation), moving persistent indexes along."""
        emit(self.layoutAboutToBeChanged)
        old_keys = self._keys
        self._keys = list(new_keys)
        self._pos = {k: i for i, k in enumerate(self._keys)}
        before = self.persistentIndexList()
        if before:
            after = [self.index(self._pos[old_keys[ix.row()]], ix.column())
                     if 0 <= ix.row() < len(old_keys) else QModelIndex() for ix in before]
            self.changePersistentIndexList(before, after)
        emit(self.layoutChanged)

    def _emit_changed(self, rows: list[int]) -> None:
        """One dataChanged per run of adjacent rows, or one over the span if many."""
        if not rows:
            return
        last_col = len(self.columns) - 1
        runs = _runs(rows)
        if len(runs) > RUN_GROUPING:
            runs = [[rows[0], rows[-1]]]
        for a, b in runs:
            emit(self.dataChanged, self.index(a, 0), self.index(b, last_col))


def _runs(rows: list[int]) -> list[list[int]]:
    """Sorted row numbers -> [first, last] of each run of adjacent rows."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return runs


def may_act(whoami: Mapping[str, Any], rows: Sequence[Row]) -> bool:
    """Whether the signed-in user may cancel or edit all these jobs: theirs, or any as admin."""
    if whoami.get("role") == "admin":
        return True
    user = whoami.get("user")
    return bool(user) and all(r.get("user") == user for r in rows)


class RunningModel(RowModel):
    search_fields = JOB_SEARCH
    columns = RUNNING_COLUMNS


class QueuedModel(RowModel):
    search_fields = JOB_SEARCH
    columns = QUEUED_COLUMNS

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.ToolTipRole and 0 <= index.row() < len(self._keys):
            return queued_tip(self._rows[self._keys[index.row()]])  # the whole row
        return super().data(index, role)


class FinishedModel(RowModel):
    search_fields = JOB_SEARCH
    columns = FINISHED_COLUMNS


class UsersModel(RowModel):
    columns = USER_COLUMNS
    key_field = "user"


class GpuModel(RowModel):
    """The System view's table: one row per GPU with its holder."""

    columns = GPU_COLUMNS
    key_field = "index"


MODEL_CLASSES: dict[str, type[RowModel]] = {
    "running": RunningModel,
    "queued": QueuedModel,
    "finished": FinishedModel,
    "users": UsersModel,
    "system": GpuModel,
}


# -- the proxy -----------------------------------------------------------------------------
class FilterProxy(QSortFilterProxyModel):
    """Filters rows by words (all must appear); sorting is forwarded to the source."""

    def __init__(self, source: RowModel, parent: Any = None) -> None:
        super().__init__(parent)
        self._terms: tuple[str, ...] = ()
        self.setSourceModel(source)

    def source(self) -> RowModel:
        src = self.sourceModel()
        assert isinstance(src, RowModel)
        return src

    def set_filter_text(self, text: str) -> None:
        terms = tuple(text.lower().split())
        if terms == self._terms:
            return
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.10
            self.beginFilterChange()
            self._terms = terms
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._terms = terms
            self.invalidateRowsFilter()

    def filter_text(self) -> str:
        return " ".join(self._terms)

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:
        if not self._terms:
            return True
        text = self.source().search_text(source_row)
        return all(t in text for t in self._terms)

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        self.source().sort(column, order)

    def key_at(self, proxy_row: int) -> Hashable:
        return self.source().key_at(self.mapToSource(self.index(proxy_row, 0)).row())

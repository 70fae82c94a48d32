"""The GUI's side of preemption (issue #14): a Restarts column in the Running and
Queued views, and a job's preemption in its details. No server, no widgets."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6.QtWidgets")

from dopq.client.gui.columns import QUEUED_COLUMNS, RUNNING_COLUMNS, restarts_text  # noqa: E402
from dopq.client.gui.details import JobDialog  # noqa: E402


@pytest.mark.parametrize(("row", "text"), [
    ({}, "-"), ({"preemptible": True}, "0"), ({"preemptible": True, "restarts": 2}, "2"),
    ({"restarts": 1}, "1"),
])
def test_restarts_text(row: dict[str, Any], text: str) -> None:
    assert restarts_text(row) == text


def test_running_and_queued_views_have_a_restarts_column() -> None:
    for columns in (RUNNING_COLUMNS, QUEUED_COLUMNS):
        column = next(c for c in columns if c.title == "Restarts")
        assert column.display({"restarts": 1, "preemptible": True}) == "1"
        assert column.display({"restarts": 0}) == "-"
        assert "preempted" in column.tip


def test_details_show_preemption() -> None:
    fields = dict(JobDialog.FIELDS)
    assert (fields["preemptible"], fields["restarts"], fields["preempted_by"]) == (
        "Preemptible", "Restarts", "Preempted for job")


def test_submit_dialog_asks_preemptible(qtbot: Any) -> None:
    from dopq.client.gui.dialogs import SubmitDialog

    dialog = SubmitDialog()
    qtbot.addWidget(dialog)
    assert "preemptible" not in dialog.options()  # the job folder's, else the server's
    dialog.preemptible.setCurrentIndex(1)
    assert dialog.options()["preemptible"] is True
    dialog.preemptible.setCurrentIndex(2)
    assert dialog.options()["preemptible"] is False

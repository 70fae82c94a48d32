"""dopq report's arithmetic (dopq.core.accounting), pure."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from dopq.core import accounting as acc
from dopq.core.errors import DopqError

GIB = 2**30
NOV = datetime(2026, 11, 10, tzinfo=UTC).timestamp()
DEC = datetime(2026, 12, 2, tzinfo=UTC).timestamp()


def job(user: str = "ann", state: str = "succeeded", start: float = NOV, hours: float = 1.0,
        wait: float = 60.0, **kw: Any) -> dict[str, Any]:
    return {"user": user, "state": state, "queued_at": start - wait, "started_at": start,
            "finished_at": start + hours * 3600, "num_gpus": 1, "gpus": [0],
            "gpu_memory": 0, "gpu_utilisation": None, **kw}


def test_whole_and_shared_gpus_count_as_fractions() -> None:
    mem = {0: 80 * GIB, 1: 80 * GIB}
    rows = [job(gpus=[0, 1], num_gpus=2, hours=2),            # 4 GPU-hours
            job(gpu_memory=20 * GIB, hours=4),                 # a quarter for 4 h: 1
            job(gpu_memory=20 * GIB, gpus=[7], hours=1)]       # unknown device: whole
    (line,) = acc.report(rows, acc.GroupBy.USER, mem)
    assert line["gpu_hours"] == pytest.approx(6.0)
    assert line["cpu_hours"] == 0


def test_cpu_only_hours_and_endings() -> None:
    rows = [job(num_gpus=0, gpus=[], hours=3), job(state="failed", hours=1),
            job(state="cancelled", started_at=None, queued_at=NOV)]
    (line,) = acc.report(rows, acc.GroupBy.USER)
    assert line["cpu_hours"] == pytest.approx(3.0)
    assert line["gpu_hours"] == pytest.approx(1.0)
    assert (line["jobs"], line["succeeded"], line["failed"], line["cancelled"]) == (3, 1, 1, 1)
    assert line["wait_mean"] == 60.0  # the cancelled job never started: no wait sample


def test_p90_nearest_rank() -> None:
    assert acc.percentile([], 0.9) is None
    assert acc.percentile([5.0], 0.9) == 5.0
    assert acc.percentile([float(i) for i in range(1, 11)], 0.9) == 9.0
    rows = [job(wait=w) for w in (10, 20, 30, 40, 50, 60, 70, 80, 90, 1000)]
    (line,) = acc.report(rows, acc.GroupBy.USER)
    assert line["wait_p90"] == 90.0
    assert line["wait_mean"] == pytest.approx(145.0)


def test_months_are_utc_and_grouping() -> None:
    late = datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()
    rows = [job(start=late - 3600, hours=1), job(start=late, hours=1),  # ends 1 Dec 00:30 UTC
            job(user="bob", start=DEC)]
    by_month = acc.report(rows, acc.GroupBy.MONTH)
    assert [(r["month"], r["jobs"]) for r in by_month] == [("2026-11", 1), ("2026-12", 2)]
    both = acc.report(rows, acc.GroupBy.USER_MONTH)
    assert [(r["user"], r["month"]) for r in both] == [
        ("ann", "2026-11"), ("ann", "2026-12"), ("bob", "2026-12")]
    assert all(r["month"] == "" for r in acc.report(rows, acc.GroupBy.USER))


def test_efficiency_is_weighted_by_gpu_hours() -> None:
    rows = [job(hours=3, gpu_utilisation=90.0), job(hours=1, gpu_utilisation=10.0),
            job(hours=100, gpu_utilisation=None)]  # not measured: left out, not zero
    (line,) = acc.report(rows, acc.GroupBy.USER)
    assert line["efficiency"] == pytest.approx(70.0)
    (none,) = acc.report([job()], acc.GroupBy.USER)
    assert none["efficiency"] is None


def test_dates_and_window() -> None:
    assert acc.parse_date("2026-11") == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert acc.parse_date("2026-11", end=True) == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert acc.parse_date("2026-11-30", end=True) == DEC - 86400
    for bad in ("2026-13", "2026-02-30", "yesterday", "2026-1-1", "x" * 5000):
        with pytest.raises(DopqError) as e:
            acc.parse_date(bad)
        assert "\n" not in str(e.value) and len(str(e.value)) < 120
    assert acc.in_window(job(), acc.parse_date("2026-11"), acc.parse_date("2026-11", end=True))
    assert not acc.in_window(job(start=DEC), None, acc.parse_date("2026-11", end=True))
    assert not acc.in_window({"finished_at": None}, None, None)


def test_group_by_words() -> None:
    assert acc.group_by(None) is acc.GroupBy.USER
    assert acc.group_by("month,user") is acc.GroupBy.USER_MONTH
    with pytest.raises(DopqError, match="use user, month or user,month"):
        acc.group_by("gpu")

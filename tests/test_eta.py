"""When will my job start (issue 11, items 12-13): dopq.core.eta, and where it shows.

Pure tests of :func:`dopq.core.eta.estimate` on a fake 2-GPU state with exact
times and words; then through a real server (``dopq queue --json``, the table,
``dopq show``), the GUI's Queued model, and the store's record of estimates.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, cli_login, run_cli, wait_for
from hostile import good_job

from dopq.core.eta import (
    STARTING,
    RunTimes,
    estimate,
    short_duration,
    start_text,
    typical_run_times,
)
from dopq.core.jobs import JobState
from dopq.core.policy import ClusterState, PolicyConfig, QueuedJob, RunningJob
from dopq.server.store import Store

CFG = PolicyConfig().validate()
NOW = 1000.0


def rel(ts: float, now: float) -> str:
    """Times as seconds from now, so the words are exact in any time zone."""
    return f"+{int(ts - now)}"


def est(state: ClusterState, runtimes: RunTimes | None = None, **kw: Any) -> dict[int, Any]:
    return {k: (v.start, v.reason)
            for k, v in estimate(state, NOW, CFG, runtimes, when=rel, **kw).items()}


# -- pure ---------------------------------------------------------------------------------
def busy_machine() -> ClusterState:
    """2 GPUs, both busy until 3600 (job 1) and 2200 (job 2), five jobs queued."""
    return ClusterState(
        queued=[
            QueuedJob(10, "carol", 2, 100.0),  # head: reserves both GPUs
            QueuedJob(11, "dave", 1, 200.0, held=True),
            QueuedJob(12, "erin", 1, 300.0, 3000.0, after=(2,)),  # after the running job 2
            QueuedJob(13, "frank", 1, 400.0, 600.0),  # short: backfills when job 2 ends
            QueuedJob(14, "gina", 1, 500.0),  # no limit: waits for job 10
        ],
        running=[RunningJob(1, "alice", 1, (0,), 0.0, 3600.0),
                 RunningJob(2, "bob", 1, (1,), 400.0, 1800.0)],
        free_gpus=frozenset(), total_gpus=2,
    )


def test_times_and_words_on_a_busy_machine() -> None:
    out = est(busy_machine(), RunTimes({"carol": 1000.0}))
    assert out == {
        # both GPUs free at 3600, when job 1 reaches its limit
        10: (3600.0, "Resources: 2 GPUs busy until ~+2600 (jobs 1, 2)"),
        11: (None, "Held"),
        # job 2 ends at 2200, but 2200 + 3000 is past the reservation: after job 10 (1000 s)
        12: (4600.0, "Dependency: job 2 (running)"),
        # backfills at 2200 on GPU 1: 2200 + 600 ends before job 10's start at 3600
        13: (2200.0, "Priority: 2 jobs ahead"),
        14: (4600.0, "Priority: 3 jobs ahead"),
    }


def test_reservation_and_backfill_now() -> None:
    state = ClusterState(
        queued=[QueuedJob(10, "carol", 2, 100.0), QueuedJob(11, "dave", 1, 200.0),
                QueuedJob(12, "erin", 1, 300.0, 1200.0)],
        running=[RunningJob(1, "alice", 1, (0,), 0.0, 3600.0)],
        free_gpus=frozenset({1}), total_gpus=2,
    )
    out = est(state, RunTimes({"carol": 500.0, "dave": 100.0}))
    assert out == {
        10: (3600.0, "Resources: 1 GPU busy until ~+2600 (job 1)"),
        # GPU 1 is free, but held for job 10; job 11 has no time limit
        11: (4100.0, "Reserved: GPU 1 is held for job 10 (starts ~+2600); "
                     "a time limit under 43m would let this job use it now"),
        12: (NOW, STARTING),  # 1000 + 1200 ends before 3600: backfills now
    }


def test_unknown_ends_give_null_with_the_reason() -> None:
    state = ClusterState(
        queued=[QueuedJob(10, "carol", 1, 100.0), QueuedJob(11, "dave", 1, 200.0, after=(99,)),
                QueuedJob(12, "erin", 1, 300.0, after=(10,))],
        running=[RunningJob(1, "alice", 1, (0,), 0.0), RunningJob(2, "bob", 1, (1,), 0.0)],
        free_gpus=frozenset(), total_gpus=2,
    )
    out = est(state)
    assert out[10] == (None, "Resources: 1 GPU busy (jobs 1, 2: no time limit, end unknown)")
    assert out[11] == (None, "Dependency: job 99 (not finished); start unknown "
                             "(jobs 1, 2: no time limit, no typical run)")
    assert out[12] == (None, "Dependency: job 10 (queued); start unknown "
                             "(jobs 1, 2: no time limit, no typical run)")
    # the users' typical run times, else the server's default, give them an end:
    # job 1 ends at 1500, job 2 at 3000; job 10 runs 1500-4500, then job 12
    out = est(state, RunTimes({"alice": 1500.0}, default=3000.0))
    assert out[10] == (1500.0, "Resources: 1 GPU busy until ~+500 (job 1)")
    assert out[12] == (4500.0, "Dependency: job 10 (queued)")
    out = est(state, RunTimes({"alice": 1500.0, "carol": 100.0}, default=3000.0))
    assert out[12][0] == 1600.0


def test_words_for_limits_capacity_and_failed_dependencies() -> None:
    cfg = PolicyConfig(max_running_per_user=1).validate()
    state = ClusterState(
        queued=[QueuedJob(10, "alice", 1, 100.0, 600.0), QueuedJob(11, "bob", 4, 200.0),
                QueuedJob(12, "carol", 1, 300.0, after=(5,))],
        running=[RunningJob(1, "alice", 1, (0,), 0.0, 3600.0)],
        free_gpus=frozenset({1}), total_gpus=2, finished_states={5: JobState.FAILED},
    )
    out = {k: (v.start, v.reason) for k, v in estimate(state, NOW, cfg, when=rel).items()}
    assert out[10] == (3600.0, "User limit: alice has 1 job running (at most 1)")
    assert out[11][1].startswith("Resources: needs 4 GPUs, the machine has 2")
    assert out[12][1].startswith("Dependency: job 5 (failed)")


def test_the_simulation_is_bounded() -> None:
    queued = [QueuedJob(100 + i, f"u{i % 7}", 1, float(i), 60.0) for i in range(300)]
    state = ClusterState(queued, [], frozenset({0, 1}), total_gpus=2)
    out = est(state, max_events=20, window=8)
    known = [j for j, (start, _) in out.items() if start is not None]
    assert 20 <= len(known) < 300
    last = out[399]
    assert last[0] is None and "beyond 20 simulated events" in last[1]
    assert last[1].startswith("Priority: 299 jobs ahead")
    full = est(state)  # the default bound reaches all 300 (150 events)
    assert full[399][0] == NOW + 149 * 60.0


def test_helpers() -> None:
    assert short_duration(2580) == "43m" and short_duration(7500) == "2h05m"
    assert short_duration(2 * 86400 + 3 * 3600) == "2d03h"
    assert typical_run_times([("Ana", 10.0), ("ana", 30.0), ("bo", 5.0), ("ana", 20.0)]) \
        == {"ana": 20.0, "bo": 5.0}
    assert start_text(None, 0.0) == "-"
    now = time.time()
    soon = dt.datetime.fromtimestamp(now + 600, dt.UTC).isoformat().replace("+00:00", "Z")
    assert start_text(soon, now) == "~" + time.strftime("%H:%M", time.localtime(now + 600)) \
        or start_text(soon, now).startswith("~")  # past midnight: a date comes first
    assert start_text(soon, now + 700) == "~now"


def test_store_migrates_and_keeps_estimates(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    try:
        cols = [r[1] for r in store.read("PRAGMA table_info(jobs)")]
        assert "expected_start_first" in cols and "expected_start_last" in cols
    finally:
        store.close()


def test_bench_eta_quick(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "eta.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_eta.py"), "--quick",
                           "--json", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [c["queued"] for c in r["cost"]] == [1000, 10_000]
    assert {a["trace"] for a in r["accuracy"]} >= {"mixed_day.jsonl"}
    assert all(a["median_s"] is not None for a in r["accuracy"])


# -- through the server ---------------------------------------------------------------------
@pytest.fixture
def signed_in(server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Running:
    cli_login(server, monkeypatch, tmp_path)
    return server


def run(capsys: Any, *argv: str) -> tuple[int, str]:
    code, out, _err = run_cli(capsys, *argv)
    return code, out


def test_queue_shows_expected_start_and_words(signed_in: Running, capsys: Any,
                                              jobs_dir: Path) -> None:
    capsys.readouterr()
    big = good_job(jobs_dir, "alice", "eta-big", "sleep 60", num_gpus=2)
    code, out = run(capsys, "submit", str(big), "--json", "--time-limit", "10m")
    assert code == 0
    a = json.loads(out)["id"]
    wait_for(lambda: signed_in["alice"].call("job", a)["state"] == "running", 60)
    after = good_job(jobs_dir, "alice", "eta-after", "true", num_gpus=1)
    code, out = run(capsys, "submit", str(after), "--json", "--time-limit", "5m",
                    "--after-any", str(a))
    b = json.loads(out)["id"]
    held = good_job(jobs_dir, "alice", "eta-held", "true", num_gpus=1)
    code, out = run(capsys, "submit", str(held), "--json")
    c = json.loads(out)["id"]
    wait_for(lambda: signed_in["alice"].call("job", c)["state"] == "queued", 60)
    signed_in["root"].call("edit", [c], "hold")  # holds are an admin's

    def rows() -> dict[int, dict[str, Any]] | None:
        code, out = run(capsys, "queue", "--json")
        got = {r["id"]: r for r in json.loads(out)}
        ok = b in got and c in got and got[b].get("expected_start") and got[c]["held"]
        return got if ok and got[c]["reason"] == "Held" else None

    got = wait_for(rows, 60)
    started = signed_in["alice"].call("job", a)["started_at"]
    t0 = dt.datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp()
    eta = dt.datetime.fromisoformat(got[b]["expected_start"].replace("Z", "+00:00")).timestamp()
    assert abs(eta - (t0 + 600)) < 2  # job a's start + its 10m limit
    assert got[b]["reason"] == f"Dependency: job {a} (running)"
    assert got[c]["expected_start"] is None and got[c]["reason"] == "Held"
    code, out = run(capsys, "queue")
    head, *lines = out.splitlines()
    assert "START" in head and head.rstrip().endswith("REASON")
    line = next(x for x in lines if x.split()[1] == str(b))
    assert f"~{time.strftime('%H:%M', time.localtime(eta))}" in line \
        or "~" in line  # a date first past midnight
    assert f"Dependency: job {a} (running)" in line
    code, out = run(capsys, "show", str(b))
    assert f"reason: Dependency: job {a} (running)" in out and "start: ~" in out
    # job a ends early: b starts long before its estimate, and the store keeps both
    run(capsys, "cancel", str(c))
    run(capsys, "cancel", str(a))

    def kept() -> dict[str, Any] | None:
        job = signed_in["alice"].call("job", b)
        return job if job["started_at"] and job["expected_start_last"] else None

    job = wait_for(kept, 60)
    for key in ("expected_start_first", "expected_start_last"):
        ts = dt.datetime.fromisoformat(job[key].replace("Z", "+00:00")).timestamp()
        assert abs(ts - (t0 + 600)) < 2
    code, out = run(capsys, "show", str(b))
    assert "estimated: first " in out
    signed_in.wait_job(b)


# -- the GUI ------------------------------------------------------------------------------
def test_gui_queued_model_shows_start_and_reason(qtbot: Any) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6.QtWidgets")
    from PySide6.QtCore import Qt

    from dopq.client.gui.models import QueuedModel

    now = time.time()
    start = dt.datetime.fromtimestamp(now + 1800, dt.UTC).isoformat().replace("+00:00", "Z")
    reason = ("Reserved: GPU 1 is held for job 9 (starts ~10:40); a time limit under 18m "
              "would let this job use it now")
    rows = [{"id": 5, "name": "x", "user": "ana", "state": "queued", "num_gpus": 1,
             "position": 1, "priority_value": 1.0, "priority": 0, "reason": reason,
             "expected_start": start, "wait_s": 3.0, "submitted_at": start, "held": False},
            {"id": 6, "name": "y", "user": "ana", "state": "queued", "num_gpus": 1,
             "position": 2, "priority_value": 1.0, "priority": 0, "reason": "Held",
             "expected_start": None, "wait_s": 3.0, "submitted_at": start, "held": True}]
    m = QueuedModel()
    m.apply(rows)
    titles = [c.title for c in m.columns]
    start_col, reason_col = titles.index("Start"), titles.index("Reason")
    assert m.data(m.index(0, start_col)) == start_text(start, time.time())
    assert m.data(m.index(0, start_col)).startswith("~")
    assert m.data(m.index(1, start_col)) == "-"
    assert m.data(m.index(0, reason_col)) == reason
    tip = m.data(m.index(0, titles.index("Job")), Qt.ItemDataRole.ToolTipRole)
    assert tip.startswith(reason) and "expected start" in tip
    assert m.data(m.index(1, 0), Qt.ItemDataRole.ToolTipRole) == "Held"
    boost = m.headerData(titles.index("Boost"), Qt.Orientation.Horizontal,
                         Qt.ItemDataRole.ToolTipRole)
    assert "--priority" in boost

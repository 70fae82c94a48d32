"""The CLI's side of preemption (issue #14): the RESTARTS cell, ``dopq show`` of a
preempted job, the queue's reason for a job that will preempt, ``submit --preemptible``.

No server: the commands are fed views shaped as the server builds them
(``dopq.wire.views``), through a stand-in for the client.
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from conftest import run_cli
from fakes import AnswerClient

from dopq.client.commands import build_parser
from dopq.client.job_commands import _submit_options, restarts_cell

WILL_PREEMPT = "will preempt job 12 of alice at ~10:42"
WHY = "preempted by job 17 of bob (bob under fair share; alice above)"


def job(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 12, "name": "train", "user": "alice", "state": "running", "num_gpus": 1,
        "gpu_memory": 0, "gpus": [0], "exit_code": None, "error": None,
        "submitted_at": "2026-01-01T09:00:00.000Z", "started_at": "2026-01-01T10:00:00.000Z",
        "finished_at": None, "image": None, "container": "c12", "time_limit": None,
        "priority": 0, "nice": 0, "held": False, "array_index": None, "array_parent": None,
        "after": [], "after_any": [], "origin": "api", "wait_s": 1.0, "run_s": 60.0,
        "cpu_percent": None, "memory_bytes": None, "gpu_samples": [],
        "gpu_memory_used": None, "gpu_utilisation": None, "idle_since": None,
        "preemptible": False, "restarts": 0, "preempted_by": None,
    }
    row.update(kw)
    return row


def queued(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 17, "name": "light", "user": "bob", "state": "queued", "num_gpus": 1,
        "gpu_memory": 0, "submitted_at": "2026-01-01T10:30:00.000Z", "submitted_ts": 0.0,
        "time_limit": None, "priority": 0, "nice": 0, "held": False, "array_index": None,
        "array_parent": None, "reason": "Priority", "priority_value": 0.9,
        "expected_start": None, "position": 1, "wait_s": 5.0, "preemptible": False,
        "restarts": 0,
    }
    row.update(kw)
    return row


@pytest.mark.parametrize(("row", "text"), [
    ({}, "-"),
    ({"preemptible": True}, "0P"),
    ({"preemptible": True, "restarts": 2}, "2P"),
    ({"restarts": 3}, "3"),  # preempted before, the default changed since
    ({"restarts": None}, "-"),  # an older server's row
])
def test_restarts_cell(row: dict[str, Any], text: str) -> None:
    assert restarts_cell(row) == text


def test_listings_add_restarts_only_where_a_job_is_preemptible(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"running": [job()], "queue": [queued(reason=WILL_PREEMPT)]}
    monkeypatch.setattr("dopq.client.job_commands._client", lambda args: AnswerClient(answers))
    code, out, _ = run_cli(capsys, "running")
    assert code == 0 and "RESTARTS" not in out  # as before #14 when no job is preemptible
    answers["running"] = [job(preemptible=True, restarts=1), job(id=13, name="other")]
    code, out, _ = run_cli(capsys, "running")
    head, first, second = out.splitlines()
    assert head.split()[:4] == ["ID", "NAME", "USER", "RESTARTS"]
    assert first.split()[:4] == ["12", "train", "alice", "1P"]
    assert second.split()[:4] == ["13", "other", "alice", "-"]
    # The queue's reason column carries the scheduler's text as it is.
    code, out, _ = run_cli(capsys, "queue")
    assert code == 0 and out.splitlines()[1].endswith(WILL_PREEMPT)
    answers["queue"] = [queued(reason=WILL_PREEMPT),
                        queued(id=12, name="train", user="alice", preemptible=True,
                               restarts=1, position=2)]
    code, out, _ = run_cli(capsys, "queue")
    head, light, again = out.splitlines()
    assert head.split()[:5] == ["POS", "ID", "NAME", "USER", "RESTARTS"]
    assert light.split()[:5] == ["1", "17", "light", "bob", "-"]
    assert again.split()[:5] == ["2", "12", "train", "alice", "1P"]


def test_show_says_by_which_job_and_why(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    events = [{"at": "2026-01-01T09:00:00.000Z", "state": "queued", "detail": "image ready"},
              {"at": "2026-01-01T10:00:00.000Z", "state": "running", "detail": "gpus 0"},
              {"at": "2026-01-01T10:42:07.000Z", "state": "queued", "detail": WHY}]
    shown = job(state="queued", gpus=[], container=None, started_at=None, preemptible=True,
                restarts=1, preempted_by=17, events=events, spec=None, outputs="/o/12",
                expected_start=None, reason="Resources", expected_start_first=None,
                expected_start_last=None)
    monkeypatch.setattr("dopq.client.commands._client", lambda args: AnswerClient({"job": shown}))
    code, out, _ = run_cli(capsys, "show", "12")
    assert code == 0
    text = " ".join(out.split())
    assert "preemptible: yes" in text and "restarts: 1" in text
    assert ("preempted: by job 17 of bob (bob under fair share; alice above), at "
            "2026-01-01T10:42:07.000Z") in text
    shown["events"] = []
    code, out, _ = run_cli(capsys, "show", "12")
    assert "preempted: by job 17" in out
    plain = job(events=[], spec=None, outputs="/o/12", expected_start=None, reason=None,
                expected_start_first=None, expected_start_last=None)
    monkeypatch.setattr("dopq.client.commands._client", lambda args: AnswerClient({"job": plain}))
    code, out, _ = run_cli(capsys, "show", "12")
    assert code == 0 and "preempt" not in out and "restarts" not in out


def test_submit_preemptible_option(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()

    def options(*argv: str) -> dict[str, Any]:
        args: argparse.Namespace = parser.parse_args(["submit", "job", *argv])
        return _submit_options(args)

    assert "preemptible" not in options()  # the job folder's, else the server's default
    assert options("--preemptible")["preemptible"] is True
    assert options("--no-preemptible")["preemptible"] is False
    with pytest.raises(SystemExit):
        run_cli(capsys, "submit", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--preemptible, --no-preemptible" in out and "DOPQ_RESTART_COUNT" in out


def test_logs_of_an_earlier_run(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    class Logs(AnswerClient):
        def call(self, method: str, *args: Any, **kw: Any) -> Any:
            if method == "logs":
                self.asked = args
                kind = args[1]
                return {"data": "run 0\ncheckpointed\n" if kind == "run.1" else "",
                        "offset": 0, "done": True, "state": "queued"}
            return super().call(method, *args, **kw)

    queued_again = job(state="queued", started_at=None, preemptible=True, restarts=1)
    client = Logs({"job": queued_again, "whoami": {"user": "alice"}})
    monkeypatch.setattr("dopq.client.job_commands._client", lambda args: client)
    code, out, err = run_cli(capsys, "logs", "12", "--run", "1")
    assert code == 0 and out == "run 0\ncheckpointed\n" and client.asked[:2] == (12, "run.1")
    code, out, err = run_cli(capsys, "logs", "12")
    assert code == 0 and "dopq logs 12 --run N` shows its run N (1 to 1)" in err
    code, out, err = run_cli(capsys, "logs", "12", "--run", "0")
    assert code != 0 and "runs count from 1" in err

"""``from dopq import Client``: the CLI's commands from Python, against a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Running, cli_login, free_port, run_cli, wait_for
from hostile import good_job

from dopq import Client
from dopq.core.errors import DopqError


@pytest.fixture
def signed_in(server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Running:
    cli_login(server, monkeypatch, tmp_path)  # the token file and the pin, as `dopq login`
    return server


def test_a_sweep_submitted_and_waited_for(signed_in: Running, jobs_dir: Path) -> None:
    c = Client.connect()  # found as the CLI finds it: DOPQ_SERVER, DOPQ_NS_PORT, token file
    assert c.whoami()["user"] == "alice"
    folder = good_job(jobs_dir, "alice", "sweep", 'echo "lr=$LR"; exit 0')
    jobs = [c.submit(folder, env={"LR": lr}, name=f"lr-{lr}", time_limit="5m")
            for lr in ("0.1", "0.01")]
    ids = [j["id"] for j in jobs]
    assert {j["user"] for j in jobs} == {"alice"}
    assert isinstance(c.queue(), list) and isinstance(c.running(), list)
    done = c.wait(ids, timeout=60)
    assert [j["state"] for j in done] == ["succeeded", "succeeded"]
    assert [c.logs(i).strip() for i in ids] == ["lr=0.1", "lr=0.01"]
    shown = c.show(ids[0])
    assert shown["name"] == "lr-0.1" and shown["time_limit"] == 300 and shown["events"]
    assert c.wait(ids[1])["exit_code"] == 0
    # the listings are views the server refreshes a moment after a change
    wait_for(lambda: set(ids) <= {r["id"] for r in c.history()}, 10, 0.1)
    assert "alice" in {u["user"] for u in c.users()}
    assert "gpus" in c.status()
    wait_for(lambda: set(ids) <= {r["id"] for r in c.snapshot()["finished"]}, 10, 0.1)


def test_cancel_and_refusals(signed_in: Running, jobs_dir: Path, capsys: Any) -> None:
    c = Client.connect()
    folder = good_job(jobs_dir, "alice", "long", "sleep 60")
    job = c.submit(folder)
    assert c.cancel(job["id"])["state"] in ("cancelled", "running")  # running: stopping
    assert c.wait(job["id"], timeout=10)["state"] == "cancelled"
    capsys.readouterr()
    with pytest.raises(DopqError) as exc:
        c.show(999)
    code, _, err = run_cli(capsys, "show", "999")
    assert code == 1 and err == f"dopq: error: {exc.value}\n"


def test_a_wrong_token_is_the_clis_error(signed_in: Running, capsys: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPQ_TOKEN", "not-a-token")
    capsys.readouterr()
    code, _, err = run_cli(capsys, "queue")
    with pytest.raises(DopqError) as exc:
        Client.connect().queue()
    assert code == 1 and err == f"dopq: error: {exc.value}\n" and err.count("\n") == 1


def test_no_server_is_the_clis_error(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPQ_NS_PORT", str(free_port()))
    code, _, err = run_cli(capsys, "queue")
    with pytest.raises(DopqError) as exc:
        Client.connect().queue()
    assert code == 1 and err == f"dopq: error: {exc.value}\n"
    assert str(exc.value).startswith("no name server")

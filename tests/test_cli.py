"""The ``dopq`` command line against a real server (and without one)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORDS, Running, cli_login, free_port, run_cli, write_toml
from hostile import good_job

from dopq import cli

run = run_cli


@pytest.fixture
def signed_in(server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Running:
    cli_login(server, monkeypatch, tmp_path)
    token_file = tmp_path / "home" / "dopq" / "tokens.json"
    assert token_file.stat().st_mode & 0o777 == 0o600
    return server


def test_submit_wait_logs_and_listings(signed_in: Running, capsys: Any, jobs_dir: Path) -> None:
    capsys.readouterr()
    folder = good_job(jobs_dir, "alice", "cli-job", "echo hello-cli; exit 0", num_gpus=1)
    code, out, _ = run(capsys, "submit", str(folder), "--json", "--time-limit", "5m")
    assert code == 0
    job_id = json.loads(out)["id"]
    code, out, _ = run(capsys, "wait", str(job_id), "--timeout", "60")
    assert code == 0 and "succeeded" in out
    code, out, _ = run(capsys, "logs", str(job_id))
    assert "hello-cli" in out
    for command in ("queue", "running", "history", "status", "users", "priority", "images"):
        code, out, err = run(capsys, command, "--json")
        assert code == 0, err
        json.loads(out)
    code, out, _ = run(capsys, "show", str(job_id), "--json")
    job = json.loads(out)
    for key in ("id", "name", "user", "state", "num_gpus", "gpus", "exit_code", "error",
                "submitted_at", "started_at", "finished_at", "image", "container"):
        assert key in job
    assert job["time_limit"] == 300 and job["submitted_at"].endswith("Z")
    failing = good_job(jobs_dir, "alice", "cli-fail", "exit 4")
    code, out, _ = run(capsys, "submit", str(failing), "--json")
    code, out, _ = run(capsys, "wait", str(json.loads(out)["id"]), "--timeout", "60")
    assert code == 1 and "exit code 4" in out


def test_refusals_are_one_line(signed_in: Running, capsys: Any, jobs_dir: Path) -> None:
    capsys.readouterr()
    code, _, err = run(capsys, "clear-history")
    assert code == 1 and err.count("\n") == 1 and "admin" in err
    code, _, err = run(capsys, "show", "999")
    assert code == 1 and err == "dopq: error: no job 999\n"
    code, _, err = run(capsys, "submit", str(jobs_dir / "nope"))
    assert code == 1 and "no such file" in err


def test_unreachable_server_is_one_line(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOPQ_NS_PORT", str(free_port()))
    code, _, err = run(capsys, "queue")
    assert code == 1
    assert err.startswith("dopq: error: no name server") and err.count("\n") == 1


def test_config_show_and_bad_config(capsys: Any, tmp_path: Path) -> None:
    cfg = write_toml({"state_dir": str(tmp_path)}, tmp_path / "ok.toml")
    code, out, _ = run(capsys, "config", "show", "--config", str(cfg))
    assert code == 0 and f'state_dir = "{tmp_path}"' in out and "[nameserver]" in out
    bad = tmp_path / "bad.toml"
    bad.write_text('[gpus]\nbackend = "quantum"\n')
    code, _, err = run(capsys, "config", "show", "--config", str(bad))
    assert code == 1 and "gpus.backend" in err
    bad.write_text("[docker]\nnetwrk = 'none'\n")
    code, _, err = run(capsys, "config", "show", "--config", str(bad))
    assert code == 1 and "docker.netwrk: unknown key" in err


def test_admin_manages_users_remotely(server: Running, capsys: Any,
                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOPQ_NS_PORT", str(server.settings.nameserver.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORDS["root"] + "\n"))
    assert cli.main(["login", "--user", "root", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("carolpass1\ncarolpass1\n"))
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "carolpass1")
    code, out, err = run(capsys, "user", "add", "carol", "--remote")
    assert code == 0, err
    code, out, _ = run(capsys, "user", "list", "--remote", "--json")
    assert "carol" in {u["name"] for u in json.loads(out)}
    code, _, err = run(capsys, "audit", "--json")
    assert code == 0
    code, _, _ = run(capsys, "user", "remove", "carol", "--remote")
    assert code == 0


@pytest.mark.parametrize("module", ["account_commands", "info_commands", "job_commands",
                                    "notify_commands", "report_commands"])
def test_every_command_module_asks_for_its_client_at_the_call(
        module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command modules are imported when the parser is first built. If they bound
    ``commands._client`` then, a test that patched it around its first CLI call left
    its client (and its server, stopped since) to every later test of the run."""
    import importlib

    from dopq.client import commands

    mod = importlib.import_module(f"dopq.client.{module}")  # imported before the patch
    sentinel = object()
    monkeypatch.setattr(commands, "_client", lambda _args: sentinel)
    assert mod._client(None) is sentinel

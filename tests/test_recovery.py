"""kill -9 of the server at any moment loses nothing (issue 2, item 8)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORDS, add_users, cleanup_docker, make_config, wait_for, write_toml
from hostile import good_job, zip_it

from dopq import settings as settings_mod
from dopq.client import Client
from dopq.errors import DopqError

pytestmark = pytest.mark.docker

FINAL = ("succeeded", "failed", "cancelled")


class Proc:
    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dopq.cli", "server", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def term(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _client(s: Any, user: str) -> Client:
    c = Client(s.nameserver.host, s.nameserver.port, s.server_name, token="")

    def login() -> bool:
        try:
            c.login(user, PASSWORDS[user], remember=False)
            return True
        except DopqError:
            return False

    wait_for(login, 60, 0.2)
    return c


def test_kill9_loses_nothing(tmp_path: Path, engine: None, jobs_dir: Path) -> None:
    cfg = make_config(tmp_path, gpus={"backend": "virtual", "virtual_count": 2})
    settings = settings_mod.from_dict(cfg)
    add_users(settings.db_path)
    proc = Proc(write_toml(cfg, tmp_path / "config.toml"), tmp_path / "server.log")
    rng = random.Random(7)
    folders = [
        zip_it(good_job(jobs_dir, "alice", f"job-{i}", f"sleep {rng.choice([0.3, 1, 2])}",
                        num_gpus=i % 3 if i % 3 < 3 else 1))
        for i in range(8)
    ]
    submitted: list[int] = []
    try:
        proc.start()
        for cycle in range(3):
            alice = _client(settings, "alice")
            for folder in folders[cycle * 3: cycle * 3 + 3]:
                submitted.append(alice.submit(folder)["id"])
            time.sleep(rng.uniform(0.2, 2.0))  # let it get into the middle of work
            proc.kill9()
            proc.start()
        alice = _client(settings, "alice")

        def all_final() -> list[dict[str, Any]] | None:
            jobs = [alice.call("job", i) for i in submitted]
            return jobs if all(j["state"] in FINAL for j in jobs) else None

        jobs = wait_for(all_final, 180, 0.3)
        assert [j["state"] for j in jobs] == ["succeeded"] * len(submitted), jobs
        assert [j["exit_code"] for j in jobs] == [0] * len(submitted)
        history = alice.call("history", 1000)
        assert sorted(j["id"] for j in history) == sorted(submitted)  # no duplicates, none lost
        spans = [(j["started_at"], j["finished_at"], set(j["gpus"])) for j in jobs]
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a[0] < b[1] and b[0] < a[1]:
                    assert not a[2] & b[2], (a, b)
        wait_for(lambda: not subprocess.run(
            ["docker", "ps", "-aq", "--filter",
             f"label=dopq.instance={settings.docker.name_prefix}"],
            capture_output=True, text=True).stdout.strip(), 30, 0.2)
    finally:
        proc.term()
        cleanup_docker(settings.docker.name_prefix)

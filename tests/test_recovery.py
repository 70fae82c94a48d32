"""kill -9 of the server at any moment loses nothing (issue 2, item 8)."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import add_users, cleanup_docker, make_config, wait_for, write_toml
from hostile import good_job, zip_it
from serverproc import ServerProc, signed_in

from dopq.core import settings as settings_mod

pytestmark = pytest.mark.docker

FINAL = ("succeeded", "failed", "cancelled")


CYCLES = 10 if os.environ.get("DOPQ_FAULTS_FULL") == "1" else 3


def _inbox_drop(settings: Any, folder: Path) -> None:
    inbox = settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / f"{folder.name}.zip.part"
    zip_it(folder, part)
    part.rename(inbox / f"{folder.name}.zip")


def test_kill9_loses_nothing(tmp_path: Path, engine: None, jobs_dir: Path) -> None:
    """kill -9 at random moments of a mixed workload; restart each time."""
    cfg = make_config(tmp_path, gpus={"backend": "virtual", "virtual_count": 2})
    settings = settings_mod.from_dict(cfg)
    add_users(settings.db_path)
    proc = ServerProc(write_toml(cfg, tmp_path / "config.toml"), tmp_path / "server.log")
    rng = random.Random(int(os.environ.get("DOPQ_FAULTS_SEED", "7")))
    expected: dict[str, int] = {}  # job name -> exit code it must end with
    try:
        proc.start()
        for cycle in range(CYCLES):
            alice = signed_in(settings, "alice")
            for k in range(3):
                name = f"c{cycle}-job{k}"
                code = rng.choice([0, 0, 3])
                expected[name] = code
                folder = good_job(jobs_dir, "alice", name,
                                  f"sleep {rng.choice([0.2, 1, 2])}; exit {code}",
                                  num_gpus=rng.choice([0, 1, 1, 2]))
                if k == 1:  # a build that takes a while
                    (folder / "Dockerfile").write_text(
                        f"FROM dopq/busybox:latest\nRUN sleep 1 && echo {name} > /id\n"
                        "COPY run.sh /job/run.sh\nCMD [\"sh\", \"/job/run.sh\"]\n")
                if k == 2:
                    _inbox_drop(settings, folder)
                else:
                    alice.submit(folder)
            time.sleep(rng.uniform(0.1, 2.5))  # into the middle of the work
            proc.kill9()
            proc.start()
        alice = signed_in(settings, "alice")

        def all_final() -> list[dict[str, Any]] | None:
            jobs = alice.call("history", 1000) + alice.call("queue") + alice.call("running")
            done = [j for j in jobs if j["state"] in FINAL]
            return done if len(done) == len(expected) and len(jobs) == len(expected) else None

        try:
            jobs = wait_for(all_final, 180, 0.5)
        except AssertionError:
            seen = alice.call("history", 1000) + alice.call("queue") + alice.call("running")
            print({j["name"]: (j["id"], j["state"]) for j in seen})
            print(sorted(set(expected) - {j["name"] for j in seen}))
            print((tmp_path / "server.log").read_text()[-3000:])
            raise
        by_name = {j["name"]: j for j in jobs}
        assert sorted(by_name) == sorted(expected)  # none lost, none twice
        for name, code in expected.items():
            job = by_name[name]
            assert job["exit_code"] == code, job
            assert job["state"] == ("succeeded" if code == 0 else "failed"), job
            finals = [e for e in alice.call("job", job["id"])["events"] if e["state"] in FINAL]
            assert len(finals) == 1, (name, finals)
        spans = [(j["started_at"], j["finished_at"], set(j["gpus"])) for j in jobs]
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a[0] < b[1] and b[0] < a[1]:
                    assert not a[2] & b[2], (a, b)
        wait_for(lambda: not subprocess.run(
            ["docker", "ps", "-aq", "--filter",
             f"label=dopq.instance={settings.docker.name_prefix}"],
            capture_output=True, text=True).stdout.strip(), 30, 0.2)
        print(f"kill -9 cycles survived: {CYCLES}, jobs: {len(expected)}, lost: 0")
    finally:
        proc.term()
        cleanup_docker(settings.docker.name_prefix)



def test_a_provider_leaves_when_its_server_is_gone_before_it_watches(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Provider watches the pid its server gave it. A server killed while the
    Provider was still starting had already left it to init: it leaves at once,
    instead of waiting forever beside the next server's Provider (it did: its
    watch took init for its parent)."""
    from dopq.server.provider import Provider

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stub = SimpleNamespace(_stopping=threading.Event())
    Provider._watch_parent(stub, os.getpid())  # not its parent (any more): gone
    assert exits == [0]
    stub._stopping.set()  # its server alive: it watches until the Provider stops
    Provider._watch_parent(stub, os.getppid())
    assert exits == [0]

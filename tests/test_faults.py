"""Faults and hostile input (issue 7): nothing is lost, nobody gets in.

Short by default (CI); ``DOPQ_FAULTS_FULL=1`` (``make faults``) runs the long
versions. Every loop is bounded in count and time; all traffic is loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, wait_for
from hostile import good_job

from dopq.core.errors import DopqError, LimitExceeded

pytestmark = pytest.mark.docker
FULL = os.environ.get("DOPQ_FAULTS_FULL") == "1"


def _status_lines(server: Running, job_id: int) -> dict[str, str]:
    log = server["root"].call("logs", job_id)["data"]
    return dict(line.split(":", 1) for line in log.splitlines() if ":" in line)


# -- 8. confinement -------------------------------------------------------------------------
def test_confinement(server_factory: Any, jobs_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "datasets"
    shared.mkdir()
    (shared / "train.txt").write_text("data")
    server = server_factory(
        docker={"read_only_rootfs": True},
        mounts=[{"source": str(shared), "target": "/data", "read_only": True}],
    )
    alice, bob = server["alice"], server["bob"]
    secret = server.wait_job(bob.submit(good_job(
        jobs_dir, "bob", "bob-secret", "echo secret > /outdir/secret.txt"))["id"])
    assert secret["state"] == "succeeded"
    script = "; ".join([
        "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status",
        "echo sock:$(ls /var/run/docker.sock /run/docker.sock 2>/dev/null | wc -l)",
        "echo rootfs:$(touch /x 2>/dev/null && echo writable || echo readonly)",
        "echo outdir:$(touch /outdir/ok && echo writable || echo readonly)",
        "echo data:$(cat /data/train.txt)",
        "echo datarw:$(touch /data/x 2>/dev/null && echo writable || echo readonly)",
        "echo others:$(find / -name secret.txt 2>/dev/null | wc -l)",
        "echo mounts:$(grep -c -E ' /(outdir|data) ' /proc/mounts)",
        "echo net:$(ls /sys/class/net | tr '\\n' ' ')",
        "echo nofile:$(ulimit -n)",
    ])
    run_params = {"ulimits": [{"name": "nofile", "soft": 1000, "hard": 2000}],
                  "labels": {"team": "vision"}}
    job = server.wait_job(alice.submit(good_job(jobs_dir, "alice", "probe", script,
                                                config={"run_params": run_params}))["id"])
    assert job["state"] == "succeeded", job
    got = {k.strip(): v.strip() for k, v in _status_lines(server, job["id"]).items()}
    assert "NoNewPrivs" in got, server["root"].call("logs", job["id"])["data"]
    assert got["NoNewPrivs"] == "1"
    caps = int(got["CapEff"], 16)
    allowed = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5,
               "SETGID": 6, "SETUID": 7}
    assert caps & ~sum(1 << b for b in allowed.values()) == 0
    assert got["sock"] == "0"
    assert got["rootfs"] == "readonly" and got["outdir"] == "writable"
    assert got["data"] == "data" and got["datarw"] == "readonly"
    assert got["others"] == "0" and got["mounts"] == "2"
    assert got["net"] == "lo" and got["nofile"] == "1000"


# -- 6. misbehaving jobs ---------------------------------------------------------------------
def test_misbehaving_jobs_are_contained(server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(
        docker={"pids_limit": 64, "log_max_bytes": "1m", "stop_grace": 1.0},
        limits={"default_memory": "64m"},
    )
    alice = server["alice"]
    scripts = {
        "fork-bomb": "i=0; while [ $i -lt 400 ]; do sleep 30 & i=$((i+1)); done; "
                     "echo spawned; wait",
        "memory-hog": "echo start; head -c 200m /dev/zero | tail -c 150m > /dev/null; "
                      "echo survived",
        "log-flood": "yes 'flooding the log with a long line of text' | head -c 50m; "
                     "echo done",
        "no-sigterm": "trap '' TERM; echo ignoring; while true; do sleep 1; done",
        "neighbour": "sleep 2; echo fine",
    }
    ids = {name: alice.submit(good_job(jobs_dir, "alice", name, s,
                                       config={"time_limit": 20}))["id"]
           for name, s in scripts.items()}
    wait_for(lambda: alice.call("job", ids["no-sigterm"])["state"] == "running", 60)
    started = time.monotonic()
    alice.call("cancel", ids["no-sigterm"])
    job = server.wait_job(ids["no-sigterm"], 30)
    assert job["state"] == "cancelled" and time.monotonic() - started < 15
    jobs = {name: server.wait_job(i, 90) for name, i in ids.items()}
    # the fork bomb hits the pids limit (its shell fails to fork) or its time limit
    assert jobs["fork-bomb"]["state"] == "failed"
    hog = jobs["memory-hog"]
    assert hog["state"] == "failed" and "out of memory" in hog["error"], hog
    flood = jobs["log-flood"]
    run_log = server.settings.state_path / "jobs" / str(flood["id"]) / "run.log"
    wait_for(run_log.exists, 30)
    assert run_log.stat().st_size <= 1024**2 + 100
    assert jobs["neighbour"]["state"] == "succeeded"
    status = alice.call("status")
    assert status["queue_state"] == "running" and status["provider_state"] == "running"


# -- 5. a client that disappears mid-upload ----------------------------------------------------
def test_abandoned_upload_leaves_nothing(server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(intake={"upload_timeout": 1.0, "poll_interval": 0.1})
    alice = server["alice"]
    upload = alice.call("submit_begin", 10_000, {})
    alice.call("submit_chunk", upload, b"PK" + b"x" * 4000)
    alice.close()  # gone
    uploads = server.settings.state_path / "uploads"
    assert list(uploads.iterdir())
    wait_for(lambda: not list(uploads.iterdir()), 15, 0.2)
    assert server["root"].call("queue") == [] and server["root"].call("history") == []
    with pytest.raises(DopqError, match="no upload"):
        server["alice"].call("submit_chunk", upload, b"more")


# -- 4. disk full ---------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_disk_full(server_factory: Any, tmp_path: Path, jobs_dir: Path) -> None:
    state = tmp_path / "small"
    if not _mount_tmpfs(state, "24m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        server = server_factory(state_dir=str(state))
        alice = server["alice"]
        filler = state / "filler"
        with filler.open("wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
        big = jobs_dir / "big.zip"
        big.write_bytes(os.urandom(2 << 20))
        with pytest.raises(DopqError) as err:
            alice.submit(big)
        assert "\n" not in str(err.value)
        filler.unlink()
        job = server.wait_job(alice.submit(good_job(jobs_dir, "alice", "after-full"))["id"])
        assert job["state"] == "succeeded"
        check = server.server.platform.store.read("PRAGMA integrity_check")
        assert check[0][0] == "ok"
        server.stop()
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


# -- 9. the API -----------------------------------------------------------------------------------
def test_api_refuses_bad_calls(server: Running) -> None:
    alice = server["alice"]
    with pytest.raises(DopqError) as err:
        alice.call("no_such_method")
    assert "\n" not in str(err.value)
    with pytest.raises(DopqError):
        alice.call("edit", "not-a-list", "delete")
    with pytest.raises(DopqError):
        alice.call("history", {"limit": 5})
    with pytest.raises(LimitExceeded):
        alice.call("submit_chunk", "x", b"y" * (5 << 20))
    with pytest.raises(DopqError):
        alice.call("logs", 1, "../../etc/passwd")
    huge = "x" * (20 << 20)
    with pytest.raises(DopqError):
        alice.call("login", huge, huge)
    assert alice.call("whoami")["user"] == "alice"


def test_stalled_clients_do_not_stall_others(server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(server={"idle_timeout": 2.0, "max_connections": 64})
    uri = server.server.uri
    idle = []
    for _ in range(40 if FULL else 20):  # connect and say nothing
        s = socket.create_connection((uri.host, uri.port))
        idle.append(s)
    alice = server["alice"]
    # A client that asks for a big reply and never reads it.
    job_id = server.wait_job(alice.submit(good_job(jobs_dir, "alice", "quick"))["id"])["id"]
    assert alice.call("job", job_id)["state"] == "succeeded"
    t0 = time.monotonic()
    for _ in range(20):
        alice.call("status")
    assert time.monotonic() - t0 < 10
    for s in idle:
        s.close()

"""Docker engine restart in the middle of running jobs (issue 7, fault 2).

Stops the dockerd that scripts/engine.sh started (by its PID file) and starts
it again with the same script; the tests after it find the engine back up.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_for
from hostile import good_job

pytestmark = pytest.mark.docker
PIDFILE = Path("/var/run/docker.pid")


def _engine_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


# When the engine's socket disappears mid-request, urllib3 drops the
# connection's socket without closing it (the garbage collector does).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_engine_restart(server_factory: Any, jobs_dir: Path) -> None:
    pid = _engine_pid()
    if pid is None:
        pytest.skip("no dockerd PID file: this engine was not started by scripts/engine.sh")
    server = server_factory(docker={"stop_grace": 1.0})
    alice = server["alice"]
    running = alice.submit(good_job(jobs_dir, "alice", "long-run", "sleep 300", num_gpus=2))["id"]
    wait_for(lambda: alice.call("job", running)["state"] == "running", 60)
    waiting = alice.submit(good_job(jobs_dir, "alice", "waits", "echo after-restart",
                                    num_gpus=1))["id"]
    wait_for(lambda: alice.call("job", waiting)["state"] == "queued", 60)
    try:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: _engine_pid() is None, 60, 0.2)
        # The API stays up and says the engine is down.
        wait_for(lambda: alice.call("status")["engine_state"] == "down", 30, 0.2)
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "engine.sh")], check=True)
    wait_for(lambda: alice.call("status")["engine_state"] == "up", 60, 0.2)
    job = server.wait_job(running, 60)
    assert job["state"] == "failed" and "engine restart" in job["error"], job
    job = server.wait_job(waiting, 60)
    assert job["state"] == "succeeded"
    assert "after-restart" in alice.call("logs", waiting)["data"]
    server.stop()
    gc.collect()  # the dropped sockets go now, under this test's warning filter

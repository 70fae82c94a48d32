"""dopq report and dopq restart on a real server (the engine, virtual GPUs).

The report counts finished jobs, a user's own lines only, and keeps counting
them after ``clear-history``. A restart queues a copy of a finished job with
the image the original ran (no build: the copy never reaches the Provider),
with changed options checked as submit checks them, and records where it
came from; someone else's job, a running one, unknown options and a gone
image are refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_login, run_cli, wait_for
from hostile import good_job

from dopq.core.errors import Conflict, DopqError, Forbidden, JobRejected
from dopq.core.gpuwatch import WatchConfig
from dopq.server.gpus import GIB, GpuInfo, GpuSample
from dopq.server.gpusampler import GpuJob, GpuSampler, ProcFs

TWO_GPUS = {"gpus": {"backend": "virtual", "virtual_count": 2}}


def lines_of(client: Any, *args: Any) -> dict[str, dict[str, Any]]:
    return {line["user"]: line for line in client.call("report", *args)["lines"]}


@pytest.mark.docker
def test_report_and_restart_end_to_end(server_factory: Any, jobs_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: Any) -> None:
    server = server_factory(**TWO_GPUS)
    alice, bob, root = server["alice"], server["bob"], server["root"]
    first = alice.submit(good_job(jobs_dir, "alice", "gpujob", "echo first", num_gpus=1))["id"]
    other = bob.submit(good_job(jobs_dir, "bob", "cpujob", "echo bob"))["id"]
    assert server.wait_job(first)["state"] == "succeeded"
    assert server.wait_job(other)["state"] == "succeeded"

    # -- the report: one's own lines; an admin's everyone's ------------------------------
    mine = lines_of(alice)
    assert set(mine) == {"alice"}
    assert mine["alice"]["jobs"] == 1 and mine["alice"]["succeeded"] == 1
    assert mine["alice"]["gpu_hours"] > 0 and mine["alice"]["cpu_hours"] == 0
    everyone = lines_of(root)
    assert set(everyone) == {"alice", "bob"}
    assert everyone["bob"]["cpu_hours"] > 0 and everyone["bob"]["gpu_hours"] == 0
    by_month = root.call("report", None, None, "user,month")["lines"]
    assert {line["month"] for line in by_month} and all(line["month"] for line in by_month)
    with pytest.raises(DopqError, match="bad date"):
        alice.call("report", "last tuesday")
    with pytest.raises(DopqError, match="use user, month or user,month"):
        alice.call("report", None, None, "gpu")
    assert lines_of(alice, "2000-01", "2000-12") == {}

    # clear-history hides the rows from the history; the report still counts them
    root.call("clear_history")
    assert alice.call("history") == []
    assert lines_of(root) == everyone

    # -- restart: a copy with another time limit, the same image, no build ------------------
    original = alice.call("job", first)
    copy = alice.call("restart_job", first, {"time_limit": "5m"})
    assert copy["user"] == "alice" and copy["restarted_from"] == first
    done = server.wait_job(copy["id"])
    assert done["state"] == "succeeded" and done["time_limit"] == 300
    detail = alice.call("job", copy["id"])
    assert detail["image"] == original["image"]
    assert not (server.settings.state_path / "jobs" / str(copy["id"]) / "build.log").exists()
    log = alice.call("logs", copy["id"])
    assert "first" in str(log.get("data") or log)

    # the CLI: dopq show names the original; dopq report --csv
    cli_login(server, monkeypatch, tmp_path)
    code, out, err = run_cli(capsys, "show", str(copy["id"]))
    assert code == 0, err
    assert f"job {first}" in out and "restarted from" in out
    code, out, err = run_cli(capsys, "report", "--csv")
    assert code == 0, err
    assert out.splitlines()[0].startswith("user,jobs,") and out.splitlines()[1].startswith("alice,")
    code, out, err = run_cli(capsys, "report", "--since", "2026-13")
    assert code == 1 and "bad date" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "restart", str(first), "--time-limit", "10m", "--json")
    assert code == 0, err
    via_cli = server.wait_job(json.loads(out)["id"])
    assert via_cli["time_limit"] == 600 and via_cli["state"] == "succeeded"
    code, out, err = run_cli(capsys, "restart", str(other))
    assert code == 1 and err.strip() == (f"dopq: error: cannot restart job {other}: "
                                         "it belongs to bob")

    # -- refusals -------------------------------------------------------------------------
    with pytest.raises(Forbidden, match=f"cannot restart job {first}: it belongs to alice"):
        bob.call("restart_job", first, {})
    with pytest.raises(JobRejected, match="restart cannot change 'command'"):
        alice.call("restart_job", first, {"command": "cat /etc/shadow"})
    with pytest.raises(JobRejected, match="only an admin may submit with a priority above 0"):
        alice.call("restart_job", first, {"priority": 5})
    with pytest.raises(JobRejected, match="this server has 2"):
        alice.call("restart_job", first, {"gpus": 3})
    with pytest.raises(DopqError):
        alice.call("restart_job", first, {"time_limit": "forever"})
    with pytest.raises(DopqError, match="must be a dict"):
        alice.call("restart_job", first, ["time_limit", "5m"])
    slow = alice.submit(good_job(jobs_dir, "alice", "slow", "sleep 60"))["id"]
    wait_for(lambda: alice.call("job", slow)["state"] == "running", 90)
    with pytest.raises(Conflict, match="only a finished job"):
        alice.call("restart_job", slow, {})
    alice.call("cancel", slow)

    # an admin restarts alice's job: it is hers, and the audit log says who did it
    again = root.call("restart_job", first, {"priority": 3})
    assert again["user"] == "alice" and again["priority"] == 3
    assert any(e["action"] == "restart" and f"job {first}" in e["detail"]
               for e in root.call("audit"))
    server.wait_job(again["id"])

    # the image is gone from the engine: one clear line, no job
    runtime = server.server.platform.runtime
    server.wait_job(slow)
    wait_for(lambda: not runtime.api.containers(all=True, filters={"ancestor": original["image"]}),
             30)
    runtime.api.remove_image(original["image"], force=True)
    store = server.server.platform.store
    before = len(store.jobs())
    with pytest.raises(Conflict, match="is gone from the engine"):
        alice.call("restart_job", first, {})
    assert len(store.jobs()) == before  # no job was made


def test_the_sampler_gives_a_jobs_mean_utilisation_when_it_ends() -> None:
    devices = [GpuInfo(0, "a", "G", 16 * GIB, 0), GpuInfo(1, "b", "G", 16 * GIB, 1)]
    sampler = GpuSampler(devices, WatchConfig(enforcement="warn"), ProcFs("/nonexistent"))
    job = GpuJob(5, "alice", (0, 1))

    def sample(u0: float | None, u1: float | None) -> list[GpuSample]:
        return [GpuSample(0, u0, 0, 16 * GIB, (), ()), GpuSample(1, u1, 0, 16 * GIB, (), ())]

    assert sampler.observe(sample(100.0, 0.0), [job], 0.0).ended == {}
    assert sampler.observe(sample(60.0, 40.0), [job], 1.0).ended == {}
    assert sampler.observe(sample(None, None), [job], 2.0).ended == {}  # not read: not counted
    assert sampler.observe(sample(0.0, 0.0), [], 3.0).ended == {5: 50.0}
    assert sampler.observe(sample(0.0, 0.0), [], 4.0).ended == {}

"""GPU sharing by memory (issue #13), end to end on the real engine with virtual GPUs.

One virtual device of 16 GiB, 1 GiB of it reserved: three jobs that declare
4 GiB each run on it at the same time; a whole-GPU job submitted after them
waits until every sharer has ended; a job asking more than the device can
share is refused at submit. Also the store's migration of a DoPQ 1.0 database.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, wait_for
from fakes import database_at
from hostile import good_job, zip_it

from dopq.core.errors import JobRejected
from dopq.server.schema import SCHEMA_VERSION
from dopq.server.store import Store

GIB = 2**30
SHARED = {"backend": "virtual", "virtual_count": 1, "virtual_memory": "16g",
          "memory_reserve": "1g"}


def _running(server: Running, ids: list[int]) -> list[dict[str, Any]]:
    return [j for j in server["root"].call("running") if j["id"] in ids]


@pytest.mark.docker
def test_three_shares_run_together_and_a_whole_gpu_job_waits_for_them(
        server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(gpus=SHARED)
    alice, bob = server["alice"], server["bob"]
    # One build, three queued elements at once: they start together.
    sharers = good_job(jobs_dir, "alice", "sharers", 'echo "gpus=[$DOPQ_GPUS]"; sleep 8',
                       num_gpus=1, config={"gpu_memory": "4g"})
    head = alice.submit(sharers, {"array": "0-2"})["id"]
    ids = wait_for(lambda: (lambda e: [j["id"] for j in e] if len(e) == 3 else None)(
        alice.call("array", head)), 60)
    together = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(_running(server, ids)),
                        60)
    assert {tuple(j["gpus"]) for j in together} == {(0,)}
    assert {j["gpu_memory"] for j in together} == {4 * GIB}
    assert all({"gpu_memory_used", "gpu_utilisation", "idle_since"} <= set(j) for j in together)
    device = server["alice"].call("status")["gpus"][0]
    assert device["memory"] == 16 * GIB
    assert sorted((h["job"], h["user"], h["declared"]) for h in device["holders"]) == [
        (i, "alice", 4 * GIB) for i in sorted(ids)]
    assert device["foreign"] == []

    # A whole-GPU job now: built and queued while the sharers still run, not started.
    whole = bob.submit(good_job(jobs_dir, "bob", "whole", 'echo "gpus=[$DOPQ_GPUS]"',
                                num_gpus=1))["id"]
    wait_for(lambda: bob.call("job", whole)["state"] != "building"
             and bob.call("job", whole)["state"] != "received", 60)
    assert bob.call("job", whole)["state"] == "queued"
    assert _running(server, ids), "the sharers ended before the whole-GPU job was queued"
    assert bob.call("job", whole)["gpu_memory"] in (0, None)

    ended = [server.wait_job(i, 60) for i in ids]
    done = server.wait_job(whole, 60)
    assert [j["state"] for j in ended] == ["succeeded"] * 3
    assert done["state"] == "succeeded" and done["gpus"] == [0]
    starts = sorted(j["started_at"] for j in ended)
    assert starts[-1] < min(j["finished_at"] for j in ended), "the three did not overlap"
    assert done["started_at"] >= max(j["finished_at"] for j in ended), (done, ended)
    for j in ended:
        assert "gpus=[0]" in server["root"].call("logs", j["id"])["data"]


@pytest.mark.docker
def test_more_memory_than_a_device_can_share_is_refused_at_submit(
        server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(gpus=SHARED)
    alice = server["alice"]
    big = good_job(jobs_dir, "alice", "big", num_gpus=1, config={"gpu_memory": "20g"})
    with pytest.raises(JobRejected) as info:
        alice.submit(big)
    assert "gpu_memory 20 GiB is more than any GPU here can share" in str(info.value)
    assert "at most 15 GiB" in str(info.value) and "\n" not in str(info.value)
    fits = good_job(jobs_dir, "alice", "fits", num_gpus=1)
    with pytest.raises(JobRejected, match="at most 15 GiB"):
        alice.submit(fits, {"gpu_memory": "15.5g"})  # the option, checked before the upload
    with pytest.raises(JobRejected, match="at most 15 GiB"):
        alice.submit(big, precheck=False)  # the archive, checked at the end of the upload
    assert alice.call("queue") == [] and alice.call("history") == []


@pytest.mark.docker
def test_an_inbox_job_asking_too_much_fails_with_the_reason(
        server_factory: Any, jobs_dir: Path) -> None:
    """The drop folder has no one to answer: the Provider's check fails the job."""
    server = server_factory(gpus=SHARED)
    folder = good_job(jobs_dir, "alice", "big-drop", num_gpus=1, config={"gpu_memory": "20g"})
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / "big-drop.zip.part"
    shutil.copy(zip_it(folder), part)
    part.rename(inbox / "big-drop.zip")
    alice = server["alice"]
    job = wait_for(lambda: alice.call("history"), 60)[0]
    assert job["state"] == "failed" and job["started_at"] is None
    assert "gpu_memory 20 GiB is more than any GPU here can share" in job["error"]
    assert "at most 15 GiB" in job["error"]


def test_a_dopq_1_database_gains_gpu_memory_0(tmp_path: Path) -> None:
    """Jobs stored before #13 read as whole-GPU jobs after the migration."""
    path = tmp_path / "old.sqlite"
    database_at(path, 5)
    store = Store(path)
    try:
        assert store.read("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        row = store.jobs()[0]
        assert (row["name"], row["num_gpus"], row["gpu_memory"]) == ("old", 1, 0)
        new = store.add_job(name="new", user="bob", num_gpus=2, gpu_memory=3 * GIB)
        assert store.job(new)["gpu_memory"] == 3 * GIB
    finally:
        store.close()

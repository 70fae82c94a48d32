"""The server end to end, on the real Docker engine, name server and SQLite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, wait_for
from hostile import ARCHIVE_CASES, CONFIG_CASES, good_job, zip_it

from dopq.core.errors import Conflict, DopqError, Forbidden, JobRejected, LimitExceeded

pytestmark = pytest.mark.docker


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]


def test_jobs_of_two_users_run_on_exclusive_gpus(server: Running, jobs_dir: Path) -> None:
    alice, bob = server["alice"], server["bob"]
    ids = []
    for i, code in enumerate((0, 3, 0)):
        script = f'echo "gpus=[$DOPQ_GPUS]"; sleep 1; exit {code}'
        folder = good_job(jobs_dir, "alice", f"alice-{i}", script, num_gpus=1)
        ids.append(alice.submit(folder)["id"])
    two = good_job(jobs_dir, "bob", "bob-two", 'echo "gpus=[$DOPQ_GPUS]"; sleep 1', num_gpus=2)
    cpu = good_job(jobs_dir, "bob", "bob-cpu", 'echo "gpus=[$DOPQ_GPUS] id=$DOPQ_JOB_ID"')
    ids.append(bob.submit(two)["id"])
    ids.append(bob.submit(zip_it(cpu))["id"])
    jobs = [server.wait_job(i, 90) for i in ids]

    assert [(j["state"], j["error"]) for j in jobs] == [
        ("succeeded", None), ("failed", "exit code 3"), ("succeeded", None),
        ("succeeded", None), ("succeeded", None)]
    assert [j["exit_code"] for j in jobs] == [0, 3, 0, 0, 0]
    assert jobs[1]["error"] == "exit code 3"
    assert [len(j["gpus"]) for j in jobs] == [1, 1, 1, 2, 0]
    for j in jobs:
        log = server["root"].call("logs", j["id"])["data"]
        assert f"gpus=[{','.join(map(str, j['gpus']))}]" in log
        prefix, _, rest = j["container"].partition("-")  # <prefix>-<server's owner id>-<job>
        assert prefix == server.settings.docker.name_prefix and rest.endswith(f"-{j['id']}")
    assert f"id={ids[4]}" in server["root"].call("logs", ids[4])["data"]
    gpu_jobs = [j for j in jobs if j["gpus"]]
    for a in gpu_jobs:
        for b in gpu_jobs:
            if a["id"] < b["id"] and _overlap(a, b):
                assert not set(a["gpus"]) & set(b["gpus"]), (a, b)
    # Containers are collected after their logs are saved.
    wait_for(lambda: not server.server.platform.runtime.list(server.settings.docker.name_prefix))
    # Views are shared and at most half a second old.
    wait_for(lambda: [g["job"] for g in server["alice"].call("status")["gpus"]] == [None, None])
    users = {u["user"]: u for u in server["alice"].call("users")}
    assert users["alice"]["finished"] == 3 and users["bob"]["finished"] == 2
    assert users["alice"]["gpu_hours"] > 0


def test_inbox_drop_is_picked_up_and_runs(server: Running, jobs_dir: Path) -> None:
    folder = good_job(jobs_dir, "alice", "dropped", "echo from-the-inbox")
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / "dropped.zip.part"
    shutil.copy(zip_it(folder), part)
    part.rename(inbox / "dropped.zip")
    alice = server["alice"]
    job = wait_for(lambda: [j for j in alice.call("history") if j["name"] == "dropped"], 60)[0]
    assert job["state"] == "succeeded" and job["origin"] == "inbox"
    assert "from-the-inbox" in alice.call("logs", job["id"])["data"]
    assert not list(inbox.iterdir())


def test_inbox_refuses_a_file_of_another_owner(server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(users={"uid_map": {"alice": os.getuid() + 4242}})
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    shutil.copy(zip_it(good_job(jobs_dir, "alice", "sneaky")), inbox / "sneaky.zip")
    job = wait_for(lambda: server["root"].call("history"), 30)[0]
    assert job["state"] == "failed" and "owner" in job["error"]


def test_cancel_time_limit_and_wait(server: Running, jobs_dir: Path) -> None:
    alice = server["alice"]
    long = alice.submit(good_job(jobs_dir, "alice", "long", "sleep 60", num_gpus=2))["id"]
    wait_for(lambda: alice.call("job", long)["state"] == "running", 60)
    queued = alice.submit(good_job(jobs_dir, "alice", "behind", "true", num_gpus=2))["id"]
    limited = alice.submit(good_job(jobs_dir, "alice", "limited", "sleep 60",
                                    config={"time_limit": 1}))["id"]
    wait_for(lambda: alice.call("job", queued)["state"] == "queued", 60)
    assert alice.call("cancel", queued)["state"] == "cancelled"
    with pytest.raises(Forbidden):
        server["bob"].call("cancel", long)
    alice.call("cancel", long)
    job = server.wait_job(long, 30)
    assert job["state"] == "cancelled" and job["error"] == "cancelled by alice"
    job = server.wait_job(limited, 30)
    assert job["state"] == "failed" and job["error"] == "timeout"
    with pytest.raises(Conflict):
        alice.call("cancel", long)


def test_hostile_archives_are_refused_at_submit_or_fail_their_job_only(
        server: Running, tmp_path: Path, jobs_dir: Path) -> None:
    alice = server["alice"]
    cases = {**ARCHIVE_CASES, **CONFIG_CASES}
    ids = {}
    for name, (builder, words) in cases.items():
        d = tmp_path / "hostile" / name
        d.mkdir(parents=True)
        archive = builder(d)
        try:  # the server's verdict at submit, without the client's own checks
            ids[name] = alice.submit(archive, precheck=False)["id"]
        except JobRejected as exc:
            # this reason, or another mistake found first (most name another executor)
            reason = str(exc)
            assert reason.startswith("rejected:") and "\n" not in reason, (name, reason)
            assert words in reason or "differs" in reason, (name, reason)
        # dropped in the inbox, where no one waits for an answer: a failed job
        inbox = server.settings.inbox_path / "alice"
        inbox.mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, inbox / f"{name}.zip.part")
        os.replace(inbox / f"{name}.zip.part", inbox / f"{name}.zip")
    assert set(ids) <= {"lying_bomb"}  # only what shows when it is unpacked for real
    extra = {
        "too_many_gpus": (good_job(jobs_dir, "alice", "greedy", num_gpus=3), "asks for 3 GPUs"),
        "other_executor": (good_job(jobs_dir, "bob", "notmine"), "differs"),
        "too_much_memory": (good_job(jobs_dir, "alice", "hog", config={"required_memory": "1t"}),
                            "over the limit"),
    }
    for folder, words in extra.values():
        with pytest.raises(JobRejected, match=words):
            alice.submit(folder)
    nobuild = good_job(jobs_dir, "alice", "nobuild", config={})
    (nobuild / "Dockerfile").write_text("FROM dopq/busybox:latest\nRUN false\n")
    ids["build_fails"] = alice.submit(nobuild)["id"]
    good = alice.submit(good_job(jobs_dir, "alice", "fine", "echo still-fine"))["id"]
    jobs = {name: server.wait_job(i, 60) for name, i in ids.items()}
    for name, job in jobs.items():
        assert job["state"] == "failed", name
        if name == "build_fails":
            assert job["error"].startswith("build failed:"), job["error"]
            assert "RUN false" in alice.call("logs", job["id"], "build")["data"]
        else:
            assert job["error"].startswith("rejected:"), (name, job["error"])
    dropped = wait_for(lambda: (lambda h: h if len(h) == len(cases) else None)(
        [j for j in server["root"].call("history", 500) if j["origin"] == "inbox"]), 60)
    for job in dropped:
        assert job["state"] == "failed" and job["error"].startswith("rejected:"), job
    assert server.wait_job(good)["state"] == "succeeded"
    status = alice.call("status")
    assert status["provider_state"] == "running" and status["provider_restarts"] == 0
    # nothing was written outside the job directories
    state = server.settings.state_path
    assert not (state.parent / "evil").exists() and not Path("/etc/x").exists()


def test_upload_limits_and_bad_calls(server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(limits={"max_upload": "2k"})
    alice = server["alice"]
    big = jobs_dir / "big.zip"
    big.write_bytes(os.urandom(4096))
    with pytest.raises(LimitExceeded, match="over the limit"):
        alice.submit(big, precheck=False)
    upload = alice.call("submit_begin", 100, {})
    with pytest.raises(LimitExceeded, match="larger than announced"):
        alice.call("submit_chunk", upload, b"x" * 101)
    with pytest.raises(DopqError, match="unknown submit option"):
        alice.call("submit_begin", 10, {"privileged": True})
    with pytest.raises(Forbidden):
        alice.call("submit_begin", 10, {"user": "bob"})
    with pytest.raises(DopqError):
        alice.call("job", "not-a-number")
    assert not list((server.settings.state_path / "uploads").iterdir())


def test_identical_context_reuses_the_image(server: Running, jobs_dir: Path) -> None:
    alice = server["alice"]
    folder = good_job(jobs_dir, "alice", "same", "echo same")
    first = server.wait_job(alice.submit(folder)["id"])
    second = server.wait_job(alice.submit(folder)["id"])
    assert first["state"] == second["state"] == "succeeded"
    assert first["image"] == second["image"]
    assert "reusing" in alice.call("logs", second["id"], "build")["data"]


def test_array_and_dependencies(server: Running, jobs_dir: Path) -> None:
    alice = server["alice"]
    first = alice.submit(good_job(jobs_dir, "alice", "first", "exit 1"))["id"]
    dep_fail = alice.submit(good_job(jobs_dir, "alice", "needs-first"), {"after": [first]})["id"]
    dep_any = alice.submit(good_job(jobs_dir, "alice", "any-first"), {"after_any": [first]})["id"]
    arr = alice.submit(good_job(jobs_dir, "alice", "arr", 'echo "index=$DOPQ_ARRAY_INDEX"'),
                       {"array": "0-2"})["id"]
    assert server.wait_job(first)["state"] == "failed"
    job = server.wait_job(dep_fail)
    assert job["state"] == "failed" and "dependency" in job["error"]
    assert server.wait_job(dep_any)["state"] == "succeeded"
    members = wait_for(lambda: [j for j in alice.call("history", 100)
                                if j["array_parent"] == arr and j["state"] == "succeeded"]
                       if len([j for j in alice.call("history", 100)
                               if j["array_parent"] == arr]) == 3 else None, 60)
    logs = sorted(alice.call("logs", j["id"])["data"].strip() for j in members)
    assert logs == ["index=0", "index=1", "index=2"]


def test_fair_share_lets_a_late_user_in(server_factory: Any, jobs_dir: Path) -> None:
    """1 GPU; A queues 6 jobs, then B queues 2: after A's first, B's run first."""
    server = server_factory(gpus={"backend": "virtual", "virtual_count": 1})
    alice, bob = server["alice"], server["bob"]
    first = good_job(jobs_dir, "alice", "a-first", "sleep 6", num_gpus=1)
    folder = good_job(jobs_dir, "alice", "a-work", "sleep 0.5", num_gpus=1)
    a_ids = [alice.submit(first)["id"]]
    wait_for(lambda: alice.call("job", a_ids[0])["state"] == "running", 60)
    a_ids += [alice.submit(folder)["id"] for _ in range(5)]
    wait_for(lambda: all(alice.call("job", i)["state"] == "queued" for i in a_ids[1:]), 60)
    b_folder = good_job(jobs_dir, "bob", "b-work", "sleep 0.5", num_gpus=1)
    b_ids = [bob.submit(b_folder)["id"] for _ in range(2)]
    wait_for(lambda: all(bob.call("job", i)["state"] == "queued" for i in b_ids), 60)
    # the shared views are at most half a second behind
    queue = wait_for(lambda: (lambda q: q if all(x["state"] == "queued" for x in q) else None)(
        alice.call("queue")), 10)
    assert [q["user"] for q in queue][:2] == ["bob", "bob"], queue
    assert {q["reason"].split(":")[0] for q in queue} <= {"Priority", "Resources"}  # worded
    jobs = {i: server.wait_job(i, 120) for i in a_ids + b_ids}
    order = sorted(jobs.values(), key=lambda j: j["started_at"])
    assert [j["user"] for j in order][:3] == ["alice", "bob", "bob"]
    users = {u["user"]: u for u in alice.call("users")}
    assert users["alice"]["gpu_hours"] > users["bob"]["gpu_hours"] > 0
    prio = alice.call("priority")
    assert prio == []  # nothing queued any more

"""DoPQ on the local two-node Slurm cluster (issue #16), end to end.

A real server with ``[runtime] backend = "slurm"``: jobs are built here, pushed
to the cluster's registry, placed by DoPQ's scheduler on a node and its GPUs,
run by ``sbatch`` through the node's Docker engine, watched through Slurm and
the job folder. CI runs these (the short form); the faults are in
``test_slurm_faults.py`` (``make test-slurm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from hostile import good_job
from slurmcluster import NODES, cluster_sections, jobs_of, resume_nodes

pytestmark = [pytest.mark.docker, pytest.mark.slurm]


@pytest.fixture
def slurm_server(server_factory: Any) -> Any:
    sections = cluster_sections()
    resume_nodes()  # a node a fault test left drained takes jobs again
    return server_factory(**sections, docker={"stop_grace": 3.0},
                          gpus={"backend": "virtual", "virtual_count": 0})


def test_jobs_run_on_both_nodes_with_the_gpus_slurm_bound(slurm_server: Any,
                                                          jobs_dir: Path) -> None:
    alice = slurm_server["alice"]
    script = 'echo "job=$DOPQ_JOB_ID gpus=$NVIDIA_VISIBLE_DEVICES node=$DOPQ_NODE"; sleep 4'
    ids = [alice.submit(good_job(jobs_dir, "alice", f"on-node-{i}", script, num_gpus=1))["id"]
           for i in range(4)]
    wait_for(lambda: sum(alice.call("job", i)["state"] == "running" for i in ids) == 4, 120)
    jobs = [slurm_server.wait_job(i, 120) for i in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 4, jobs
    assert {j["node"] for j in jobs} == set(NODES)  # 4 GPUs: two on each node
    for j in jobs:
        log = alice.call("logs", j["id"])["data"]
        assert f"job={j['id']} " in log and f"node={j['node']}" in log, log
        gpus = log.split("gpus=")[1].split()[0]
        assert gpus not in ("", "void") and len(gpus.split(",")) == 1, log
    owner = slurm_server.server.platform.store.owner_id()
    assert {r["node"] for r in jobs_of(owner)} == set(NODES)


def test_exit_code_time_limit_and_cancel(slurm_server: Any, jobs_dir: Path) -> None:
    alice = slurm_server["alice"]
    failing = alice.submit(good_job(jobs_dir, "alice", "exits-3", "echo bye; exit 3"))["id"]
    sleeper = alice.submit(good_job(jobs_dir, "alice", "sleeper", "sleep 300",
                                    num_gpus=1))["id"]
    limited = alice.submit(good_job(jobs_dir, "alice", "limited", "sleep 300",
                                    config={"time_limit": 3}))["id"]
    job = slurm_server.wait_job(failing, 120)
    assert (job["state"], job["exit_code"]) == ("failed", 3) and "exit code 3" in job["error"]
    wait_for(lambda: alice.call("job", sleeper)["state"] == "running", 120)
    owner = slurm_server.server.platform.store.owner_id()
    wait_for(lambda: any(r["state"] == "RUNNING" for r in jobs_of(owner)), 60)
    alice.call("cancel", sleeper)
    job = slurm_server.wait_job(sleeper, 60)
    assert job["state"] == "cancelled", job
    job = slurm_server.wait_job(limited, 120)
    assert job["state"] == "failed" and "timeout" in (job["error"] or ""), job
    wait_for(lambda: all(r["state"] not in ("RUNNING", "PENDING") for r in jobs_of(owner)), 60)


def test_hostile_values_reach_the_container_as_plain_text(slurm_server: Any,
                                                           jobs_dir: Path,
                                                           tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"$(touch {marker})`touch {marker}`;touch {marker} '\"\n--privileged"
    folder = good_job(jobs_dir, "alice", "hostile", 'printf "%s|" "$EVIL"; echo',
                      config={"run_params": {"environment": {"EVIL": evil}}})
    job_id = slurm_server["alice"].submit(folder)["id"]
    job = slurm_server.wait_job(job_id, 120)
    assert job["state"] == "succeeded", job
    assert evil in slurm_server["alice"].call("logs", job_id)["data"]
    assert not marker.exists()


def test_fair_share_across_the_cluster(slurm_server: Any, jobs_dir: Path) -> None:
    """Alice holds the 4 GPUs and queues more; Bob's jobs go ahead of her queued ones,
    one by one as her running jobs end."""
    alice, bob = slurm_server["alice"], slurm_server["bob"]
    holders = [alice.submit(good_job(jobs_dir, "alice", f"a-hold-{i}", "sleep 300",
                                     num_gpus=1))["id"] for i in range(4)]
    wait_for(lambda: all(alice.call("job", i)["state"] == "running" for i in holders), 120)
    a_folder = good_job(jobs_dir, "alice", "a-work", "sleep 1", num_gpus=1)
    a_ids = [alice.submit(a_folder)["id"] for _ in range(2)]
    b_folder = good_job(jobs_dir, "bob", "b-work", "sleep 1", num_gpus=1)
    b_ids = [bob.submit(b_folder)["id"] for _ in range(2)]
    wait_for(lambda: all(alice.call("job", i)["state"] == "queued" for i in a_ids + b_ids), 120)
    order = []
    for holder in holders:
        alice.call("cancel", holder)
        order.append(wait_for(lambda: next((i for i in a_ids + b_ids if i not in order and
                                            alice.call("job", i)["state"] != "queued"), None),
                              60))
    assert order[:2] == b_ids, order
    jobs = [slurm_server.wait_job(i, 120) for i in a_ids + b_ids]
    assert all(j["state"] == "succeeded" for j in jobs), jobs


def test_cli_shows_the_nodes(slurm_server: Any, jobs_dir: Path, monkeypatch: Any,
                             tmp_path: Path, capsys: Any) -> None:
    from conftest import cli_login

    from dopq import cli

    alice = slurm_server["alice"]
    job_id = alice.submit(good_job(jobs_dir, "alice", "shown", "sleep 20", num_gpus=2))["id"]
    wait_for(lambda: alice.call("job", job_id)["state"] == "running", 120)
    cli_login(slurm_server, monkeypatch, tmp_path)
    capsys.readouterr()
    for argv in (["status"], ["show", str(job_id)]):
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    print(out)  # -s: the capture to look at
    node = alice.call("job", job_id)["node"]
    assert f"node: {node}" in out and "GPUs: slurm" in out
    assert all(f"{n} GPU {i}" in out for n in NODES for i in (0, 1))
    alice.call("cancel", job_id)

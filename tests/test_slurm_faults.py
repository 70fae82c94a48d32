"""Faults of DoPQ on the local two-node Slurm cluster (issue #16): the long form.

Each test breaks one piece while jobs run on the cluster and more are queued,
and checks that every job still ends exactly once with the right result:

- the DoPQ server killed with -9 and started again: its running Slurm jobs are
  taken back by their comment (``dopq:<owner>:<job id>``), never submitted twice;
- slurmctld stopped and started again (its PID file, then ``cluster.sh up``);
- a node whose slurmd dies mid-job (``cluster.sh node-stop``): the job fails
  naming the node, or with ``[slurm] requeue_on_node_failure`` runs again on
  the other node;
- a hostile job archive is refused as on the Docker backend and reaches no node.

Other people use the same cluster (their jobs hold GPUs DoPQ counts as busy),
so every wait is generous. ``make test-slurm`` runs these.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import add_users, cleanup_docker, make_config, wait_for, write_toml
from hostile import good_job, traversal
from serverproc import ServerProc, signed_in
from slurmcluster import CLUSTER_DIR, NODES, cluster, cluster_sections, jobs_of, resume_nodes, slurm

from dopq.core import settings as settings_mod
from dopq.core.errors import DopqError
from dopq.server.store import Store

pytestmark = [pytest.mark.docker, pytest.mark.slurm, pytest.mark.slurm_long, pytest.mark.slow]

FINAL = ("succeeded", "failed", "cancelled")
SERVER = {"docker": {"stop_grace": 3.0}, "gpus": {"backend": "virtual", "virtual_count": 0}}


# -- helpers ---------------------------------------------------------------------------
def slurm_jobs_per_dopq_job(owner: str) -> Counter[int]:
    """How many Slurm jobs (any state Slurm still keeps) each DoPQ job id had."""
    return Counter(int(r["comment"].rsplit(":", 1)[1]) for r in jobs_of(owner))


def slurm_state(owner: str, job_id: int) -> str | None:
    rows = [r for r in jobs_of(owner) if r["comment"] == f"dopq:{owner}:{job_id}"]
    return rows[-1]["state"] if rows else None


def cancel_leftovers(owner: str) -> None:
    """Cancel what a failed test left queued or running in Slurm for this server."""
    ids = [r["id"] for r in jobs_of(owner)
           if r["state"] in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED")]
    if ids:
        slurm("scancel", *ids)


def assert_ended_once(job: dict[str, Any]) -> None:
    finals = [e for e in job["events"] if e["state"] in FINAL]
    assert len(finals) == 1, (job["id"], job["events"])


def submit(client: Any, folder: Path, name: str, script: str, gpus: int = 1) -> int:
    return int(client.submit(folder, {"name": name, "gpus": gpus,
                                      "command": ["sh", "-c", script]})["id"])


def ctld_pid() -> int:
    """slurmctld's PID from cluster.sh's PID file, checked against the binary."""
    pid = int((CLUSTER_DIR / "run" / "slurmctld.pid").read_text().strip())
    exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    assert exe == str(Path("/usr/sbin/slurmctld").resolve()), exe  # Debian: via alternatives
    return pid


def ctld_up() -> bool:
    return "is UP" in slurm("scontrol", "ping").stdout


@pytest.fixture
def slurm_sections() -> dict[str, Any]:
    sections = cluster_sections()
    resume_nodes()  # a node an earlier fault left down takes jobs again
    wait_for(ctld_up, 60, 0.5)
    return sections


# -- a. kill -9 of the server ------------------------------------------------------------
def test_server_kill9_readopts_running_slurm_jobs(tmp_path: Path, engine: None,
                                                  jobs_dir: Path,
                                                  slurm_sections: dict[str, Any]) -> None:
    """Jobs run on the cluster and more are queued; the server dies with -9, one job
    ends meanwhile; after the restart every job ends once with its exit code and no
    DoPQ job had two Slurm jobs."""
    cfg = make_config(tmp_path, **slurm_sections, **SERVER)
    settings = settings_mod.from_dict(cfg)
    add_users(settings.db_path)
    proc = ServerProc(write_toml(cfg, tmp_path / "config.toml"), tmp_path / "server.log")
    folder = good_job(jobs_dir, "alice", "kill-nine", "true", num_gpus=1)
    owner = ""
    try:
        proc.start()
        alice = signed_in(settings, "alice")
        owner = Store(settings.db_path).owner_id()
        plan = {"short-3": ("sleep 4; exit 3", 3), "long-0": ("sleep 20", 0),
                "long-4": ("sleep 20; exit 4", 4), "q-0": ("sleep 1", 0),
                "q-5": ("sleep 1; exit 5", 5), "q-1": ("sleep 1; exit 1", 1)}
        ids = {name: submit(alice, folder, name, script, gpus=2 if name.startswith("q")
                            else 1) for name, (script, _code) in plan.items()}
        # short-3 and one long job running in Slurm: then the server dies
        wait_for(lambda: slurm_state(owner, ids["short-3"]) == "RUNNING"
                 and "RUNNING" in (slurm_state(owner, ids["long-0"]),
                                   slurm_state(owner, ids["long-4"])), 90, 0.2)
        proc.kill9()
        # short-3 ends while no server watches
        wait_for(lambda: slurm_state(owner, ids["short-3"]) not in ("RUNNING", "COMPLETING"),
                 30, 0.2)
        running_at_restart = {n for n, i in ids.items() if slurm_state(owner, i) == "RUNNING"}
        assert running_at_restart, "no job was left running for the restart to take back"
        proc.start()
        alice = signed_in(settings, "alice")

        def all_final() -> dict[str, dict[str, Any]] | None:
            jobs = {n: alice.call("job", i) for n, i in ids.items()}
            return jobs if all(j["state"] in FINAL for j in jobs.values()) else None

        try:
            jobs = wait_for(all_final, 150, 0.5)
        except AssertionError:
            print(proc.log.read_text()[-3000:])
            raise
        for name, (_script, code) in plan.items():
            job = jobs[name]
            assert (job["state"], job["exit_code"]) == (
                "succeeded" if code == 0 else "failed", code), job
            assert_ended_once(job)
        per_job = slurm_jobs_per_dopq_job(owner)
        assert {per_job[i] for i in ids.values()} == {1}, (per_job, ids)
        print(f"taken back after kill -9: {sorted(running_at_restart)}")
    finally:
        proc.term()
        if owner:
            cancel_leftovers(owner)
        cleanup_docker(settings.docker.name_prefix)


# -- b. slurmctld restarts -----------------------------------------------------------------
def test_slurmctld_restart_loses_and_doubles_nothing(server_factory: Any, jobs_dir: Path,
                                                      slurm_sections: dict[str, Any]) -> None:
    """slurmctld stops while two jobs run; more are submitted while it is away; it
    comes back (``cluster.sh up``): every job ends once, with its exit code."""
    srv = server_factory(**slurm_sections, **SERVER)
    alice = srv["alice"]
    owner = srv.server.platform.store.owner_id()
    folder = good_job(jobs_dir, "alice", "ctld-restart", "true", num_gpus=1)
    up: subprocess.Popen[str] | None = None
    try:
        plan = {"run-0": ("sleep 12", 0), "run-6": ("sleep 12; exit 6", 6)}
        ids = {n: submit(alice, folder, n, s) for n, (s, _c) in plan.items()}
        wait_for(lambda: all(slurm_state(owner, i) == "RUNNING" for i in ids.values()), 90,
                 0.2)
        pid = ctld_pid()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, 0.1)
        # queued while the controller is away: DoPQ must wait for it, not fail them
        later = {"late-0": ("sleep 1", 0), "late-7": ("sleep 1; exit 7", 7),
                 "late-2g": ("sleep 1", 0)}
        for n, (s, _c) in later.items():
            ids[n] = submit(alice, folder, n, s, gpus=2 if n == "late-2g" else 1)
        plan.update(later)
        time.sleep(5)  # the controller stays away a while (DoPQ polls meanwhile)
        assert all(alice.call("job", i)["state"] not in FINAL for i in ids.values()), \
            {n: alice.call("job", i)["error"] for n, i in ids.items()}
        # cluster.sh up starts slurmctld again, then smoke-tests (Slurm jobs of its own,
        # which may wait for GPUs): the test goes on once the controller answers.
        up = subprocess.Popen(["bash", str(Path(__file__).parent.parent / "scripts" /
                                           "cluster.sh"), "up"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        wait_for(ctld_up, 60, 0.5)
        jobs = {n: srv.wait_job(i, 150) for n, i in ids.items()}
        for name, (_s, code) in plan.items():
            job = alice.call("job", jobs[name]["id"])
            assert (job["state"], job["exit_code"]) == (
                "succeeded" if code == 0 else "failed", code), job
            assert_ended_once(job)
        per_job = slurm_jobs_per_dopq_job(owner)
        assert {per_job[i] for i in ids.values()} == {1}, (per_job, ids)
    finally:
        if not ctld_up():  # never leave the cluster without its controller
            cluster("up", check=False)
        if up is not None:
            try:
                up.wait(120)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)
        cancel_leftovers(owner)


# -- c. a node dies mid-job --------------------------------------------------------------
def node_job(mark: str) -> str:
    """The first run sleeps on the node that dies; a run after a requeue finds the mark
    it left in /outdir (kept for the job) and ends at once, or (/outdir not kept)
    sleeps as long and still succeeds. ``mark``: unique (test servers share the
    cluster's outputs folder, see test_outputs_of_two_servers_stay_apart)."""
    return (f'echo "node=$DOPQ_NODE"; [ -e /outdir/{mark} ] && exit 0; '
            f"touch /outdir/{mark} 2>/dev/null; sleep 40")


def _run_until_node_dies(srv: Any, jobs_dir: Path, name: str) -> tuple[int, str, str]:
    """A one-GPU job runs; its node's slurmd stops. (job id, node, owner)."""
    alice = srv["alice"]
    owner = srv.server.platform.store.owner_id()
    script = node_job(f"first-run-{uuid.uuid4().hex}")
    job_id = alice.submit(good_job(jobs_dir, "alice", name, script, num_gpus=1))["id"]
    job = wait_for(lambda: (j := alice.call("job", job_id))["state"] == "running"
                   and slurm_state(owner, job_id) == "RUNNING" and j, 120, 0.2)
    node = job["node"]
    assert node in NODES, job
    cluster("node-stop", node)
    return job_id, node, owner


def _restore(node: str) -> None:
    cluster("node-start", node, check=False)
    slurm("scontrol", "update", f"nodename={node}", "state=resume")


def test_node_failure_fails_the_job_naming_the_node(server_factory: Any, jobs_dir: Path,
                                                    slurm_sections: dict[str, Any]) -> None:
    srv = server_factory(**slurm_sections, **SERVER)
    node, owner = "", ""
    try:
        job_id, node, owner = _run_until_node_dies(srv, jobs_dir, "dies")
        job = srv.wait_job(job_id, 75)  # SlurmdTimeout 10 s (often more), then NODE_FAIL
        assert job["state"] == "failed" and node in (job["error"] or ""), job
        assert_ended_once(srv["alice"].call("job", job_id))
        assert slurm_jobs_per_dopq_job(owner)[job_id] == 1
    finally:
        if owner:
            cancel_leftovers(owner)
        if node:
            _restore(node)


def test_node_failure_requeues_onto_the_other_node(server_factory: Any, jobs_dir: Path,
                                                   slurm_sections: dict[str, Any]) -> None:
    sections = {**slurm_sections,
                "slurm": {**slurm_sections["slurm"], "requeue_on_node_failure": True}}
    srv = server_factory(**sections, **SERVER)
    node, owner = "", ""
    try:
        job_id, node, owner = _run_until_node_dies(srv, jobs_dir, "requeued")
        alice = srv["alice"]
        # queued again after NODE_FAIL, then run on the node that still works
        job = srv.wait_job(job_id, 100)
        assert job["state"] == "succeeded", (job["error"], job["events"])
        assert job["node"] != node, job
        assert any("requeued" in (e.get("detail") or "") and node in (e.get("detail") or "")
                   for e in alice.call("job", job_id)["events"]), job
        assert_ended_once(alice.call("job", job_id))
        assert f"node={job['node']}" in alice.call("logs", job_id)["data"]
    finally:
        if owner:
            cancel_leftovers(owner)
        if node:
            _restore(node)


# -- outputs on the cluster ------------------------------------------------------------------


def test_outputs_of_two_servers_stay_apart(server_factory: Any, jobs_dir: Path,
                                           slurm_sections: dict[str, Any]) -> None:
    """Two servers on one cluster: alice's job 1 of the second does not see the /outdir
    of alice's job 1 of the first."""
    first = server_factory(**slurm_sections, **SERVER)
    second = server_factory(**slurm_sections, **SERVER)
    secret = uuid.uuid4().hex
    wrote = first["alice"].submit(good_job(jobs_dir, "alice", "writes-outdir",
                                           f"echo {secret} > /outdir/secret"))["id"]
    assert first.wait_job(wrote, 120)["state"] == "succeeded"
    read = second["alice"].submit(good_job(jobs_dir, "alice", "reads-outdir",
                                           "echo files: $(ls -A /outdir); "
                                           "cat /outdir/secret 2>/dev/null; true"))["id"]
    assert read == wrote  # the same user and job id on both servers
    assert second.wait_job(read, 120)["state"] == "succeeded"
    log = second["alice"].call("logs", read)["data"]
    assert "files:" in log and secret not in log, log


# -- d. hostile archives ------------------------------------------------------------------
def _verdict(client: Any, server: Any, archive: Path) -> str:
    """Why the server refused ``archive`` (judged by the server, not the client)."""
    try:
        job_id = client.submit(archive, precheck=False)["id"]
    except DopqError as exc:
        return str(exc)
    job = server.wait_job(job_id, 60)
    assert job["state"] == "failed", job
    return str(job["error"])


def test_hostile_archive_refused_as_on_docker(server_factory: Any, tmp_path: Path,
                                              slurm_sections: dict[str, Any]) -> None:
    on_slurm = server_factory(**slurm_sections, **SERVER)
    on_docker = server_factory()
    owner = on_slurm.server.platform.store.owner_id()
    cases: dict[str, Path] = {}
    for srv_name in ("slurm", "docker"):
        folder = tmp_path / srv_name
        folder.mkdir()
        foreign = good_job(folder, "alice", "foreign-base", "echo hi")
        (foreign / "Dockerfile").write_text(
            "FROM alpine:3.19\nCOPY run.sh /job/run.sh\nCMD [\"sh\", \"/job/run.sh\"]\n")
        cases[f"{srv_name}:foreign-base"] = foreign
        cases[f"{srv_name}:privileged"] = good_job(
            folder, "alice", "privileged", config={"run_params": {"privileged": True}})
        cases[f"{srv_name}:traversal"] = traversal(folder)
    words = {"foreign-base": "FROM alpine:3.19", "privileged": "privileged", "traversal": "'..'"}
    for case, word in words.items():
        got_slurm = _verdict(on_slurm["alice"], on_slurm, cases[f"slurm:{case}"])
        got_docker = _verdict(on_docker["alice"], on_docker, cases[f"docker:{case}"])
        assert got_slurm == got_docker, (case, got_slurm, got_docker)
        assert got_slurm.startswith("rejected:") and word in got_slurm, (case, got_slurm)
    assert jobs_of(owner) == []
    assert not (Path(slurm_sections["slurm"]["shared_dir"]) / owner).exists()

"""Preemption (issue #14), end to end on the real engine with one virtual GPU.

Alice's preemptible job holds the only GPU; it traps SIGTERM, writes a
checkpoint to ``/outdir`` and exits. Bob (under his fair share: he has used
nothing) submits a job: alice's is stopped within the grace, goes back to the
queue keeping its submit time, bob's runs, then alice's runs again with the
same ``/outdir``, finds its checkpoint and sees ``DOPQ_RESTART_COUNT=1``.
Also the store's migration of a database from before preemption.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from fakes import database_at
from hostile import good_job

from dopq.core.errors import DopqError
from dopq.core.jobs import JobState
from dopq.server.schema import SCHEMA_VERSION
from dopq.server.store import Store

GRACE = 10.0
# One device; a job may be preempted after 1 s of its run, gets 10 s to checkpoint.
PREEMPTING = {
    "gpus": {"backend": "virtual", "virtual_count": 1},
    "policy": {"preemption": "fairshare", "min_runtime": 1.0, "preempt_grace": GRACE},
}
# The trap runs while `wait` waits (a foreground sleep would hold it off until it ends).
CHECKPOINTING = """
echo "run $DOPQ_RESTART_COUNT"
echo "$DOPQ_RESTART_COUNT" >> /outdir/runs
if [ -f /outdir/checkpoint ]; then
    echo "resumed $(cat /outdir/checkpoint) restart $DOPQ_RESTART_COUNT" > /outdir/resumed
    exit 0
fi
trap 'echo "step 7" > /outdir/checkpoint; echo checkpointed; exit 0' TERM
echo started > /outdir/started
sleep 300 &
wait $!
"""


@pytest.mark.docker
def test_a_light_users_job_preempts_a_checkpointing_job_which_resumes(
        server_factory: Any, jobs_dir: Path) -> None:
    server = server_factory(**PREEMPTING)
    alice, bob, root = server["alice"], server["bob"], server["root"]
    heavy = alice.submit(good_job(jobs_dir, "alice", "heavy", CHECKPOINTING, num_gpus=1),
                         {"preemptible": True})["id"]
    outdir = server.settings.state_path / "outputs" / "alice" / str(heavy)
    wait_for(lambda: (outdir / "started").exists(), 90)
    first = alice.call("job", heavy)
    assert first["state"] == "running" and first["preemptible"] and first["restarts"] == 0

    light = bob.submit(good_job(jobs_dir, "bob", "light", "echo light; sleep 2",
                                num_gpus=1))["id"]
    # Preempted: back in the queue within the grace (the trap exits at once).
    requeued = wait_for(lambda: (lambda j: j if j["restarts"] == 1 else None)(
        alice.call("job", heavy)), 60 + GRACE)
    assert requeued["preempted_by"] == light
    assert requeued["submitted_at"] == first["submitted_at"]
    assert (outdir / "checkpoint").read_text() == "step 7\n"
    done_light = server.wait_job(light, 60)
    assert done_light["state"] == "succeeded"
    done = server.wait_job(heavy, 90)
    assert done["state"] == "succeeded", done
    assert done["started_at"] >= done_light["started_at"]
    assert done["restarts"] == 1 and done["submitted_at"] == first["submitted_at"]

    # The second run found the checkpoint, with DOPQ_RESTART_COUNT=1, in the same /outdir.
    assert (outdir / "resumed").read_text() == "resumed step 7 restart 1\n"
    assert (outdir / "runs").read_text() == "0\n1\n"
    # Its events say so, dopq show names the job and why, the audit log records it.
    details = [e["detail"] for e in done["events"]]
    assert any(d.startswith("preempted") for d in details), details
    audit = [e for e in root.call("audit")
             if e["action"] == "preempt" and f"job {heavy} of alice" in e["detail"]]
    assert len(audit) == 1, audit
    # Its trap saved the checkpoint and ended it well within the grace (no SIGKILL).
    back = next(e["at"] for e in done["events"] if e["detail"].startswith("preempted"))
    assert 0 <= _seconds(back) - _seconds(audit[0]["at"]) < GRACE
    # Both runs' logs: the first kept apart, the second as the job's run log.
    assert "run 1" in alice.call("logs", heavy)["data"]
    first_log = server.settings.state_path / "jobs" / str(heavy) / "run.1.log"
    assert "run 0" in first_log.read_text() and "checkpointed" in first_log.read_text()
    earlier = alice.call("logs", heavy, "run.1")
    assert earlier["data"] == first_log.read_text() and earlier["done"]
    with pytest.raises(DopqError, match="preempted 1 times: no run 2"):
        alice.call("logs", heavy, "run.2")


def _seconds(at: Any) -> float:
    """An API time (ISO 8601 UTC, or a Unix time) in seconds."""
    if isinstance(at, int | float):
        return float(at)
    return dt.datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()


def test_a_database_from_before_preemption_gains_the_columns(tmp_path: Path) -> None:
    """Jobs stored before #14 read as not preemptible, never restarted."""
    path = tmp_path / "old.sqlite"
    database_at(path, 6)
    store = Store(path)
    try:
        assert store.read("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        row = store.jobs()[0]
        assert (row["preemptible"], row["restarts"], row["preempted_by"]) == (False, 0, None)
        new = store.add_job(name="new", user="bob", num_gpus=1, preemptible=True)
        store.transition(new, JobState.RECEIVED, restarts=2, preempted_by=1)
        got = store.job(new)
        assert (got["preemptible"], got["restarts"], got["preempted_by"]) == (True, 2, 1)
    finally:
        store.close()


# -- the queue thread's part, with a fake engine (test_scheduler_driver's rig) -------------


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    """test_scheduler_driver's rig (two GPUs), with preemption on."""
    from conftest import make_config
    from test_scheduler_driver import Clock, FakeEngine

    from dopq.core import settings as settings_mod
    from dopq.server.queue import PriorityQueueThread
    from dopq.server.runtime import ContainerSpec

    settings = settings_mod.from_dict(make_config(
        tmp_path, docker={"stop_grace": 1.0},
        policy={"preemption": "fairshare", "min_runtime": 60.0, "preempt_grace": 5.0}))
    store = Store(settings.db_path)
    clock = Clock()
    engine = FakeEngine(store.owner_id())
    q = PriorityQueueThread(settings, store, engine, [0, 1], "env",  # type: ignore[arg-type]
                            clock=clock)
    q.container_spec = lambda row, gpus: ContainerSpec(  # type: ignore[method-assign]
        name=q.container_name(row["id"]), image="img",
        labels={"dopq.job": str(row["id"])}, gpus=gpus)

    class Rig:
        def add(self, user: str = "alice", gpus: int = 1, **kw: Any) -> int:
            return store.add_job(name="job", user=user, state=JobState.QUEUED, num_gpus=gpus,
                                 submitted_at=clock.now, **kw)

        def step(self, advance: float = 0.0, exited: list[str] | None = None) -> None:
            clock.now += advance
            q.step(exited)
            q.scheduler.validate()

    r: Any = Rig()
    r.settings, r.store, r.clock, r.engine, r.q = settings, store, clock, engine, q
    yield r
    q._workers.shutdown(wait=True)
    store.close()


def test_the_driver_preempts_keeps_the_log_and_clears_the_name_for_the_rerun(
        rig: Any) -> None:
    rig.q.recover()
    job = rig.add(gpus=1, preemptible=True)
    rig.step()
    name = rig.q.container_name(job)
    submitted = rig.store.job(job)["submitted_at"]
    assert rig.store.job(job)["state"] == "running"
    light = rig.add(user="bob", gpus=2)  # one GPU is free: not enough
    rig.step(1.0)
    assert rig.store.job(job)["state"] == "running" and name not in rig.engine.stopped
    rig.step(60.0)  # past its minimum runtime: preempted for bob's job
    wait_for(lambda: name in rig.engine.stopped, 10)  # docker stop with the grace, on a worker
    audit = rig.store.audit_log()[0]
    assert audit["action"] == "preempt"
    assert audit["detail"].startswith(f"job {job} of alice: preempted by job {light} of bob")

    # The container exits (its trap saved a checkpoint): queued again by the
    # scheduler, its log kept apart and its container collected on a worker.
    rig.engine.exit(name, 0, rig.clock.now)
    rig.step(1.0, [name])
    row = rig.store.job(job)
    assert (row["state"], row["restarts"], row["preempted_by"]) == ("queued", 1, light)
    assert (row["error"], row["gpus"], row["submitted_at"]) == (None, [], submitted)
    assert rig.store.job(light)["state"] == "running"
    first = rig.q.house.run_log_path(job, 1)
    wait_for(first.exists, 10)
    wait_for(lambda: name not in rig.engine.containers, 10)
    assert first.read_text() == "log\n" and not rig.q.run_log_path(job).exists()
    assert job not in rig.q.house._sealed  # the outputs stay open for the next run

    # bob's job ends. A container of the first run left behind (remove_containers
    # off, a collect not yet run) is cleared before the rerun takes its name.
    rig.engine.containers[name] = _exited(rig, name, job)
    first.unlink()
    light_name = rig.q.container_name(light)
    rig.engine.exit(light_name, 0, rig.clock.now)
    rig.step(1.0, [light_name])
    assert rig.store.job(job)["state"] == "running" and first.read_text() == "log\n"
    assert rig.engine.containers[name].running  # the new run's container


def _exited(rig: Any, name: str, job: int) -> Any:
    from dopq.server.runtime import ContainerStatus

    return ContainerStatus(name, name, job, False, 0, False, 1.0, 2.0, owner=rig.engine.owner)


def test_the_container_gets_its_restart_count(tmp_path: Path) -> None:
    from conftest import make_config

    from dopq.core import settings as settings_mod
    from dopq.server.containers import container_spec
    from dopq.server.outputs import OutputFolders

    settings = settings_mod.from_dict(make_config(tmp_path))
    store = Store(settings.db_path)
    try:
        job = store.add_job(name="job", user="alice", state=JobState.QUEUED, num_gpus=1,
                            preemptible=True)
        folders = OutputFolders(settings)
        spec = container_spec(settings, folders, store.job(job), [0], instance="t",
                              owner="o", gpu_mode="env")
        assert spec.env["DOPQ_RESTART_COUNT"] == "0"
        (folders.path("alice", job) / "checkpoint").write_text("step 7\n")
        store.transition(job, JobState.QUEUED, restarts=1, preempted_by=5)
        spec = container_spec(settings, folders, store.job(job), [0], instance="t",
                              owner="o", gpu_mode="env")
        assert spec.env["DOPQ_RESTART_COUNT"] == "1"
        outdir = spec.binds[str(folders.path("alice", job))]
        assert outdir["bind"] == "/outdir"  # the same folder, as the first run left it
        assert (folders.path("alice", job) / "checkpoint").read_text() == "step 7\n"
    finally:
        store.close()

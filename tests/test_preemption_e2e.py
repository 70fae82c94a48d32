"""Preemption (issue #14), end to end on the real engine with one virtual GPU.

Alice's preemptible job holds the only GPU; it traps SIGTERM, writes a
checkpoint to ``/outdir`` and exits. Bob (under his fair share: he has used
nothing) submits a job: alice's is stopped within the grace, goes back to the
queue keeping its submit time, bob's runs, then alice's runs again with the
same ``/outdir``, finds its checkpoint and sees ``DOPQ_RESTART_COUNT=1``.
Also the store's migration of a database from before preemption.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from hostile import good_job

from dopq.core.jobs import JobState
from dopq.server.schema import MIGRATIONS, SCHEMA_VERSION
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
    assert any(e["action"] == "preempt" and f"job {heavy} of alice" in e["detail"]
               for e in root.call("audit"))
    # Both runs' logs: the first kept apart, the second as the job's run log.
    assert "run 1" in alice.call("logs", heavy)["data"]
    first_log = server.settings.state_path / "jobs" / str(heavy) / "run.1.log"
    assert "run 0" in first_log.read_text() and "checkpointed" in first_log.read_text()


def test_a_database_from_before_preemption_gains_the_columns(tmp_path: Path) -> None:
    """Jobs stored before #14 read as not preemptible, never restarted."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    for step in MIGRATIONS[:6]:
        db.executescript(step)
    db.execute("PRAGMA user_version=6")
    db.execute("INSERT INTO jobs (name, user, state, num_gpus, submitted_at) "
               "VALUES ('old', 'alice', 'queued', 1, 1.0)")
    db.commit()
    db.close()
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

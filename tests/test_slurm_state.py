"""Reading Slurm's answers (dopq.server.slurmstate): scontrol's key=value lines,
gres and TRES counts, node states, squeue rows with a bar in a user's text.
"""

from __future__ import annotations

import pytest

from dopq.server.slurmstate import gres_gpus, key_values, node_state, parse_jobs, tres_gpus

# -- parsing -----------------------------------------------------------------------

def test_key_values_keeps_spaces_in_values_and_the_first_of_two_keys() -> None:
    line = ("NodeName=dopq-n1 Arch=x86_64 CPUTot=8 Gres=gpu:tesla:2(S:0-1) "
            "OS=Linux 6.1.0-18-amd64 #1 SMP Debian RealMemory=16000 State=IDLE+DRAIN "
            "Reason=maintenance work [root@2026-12-03T10:00:00] Comment=x State=DOWN")
    kv = key_values(line)
    assert kv["NodeName"] == "dopq-n1"
    assert kv["OS"] == "Linux 6.1.0-18-amd64 #1 SMP Debian"
    assert kv["Reason"] == "maintenance work [root@2026-12-03T10:00:00]"
    assert kv["State"] == "IDLE+DRAIN"


@pytest.mark.parametrize(("text", "count"), [
    ("gpu:2", 2), ("gpu:tesla:2(S:0-1)", 2), ("gres:gpu:1", 1), ("gres/gpu:3", 3),
    ("gpu:a100:2(S:0),gpu:v100:1(S:1)", 3), ("(null)", 0), ("N/A", 0), ("", 0),
    ("gpu", 1), ("mps:100,gpu:2", 2), ("gpu:tesla:no_consume:4", 4),
])
def test_gres_gpus(text: str, count: int) -> None:
    assert gres_gpus(text) == count


def test_tres_gpus_prefers_the_untyped_count() -> None:
    assert tres_gpus("cpu=2,mem=2G,gres/gpu=2,gres/gpu:tesla=2") == 2
    assert tres_gpus("cpu=2,gres/gpu:a=1,gres/gpu:b=2") == 3
    assert tres_gpus("cpu=2,mem=1G") is None
    assert tres_gpus("") is None


@pytest.mark.parametrize(("raw", "text", "usable"), [
    ("IDLE", "idle", True), ("MIXED", "mixed", True), ("ALLOCATED", "allocated", True),
    ("IDLE+DRAIN", "drained", False), ("MIXED+DRAIN", "draining", False),
    ("DOWN*", "down*", False), ("DOWN+NOT_RESPONDING", "down*", False),
    ("IDLE*", "idle*", False), ("IDLE+CLOUD+POWERED_DOWN", "idle", True),
    ("UNKNOWN", "unknown", False), ("IDLE+FAIL", "fail", False),
])
def test_node_state(raw: str, text: str, usable: bool) -> None:
    assert node_state(raw) == (text, usable)


def test_parse_jobs_a_bar_in_name_or_comment_moves_no_other_field() -> None:
    rows = parse_jobs(
        "5|0|RUNNING|n1|gres:gpu:2|2026-12-03T17:00:00|Unknown|my|name|dopq:o:9\n"
        "6_1|0|RUNNING|n1|N/A|N/A|N/A|array|x\n"
        "garbage\n")
    assert len(rows) == 1
    job = rows[0]
    assert (job.id, job.uid, job.state, job.node, job.gpus) == (5, 0, "RUNNING", "n1", 2)
    assert job.name == "my|name" and job.comment == "dopq:o:9"
    assert job.start is not None and job.end is None


@pytest.mark.parametrize(("state", "requeue", "reason"), [
    ("NODE_FAIL", False, "node dopq-n2 failed"),
    ("NODE_FAIL", True, "requeued: node dopq-n2 failed"),
    ("BOOT_FAIL", True, "requeued: node dopq-n2 failed to boot"),
    ("CANCELLED", True, "cancelled in Slurm"),  # only the node's failures are requeued
])
def test_a_node_failure_asks_for_a_requeue_when_configured(state: str, requeue: bool,
                                                          reason: str) -> None:
    from dopq.server.slurmstate import SlurmJob, job_status

    job = SlurmJob(101, 0, state, "dopq-n2", 1, 100.0, 200.0, "dopq-x-7", "dopq:o:7")
    st = job_status("slurm-101", "dopq-x-7", 7, "o", job, None, 1000.0, requeue)
    assert (st.running, st.exit_code, st.reason) == (False, None, reason)

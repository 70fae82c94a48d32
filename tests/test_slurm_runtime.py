"""SlurmRuntime against a fake Slurm (a runner that answers like squeue, sbatch,
scancel and scontrol), the parsing of Slurm's output, and the batch script:
checked with ``bash -n`` and run for real with a fake ``docker`` on PATH that
records its arguments, so hostile values in every spec field are seen to
arrive as exactly one argument each and to run nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dopq.core.errors import DopqError, EngineUnavailable
from dopq.core.settings import Settings
from dopq.server.batch import Shell, batch_script, docker_argv
from dopq.server.runspec import LABEL_JOB, LABEL_OWNER, ContainerSpec
from dopq.server.slurm import SlurmRuntime
from dopq.server.slurmstate import (
    SQUEUE_FORMAT,
    STATUS_WAIT,
    gres_gpus,
    key_values,
    node_state,
    parse_jobs,
    tres_gpus,
)

OWNER = "a1b2c3d4e5"
UID = os.getuid()
EVIL = "x'\"$(touch PWNED1)`touch PWNED2`;touch PWNED3\n -rf ${IFS}* \\ && touch PWNED4 #"


def spec(name: str = "dopq-a1b2c3d4-7", job: int = 7, **kw: Any) -> ContainerSpec:
    labels = {LABEL_JOB: str(job), LABEL_OWNER: OWNER, "dopq.instance": "dopq"}
    return ContainerSpec(name=name, image="127.0.0.1:5000/dopq/busybox:latest", labels=labels,
                         **kw)


class FakeSlurm:
    """Answers Slurm's commands from a table of jobs and nodes; records every argv."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.jobs: dict[int, dict[str, Any]] = {}
        self.nodes: list[str] = []
        self.next_id = 100
        self.down = False
        self.on_scancel: Any = None

    def add(self, jid: int, state: str = "RUNNING", *, comment: str = f"dopq:{OWNER}:7",
            uid: int = UID, node: str = "dopq-n1", gres: str = "gres:gpu:1",
            end: str = "Unknown", name: str = "dopq-a1b2c3d4-7") -> None:
        self.jobs[jid] = dict(state=state, comment=comment, uid=uid, node=node, gres=gres,
                              end=end, name=name)

    def row(self, jid: int) -> str:
        j = self.jobs[jid]
        return (f"{jid}|{j['uid']}|{j['state']}|{j['node']}|{j['gres']}|2026-12-03T17:00:00|"
                f"{j['end']}|{j['name']}|{j['comment']}")

    def __call__(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        if self.down:
            return 1, "", "squeue: error: Unable to contact slurm controller (connect failure)\n"
        cmd = argv[0]
        if cmd == "squeue":
            wanted = [a.split("=", 1)[1] for a in argv if a.startswith("--jobs=")]
            if wanted:
                jid = int(wanted[0])
                if jid not in self.jobs:
                    return 1, "", "slurm_load_jobs error: Invalid job id specified\n"
                return 0, self.row(jid) + "\n", ""
            return 0, "".join(self.row(j) + "\n" for j in self.jobs), ""
        if cmd == "sbatch":
            self.next_id += 1
            comment = next(a.split("=", 1)[1] for a in argv if a.startswith("--comment="))
            self.add(self.next_id, "PENDING", comment=comment)
            return 0, f"{self.next_id}\n", ""
        if cmd == "scancel":
            if self.on_scancel:
                self.on_scancel(argv)
            return 0, "", ""
        if argv[:2] == ["scontrol", "ping"]:
            return 0, "Slurmctld(primary) at head is UP\n", ""
        if argv[:5] == ["scontrol", "--details", "--oneliner", "show", "node"]:
            return 0, "".join(n + "\n" for n in self.nodes), ""
        return 1, "", f"{cmd}: error: unexpected call\n"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings()
    s.slurm.shared_dir = str(tmp_path / "shared")
    s.slurm.partition = "gpu"
    s.slurm.extra_args = ["--qos=normal"]
    s.slurm.poll_interval = 0.01
    return s


@pytest.fixture
def fake() -> FakeSlurm:
    return FakeSlurm()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rt(settings: Settings, fake: FakeSlurm, clock: Clock) -> SlurmRuntime:
    return SlurmRuntime(settings, OWNER, fake, grace=10, clock=clock, sleep=clock.sleep)


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


# -- Slurm commands ----------------------------------------------------------------

def test_run_writes_a_private_job_folder_and_submits_it(rt: SlurmRuntime, fake: FakeSlurm,
                                                        settings: Settings) -> None:
    s = spec(gpus=[0, 1], node="dopq-n2", nano_cpus=1_500_000_000, mem_limit=3 * 2**30 + 1,
             time_limit=3600.0)
    ref = rt.run(s)
    assert ref == "slurm-101"
    job_dir = Path(settings.slurm.shared_dir) / OWNER / "job-7-dopq-a1b2c3d4-7"
    assert fake.calls[-1] == [
        "sbatch", "--parsable", "--nodes=1", "--ntasks=1", "--job-name=dopq-a1b2c3d4-7",
        f"--comment=dopq:{OWNER}:7", f"--output={job_dir}/slurm.out", f"--chdir={job_dir}",
        "--no-requeue", "--nodelist=dopq-n2", "--gres=gpu:2", "--cpus-per-task=2",
        "--mem=3073M", "--time=61", "--partition=gpu", "--qos=normal", f"{job_dir}/job.sh"]
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((job_dir.parent).stat().st_mode) == 0o700
    assert stat.S_IMODE((job_dir / "job.sh").stat().st_mode) == 0o700
    assert json.loads((job_dir / "meta.json").read_text()) == {
        "slurm_job": "101", "name": "dopq-a1b2c3d4-7", "job_id": 7}
    st = rt.status(ref)
    assert st is not None and st.running and st.job_id == 7 and st.owner == OWNER
    assert st.id == ref and st.name == "dopq-a1b2c3d4-7" and not st.created


def test_run_with_a_hostile_name_stays_in_the_owner_folder(rt: SlurmRuntime, fake: FakeSlurm,
                                                           settings: Settings) -> None:
    rt.run(spec(name="../../" + EVIL))
    root = Path(settings.slurm.shared_dir) / OWNER
    (folder,) = list(root.iterdir())
    assert folder.name.startswith("job-7-") and "/" not in folder.name[6:]
    job_name = next(a for a in fake.calls[-1] if a.startswith("--job-name="))
    assert job_name == "--job-name=../../" + EVIL  # one argument, no shell


def test_sbatch_failure_is_one_line_and_leaves_no_folder(rt: SlurmRuntime, fake: FakeSlurm,
                                                         settings: Settings) -> None:
    def refuse(argv: list[str], timeout: float) -> tuple[int, str, str]:
        return 1, "", ("sbatch: error: Batch job submission failed: Requested node "
                       "configuration is not available\nmore\n")
    rt._run = refuse
    with pytest.raises(DopqError) as err:
        rt.run(spec())
    assert str(err.value) == ("Slurm: sbatch: sbatch: error: Batch job submission failed: "
                              "Requested node configuration is not available")
    assert not list((Path(settings.slurm.shared_dir) / OWNER).iterdir())


def test_an_unreachable_controller_is_engine_unavailable(rt: SlurmRuntime,
                                                         fake: FakeSlurm) -> None:
    fake.down = True
    with pytest.raises(EngineUnavailable):
        rt.list("dopq", OWNER)
    with pytest.raises(EngineUnavailable):
        rt.nodes()
    assert rt.ping() is False


def test_ping(rt: SlurmRuntime) -> None:
    assert rt.ping() is True
    assert rt.has_nvidia_runtime() is False
    assert rt.foreign_gpu_envs(OWNER) == [] and rt.stats("slurm-1") is None


def _finish(settings: Settings, ref: str, code: int = 3, **extra: Any) -> Path:
    (folder,) = [d for d in (Path(settings.slurm.shared_dir) / OWNER).iterdir()
                 if json.loads((d / "meta.json").read_text())["slurm_job"] == ref[6:]]
    (folder / "status").write_text(json.dumps({
        "exit_code": code, "oom_killed": True, "started_at": "2026-12-03T17:00:00.5Z",
        "finished_at": "2026-12-03T17:00:10Z", "reason": "", "slurm_job": ref[6:],
        "node": "dopq-n1", **extra}))
    return folder


def test_status_file_gives_the_exit(rt: SlurmRuntime, fake: FakeSlurm,
                                    settings: Settings) -> None:
    ref = rt.run(spec())
    fake.jobs[101]["state"] = "RUNNING"
    _finish(settings, ref)
    st = rt.status(ref)
    assert st is not None and not st.running and st.exit_code == 3 and st.oom_killed
    assert st.finished_at is not None and st.started_at is not None
    assert st.finished_at - st.started_at == pytest.approx(9.5)
    assert st.node == "dopq-n1" and st.reason is None
    del fake.jobs[101]  # Slurm forgot it: the folder still tells
    st = rt.status(ref)
    assert st is not None and st.exit_code == 3 and not st.running


@pytest.mark.parametrize(("state", "reason"), [
    ("NODE_FAIL", "node dopq-n2 failed"), ("TIMEOUT", "time limit (Slurm)"),
    ("CANCELLED", "cancelled in Slurm"), ("BOOT_FAIL", "node dopq-n2 failed to boot"),
])
def test_ended_without_status(rt: SlurmRuntime, fake: FakeSlurm, clock: Clock, state: str,
                              reason: str) -> None:
    ref = rt.run(spec())
    fake.jobs[101].update(state=state, node="dopq-n2", end="2026-12-03T17:00:00")
    clock.now = time.mktime(time.strptime("2026-12-03T17:01:00", "%Y-%m-%dT%H:%M:%S"))
    st = rt.status(ref)
    assert st is not None and not st.running and st.exit_code is None
    assert st.reason == reason and st.node == "dopq-n2"


def test_a_finished_job_waits_a_moment_for_its_status_file(rt: SlurmRuntime, fake: FakeSlurm,
                                                           clock: Clock) -> None:
    ref = rt.run(spec())
    fake.jobs[101].update(state="COMPLETED", end="2026-12-03T17:00:00")
    end = time.mktime(time.strptime("2026-12-03T17:00:00", "%Y-%m-%dT%H:%M:%S"))
    clock.now = end + 1
    assert rt.status(ref).running  # type: ignore[union-attr]
    clock.now = end + STATUS_WAIT + 1
    st = rt.status(ref)
    assert st is not None and not st.running and "without a status" in (st.reason or "")


def test_lost_job(rt: SlurmRuntime, fake: FakeSlurm) -> None:
    ref = rt.run(spec())
    del fake.jobs[101]
    st = rt.status(ref)
    assert st is not None and not st.running and st.reason == "Slurm lost the job"
    assert rt.status("slurm-999") is None and rt.status("abc") is None


def test_foreign_jobs_are_not_ours(rt: SlurmRuntime, fake: FakeSlurm) -> None:
    fake.add(1, comment=f"dopq:{OWNER}:1", uid=UID + 1)  # another user, our comment
    theirs = SlurmRuntime(rt.settings, "someoneelse", fake)
    two = theirs.run(ContainerSpec(name="dopq-someone-2", image="i",
                                   labels={LABEL_JOB: "2", LABEL_OWNER: "someoneelse"}))
    fake.jobs[int(two[6:])]["state"] = "RUNNING"
    fake.add(3, comment=f"x|dopq:{OWNER}:3", uid=UID + 1)  # a bar in a foreign comment
    fake.add(4, comment="plain user job")
    assert rt.list("dopq", OWNER) == []
    assert rt.status("slurm-1") is None and rt.status("slurm-4") is None
    st = rt.status(two)  # another server's: seen, with its owner, never touched
    assert st is not None and st.owner == "someoneelse" and st.running
    rt.stop(two, 1, owner=OWNER)
    rt.remove("slurm-1", owner=OWNER)
    rt.remove(two, owner=OWNER)
    assert not [c for c in fake.calls if c[0] == "scancel"]
    assert theirs.status(two) is not None


def test_list_finds_exits_after_a_restart(settings: Settings, fake: FakeSlurm,
                                          clock: Clock) -> None:
    first = SlurmRuntime(settings, OWNER, fake, clock=clock, sleep=clock.sleep)
    a = first.run(spec(name="dopq-a-7", job=7))
    b = first.run(spec(name="dopq-a-8", job=8))
    c = first.run(spec(name="dopq-a-9", job=9))
    fake.jobs[101]["state"] = "RUNNING"
    _finish(settings, b, code=0)
    del fake.jobs[102]  # exited while the server was down; Slurm forgot it
    fake.add(50, comment="someone else's")
    again = SlurmRuntime(settings, OWNER, fake, clock=clock, sleep=clock.sleep)
    found = {st.id: st for st in again.list("dopq", OWNER)}
    assert set(found) == {a, b, c}
    assert found[a].running and found[a].job_id == 7
    assert not found[b].running and found[b].exit_code == 0 and found[b].job_id == 8
    assert found[c].running and found[c].name == "dopq-a-9"
    assert again.logs(b) == b""


def test_meta_lost_the_job_is_found_by_its_id(settings: Settings, fake: FakeSlurm,
                                              clock: Clock) -> None:
    first = SlurmRuntime(settings, OWNER, fake, clock=clock, sleep=clock.sleep)
    ref = first.run(spec())
    folder = next((Path(settings.slurm.shared_dir) / OWNER).iterdir())
    (folder / "meta.json").unlink()  # the server died between sbatch and meta.json
    (folder / "log").write_bytes(b"one\ntwo\n")
    again = SlurmRuntime(settings, OWNER, fake, clock=clock, sleep=clock.sleep)
    (st,) = again.list("dopq", OWNER)
    assert st.id == ref and st.job_id == 7
    assert again.logs(ref, tail=1) == b"two\n"


def test_stop_signals_the_script_then_cancels(rt: SlurmRuntime, fake: FakeSlurm,
                                              clock: Clock) -> None:
    ref = rt.run(spec())
    fake.jobs[101]["state"] = "RUNNING"
    start = clock.now
    rt.stop(ref, 10, owner=OWNER)
    cancels = [c for c in fake.calls if c[0] == "scancel"]
    assert cancels == [["scancel", "--batch", "--signal=TERM", "101"], ["scancel", "101"]]
    assert clock.now - start == pytest.approx(15, abs=0.6)


def test_stop_returns_when_the_job_ends(rt: SlurmRuntime, fake: FakeSlurm, clock: Clock,
                                        settings: Settings) -> None:
    ref = rt.run(spec())
    fake.jobs[101]["state"] = "RUNNING"
    fake.on_scancel = lambda argv: _finish(settings, ref, code=143)
    rt.stop(ref, 10, owner=OWNER)
    assert [c for c in fake.calls if c[0] == "scancel"] == [
        ["scancel", "--batch", "--signal=TERM", "101"]]
    st = rt.status(ref)
    assert st is not None and st.exit_code == 143


def test_stop_of_a_pending_job_cancels_it(rt: SlurmRuntime, fake: FakeSlurm) -> None:
    ref = rt.run(spec())
    rt.stop(ref, 10, owner=OWNER)
    assert [c for c in fake.calls if c[0] == "scancel"] == [["scancel", "101"]]
    rt.stop(ref, 10, owner="not-the-owner")
    assert len([c for c in fake.calls if c[0] == "scancel"]) == 1


def test_remove_cancels_and_deletes_only_the_folder(rt: SlurmRuntime, fake: FakeSlurm,
                                                    settings: Settings) -> None:
    ref = rt.run(spec())
    other = rt.run(spec(name="dopq-other-8", job=8))
    root = Path(settings.slurm.shared_dir) / OWNER
    (root / "unrelated").write_text("keep")
    rt.remove(ref, owner=OWNER)
    assert ["scancel", "101"] in fake.calls
    assert sorted(p.name for p in root.iterdir()) == ["job-8-dopq-other-8", "unrelated"]
    del fake.jobs[101]
    rt.remove(ref, owner=OWNER)  # again: nothing left to do
    assert rt.status(ref) is None
    assert rt.status(other) is not None


def test_logs_and_save_logs(rt: SlurmRuntime, settings: Settings, tmp_path: Path) -> None:
    ref = rt.run(spec())
    folder = next((Path(settings.slurm.shared_dir) / OWNER).iterdir())
    (folder / "log").write_bytes(b"a\nb\nc\n")
    assert rt.logs(ref) == b"a\nb\nc\n"
    assert rt.logs(ref, tail=2) == b"b\nc\n"
    assert rt.save_logs(ref, tmp_path / "out" / "log", 100) == 6
    assert (tmp_path / "out" / "log").read_bytes() == b"a\nb\nc\n"
    assert rt.save_logs(ref, tmp_path / "cut", 3) == 3
    assert (tmp_path / "cut").read_bytes() == b"a\nb\n[dopq: log truncated]\n"
    assert rt.logs("slurm-12345") == b""


def test_nodes_count_the_gpus_others_hold(rt: SlurmRuntime, fake: FakeSlurm) -> None:
    fake.nodes = [
        "NodeName=dopq-n1 Arch=x86_64 CPUTot=8 Gres=gpu:2 RealMemory=16000 State=MIXED "
        "AllocTRES=cpu=2,mem=2G,gres/gpu=2 OS=Linux 6.1 #1 SMP",
        "NodeName=dopq-n2 CPUTot=4 Gres=gpu:tesla:2(S:0) RealMemory=8000 State=IDLE+DRAIN "
        "AllocTRES= Reason=fix it [root@2026-12-03T10:00:00]",
        "NodeName=dopq-n3 CPUTot=4 Gres=(null) RealMemory=8000 State=DOWN* "
        "GresUsed=gpu:0",
        # Slurm 22.05 without gres/gpu in AccountingStorageTRES: only GresUsed counts
        "NodeName=dopq-n4 CPUTot=2 Gres=gpu:2 GresDrain=N/A GresUsed=gpu:1 State=MIXED "
        "CfgTRES=cpu=2,mem=4G,billing=2 AllocTRES=cpu=1,mem=256M RealMemory=4096",
    ]
    fake.add(10, "RUNNING", gres="gres:gpu:1")  # ours on n1
    fake.add(11, "RUNNING", comment="other", gres="gres:gpu:1")
    fake.add(12, "PENDING", gres="gres:gpu:2", node="")
    n1, n2, n3, n4 = rt.nodes()
    assert n1.name == "dopq-n1" and n1.state == "mixed" and n1.usable
    assert (n1.gpus, n1.cpus, n1.memory, n1.foreign_gpus) == (2, 8, 16000 * 2**20, 1)
    assert (n2.state, n2.usable, n2.gpus, n2.foreign_gpus) == ("drained", False, 2, 0)
    assert (n3.state, n3.usable, n3.gpus) == ("down*", False, 0)
    assert (n4.state, n4.usable, n4.gpus, n4.foreign_gpus) == ("mixed", True, 2, 1)


def test_events_tell_each_exit_once(rt: SlurmRuntime, fake: FakeSlurm,
                                    settings: Settings) -> None:
    ref = rt.run(spec())
    fake.jobs[101]["state"] = "RUNNING"
    stop = threading.Event()
    stream = rt.events(OWNER, stop)
    polls = 0
    real = fake.__call__

    def runner(argv: list[str], timeout: float) -> tuple[int, str, str]:
        nonlocal polls
        if argv[:1] == ["squeue"] and not any(a.startswith("--jobs=") for a in argv):
            polls += 1
            if polls == 3:
                _finish(settings, ref, code=1)
            if polls == 6:
                stop.set()
        return real(argv, timeout)

    rt._run = runner
    assert list(stream) == [{"Action": "die", "id": ref}]
    fake.down = True
    stop.clear()
    with pytest.raises(EngineUnavailable):
        next(rt.events(OWNER, stop))


# -- the batch script ----------------------------------------------------------------

FAKE_DOCKER = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
d = os.environ["FAKE_DIR"]
with open(os.path.join(d, "argv.jsonl"), "a") as fh:
    fh.write(json.dumps(args) + "\\n")
cmd = args[0]
stopped = os.path.join(d, "stopped")
if cmd == "pull":
    sys.exit(int(os.environ.get("FAKE_PULL_RC", "0")))
if cmd == "create":
    print("cid123")
elif cmd == "logs":
    sys.stdout.write(os.environ.get("FAKE_OUTPUT", "hello\\n"))
elif cmd == "wait":
    deadline = time.time() + 20
    while os.environ.get("FAKE_HANG") and not os.path.exists(stopped) and time.time() < deadline:
        time.sleep(0.02)
    print(0)
elif cmd == "stop":
    open(stopped, "w").close()
elif cmd == "inspect":
    code = 143 if os.path.exists(stopped) else int(os.environ.get("FAKE_EXIT", "0"))
    print(f"{{code}} false 2026-12-03T17:00:00.123456789Z 2026-12-03T17:00:05Z")
"""


@pytest.fixture
def fake_docker(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "docker"
    exe.write_text(FAKE_DOCKER.format(python=sys.executable))
    exe.chmod(0o755)
    return bin_dir


def hostile_spec() -> ContainerSpec:
    return ContainerSpec(
        name="-" + EVIL, image="reg/img:" + EVIL,
        labels={LABEL_JOB: "7", "k" + EVIL.replace("=", ""): EVIL},
        env={"A" + EVIL.replace("=", ""): EVIL, "NVIDIA_VISIBLE_DEVICES": "all", "B": "-e X=1"},
        command=["--privileged", EVIL, "$HOME"], entrypoint=["-" + EVIL, "--rm"],
        working_dir=EVIL, user="-" + EVIL, mem_limit=2**30, nano_cpus=1_250_000_000,
        shm_size=64 * 2**20, pids_limit=100, network="-" + EVIL,
        binds={"/src " + EVIL: {"bind": "/dst" + EVIL, "mode": "ro"}},
        cap_add=["CHOWN", EVIL], read_only=True, log_max_bytes=1000, tty=True,
        stop_signal=EVIL, ulimits=[{"name": "nofile" + EVIL, "soft": 10, "hard": 20}])


def hostile_argv() -> list[str]:
    """What docker must receive for hostile_spec(), written out by hand."""
    e = EVIL
    return [
        "create", "--name=-" + e, "--label=dopq.job=7", f"--label=k{e.replace('=', '')}={e}",
        f"--env=A{e.replace('=', '')}={e}", "--env=B=-e X=1",
        "--env=NVIDIA_VISIBLE_DEVICES=0,1", "--env=DOPQ_NODE=dopq-n1",
        "--env=DOPQ_SLURM_JOB=42", f"--memory={2**30}", f"--memory-swap={2**30}",
        "--cpus=1.25", f"--shm-size={64 * 2**20}", "--pids-limit=100", "--network=-" + e,
        f"--volume=/src {e}:/dst{e}:ro", "--cap-drop=ALL", "--cap-add=CHOWN", f"--cap-add={e}",
        "--security-opt=no-new-privileges", "--read-only", "--ulimit=core=0:0",
        f"--ulimit=nofile{e}=10:20", "--init", "--user=-" + e, f"--workdir={e}",
        "--entrypoint=-" + e, f"--stop-signal={e}", "--log-driver=json-file",
        "--log-opt=max-size=1000", "--log-opt=max-file=1", "--tty", "reg/img:" + e,
        "--rm", "--privileged", e, "$HOME"]


def run_script(script: str, job_dir: Path, bin_dir: Path, wait: bool = True,
               **env: str) -> subprocess.Popen[bytes]:
    path = job_dir / "job.sh"
    path.write_text(script)
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_DIR": str(job_dir.parent),
            "SLURM_JOB_ID": "42", "SLURMD_NODENAME": "dopq-n1", "SLURM_JOB_GPUS": "0,1",
            **env}
    proc = subprocess.Popen(["bash", str(path)], cwd=job_dir.parent, env=full)
    if wait:
        proc.wait(timeout=30)
    return proc


def recorded(job_dir: Path) -> list[list[str]]:
    lines = (job_dir.parent / "argv.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "work" / "job-7-it's $(x) `y`"
    d.mkdir(parents=True)
    return d


def test_hostile_values_pass_the_syntax_check(job_dir: Path) -> None:
    script = batch_script(hostile_spec(), str(job_dir), 10)
    subprocess.run(["bash", "-n"], input=script.encode(), check=True)


def test_hostile_values_reach_docker_as_exactly_one_argument_each(job_dir: Path,
                                                                  fake_docker: Path) -> None:
    s = hostile_spec()
    proc = run_script(batch_script(s, str(job_dir), 10), job_dir, fake_docker, FAKE_EXIT="3")
    assert proc.returncode == 3
    calls = recorded(job_dir)
    assert calls[0] == ["pull", "-q", s.image]
    assert calls[1] == ["rm", "-f", s.name]
    assert calls[2] == hostile_argv()
    assert ["start", "cid123"] in calls and ["wait", "cid123"] in calls
    assert ["logs", "-f", "cid123"] in calls
    assert calls[-1] == ["rm", "-f", "cid123"]
    assert [c[0] for c in calls if c[0] == "inspect"] == ["inspect"]
    status = json.loads((job_dir / "status").read_text())
    assert status == {"exit_code": 3, "oom_killed": False,
                      "started_at": "2026-12-03T17:00:00.123456789Z",
                      "finished_at": "2026-12-03T17:00:05Z", "reason": "",
                      "slurm_job": "42", "node": "dopq-n1"}
    assert (job_dir / "log").read_bytes() == b"hello\n"
    assert not list(job_dir.parent.rglob("PWNED*"))
    assert not list(Path.cwd().glob("PWNED*"))


def test_docker_argv_marks_only_its_own_words_for_the_shell() -> None:
    argv = docker_argv(hostile_spec())
    assert [w for w in argv if isinstance(w, Shell)] == [
        '--env=NVIDIA_VISIBLE_DEVICES="$GPUS"', '--env=DOPQ_NODE="${SLURMD_NODENAME:-}"',
        '--env=DOPQ_SLURM_JOB="${SLURM_JOB_ID:-}"']


def test_a_string_command_is_split_as_docker_py_does() -> None:
    argv = docker_argv(ContainerSpec(name="n", image="i", labels={},
                                     command="python -c 'print(1); print(2)'",
                                     entrypoint="/bin/sh -e"))
    assert "--entrypoint=/bin/sh" in argv
    assert argv[argv.index("i"):] == ["i", "-e", "python", "-c", "print(1); print(2)"]


def test_bad_image_or_env_names_are_refused() -> None:
    with pytest.raises(DopqError):
        docker_argv(ContainerSpec(name="n", image="--privileged", labels={}))
    with pytest.raises(DopqError):
        docker_argv(ContainerSpec(name="n", image="i", labels={}, env={"A=B": "c"}))
    with pytest.raises(DopqError):
        docker_argv(ContainerSpec(name="n", image="i", labels={"dopq.owner=x": "y"}))
    with pytest.raises(DopqError):
        docker_argv(ContainerSpec(name="n", image="i", labels={},
                                  binds={"/a": {"bind": "/b", "mode": "rw,z"}}))


def test_no_gpus_is_void_and_a_failed_pull_writes_125(job_dir: Path, fake_docker: Path) -> None:
    s = ContainerSpec(name="n", image="i", labels={})
    proc = run_script(batch_script(s, str(job_dir), 5), job_dir, fake_docker,
                      SLURM_JOB_GPUS="", FAKE_PULL_RC="1")
    assert proc.returncode == 125
    status = json.loads((job_dir / "status").read_text())
    assert status["exit_code"] == 125 and status["reason"] == "docker pull failed"
    assert [c[0] for c in recorded(job_dir)] == ["pull"]
    assert b"[dopq: docker pull failed]" in (job_dir / "log").read_bytes()
    (job_dir.parent / "argv.jsonl").unlink()
    proc = run_script(batch_script(s, str(job_dir), 5), job_dir, fake_docker, SLURM_JOB_GPUS="",
                      CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0
    create = next(c for c in recorded(job_dir) if c[0] == "create")
    assert "--env=NVIDIA_VISIBLE_DEVICES=void" in create


def test_the_log_is_capped(job_dir: Path, fake_docker: Path) -> None:
    s = ContainerSpec(name="n", image="i", labels={}, log_max_bytes=10)
    run_script(batch_script(s, str(job_dir), 5), job_dir, fake_docker,
               FAKE_OUTPUT="0123456789abcdef\n")
    assert (job_dir / "log").read_bytes() == b"0123456789\n[dopq: log truncated]\n"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_sigterm_stops_the_container_with_the_grace(job_dir: Path, fake_docker: Path) -> None:
    s = ContainerSpec(name="n", image="i", labels={})
    proc = run_script(batch_script(s, str(job_dir), 17), job_dir, fake_docker, wait=False,
                      FAKE_HANG="1")
    try:
        deadline = time.monotonic() + 20
        argv_log = job_dir.parent / "argv.jsonl"
        while not (argv_log.exists() and '["wait"' in argv_log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ["stop", "-t", "17", "cid123"] in recorded(job_dir)
    assert json.loads((job_dir / "status").read_text())["exit_code"] == 143


def test_list_asks_squeue_for_this_users_jobs(rt: SlurmRuntime, fake: FakeSlurm) -> None:
    rt.list("dopq", OWNER)
    assert fake.calls[-1] == ["squeue", "--noheader", "--all", "--states=all", f"--user={UID}",
                              f"--format={SQUEUE_FORMAT}"]


def test_a_job_submitted_while_listing_is_not_taken_for_lost(rt: SlurmRuntime,
                                                             fake: FakeSlurm) -> None:
    first = rt.run(spec())
    fake.jobs[101]["state"] = "RUNNING"
    real = fake.__call__

    def racing(argv: list[str], timeout: float) -> tuple[int, str, str]:
        answer = real(argv, timeout)
        if argv[0] == "squeue" and not any(a.startswith("--jobs=") for a in argv):
            rt._run = real
            rt.run(spec(name="dopq-a1b2c3d4-8", job=8))  # sbatch after squeue answered
        return answer

    rt._run = racing
    listed = rt.list("dopq", OWNER)
    assert [(st.id, st.running, st.reason) for st in listed] == [(first, True, None)]
    assert {st.id: st.running for st in rt.list("dopq", OWNER)} == {first: True,
                                                                     "slurm-102": True}


@pytest.mark.parametrize("size", [0, 1, 5, 70_000, 200_000])
def test_logs_tail_reads_from_the_end(rt: SlurmRuntime, settings: Settings, size: int) -> None:
    ref = rt.run(spec())
    folder = next((Path(settings.slurm.shared_dir) / OWNER).iterdir())
    data = b"".join(b"line %d %s\n" % (i, b"x" * (i % 50)) for i in range(size))
    (folder / "log").write_bytes(data + b"last without newline")
    lines = (data + b"last without newline").splitlines(keepends=True)
    for n in (1, 2, 3, 1000, 10**6):
        assert rt.logs(ref, tail=n) == b"".join(lines[-n:])
    assert rt.logs(ref, tail=0) == b""


def test_the_script_starts_with_fixed_lines_sbatch_reads_no_directive_from_values() -> None:
    s = hostile_spec()
    s.name = "x\n#SBATCH --uid=0\n"
    lines = batch_script(s, "/j\n#SBATCH --partition=evil", 10).splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# DoPQ") and lines[2] == "set -u"


def test_a_stop_during_the_pull_is_a_stop(job_dir: Path, fake_docker: Path) -> None:
    s = ContainerSpec(name="n", image="i", labels={})
    script = batch_script(s, str(job_dir), 5).replace(
        'if ! "${DOCKER[@]}" pull', 'kill -TERM $$\nif ! "${DOCKER[@]}" pull', 1)
    proc = run_script(script, job_dir, fake_docker, FAKE_PULL_RC="1")
    assert proc.returncode == 143
    status = json.loads((job_dir / "status").read_text())
    assert status["reason"] == "stopped before the container started"


def test_an_earlier_run_of_the_job_never_takes_the_new_runs_folder(
        rt: SlurmRuntime, fake: FakeSlurm) -> None:
    old = rt.run(spec())
    fake.jobs[101]["state"] = "COMPLETING"  # removed, Slurm still finishing it
    rt.remove(old, owner=OWNER)
    new = rt.run(spec())  # the job runs again: same DoPQ id, same folder name
    fake.jobs[102]["state"] = "RUNNING"
    again = SlurmRuntime(rt.settings, OWNER, fake)
    found = {st.id: st for st in again.list("dopq", OWNER)}
    assert set(found) == {new}  # the old one, removed, is gone although Slurm has it
    assert found[new].running and found[new].name == "dopq-a1b2c3d4-7"
    assert again.status(old) is None and again.status(new) is not None


def test_the_node_docker_command_may_have_words() -> None:
    s = ContainerSpec(name="n", image="i", labels={})
    script = batch_script(s, "/j", 10, docker="'/opt/my docker/docker' --config '/etc/x y'")
    assert "\nDOCKER=('/opt/my docker/docker' --config '/etc/x y')\n" in script


def test_the_default_runner_runs_no_shell_and_passes_slurm_conf(tmp_path: Path) -> None:
    from dopq.server.slurm import subprocess_runner

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "squeue"
    tool.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps([sys.argv[1:], os.environ.get('SLURM_CONF')]))\n")
    tool.chmod(0o755)
    s = Settings()
    s.slurm.bin_dir = str(bin_dir)
    s.slurm.conf = "/etc/x/slurm.conf"
    rc, out, _ = subprocess_runner(s)(["squeue", "$(touch PWNED)", "a b"], 10)
    assert rc == 0 and json.loads(out) == [["$(touch PWNED)", "a b"], "/etc/x/slurm.conf"]
    assert not list(Path.cwd().glob("PWNED"))
    with pytest.raises(DopqError):
        subprocess_runner(s)(["sinfo"], 10)  # not in bin_dir

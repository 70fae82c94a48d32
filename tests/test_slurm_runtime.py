"""SlurmRuntime against a fake Slurm (a runner that answers like squeue, sbatch,
scancel and scontrol): the arguments it sends, job folders, exits and the
reasons for ends without one, foreign jobs, stop, remove, logs, nodes, events.
The batch script is tested in test_slurm_batch.py, the parsing in
test_slurm_state.py, the real cluster in test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dopq.core.errors import DopqError, EngineUnavailable
from dopq.core.settings import Settings
from dopq.server.runspec import LABEL_JOB, LABEL_OWNER, ContainerSpec
from dopq.server.slurm import SlurmRuntime
from dopq.server.slurmstate import SQUEUE_FORMAT, STATUS_WAIT

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


# -- Slurm commands ----------------------------------------------------------------

def test_run_writes_a_private_job_folder_and_submits_it(rt: SlurmRuntime, fake: FakeSlurm,
                                                        settings: Settings) -> None:
    s = spec(gpus=[0, 1], node="dopq-n2", nano_cpus=1_500_000_000, mem_limit=3 * 2**30 + 1,
             time_limit=3600.0)
    ref = rt.run(s)
    assert ref == "slurm-101"
    (job_dir,) = (Path(settings.slurm.shared_dir) / OWNER).glob("job-7-dopq-a1b2c3d4-7-*")
    assert len(job_dir.name) == len("job-7-dopq-a1b2c3d4-7-") + 8  # a token per run
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
    assert sorted(p.name.rpartition("-")[0] if p.name.startswith("job-") else p.name
                  for p in root.iterdir()) == ["job-8-dopq-other-8", "unrelated"]
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


def test_a_job_cancelled_while_pending_has_ended_at_once(rt: SlurmRuntime, fake: FakeSlurm,
                                                         clock: Clock) -> None:
    ref = rt.run(spec())
    fake.jobs[101].update(state="CANCELLED", node="", end="2026-12-03T17:00:00")
    clock.now = time.mktime(time.strptime("2026-12-03T17:00:01", "%Y-%m-%dT%H:%M:%S"))
    st = rt.status(ref)
    assert st is not None and not st.running and st.reason == "cancelled in Slurm"


def test_removing_an_old_run_again_never_takes_a_new_runs_folder(
        rt: SlurmRuntime, fake: FakeSlurm, settings: Settings) -> None:
    """A requeued job's old run is removed twice (collected, then removed); by then a
    new run's folder may exist without its meta.json (sbatch in flight): it stays."""
    old = rt.run(spec())
    rt.remove(old, owner=OWNER)
    new = Path(settings.slurm.shared_dir) / OWNER / "job-7-dopq-a1b2c3d4-7-0123abcd"
    new.mkdir(mode=0o700)
    rt.remove(old, owner=OWNER)
    assert new.is_dir()

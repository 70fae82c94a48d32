"""The Slurm batch script (dopq.server.batch): checked with ``bash -n`` and run for
real with a fake ``docker`` on PATH that records its arguments, so hostile values
in every spec field are seen to arrive as exactly one argument each and to run
nothing; SIGTERM, a failed pull, the log cap.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dopq.core.errors import DopqError
from dopq.server.batch import Shell, batch_script, docker_argv
from dopq.server.runspec import LABEL_JOB, ContainerSpec

EVIL = "x'\"$(touch PWNED1)`touch PWNED2`;touch PWNED3\n -rf ${IFS}* \\ && touch PWNED4 #"


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
if args[:2] == ["image", "inspect"]:  # the node has the image: FAKE_HAS_IMAGE=1
    sys.exit(0 if os.environ.get("FAKE_HAS_IMAGE") else 1)
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
    assert calls[0] == ["image", "inspect", s.image]
    assert calls[1] == ["pull", "-q", s.image]
    assert calls[2] == ["rm", "-f", s.name]
    assert calls[3] == hostile_argv()
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
    assert [c[0] for c in recorded(job_dir)] == ["image", "pull"]
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


def test_the_script_starts_with_fixed_lines_sbatch_reads_no_directive_from_values() -> None:
    s = hostile_spec()
    s.name = "x\n#SBATCH --uid=0\n"
    lines = batch_script(s, "/j\n#SBATCH --partition=evil", 10).splitlines()
    assert lines[0] == "#!/bin/bash" and lines[1].startswith("# DoPQ") and lines[2] == "set -u"


def test_a_stop_during_the_pull_is_a_stop(job_dir: Path, fake_docker: Path) -> None:
    s = ContainerSpec(name="n", image="i", labels={})
    script = batch_script(s, str(job_dir), 5).replace(
        'if ! "${DOCKER[@]}" image', 'kill -TERM $$\nif ! "${DOCKER[@]}" image', 1)
    proc = run_script(script, job_dir, fake_docker, FAKE_PULL_RC="1")
    assert proc.returncode == 143
    status = json.loads((job_dir / "status").read_text())
    assert status["reason"] == "stopped before the container started"


def test_the_node_docker_command_may_have_words() -> None:
    s = ContainerSpec(name="n", image="i", labels={})
    script = batch_script(s, "/j", 10, docker="'/opt/my docker/docker' --config '/etc/x y'")
    assert "\nDOCKER=('/opt/my docker/docker' --config '/etc/x y')\n" in script


def test_an_image_the_node_has_is_not_pulled(job_dir: Path, fake_docker: Path) -> None:
    s = hostile_spec()
    proc = run_script(batch_script(s, str(job_dir), 10), job_dir, fake_docker,
                      FAKE_HAS_IMAGE="1")
    assert proc.returncode == 0
    calls = recorded(job_dir)
    assert calls[0] == ["image", "inspect", s.image] and ["pull", "-q", s.image] not in calls

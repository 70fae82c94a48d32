"""SlurmRuntime on the real test cluster of scripts/cluster.sh (``bash scripts/cluster.sh up``).

Jobs run ``dopq/busybox:latest`` from the cluster's registry on its nodes'
engine: their log, their exit code, a stop with the grace, hostile values,
and the GPUs another Slurm job holds. Skipped where the cluster is not up.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for

from dopq.core.settings import Settings, load
from dopq.server.runspec import LABEL_INSTANCE, LABEL_JOB, LABEL_OWNER, ContainerSpec
from dopq.server.slurm import SlurmRuntime, subprocess_runner

CLUSTER = Path(os.environ.get("DOPQ_CLUSTER_DIR", "/var/lib/dopq-cluster"))
CONFIG = CLUSTER / "dopq.toml"
EVIL = "x'\"$(touch PWNED1)`touch PWNED2`;touch PWNED3\n -rf ${IFS}* \\ && touch PWNED4 #"

pytestmark = [pytest.mark.slurm, pytest.mark.docker, pytest.mark.slow]


def _cluster_settings() -> Settings | None:
    if not CONFIG.is_file():
        return None
    settings = load(CONFIG)
    runtime = SlurmRuntime(settings, "probe")
    return settings if runtime.ping() else None


@pytest.fixture(scope="module")
def settings() -> Settings:
    found = _cluster_settings()
    if found is None:
        pytest.skip(f"no Slurm test cluster ({CONFIG}; bash scripts/cluster.sh up)")
    return found


@pytest.fixture(scope="module")
def image(settings: Settings, engine: None) -> str:
    name = f"{settings.registry.url}/dopq/busybox:latest"
    subprocess.run(["docker", "tag", "dopq/busybox:latest", name], check=True)
    subprocess.run(["docker", "push", "-q", name], check=True, capture_output=True)
    return name


@pytest.fixture
def rt(settings: Settings) -> Iterator[SlurmRuntime]:
    owner = "t" + uuid.uuid4().hex[:10]
    runtime = SlurmRuntime(settings, owner, grace=3)
    yield runtime
    for st in runtime.list("dopq", owner):
        runtime.remove(st.id, owner=owner)
    root = Path(settings.slurm.shared_dir) / owner
    leftovers = list(root.iterdir()) if root.exists() else []
    if root.exists():
        root.rmdir()
    assert leftovers == []


def usable_node(rt: SlurmRuntime) -> str:
    """A node that takes jobs now (the fault tests share the cluster and stop nodes)."""
    return str(wait_for(lambda: next((n.name for n in rt.nodes() if n.usable and n.gpus), None),
                        timeout=60, interval=0.5))


def make_spec(rt: SlurmRuntime, image: str, job: int, command: list[str], **kw: object
              ) -> ContainerSpec:
    return ContainerSpec(
        name=f"dopq-{rt.owner}-{job}", image=image,
        labels={LABEL_JOB: str(job), LABEL_OWNER: rt.owner, LABEL_INSTANCE: "dopq"},
        command=command, mem_limit=128 * 2**20, nano_cpus=10**9, pids_limit=256,
        cap_add=["CHOWN", "SETUID", "SETGID", "KILL"], log_max_bytes=2**20,
        **kw)  # type: ignore[arg-type]


def ended(rt: SlurmRuntime, ref: str, timeout: float = 90) -> object:
    def done() -> object:
        st = rt.status(ref)
        return st if st is not None and not st.running else None
    return wait_for(done, timeout=timeout, interval=0.5)


def test_a_job_runs_on_its_node_with_its_gpu(rt: SlurmRuntime, image: str) -> None:
    spec = make_spec(rt, image, 1, ["sh", "-c", 'echo hello; echo "$DOPQ_NODE '
                                    '$NVIDIA_VISIBLE_DEVICES $DOPQ_SLURM_JOB"; exit 3'],
                     gpus=[0], node=(node := usable_node(rt)), time_limit=600.0)
    ref = rt.run(spec)
    assert ref.startswith("slurm-")
    st = ended(rt, ref)
    assert st.exit_code == 3 and st.reason is None  # type: ignore[attr-defined]
    assert st.node == node and st.job_id == 1  # type: ignore[attr-defined]
    # Docker's own times: a container this short may "finish" a moment before it "started"
    assert st.started_at is not None and st.finished_at > st.started_at - 1  # type: ignore
    lines = rt.logs(ref).decode().splitlines()
    assert lines[0] == "hello"
    seen_node, gpus, job = lines[1].split()
    assert seen_node == node and gpus != "void" and len(gpus.split(",")) == 1
    assert job == ref.removeprefix("slurm-")
    assert [s.id for s in rt.list("dopq", rt.owner)] == [ref]
    rt.remove(ref, owner=rt.owner)
    assert rt.list("dopq", rt.owner) == []


def test_stop_sends_the_container_sigterm(rt: SlurmRuntime, image: str) -> None:
    spec = make_spec(rt, image, 2, ["sh", "-c", "trap 'echo got TERM; exit 7' TERM; "
                                    "echo started; while true; do sleep 0.2; done"])
    ref = rt.run(spec)
    wait_for(lambda: b"started" in rt.logs(ref), timeout=90, interval=0.5)
    began = time.monotonic()
    rt.stop(ref, 3, owner=rt.owner)
    assert time.monotonic() - began < 3 + 5
    st = ended(rt, ref, timeout=30)
    assert st.exit_code == 7  # type: ignore[attr-defined]
    assert b"got TERM" in rt.logs(ref)


def test_hostile_values_arrive_as_they_are(rt: SlurmRuntime, image: str,
                                          settings: Settings) -> None:
    spec = make_spec(rt, image, 3, ["sh", "-c", 'printf "%s|%s" "$EVIL" "$1"', "-", EVIL],
                     env={"EVIL": EVIL}, working_dir="/tmp")
    spec.labels["dopq.evil"] = EVIL
    ref = rt.run(spec)
    st = ended(rt, ref)
    assert st.exit_code == 0  # type: ignore[attr-defined]
    assert rt.logs(ref).decode() == f"{EVIL}|{EVIL}"
    shared = Path(settings.slurm.shared_dir)
    assert not list(shared.rglob("PWNED*"))


def test_a_failed_pull_is_exit_125(rt: SlurmRuntime, settings: Settings) -> None:
    spec = make_spec(rt, f"{settings.registry.url}/dopq/no-such-image:latest", 4, ["true"])
    ref = rt.run(spec)
    st = ended(rt, ref)
    assert st.exit_code == 125 and st.reason == "docker pull failed"  # type: ignore


def test_nodes_see_gpus_held_by_other_slurm_jobs(rt: SlurmRuntime, tmp_path: Path) -> None:
    slurm = subprocess_runner(rt.settings)
    node = usable_node(rt)
    rc, out, err = slurm(["sbatch", "--parsable", "--gres=gpu:1", f"--nodelist={node}",
                          f"--partition={rt.settings.slurm.partition}", "--output=/dev/null",
                          f"--chdir={tmp_path}", "--wrap", "sleep 60"], 10)
    assert rc == 0, err
    foreign = out.strip().split(";")[0]
    try:
        def held() -> object:
            nodes = {n.name: n for n in rt.nodes()}
            return nodes if nodes[node].foreign_gpus == 1 else None
        nodes = wait_for(held, timeout=60, interval=0.5)
        assert set(nodes) >= {"dopq-n1", "dopq-n2"}
        n1 = nodes[node]
        assert n1.gpus == 2 and n1.cpus > 0 and n1.memory > 0  # usable: a fault test may differ
        assert rt.status(f"slurm-{foreign}") is None  # not a DoPQ job: never ours
    finally:
        slurm(["scancel", foreign], 10)


def test_a_cancel_in_slurm_stops_the_container_and_is_an_event(rt: SlurmRuntime,
                                                                image: str) -> None:
    spec = make_spec(rt, image, 5, ["sh", "-c", "trap 'exit 9' TERM; echo up; "
                                    "while true; do sleep 0.2; done"])
    ref = rt.run(spec)
    wait_for(lambda: b"up" in rt.logs(ref), timeout=90, interval=0.5)
    stop = threading.Event()
    seen: list[dict[str, object]] = []

    def watch() -> None:
        for event in rt.events(rt.owner, stop):
            seen.append(event)
            stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rc, _, err = subprocess_runner(rt.settings)(["scancel", ref.removeprefix("slurm-")], 10)
    assert rc == 0, err
    watcher.join(timeout=60)
    stop.set()
    assert seen == [{"Action": "die", "id": ref}]
    st = rt.status(ref)
    assert st is not None and not st.running and st.exit_code == 9

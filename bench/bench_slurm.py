"""Workload W on the Slurm test cluster: DoPQ-on-Slurm against plain ``sbatch``.

    .venv/bin/python bench/bench_slurm.py [--quick] [--json PATH] [--reps N]

The cluster of ``scripts/cluster.sh`` (two nodes, 2 GPUs each). Four blockers,
one GPU each, hold all 4 GPUs until one moment (they wait for the same
``/proc/uptime`` second); behind them 16 one-GPU jobs of one image, each
``sleep 0.5``, all queued before the blockers end. Makespan: from the last
blocker's end to the last job's end. Gap: on each GPU, from the end of one
container's work to the start of the next one's. Every time is taken inside
the containers (``/proc/uptime``: one kernel for all, 10 ms steps), so both
sides are measured alike.

- DoPQ: a server with ``[runtime] backend = "slurm"`` places each job on a node
  and its GPU and ``sbatch``-es it (its batch script pulls the image from the
  registry and runs the container).
- sbatch: the same image, pulled from the registry and run with
  ``docker run --rm --network none`` inside ``sbatch --gres=gpu:1 --wrap``,
  16 jobs queued in Slurm behind 4 ``sbatch`` blockers: Slurm schedules.

Both run in one invocation, one after the other in each repetition (they
would take each other's GPUs side by side); 3 repetitions, medians. Other
people's jobs on the cluster take GPUs: the GPUs busy at each start are
recorded (``foreign_busy``). ``--quick``: 4 jobs, 1 repetition. DoPQ notices an
end by polling ``squeue`` every ``[slurm] poll_interval`` (the cluster config's,
1 s; ``--poll-interval`` to try another).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    Running,
    bench_config,
    cleanup_docker,
    good_job,
    machine,
    parser,
    summary,
    wait_for,
    write_result,
)

CLUSTER_CONFIG = Path("/var/lib/dopq-cluster/dopq.toml")
GPUS = 4
WORK = 0.5
FINAL = ("succeeded", "failed", "cancelled")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# The container's own clock: the host's uptime (one kernel for every node here).
UPTIME = "cut -d' ' -f1 /proc/uptime"


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def work_cmd() -> str:
    return f'echo "start $({UPTIME})"; sleep {WORK}; echo "end $({UPTIME})"'


def blocker_cmd(until: int) -> str:
    return (f'echo "start $({UPTIME})"; '
            f"until [ $(cut -d. -f1 /proc/uptime) -ge {until} ]; do sleep 0.02; done; "
            f'echo "end $({UPTIME})"')


def marks(text: str) -> tuple[float, float]:
    found = {}
    for line in text.splitlines():
        word, _, value = line.strip().partition(" ")
        if word in ("start", "end"):
            try:
                found[word] = float(value)
            except ValueError:
                pass
    if set(found) != {"start", "end"}:
        raise RuntimeError(f"no start/end marks in {text[-300:]!r}")
    return found["start"], found["end"]


# -- the cluster -------------------------------------------------------------------------
class Cluster:
    def __init__(self) -> None:
        if not CLUSTER_CONFIG.is_file():
            raise SystemExit("no Slurm test cluster: bash scripts/cluster.sh up")
        self.cfg = tomllib.loads(CLUSTER_CONFIG.read_text())
        self.env = {"SLURM_CONF": self.cfg["slurm"]["conf"], "PATH": "/usr/bin:/bin"}
        self.registry = self.cfg["registry"]["url"]

    def sections(self) -> dict[str, Any]:
        return {k: self.cfg[k] for k in ("runtime", "slurm", "registry")}

    def run(self, *argv: str) -> str:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              check=True, timeout=60).stdout

    def busy_gpus(self) -> int:
        """GPUs Slurm has given out now (anyone's jobs)."""
        out = self.run("scontrol", "--details", "--oneliner", "show", "node")
        busy = 0
        for word in out.split():
            if word.startswith("GresUsed=gpu"):
                busy += int(word.split(":")[-1].split("(")[0])
        return busy

    def scheduler_parameters(self) -> dict[str, str]:
        keys = ("SchedulerType", "SchedulerParameters", "PriorityType", "SelectType")
        out: dict[str, str] = {}
        for line in self.run("scontrol", "show", "config").splitlines():
            key, _, value = line.partition("=")
            if key.strip() in keys:
                out[key.strip()] = value.strip()
        return out

    def states(self, ids: list[str]) -> dict[str, str]:
        out = self.run("squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T")
        return dict(line.split("|", 1) for line in out.splitlines() if "|" in line)


# -- one side: DoPQ on Slurm ---------------------------------------------------------------
def dopq_side(srv: Running, folder: Path, n: int, hold: float) -> dict[str, Any]:
    alice = srv["alice"]
    store = srv.server.platform.store
    until = int(uptime() + hold)
    blockers = [alice.submit(folder, {"gpus": 1, "name": f"w-blocker-{g}",
                                      "command": ["sh", "-c", blocker_cmd(until)]})["id"]
                for g in range(GPUS)]
    wait_for(lambda: all(store.job(i)["state"] == "running" for i in blockers), hold, 0.1)
    ids = [alice.submit(folder, {"name": "w-sleep", "command": ["sh", "-c", work_cmd()]})["id"]
           for _ in range(n)]
    queued_in_time = uptime() < until
    wait_for(lambda: all(store.job(i)["state"] in FINAL for i in (*blockers, *ids)),
             hold + 120 + 5 * n, 0.2)
    runs = []
    for i in (*blockers, *ids):
        job = store.job(i)
        if job["state"] != "succeeded":
            raise RuntimeError(f"DoPQ job {i} ended {job['state']}: {job['error']}")
        start, end = marks(alice.call("logs", i)["data"])
        runs.append({"blocker": i in blockers, "gpu": f"{job['node']}:{job['gpus']}",
                     "start": start, "end": end})
    return {"runs": runs, "queued_before_blockers_end": queued_in_time}


# -- the other: plain sbatch -----------------------------------------------------------------
def sbatch_side(cluster: Cluster, image: str, out_dir: Path, n: int,
                hold: float) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    partition = cluster.cfg["slurm"].get("partition") or ""

    def submit(name: str, cmd: str) -> str:
        wrap = (f'echo "gpu $SLURMD_NODENAME:${{SLURM_JOB_GPUS:-$CUDA_VISIBLE_DEVICES}}"; '
                f"docker pull -q {image} >/dev/null && "
                f"docker run --rm --network none {image} sh -c {_quote(cmd)}")
        argv = ["sbatch", "--parsable", "--gres=gpu:1", "--time=10", f"--job-name={name}",
                f"--output={out_dir}/{name}-%j.out", f"--chdir={out_dir}", "--wrap", wrap]
        if partition:
            argv.insert(1, f"--partition={partition}")
        return cluster.run(*argv).strip().split(";")[0]

    until = int(uptime() + hold)
    blockers = [submit(f"sb-blocker-{g}", blocker_cmd(until)) for g in range(GPUS)]
    wait_for(lambda: all(s == "RUNNING" for s in cluster.states(blockers).values())
             and len(cluster.states(blockers)) == GPUS, hold, 0.2)
    ids = [submit("sb-sleep", work_cmd()) for _ in range(n)]
    queued_in_time = uptime() < until
    every = [*blockers, *ids]
    try:
        wait_for(lambda: all(cluster.states(every).get(j) in ENDED for j in every),
                 hold + 120 + 5 * n, 0.2)
    finally:
        left = [j for j, s in cluster.states(every).items() if s not in ENDED]
        if left:
            cluster.run("scancel", *left)
    runs = []
    for j in every:
        text = next(out_dir.glob(f"*-{j}.out")).read_text()
        gpu = next(line.split(" ", 1)[1] for line in text.splitlines()
                   if line.startswith("gpu "))
        start, end = marks(text)
        runs.append({"blocker": j in blockers, "gpu": gpu, "start": start, "end": end})
    return {"runs": runs, "queued_before_blockers_end": queued_in_time}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


# -- figures ---------------------------------------------------------------------------------
def figures(side: dict[str, Any]) -> dict[str, Any]:
    runs = side["runs"]
    blockers_end = max(r["end"] for r in runs if r["blocker"])
    last = max(r["end"] for r in runs if not r["blocker"])
    per_gpu: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        per_gpu.setdefault(r["gpu"], []).append(r)
    gaps = []
    for seq in per_gpu.values():
        seq.sort(key=lambda r: r["start"])
        gaps += [b["start"] - a["end"] for a, b in zip(seq, seq[1:], strict=False)]
    first = min(r["start"] for r in runs if not r["blocker"])
    return {"makespan_s": round(last - blockers_end, 2), "gaps": gaps,
            "blockers_end_to_first_start_s": round(first - blockers_end, 2),
            "gpus_used": len(per_gpu),
            "queued_before_blockers_end": side["queued_before_blockers_end"]}


def run(quick: bool, reps: int | None = None, poll: float | None = None) -> dict[str, Any]:
    n = 4 if quick else 16
    hold = 25.0 if quick else 35.0
    reps = reps or (1 if quick else 3)
    cluster = Cluster()
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-slurm-"))
    sections = cluster.sections()
    if poll is not None:
        sections["slurm"] = {**sections["slurm"], "poll_interval": poll}
    cfg = bench_config(tmp, **sections, docker={"stop_grace": 3.0},
                       gpus={"backend": "virtual", "virtual_count": 0})
    prefix = cfg["docker"]["name_prefix"]
    srv: Running | None = None
    sides: dict[str, list[dict[str, Any]]] = {"dopq": [], "sbatch": []}
    busy: dict[str, list[int]] = {"dopq": [], "sbatch": []}
    try:
        srv = Running(cfg)
        folder = good_job(tmp / "jobs", "alice", "w-slurm", "true", num_gpus=1)
        # one job first: builds the image and pushes it to the registry
        warm = srv["alice"].submit(folder, {"name": "w-warm", "command": ["true"]})["id"]
        job = srv.wait_job(warm, 300)
        if job["state"] != "succeeded":
            raise RuntimeError(f"warm-up job ended {job['state']}: {job['error']}")
        # the registry's name for it (pushed already: the backend remembers it)
        image = srv.server.platform.workers.backend.publish(
            srv.server.platform.store.job(warm)["image"])
        for rep in range(reps):
            for name in ("dopq", "sbatch"):
                busy[name].append(cluster.busy_gpus())
                if name == "dopq":
                    side = dopq_side(srv, folder, n, hold)
                else:
                    side = sbatch_side(cluster, image, tmp / f"sbatch-{rep}", n, hold)
                sides[name].append(figures(side))
                print(f"rep {rep + 1}/{reps} {name}: makespan "
                      f"{sides[name][-1]['makespan_s']} s", flush=True)
    finally:
        if srv is not None:
            srv.stop()
        cleanup_docker(prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"jobs": n, "gpus": GPUS, "work_s": WORK, "repetitions": reps,
                           "ideal_s": n / GPUS * WORK,
                           "dopq_poll_interval_s": cfg["slurm"]["poll_interval"]}
    for name, rows in sides.items():
        makespans = [r["makespan_s"] for r in rows]
        out[name] = {
            "makespan_s": statistics.median(makespans), "makespan_runs_s": makespans,
            "gap_ms": summary([g for r in rows for g in r["gaps"]], 1000),
            "blockers_end_to_first_start_s": statistics.median(
                r["blockers_end_to_first_start_s"] for r in rows),
            "queued_before_blockers_end": all(r["queued_before_blockers_end"] for r in rows),
            "gpus_used": [r["gpus_used"] for r in rows],
            "foreign_busy_gpus_at_start": busy[name],
        }
    out["ratio_dopq_over_sbatch"] = round(out["dopq"]["makespan_s"] /
                                          out["sbatch"]["makespan_s"], 3)
    out["gap_p50_ratio"] = _ratio(out["dopq"]["gap_ms"]["p50"], out["sbatch"]["gap_ms"]["p50"])
    out["slurm"] = cluster.scheduler_parameters()
    out["slurm_note"] = (
        "sbatch side: Slurm schedules on each job's end (event-driven, sched_min_interval "
        "default 2 us) plus every sched_interval=1 s; bf_interval=1 s backfill. Faster "
        "would be SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0 "
        "(and no defer, already off); not set here (cluster.sh unchanged).")
    out["machine"] = machine()
    out["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def table(result: dict[str, Any]) -> str:
    rows = [("", "makespan s", "gap p50 ms", "gap p95 ms", "1st start s")]
    for name in ("dopq", "sbatch"):
        r = result[name]
        rows.append((name, f"{r['makespan_s']:.2f}", f"{r['gap_ms']['p50']}",
                     f"{r['gap_ms']['p95']}", f"{r['blockers_end_to_first_start_s']:.2f}"))
    lines = ["  ".join(f"{c:>12}" for c in row) for row in rows]
    lines.append(f"ratio DoPQ/sbatch (makespan): {result['ratio_dopq_over_sbatch']}"
                 f"   ideal {result['ideal_s']} s, {result['jobs']} jobs, "
                 f"{result['repetitions']} reps (median)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    p.add_argument("--poll-interval", type=float, default=None,
                   help="DoPQ's [slurm] poll_interval (default: the cluster config's)")
    args = p.parse_args(argv)
    result = run(args.quick, args.reps, args.poll_interval)
    write_result(result, args.json)
    print(table(result))
    return 0


if __name__ == "__main__":
    assert ROOT.is_dir()
    raise SystemExit(main())

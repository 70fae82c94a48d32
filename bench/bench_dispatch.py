"""Dispatch, workload W: how much GPU time DoPQ wastes between jobs, against plain docker.

    .venv/bin/python bench/bench_dispatch.py [--quick] [--json PATH] [--keep-containers]

4 virtual GPUs. A blocker job holds all 4 (``sleep 15``); behind it 16 jobs of
one already built image, each ``sleep 0.5`` on 1 GPU, all queued before the
blocker ends. Makespan: from the blocker's end to the last job's end (the job
records); the median of 3 runs, each on a fresh server. Baseline, 3 times in
the same run and on the same image, its median:
``seq 16 | xargs -P4 -I{} docker run --rm --network none IMAGE sh -c 'sleep 0.5'``.
Goal (issue 17): makespan / baseline <= 0.70; and the gap from a GPU freeing to
the next container running has p95 within 50 ms of the engine's own
create-and-start p95, timed here on the same image, 4 at a time
(``engine_create_start_ms``).

Docker's own times of each container's start and death (its event stream,
``timeNano``) give the gap from one container's exit to the next container's
start on the freed GPU, split into the time DoPQ takes to decide (exit -> the
job's ``started_at``, committed before the container is created) and the time
Docker takes to create and start it. The server runs with its defaults, so it
removes each finished container as the baseline's ``--rm`` does;
Before the gap, the engine's own lag: the container's exit (its ``FinishedAt``,
the job's ``finished_at``) to its ``die`` event (``exit_to_die_event_ms``); the
start splits at Docker's ``create`` event into the wait for a start worker
with the create call (``decision_to_created_ms``) and the engine's start
(``created_to_started_ms``).
``--keep-containers`` sets ``docker.remove_containers = false`` to see what
the removals cost.
``--quick``: blocker ``sleep 3``, 4 jobs.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import (
    Running,
    bench_config,
    cleanup_docker,
    good_job,
    parser,
    summary,
    wait_for,
    write_result,
)

GOAL_RATIO = 0.70
GOAL_GAP_OVER_ENGINE_MS = 50.0
FINAL = ("succeeded", "failed", "cancelled")


def _state(store: Any, job_id: int, want: tuple[str, ...]) -> bool:
    state = store.job(job_id)["state"]
    if state in want:
        return True
    if state in FINAL:
        raise RuntimeError(f"job {job_id} ended {state}: {store.job(job_id)['error']}")
    return False


class EngineEvents:
    """Docker's own start and die times of one server's containers (a stream reader)."""

    def __init__(self, prefix: str) -> None:
        import docker

        self.api = docker.APIClient(version="auto", timeout=30)
        self.times: dict[tuple[int, str], float] = {}
        self.stream = self.api.events(
            decode=True, filters={"type": "container", "label": f"dopq.instance={prefix}"})
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for ev in self.stream:
                action = ev.get("Action") or ev.get("status")
                job = (ev.get("Actor") or {}).get("Attributes", {}).get("dopq.job")
                if job and action in ("create", "start", "die"):
                    self.times.setdefault((int(job), action), ev["timeNano"] / 1e9)
        except Exception:  # noqa: BLE001 - closing the stream ends the loop
            pass

    def wait(self, keys: list[tuple[int, str]], timeout: float = 10.0) -> None:
        wait_for(lambda: all(k in self.times for k in keys), timeout, 0.05)

    def close(self) -> None:
        self.stream.close()
        self.thread.join(5)
        self.api.close()


def baseline(image: str, n: int) -> float:
    cmd = (f"seq {n} | xargs -P4 -I{{}} docker run --rm --network none {image} "
           "sh -c 'sleep 0.5'")
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True, timeout=300, capture_output=True)
    return time.perf_counter() - t0


def engine_create_start(image: str, n: int, prefix: str) -> list[float]:
    """Seconds from create to a started container, 4 at a time, as docker-py does it."""
    import docker

    api = docker.APIClient(version="auto", timeout=60)
    made: list[str] = []

    def one(_: int) -> float:
        t0 = time.perf_counter()
        c = api.create_container(image, ["sh", "-c", "sleep 0.5"],
                                 labels={"dopq.instance": prefix},  # cleanup_docker's
                                 host_config=api.create_host_config(network_mode="none"))
        made.append(c["Id"])
        api.start(c["Id"])
        return time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(one, range(n)))
    finally:
        for cid in made:
            api.remove_container(cid, force=True)
        api.close()


def gaps(records: dict[int, dict[str, Any]], blocker: int) -> dict[str, list[float]]:
    """Per GPU, in Docker's times: exit of one container -> start of the next (seconds)."""
    per_gpu: dict[int, list[dict[str, Any]]] = {}
    for rec in records.values():
        for g in rec["gpus"]:
            per_gpu.setdefault(g, []).append(rec)
    gap, decide, start, report, create, engine = [], [], [], [], [], []
    for seq in per_gpu.values():
        seq.sort(key=lambda r: r["docker_started"])
        for prev, nxt in zip(seq, seq[1:], strict=False):
            gap.append(nxt["docker_started"] - prev["docker_finished"])
            decide.append(nxt["record_started"] - prev["docker_finished"])
            start.append(nxt["docker_started"] - nxt["record_started"])
            report.append(prev["docker_finished"] - prev["record_finished"])
            create.append(nxt["docker_created"] - nxt["record_started"])
            engine.append(nxt["docker_started"] - nxt["docker_created"])
    first = (min(r["docker_started"] for i, r in records.items() if i != blocker)
             - records[blocker]["docker_finished"])
    return {"gap": gap, "decide": decide, "start": start, "first": [first],
            "report": report, "create": create, "engine": engine}


def workload(tmp: Path, quick: bool, keep_containers: bool,
             prefixes: list[str]) -> tuple[float, dict[int, Any], int, str, bool]:
    """One run of workload W on a fresh server, whose container prefix is added to
    ``prefixes`` (its image stays for the baseline): (makespan, records, blocker id,
    image, whether all the jobs were queued before the blocker ended)."""
    n = 4 if quick else 16
    hold = 3 if quick else 15
    cfg = bench_config(tmp, gpus={"backend": "virtual", "virtual_count": 4},
                       docker={"remove_containers": not keep_containers})
    prefix = cfg["docker"]["name_prefix"]
    prefixes.append(prefix)
    srv: Running | None = None
    events: EngineEvents | None = None
    try:
        events = EngineEvents(prefix)
        srv = Running(cfg)
        store = srv.server.platform.store
        alice = srv["alice"]
        folder = good_job(tmp / "jobs", "alice", "w-sleep", "sleep 0.5", num_gpus=1)
        # The blocker is the same folder with other options: it builds the image
        # the 16 jobs then reuse (identical context).
        blocker = alice.submit(folder, {"gpus": 4, "name": "w-blocker",
                                        "command": ["sh", "-c", f"sleep {hold}"]})["id"]
        wait_for(lambda: _state(store, blocker, ("running",)), 120, 0.05)
        ids = [alice.submit(folder)["id"] for _ in range(n)]
        wait_for(lambda: all(_state(store, i, ("queued", "running")) for i in ids),
                 hold + 60, 0.05)
        queued_in_time = store.job(blocker)["state"] == "running"
        wait_for(lambda: all(store.job(i)["state"] in FINAL for i in ids),
                 hold + 120 + n, 0.1)
        wait_for(lambda: store.job(blocker)["state"] in FINAL, 30, 0.1)
        rows = {i: store.job(i) for i in (blocker, *ids)}
        failed = [i for i, r in rows.items() if r["state"] != "succeeded"]
        if failed:
            raise RuntimeError(f"jobs {failed} did not succeed")
        events.wait([(i, a) for i in rows for a in ("create", "start", "die")])
        records: dict[int, dict[str, Any]] = {}
        for i, r in rows.items():
            records[i] = {"gpus": r["gpus"], "record_started": r["started_at"],
                          "record_finished": r["finished_at"],
                          "docker_created": events.times[(i, "create")],
                          "docker_started": events.times[(i, "start")],
                          "docker_finished": events.times[(i, "die")]}
        makespan = max(rows[i]["finished_at"] for i in ids) - rows[blocker]["finished_at"]
        return makespan, records, blocker, rows[blocker]["image"], queued_in_time
    finally:
        if srv is not None:
            srv.stop()
        if events is not None:
            events.close()


def run(quick: bool, keep_containers: bool = False) -> dict[str, Any]:
    """``reps`` runs of DoPQ (each on a fresh server), then as many of the baseline
    and of the engine's own create-and-start, on a quiet machine: the medians."""
    n = 4 if quick else 16
    reps = 1 if quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-dispatch-"))
    spans: list[float] = []
    in_time: list[bool] = []
    timeline: dict[str, list[float]] = {k: [] for k in ("gap", "decide", "start", "first",
                                                         "report", "create", "engine")}
    prefixes = ["dopqb" + uuid.uuid4().hex[:8]]  # the engine timing's, then each run's
    try:
        for k in range(reps):
            span, records, blocker, image, queued = workload(tmp / f"run{k}", quick,
                                                             keep_containers, prefixes)
            spans.append(span)
            in_time.append(queued)
            for key, values in gaps(records, blocker).items():
                timeline[key].extend(values)
        base = [baseline(image, n) for _ in range(reps)]
        engine = [t for _ in range(reps) for t in engine_create_start(image, n, prefixes[0])]
    finally:
        for prefix in prefixes:
            cleanup_docker(prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    makespan, base_s = statistics.median(spans), statistics.median(base)
    ratio = makespan / base_s
    gap = summary(timeline["gap"], 1000)
    return {
        "jobs": n, "blocker_s": 3 if quick else 15, "remove_containers": not keep_containers,
        "queued_before_blocker_end": all(in_time),
        "runs": reps, "makespan_runs_s": [round(s, 3) for s in spans],
        "makespan_s": round(makespan, 3),
        "baseline_s": round(base_s, 3), "baseline_runs_s": [round(b, 3) for b in base],
        "ideal_s": n / 4 * 0.5,
        "ratio": round(ratio, 3), "goal_ratio": GOAL_RATIO, "met": ratio <= GOAL_RATIO,
        "gap_ms": gap,
        "exit_to_decision_ms": summary(timeline["decide"], 1000),
        "decision_to_docker_start_ms": summary(timeline["start"], 1000),
        "exit_to_die_event_ms": summary(timeline["report"], 1000),
        "decision_to_created_ms": summary(timeline["create"], 1000),
        "created_to_started_ms": summary(timeline["engine"], 1000),
        "blocker_exit_to_first_start_ms": summary(timeline["first"], 1000),
        "engine_create_start_ms": summary(engine, 1000),
        **gap_goal(gap["p95"], summary(engine, 1000)["p95"]),
    }


def gap_goal(gap_p95: float | None, engine_p95: float | None) -> dict[str, Any]:
    over = None if gap_p95 is None or engine_p95 is None else round(gap_p95 - engine_p95, 1)
    return {"gap_p95_over_engine_ms": over, "goal_gap_over_engine_ms": GOAL_GAP_OVER_ENGINE_MS,
            "gap_met": over is not None and over <= GOAL_GAP_OVER_ENGINE_MS}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--keep-containers", action="store_true",
                   help="docker.remove_containers = false (no removal after each job)")
    args = p.parse_args(argv)
    write_result(run(args.quick, args.keep_containers), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time ``dopq.core.policy.decide`` on large synthetic queues.

    python bench/bench_policy.py [--quick] [--json PATH]
    python bench/bench_policy.py --write-traces bench/traces

Scenarios, each with 8 GPUs, 200 users and the given number of queued jobs:
  full      all GPUs busy (the usual state of a long queue)
  backfill  2 GPUs free, so the head of the line reserves and the rest is scanned
  recency   all GPUs busy, DoPQ 1.0 order with 1000 finished jobs of history
  entries   ``Decision.entries`` (every job's position, reason, factors)
  tick      the server's whole decision step: ``Scheduler.handle(Tick())`` on
            the full scenario (cluster state, usage snapshot, decide, books)
  shared    backfill with 80g devices, most queued jobs sharing by memory
Times are the median of several runs; memory is the tracemalloc peak of one
call. Prints a table; writes a file only when given ``--json PATH``.

``--write-traces DIR`` regenerates the simulator traces shipped in
bench/traces/ (deterministic, seeded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopq.core.capacity import Capacity  # noqa: E402
from dopq.core.events import JobAdopted, QueueLoaded, Running, Tick  # noqa: E402
from dopq.core.policy import ClusterState, PolicyConfig, QueuedJob, RunningJob, decide  # noqa: E402
from dopq.core.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from dopq.core.usage import UsageLedger  # noqa: E402

DAY = 86400.0


def make_state(n: int, free: int, seed: int = 1, users: int = 200, gpus: int = 8) -> ClusterState:
    rng = random.Random(seed)
    now = 30 * DAY
    subs = sorted(now - rng.uniform(0, 10 * DAY) for _ in range(n))
    queued = []
    for i, sub in enumerate(subs, 1):
        queued.append(
            QueuedJob(
                id=i,
                user=f"user{rng.randrange(users):03d}",
                num_gpus=rng.choice((1, 1, 1, 2, 2, 4)),
                submitted_at=sub,
                time_limit=rng.choice((None, 3600.0, 4 * 3600.0, DAY)),
                priority=rng.choice((0, 0, 0, 100, -100)),
                held=rng.random() < 0.01,
                after=(rng.randrange(1, i + 1),) if rng.random() < 0.01 else (),
            )
        )
    running = [
        RunningJob(n + g + 1, f"user{g:03d}", 1, (g,), now - 600.0, 3600.0 * (g + 1))
        for g in range(gpus - free)
    ]
    usage = {f"user{u:03d}": rng.expovariate(1 / (3 * 3600.0)) for u in range(users)}
    history = [f"user{rng.randrange(users):03d}" for _ in range(1000)]
    return ClusterState(
        queued, running, frozenset(range(gpus - free, gpus)), usage, {}, history, gpus
    )


def make_shared_state(n: int, seed: int = 1, gpus: int = 8) -> ClusterState:
    """``backfill`` with 80g devices: 3 in 5 queued jobs declare 4-16g on one
    device, and two devices are shared by running jobs."""
    rng = random.Random(seed)
    base = make_state(n, free=2, seed=seed, gpus=gpus)
    queued = [
        dataclasses.replace(q, num_gpus=1, gpu_memory=rng.choice((4, 8, 12, 16)) << 30)
        if rng.random() < 0.6 else q
        for q in base.queued
    ]
    now = 30 * DAY
    sharers = [RunningJob(n + 100 + i, f"user{i:03d}", 1, (gpus - 1 - i % 2,), now - 300.0,
                          1800.0 * (i + 1), 20 << 30) for i in range(4)]
    return dataclasses.replace(
        base, queued=queued, running=[*base.running, *sharers],
        free_gpus=base.free_gpus - {gpus - 1, gpus - 2},
        memory={g: 80 << 30 for g in range(gpus)}, memory_reserve=1 << 30,
    )


def _time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _peak_kib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1024
    finally:
        tracemalloc.stop()


def make_scheduler(state: ClusterState, cfg: PolicyConfig, now: float, gpus: int = 8) -> Scheduler:
    """A :class:`Scheduler` that knows what ``state`` describes."""
    ledger = UsageLedger(cfg.half_life, [{"user": u, "value": v, "updated_at": now}
                                         for u, v in state.usage.items()])
    sched = Scheduler(SchedulerConfig(cfg), Capacity.single(range(gpus)), ledger)
    sched.handle(QueueLoaded(state.queued), now)
    for r in state.running:
        sched.handle(JobAdopted(Running(r.id, r.user, r.num_gpus, r.gpus, r.started_at,
                                        r.time_limit)), now)
    return sched


def run(sizes: list[int], reps: int) -> list[dict[str, float]]:
    fair = PolicyConfig().validate()
    recency = PolicyConfig(policy="recency").validate()
    rows = []
    now = 30 * DAY  # make_state's clock
    for n in sizes:
        full, backfill = make_state(n, free=0), make_state(n, free=2)
        r = max(3, reps if n <= 10_000 else reps // 5)
        row = {
            "queued": n,
            "full_ms": _time(lambda s=full: decide(s, now, fair), r),
            "backfill_ms": _time(lambda s=backfill: decide(s, now, fair), r),
            "recency_ms": _time(lambda s=full: decide(s, now, recency), r),
            "entries_ms": _time(lambda s=full: decide(s, now, fair).entries, max(3, r // 5)),
            "decide_kib": _peak_kib(lambda s=backfill: decide(s, now, fair)),
            "entries_kib": _peak_kib(lambda s=full: decide(s, now, fair).entries),
        }
        # Built only now: more live objects make the collector's passes, and so
        # the columns above, slower than they are on the server.
        shared = make_shared_state(n)
        sched = make_scheduler(full, fair, now)
        row["tick_ms"] = _time(lambda s=sched: s.handle(Tick({}, []), now), r)
        row["shared_ms"] = _time(lambda s=shared: decide(s, now, fair), r)
        rows.append(row)
        del shared, sched
    return rows


def format_rows(rows: list[dict[str, float]]) -> str:
    head = (
        f"{'queued':>8} {'full ms':>8} {'backfill ms':>11} {'recency ms':>10} "
        f"{'entries ms':>10} {'decide KiB':>10} {'entries KiB':>11} {'tick ms':>8} "
        f"{'shared ms':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['queued']:>8} {r['full_ms']:>8.2f} {r['backfill_ms']:>11.2f} "
            f"{r['recency_ms']:>10.2f} {r['entries_ms']:>10.1f} {r['decide_kib']:>10.0f} "
            f"{r['entries_kib']:>11.0f} {r['tick_ms']:>8.2f} {r['shared_ms']:>9.2f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ traces


def _line(submit: float, user: str, gpus: int, duration: float, **extra: Any) -> str:
    job: dict[str, Any] = {"submit": round(submit), "user": user, "gpus": gpus,
                           "duration": round(duration)}
    job.update({k: v for k, v in extra.items() if v is not None})
    return json.dumps(job)


def trace_heavy_vs_light(rng: random.Random) -> list[str]:
    lines = ["# one user floods 4 GPUs with 300 one-GPU jobs; two light users come later"]
    for _ in range(300):
        lines.append(_line(0, "heavy", 1, rng.uniform(1200, 2400), time_limit=3600))
    for user, first in (("alice", 4 * 3600), ("bob", 10 * 3600)):
        for k in range(6):
            lines.append(_line(first + k * 1800, user, 1, rng.uniform(1200, 2400),
                               time_limit=3600))
    return lines


def trace_big_job_vs_stream(rng: random.Random) -> list[str]:
    lines = ["# two users keep 4 GPUs busy with 1-GPU jobs; one 4-GPU job arrives at 1h"]
    t = 0.0
    while t < 12 * 3600:
        user = rng.choice(("stream1", "stream2"))
        lines.append(_line(t, user, 1, rng.uniform(900, 3600), time_limit=3600))
        t += rng.uniform(300, 900)
    lines.append(_line(3600, "big", 4, 3 * 3600, time_limit=4 * 3600))
    return lines


def trace_mixed_day(rng: random.Random) -> list[str]:
    lines = ["# a day on a 4-GPU server: six users, 0-4 GPUs, some without a time limit"]
    users = {"ana": 1.0, "ben": 1.0, "chen": 2.0, "dara": 0.5, "eli": 1.5, "fay": 0.7}
    names, rates = list(users), list(users.values())
    t = 0.0
    while t < DAY:
        # busier during the working day
        hour = (t / 3600) % 24
        t += rng.expovariate((20 if 8 <= hour < 18 else 6) / 3600)
        user = rng.choices(names, rates)[0]
        gpus = rng.choices((0, 1, 2, 4), (15, 60, 18, 7))[0]
        duration = min(8 * 3600, rng.lognormvariate(6.3, 0.9))
        limit = None if rng.random() < 0.15 else max(duration * rng.uniform(0.8, 3), 600)
        prio = rng.choice((0, 0, 0, 0, 100, -100))
        lines.append(_line(t, user, gpus, duration, time_limit=limit and round(limit),
                           priority=prio or None))
    return lines


def trace_small_and_whole(rng: random.Random) -> list[str]:
    lines = ["# a day on 8 GPUs of 80g: evaluation and debug jobs of 4-12g beside whole-GPU"
             " trainings of 1-4 GPUs; compare `dopq simulate` with and without --no-sharing"]
    users = {"ana": 1.0, "ben": 1.2, "chen": 0.8, "dara": 1.0, "eli": 0.6, "fay": 0.9}
    names, rates = list(users), list(users.values())
    t = 0.0
    while t < DAY:
        hour = (t / 3600) % 24
        t += rng.expovariate((30 if 8 <= hour < 19 else 8) / 3600)
        user = rng.choices(names, rates)[0]
        if rng.random() < 0.04:  # a training: whole GPUs, hours
            gpus = rng.choices((1, 2, 4), (50, 35, 15))[0]
            duration = rng.uniform(2, 6) * 3600
            lines.append(_line(t, user, gpus, duration,
                               time_limit=round(duration * rng.uniform(1.1, 1.5))))
        else:  # evaluation or debugging: a slice of one GPU, minutes
            memory = rng.choice(("4g", "4g", "6g", "8g", "8g", "10g", "12g"))
            duration = min(3 * 3600, rng.lognormvariate(6.6, 0.8))
            limit = None if rng.random() < 0.1 else round(max(900, duration * rng.uniform(1.2, 3)))
            lines.append(_line(t, user, 1, duration, time_limit=limit, gpu_memory=memory))
    return lines


def trace_heavy_day_light_arrival(rng: random.Random) -> list[str]:
    lines = ["# 8 GPUs: a heavy user fills the machine with day-long preemptible jobs and queues"
             " more; a light user arrives at 12h with a few short jobs; compare `dopq simulate"
             " --gpus 8` with and without --preemption fairshare (and --checkpoint-every 1h)"]
    for _ in range(6):
        lines.append(_line(rng.uniform(0, 300), "heavy", 1, rng.uniform(20, 28) * 3600,
                           preemptible=True))
    lines.append(_line(rng.uniform(0, 300), "heavy", 2, rng.uniform(24, 30) * 3600,
                       preemptible=True))
    for k in range(4):
        lines.append(_line(3600 + k * 600, "heavy", 1, rng.uniform(20, 26) * 3600,
                           preemptible=True))
    for offset, gpus in ((0, 1), (600, 1), (2400, 2), (5400, 1), (9000, 1)):
        lines.append(_line(12 * 3600 + offset + rng.uniform(0, 120), "light", gpus,
                           rng.uniform(1200, 3000), time_limit=3600))
    return lines


def write_traces(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    makers = {
        "heavy_vs_light": trace_heavy_vs_light,
        "big_job_vs_stream": trace_big_job_vs_stream,
        "mixed_day": trace_mixed_day,
        "small_and_whole": trace_small_and_whole,
        "heavy_day_light_arrival": trace_heavy_day_light_arrival,
    }
    for name, make in makers.items():
        path = directory / f"{name}.jsonl"
        path.write_text("\n".join(make(random.Random(name))) + "\n")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k jobs, few runs")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--write-traces", metavar="DIR", help="regenerate the traces")
    args = parser.parse_args(argv)
    if args.write_traces:
        write_traces(Path(args.write_traces))
        return 0
    sizes = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    rows = run(sizes, reps=3 if args.quick else 25)
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

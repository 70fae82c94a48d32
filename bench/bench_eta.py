"""How much ``dopq.core.eta.estimate`` costs, and how far its estimates are from the truth.

    python bench/bench_eta.py [--quick] [--json PATH]

Cost: the synthetic queues of ``bench_policy.py`` (8 GPUs, 200 users, all
busy), with a 4h default run time so that every job has an end. ``reuse_ms``
is what the server pays (the queue's own decision and explain are reused),
``full_ms`` computes them too. Median of several runs.

Error: each trace in bench/traces/ is replayed on 4 GPUs with the real
policy (:func:`dopq.core.simulate.simulate`); when a job is submitted its start is
estimated from that instant's state, using time limits, else the median run
time of the user's jobs finished so far. Reported: median and p90 of
|estimated - real start| over the jobs that got an estimate (all, and those
that had to wait), and the share of jobs that got one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_policy import DAY, _time, make_state  # noqa: E402

from dopq.core.eta import RunTimes, estimate, typical_run_times  # noqa: E402
from dopq.core.policy import ClusterState, Decision, PolicyConfig, decide  # noqa: E402
from dopq.core.simulate import load_trace, simulate  # noqa: E402

TRACES = ROOT / "bench" / "traces"


def cost(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    cfg = PolicyConfig().validate()
    now = 30 * DAY
    rt = RunTimes(default=4 * 3600.0)
    rows = []
    for n in sizes:
        state = make_state(n, free=0)
        decision = decide(state, now, cfg)
        entries = decision.entries
        est = estimate(state, now, cfg, rt, decision=decision, entries=entries)
        rows.append({
            "queued": n,
            "reuse_ms": _time(lambda s=state, d=decision, e=entries: estimate(
                s, now, cfg, rt, decision=d, entries=e), reps),
            "full_ms": _time(lambda s=state: estimate(s, now, cfg, rt), max(3, reps // 2)),
            "estimated": sum(1 for v in est.values() if v.start is not None),
        })
    return rows


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def accuracy(trace: Path, gpus: int = 4) -> dict[str, Any]:
    jobs = load_trace(trace)
    cfg = PolicyConfig().validate()
    truth = {r.id: r for r in simulate(jobs, gpus, cfg, check=False).jobs}
    finished = sorted((r for r in truth.values() if r.end is not None and r.start is not None),
                      key=lambda r: -(r.end or 0.0))
    estimates: dict[int, float | None] = {}

    def observe(now: float, state: ClusterState, decision: Decision) -> None:
        new = [q.id for q in state.queued if q.id not in estimates]
        if not new:
            return
        done = [(r.user, (r.end or 0.0) - (r.start or 0.0)) for r in finished
                if (r.end or 0.0) <= now]
        est = estimate(state, now, cfg, RunTimes(typical_run_times(done)), decision=decision)
        for jid in new:
            estimates[jid] = est[jid].start

    simulate(jobs, gpus, cfg, check=False, observe=observe)
    errors, waited = [], []
    for jid, est in estimates.items():
        real = truth[jid].start
        if est is None or real is None:
            continue
        errors.append(abs(est - real))
        if real > truth[jid].submit:
            waited.append(abs(est - real))
    return {
        "trace": trace.name, "jobs": len(jobs), "estimated": len(errors),
        "coverage": round(len(errors) / max(1, len(jobs)), 3),
        "median_s": round(statistics.median(errors), 1) if errors else None,
        "p90_s": round(_pct(errors, 0.9), 1),
        "waited": len(waited),
        "waited_median_s": round(statistics.median(waited), 1) if waited else None,
        "waited_p90_s": round(_pct(waited, 0.9), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    sizes = [1000, 10_000] if args.quick else [1000, 10_000, 100_000]
    rows = cost(sizes, 3 if args.quick else 7)
    print(f"{'queued':>8} {'reuse ms':>9} {'full ms':>8} {'estimated':>9}")
    for r in rows:
        print(f"{r['queued']:>8} {r['reuse_ms']:>9.1f} {r['full_ms']:>8.1f} {r['estimated']:>9}")
    traces = sorted(TRACES.glob("*.jsonl"))
    acc = [accuracy(t) for t in traces]
    print(f"\n{'trace':<24} {'jobs':>5} {'cover':>6} {'median':>8} {'p90':>8} "
          f"{'waited':>6} {'w.median':>8} {'w.p90':>8}   (|estimated - real start|, s)")
    for a in acc:
        print(f"{a['trace']:<24} {a['jobs']:>5} {a['coverage']:>6.1%} {a['median_s']:>8} "
              f"{a['p90_s']:>8} {a['waited']:>6} {a['waited_median_s']!s:>8} "
              f"{a['waited_p90_s']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cost": rows, "accuracy": acc}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

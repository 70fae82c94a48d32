"""Run every DoPQ benchmark, each against its baseline, and keep the figures.

    .venv/bin/python bench/run.py [--quick] [--only NAME,...] [--out DIR] [--profile DIR]

Benchmarks (issues 6 and 17): dispatch, intake, policy, eta, api, gui, size,
context (a 1 GB build context through both doors); each runs as
its own process (``bench/bench_<name>.py --json``), so one failing does not
stop the others. Prints a summary table (benchmark, figure, value, baseline,
goal, met), writes ``<out>/<UTC timestamp>.json`` with every figure and
``<out>/<UTC timestamp>.png`` with the scaling curves (policy decision time
against queued jobs, API p99 against clients). ``--out`` defaults to
bench/results. Exits 1 when a benchmark failed to run, 0 otherwise (a missed
goal is a figure, not a failure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BENCHMARKS = ("dispatch", "intake", "policy", "eta", "api", "gui", "size", "context")
TIMEOUT_S = {"dispatch": 300, "intake": 300, "policy": 900, "eta": 600, "api": 900, "gui": 600,
             "size": 600, "context": 1200}

Row = tuple[str, str, Any, Any, str, bool | None]  # bench, figure, value, baseline, goal, met


# -- running one benchmark --------------------------------------------------------------
def _run(cmd: list[str], timeout: float, capture: bool = False) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not capture:
        return subprocess.run(cmd, timeout=timeout, env=env).returncode, ""
    proc = subprocess.run(cmd, timeout=timeout, env=env, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="")
    return proc.returncode, proc.stdout


def parse_gui(text: str) -> dict[str, Any]:
    """bench_gui.py's printed table as figures (it writes no JSON)."""
    out: dict[str, Any] = {"refresh_ms": {}, "other_ms": {}}
    section = "refresh_ms"  # timed lines after the verdict are not refreshes
    for line in text.splitlines():
        m = re.match(r"^\s{2}(\S.*?)\s+([\d.]+) ms$", line)
        if m:
            out[section][m.group(1)] = float(m.group(2))
        m = re.match(r"^worst steady refresh: ([\d.]+) ms", line)
        if m:
            out["worst_ms"] = float(m.group(1))
            section = "other_ms"
        m = re.match(r"^GUI-thread time per refresh, (\d+) queued / (\d+) finished", line)
        if m:
            out["queued"], out["finished"] = int(m.group(1)), int(m.group(2))
    if "worst_ms" not in out:
        raise ValueError("no 'worst steady refresh' line in bench_gui.py's output")
    return out


def run_one(name: str, quick: bool, tmp: Path, profile: str | None) -> dict[str, Any] | list[Any]:
    script = HERE / f"bench_{name}.py"
    if not script.exists():
        raise FileNotFoundError(f"{script.name} is missing")
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    if name == "gui":
        helps = subprocess.run(cmd[:2] + ["--help"], capture_output=True, text=True,
                               timeout=120).stdout
        if "--json" not in helps:
            rc, text = _run(cmd, TIMEOUT_S[name], capture=True)
            if rc != 0:
                raise RuntimeError(f"bench_{name}.py exited {rc}")
            return parse_gui(text)
    cmd += ["--json", str(out)]
    if name == "api" and profile:
        cmd += ["--profile", profile]
    rc, _ = _run(cmd, TIMEOUT_S[name])
    if rc != 0:
        raise RuntimeError(f"bench_{name}.py exited {rc}")
    data: dict[str, Any] | list[Any] = json.loads(out.read_text())
    return data


# -- the summary ------------------------------------------------------------------------
def summarise(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    d = results.get("dispatch")
    if isinstance(d, dict):
        rows.append(("dispatch", f"makespan {d['jobs']} jobs (s)", d["makespan_s"],
                     f"docker run {d['baseline_s']}", "", None))
        rows.append(("dispatch", "makespan / docker run", d["ratio"], 1.0,
                     f"<= {d['goal_ratio']}", d["met"]))
        rows.append(("dispatch", "gap exit->next start p50/p95 (ms)",
                     f"{d['gap_ms']['p50']}/{d['gap_ms']['p95']}",
                     f"engine create+start p95 {d['engine_create_start_ms']['p95']}",
                     f"p95 <= engine's + {d['goal_gap_over_engine_ms']:g}", d["gap_met"]))
    d = results.get("intake")
    if isinstance(d, dict):
        rows.append(("intake", "drop -> build starts p50 (ms)", d["drop_to_building_p50_ms"],
                     "", "", None))
        rows.append(("intake", "build phase p50 (ms)", d["build_ms"]["p50"],
                     f"docker build {d['baseline_docker_build_ms']}", "", None))
        rows.append(("intake", "resubmit -> queued (ms)", d["resubmit_inbox_to_queued_ms"],
                     f"first build {d['first_build_to_queued_ms']}", "< first build", d["met"]))
    d = results.get("policy")
    if isinstance(d, list):
        for r in d:
            ms = max(r["full_ms"], r["backfill_ms"])
            goal = "< 5" if r["queued"] == 10_000 else ""
            rows.append(("policy", f"decide, {r['queued']} queued (ms)", round(ms, 2),
                         "", goal, ms < 5 if goal else None))
            rows.append(("policy", f"decide memory, {r['queued']} queued (KiB)",
                         round(r["decide_kib"]), "", "", None))
    d = results.get("eta")
    if isinstance(d, dict):
        for r in d["cost"]:
            goal = "< 100" if r["queued"] == 10_000 else ""
            rows.append(("eta", f"start estimates, {r['queued']} queued (ms)",
                         round(r["reuse_ms"], 1), f"with decide {round(r['full_ms'], 1)}",
                         goal, r["reuse_ms"] < 100 if goal else None))
        for a in d["accuracy"]:
            rows.append(("eta", f"{a['trace']}: |est - real start| p50/p90 (s)",
                         f"{a['median_s']}/{a['p90_s']}",
                         f"waited {a['waited_median_s']}/{a['waited_p90_s']}", "", None))
    d = results.get("api")
    if isinstance(d, dict):
        for mode, m in d.get("modes", {}).items():
            # The p99 goal is the GUI's (snapshot) mode's; five views only must not fail.
            goal = mode == "snapshot"
            rows.append(("api", f"{mode}: p50/p99 (ms), {m['pollers']} clients",
                         f"{m['poll_p50_ms']}/{m['poll_p99_ms']}",
                         f"ping p99 {m['ping_ms']['p99']}",
                         f"p99 < {d['goal_p99_ms']:g}" if goal else "",
                         (m["poll_p99_ms"] or 1e9) < d["goal_p99_ms"] if goal else None))
            rows.append(("api", f"{mode}: errors", m["errors"], "", "0", m["errors"] == 0))
            rows.append(("api", f"{mode}: server CPU (cores) / peak RSS (MiB)",
                         f"{m['server_cpu_cores']}/{m['server_peak_rss_mib']}", "", "", None))
    d = results.get("gui")
    if isinstance(d, dict):
        rows.append(("gui", f"worst refresh, {d.get('queued', '?')} queued (ms)", d["worst_ms"],
                     "", "< 200", d["worst_ms"] < 200))
    d = results.get("size")
    if isinstance(d, dict):
        rows.append(("size", f"server RSS, {d['jobs']} finished (MiB)", d["rss_mib"],
                     f"empty {d['empty']['rss_mib']}", "", None))
        rows.append(("size", f"database, {d['jobs']} finished (MiB)", d["db_mib"],
                     f"empty {d['empty']['db_mib']}", "", None))
    rows.extend(_context_rows(results.get("context")))
    return rows


def _context_rows(d: Any) -> list[Row]:
    if not isinstance(d, dict):
        return []
    size = f"{d['size_bytes'] / 2**20:g} MiB"
    base = f"docker build {d['docker_build_s']}"
    goal = f"<= {d['goal_ratio']}x"
    rows: list[Row] = [
        ("context", f"drop folder, {size} (s)", d["inbox_s"], base, "", None),
        ("context", "drop folder / docker build", d["inbox_ratio"], 1.0, goal,
         d["inbox_ratio"] <= d["goal_ratio"]),
        ("context", f"API, {size} (s)", d["api_s"], base, "", None),
        ("context", "API / docker build", d["api_ratio"], 1.0, goal,
         d["api_ratio"] <= d["goal_ratio"]),
        ("context", "API in chunks / docker build", d["chunks_ratio"], 1.0, "", None),
    ]
    for proc, m in d["memory"].items():
        rows.append(("context", f"{proc} memory growth (MiB)", m["growth_mib"],
                     f"before {m['before_mib']}", "flat", None))
    return rows


def table(rows: list[Row], failed: dict[str, str]) -> str:
    head = ("benchmark", "figure", "value", "baseline", "goal", "met")
    cells = [head] + [
        (b, f, str(v), str(base), g, "" if met is None else ("yes" if met else "NO"))
        for b, f, v, base, g, met in rows
    ] + [(name, "FAILED: " + why[:60], "", "", "", "NO") for name, why in failed.items()]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the curves --------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    policy = results.get("policy")
    if isinstance(policy, list) and policy:
        xs = [r["queued"] for r in policy]
        for key, label in (("full_ms", "all GPUs busy"), ("backfill_ms", "2 GPUs free"),
                           ("recency_ms", "recency policy")):
            left.plot(xs, [r[key] for r in policy], marker="o", label=label)
        left.axhline(5, color="grey", linestyle="--", linewidth=1, label="goal at 10k: 5 ms")
        left.set_xscale("log")
        left.set_yscale("log")
        left.legend()
    left.set_title("policy: one decision")
    left.set_xlabel("queued jobs")
    left.set_ylabel("ms")
    api = results.get("api")
    if isinstance(api, dict) and api.get("sweep"):
        sweep = api["sweep"]
        xs = [r["pollers"] for r in sweep]
        right.plot(xs, [r["p99_ms"] for r in sweep], marker="o", label="snapshot p99")
        right.plot(xs, [r["p50_ms"] for r in sweep], marker="o", label="snapshot p50")
        views = api.get("modes", {}).get("views")
        if views:
            right.plot([views["pollers"]], [views["poll_p99_ms"]], marker="s", linestyle="",
                       label="five views p99")
        right.axhline(api["goal_p99_ms"], color="grey", linestyle="--", linewidth=1,
                      label=f"goal: p99 < {api['goal_p99_ms']:g} ms")
        right.set_yscale("log")
        right.legend()
        right.set_title(f"API: {api['queued']} queued, {api['finished']} finished")
    else:
        right.set_title("API")
    right.set_xlabel("clients polling once a second")
    right.set_ylabel("latency, ms")
    for ax in (left, right):
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every benchmark's quick mode")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for JSON and PNG")
    p.add_argument("--profile", metavar="DIR", help="py-spy profiles of the API server")
    args = p.parse_args(argv)
    names = BENCHMARKS
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = set(names) - set(BENCHMARKS)
        if unknown:
            p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    from common import machine

    before = machine()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {}
    failed: dict[str, str] = {}
    took: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="dopq-bench-") as tmp:
        for name in names:
            if name == "gui" and not (HERE / "bench_gui.py").exists():
                print("== gui: bench_gui.py not present, skipped")
                continue
            print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
            t = time.monotonic()
            try:
                results[name] = run_one(name, args.quick, Path(tmp), args.profile)
            except Exception as exc:  # noqa: BLE001 - one failure must not stop the rest
                failed[name] = f"{exc.__class__.__name__}: {exc}"
                print(f"== {name} FAILED: {failed[name]}", flush=True)
            took[name] = round(time.monotonic() - t, 1)
    rows = summarise(results)
    print()
    print(table(rows, failed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "timestamp": stamp, "quick": args.quick, "machine": before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "seconds": took,
        "summary": [dict(zip(("benchmark", "figure", "value", "baseline", "goal", "met"), r,
                             strict=True)) for r in rows],
        "failed": failed, "results": results,
    }
    json_path = out / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    png = out / f"{stamp}.png"
    if plot(results, png):
        print(f"wrote {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

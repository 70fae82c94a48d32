"""The API under load: GUI-like pollers and submitters against a server with a long queue.

    .venv/bin/python bench/bench_api.py [--quick] [--json PATH] [--png PATH]
        [--before JSON] [--compare LABEL=JSON] [--server-root DIR] [--seconds S]
        [--modes snapshot,views] [--pollers 1,10,25,50,100] [--profile DIR] [--size Q,F]

The server (``python -m dopq.cli server``, a child process, so that its CPU
time and peak RSS can be read from /proc) holds 10,000 queued and 1,000
finished jobs of 200 users. Its 4 virtual GPUs are all held by one long real
job, so the queued jobs wait for resources and every scheduling decision sees
all of them.

The load generator (``bench/loadgen.py``) runs the clients in processes of
their own, pinned away from the server: the server and its threads on one
half of the cores, the clients on the other (2 cores: server 0, clients 1;
the JSON's ``cores``), and where this process may raise priorities the
server and the pinger run above the pollers and above other work on the
machine (``nice``). For 1, 10, 25, 50 and 100 pollers, 20 s each, in two
modes:

- ``snapshot`` (GUI mode): the one ``snapshot(1000, version)`` call the GUI
  makes through ``SnapshotFollower`` (the whole queue once, in the untimed
  warm-up, then only what changed), once a second;
- ``views``: the five calls of the older GUI (``running``, ``queue``,
  ``history(1000)``, ``users``, ``status``), once a second;

with 2 submitters, each uploading a small CPU-only job once a second, and
beside them, in the same phase, a pinger: ``ping`` 10 times a second, the
cost of a call that does no work under the same load (``ping_ms``): what a
poll takes beyond it is the server's work for that poll. A poll that takes
longer than a second is followed at once by the next one. A last phase,
``quiet`` (50 pollers, no submitters: nothing changes), gives the server's
CPU per poll when every poller holds the newest version.

Reported per point: p50/p99 of the polls and of the pings, errors and
timeouts, polls per second, the CPU of the server, its children, the
clients and everything else on the machine, each core's busy share and the
load average (other work on the machine shows there). Goal: p99 < 100 ms
at 50 pollers in GUI mode, and no errors or timeouts in any phase.

``--server-root DIR`` runs the server from another checkout (its code first
on the path), with this checkout's clients: the "before" figures, e.g.
``git worktree add /work/before-api caf92bd~1`` (before encode-once), then
``--server-root /work/before-api --json bench/results/api-before.json``.
``--before JSON`` puts those figures into this run's JSON (``before``) and
PNG (p99 against pollers, before and after); ``--compare`` adds another
run beside them (a patched server, say). ``--plot JSON`` only redraws
the PNG from a finished run. ``--quick``: 1,000 queued, 100 finished, 5
pollers, 4 s per mode. ``--profile DIR`` samples the server with py-spy
during each 50-poller phase.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import (
    BASE_IMAGE,
    ServerProcess,
    add_users,
    bench_config,
    cleanup_docker,
    good_job,
    image_id,
    job_rows,
    parser,
    reset_peak,
    shared_tls,
    summary,
    wait_for,
    write_result,
    zip_it,
)
from loadgen import CpuMeter, pin_tree, priorities, run_load, split_cores

GOAL_P99_MS = 100.0
GOAL_POLLERS = 50
HISTORY = 1000  # the GUI's history_limit
SWEEP = (1, 10, 25, 50, 100)
VIEW_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("running", ()), ("queue", ()), ("history", (HISTORY,)), ("users", ()), ("status", ()),
]
MODES = {"snapshot": ["snapshot"], "views": [m for m, _ in VIEW_CALLS]}
FINAL = ("succeeded", "failed", "cancelled")


class CheckoutServer(ServerProcess):
    """The server run from another checkout's code (``--server-root``), clients from this one."""

    def __init__(self, cfg: dict[str, Any], workdir: Path, root: Path) -> None:
        super().__init__(cfg, workdir)
        self.root = root
        self.env = {**os.environ, "PYTHONPATH": str(root)}
        # The config file as that checkout writes it: this one's has sections it may not know.
        self.config.write_text(subprocess.run(
            [sys.executable, "-c", "import json, sys; from dopq.core import settings as s; "
             "sys.stdout.write(s.to_toml(s.from_dict(json.load(sys.stdin))))"],
            input=json.dumps(cfg), capture_output=True, text=True, check=True, cwd=root,
            env=self.env, timeout=60).stdout)


# -- profiling ----------------------------------------------------------------------------
def _spy(pid: int, seconds: float, path: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print("py-spy not found: no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "50",
         "--format", "raw", "--output", str(path), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _frame(text: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (file.py)``."""
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", text)
    return f"{m.group(1)} ({Path(m.group(2)).name})" if m else text


def hottest(raw: Path, top: int = 15) -> dict[str, Any]:
    """Inclusive and self share of samples per function from py-spy's collapsed stacks."""
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if "(threading.py:" not in f]
        for f in set(frames):
            incl[f] += n
        if frames:
            own[frames[-1]] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(100 * n / total, 1)] for f, n in c.most_common(top)] if total else []

    return {"samples": total, "inclusive_pct": share(incl), "self_pct": share(own)}


# -- one load phase -------------------------------------------------------------------------
def _is_timeout(err: str) -> bool:
    return "timeout" in err.lower() or "timed out" in err.lower()


def phase(srv: ServerProcess, conn: dict[str, Any], archive: Path, mode: str, pollers: int,
          submitters: int, seconds: float, tmp: Path, cores: list[int],
          nice: dict[str, int], profile: Path | None = None) -> dict[str, Any]:
    plan = {"mode": mode, "calls": VIEW_CALLS, "history": HISTORY, "pollers": pollers,
            "submitters": submitters, "archive": str(archive), "cores": cores, "nice": nice}
    meter = CpuMeter(srv.pid)
    spied: dict[str, Any] = {}
    raw = tmp / f"spy-{mode}-{pollers}.txt"

    def on_start(pids: list[int]) -> None:
        reset_peak(srv.pid)
        meter.start(pids)
        if profile is not None:
            spied["proc"] = _spy(srv.pid, seconds, raw)

    samples, cpu, started = run_load(conn, plan, seconds, tmp, on_start,
                                     lambda pids: (meter.stop(pids), srv.memory()))
    use, mem = cpu
    per: dict[str, dict[str, Any]] = {}
    for method in MODES[mode] + (["submit"] if submitters else []) + ["ping"]:
        got = [s for s in samples if s[0] == method]
        errs = [s[3] for s in got if s[3]]
        per[method] = {**summary([s[2] for s in got if not s[3]], 1000),
                       "errors": len(errs), "timeouts": sum(_is_timeout(e) for e in errs),
                       "first_errors": sorted(set(errs))[:3]}
    warm_errs = [s[3] for s in samples if s[0] == "warmup" and s[3]]
    sizes = [s[4] / 1024 for s in samples if s[0] in MODES[mode] and s[4] is not None]
    polls = [s for s in samples if s[0] in MODES[mode]]
    p99s = [per[m]["p99"] for m in MODES[mode] if per[m]["p99"] is not None]
    rounds = len(polls) / len(MODES[mode])
    result = {
        "mode": mode, "pollers": pollers, "submitters": submitters, "seconds": seconds,
        "calls": {m: v for m, v in per.items() if m != "ping"},
        "ping_ms": per["ping"],
        # the slowest of the mode's calls (views: each of the five counts on its own)
        "poll_p99_ms": max(p99s) if p99s else None,
        "poll_p50_ms": summary([s[2] for s in polls if not s[3]], 1000)["p50"],
        "polls_per_s": round(rounds / seconds, 2),
        "polls_wanted_per_s": pollers,
        "errors": sum(v["errors"] for v in per.values()) + len(warm_errs),
        "timeouts": sum(v["timeouts"] for v in per.values()) + sum(map(_is_timeout, warm_errs)),
        "warmup_errors": sorted(set(warm_errs))[:3],
        **use,
        # what one poll costs the server (submits and pings included, when any)
        "server_cpu_ms_per_poll": round(1000 * use["server_cpu_cores"] * use["wall_s"]
                                        / max(1.0, rounds), 3),
        "server_peak_rss_mib": round(mem.get("VmHWM", 0) / 2**20, 1),
        "server_rss_mib": round(mem.get("VmRSS", 0) / 2**20, 1),
        "client_processes": started["processes"], "warmup_s": started["warmup_s"],
        # GUI mode: the encoded part of each reply (the delta), from a server that encodes once
        "reply_kib": summary(sizes, 1.0) if sizes else None,
    }
    proc = spied.get("proc")
    if proc is not None:
        proc.wait(60)
        if raw.exists():
            result["profile"] = hottest(raw)
            assert profile is not None
            profile.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, profile / raw.name)
    return result


def _point(r: dict[str, Any]) -> dict[str, Any]:
    """One point of a sweep, for the table and the PNG."""
    return {"pollers": r["pollers"], "p50_ms": r["poll_p50_ms"], "p99_ms": r["poll_p99_ms"],
            "ping_p50_ms": r["ping_ms"]["p50"], "ping_p99_ms": r["ping_ms"]["p99"],
            "errors": r["errors"], "timeouts": r["timeouts"], "polls_per_s": r["polls_per_s"],
            "server_cpu_cores": r["server_cpu_cores"],
            "clients_cpu_cores": r["clients_cpu_cores"],
            "others_cpu_cores": r["others_cpu_cores"], "core_busy": r["core_busy"],
            "loadavg_1m": r["loadavg_1m"]}


# -- the benchmark ---------------------------------------------------------------------------
def run(quick: bool, profile: Path | None = None, size: tuple[int, int] | None = None,
        seconds: float | None = None, server_root: Path | None = None,
        modes: tuple[str, ...] = ("snapshot", "views"), sweep: tuple[int, ...] | None = None
        ) -> dict[str, Any]:
    queued, finished = size or ((1000, 100) if quick else (10_000, 1000))
    sweep = sweep or ((5,) if quick else SWEEP)
    seconds = seconds or (4.0 if quick else 20.0)
    at = GOAL_POLLERS if GOAL_POLLERS in sweep else sweep[-1]
    server_cores, client_cores = split_cores()
    nice = priorities()
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-api-"))
    cfg = bench_config(tmp, gpus={"backend": "virtual", "virtual_count": 4})
    prefix = cfg["docker"]["name_prefix"]
    srv = (CheckoutServer(cfg, tmp, server_root) if server_root else ServerProcess(cfg, tmp))
    out: dict[str, Any] = {
        "queued": queued, "finished": finished, "goal_p99_ms": GOAL_P99_MS,
        "goal_pollers": GOAL_POLLERS, "seconds_per_point": seconds,
        "server_code": str(server_root or Path(__file__).resolve().parents[1]),
        "server_commit": _commit(server_root or Path(__file__).resolve().parents[1]),
        "cores": {"server": server_cores, "clients": client_cores,
                  "machine": os.cpu_count(), "usable": len(os.sched_getaffinity(0)),
                  "shared": server_cores == client_cores},
        "nice": nice,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    t_run = time.monotonic()
    try:
        add_users(srv.settings.db_path)
        # The server's threads inherit this process's cores and priority; it
        # moves to the clients' after.
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        os.sched_setaffinity(0, server_cores)
        os.setpriority(os.PRIO_PROCESS, 0, nice["server"])
        out["start_s"] = round(srv.start(), 2)
        out["cores"]["server_threads_pinned"] = pin_tree(srv.pid, server_cores, nice["server"])
        os.sched_setaffinity(0, client_cores)
        os.setpriority(os.PRIO_PROCESS, 0, mine)
        root = srv.client("root")
        jobs = tmp / "jobs"
        # One real job holds every GPU, so the queued jobs wait for resources.
        hold = good_job(jobs, "root", "gpu-holder", "sleep 3600", num_gpus=4)
        holder = root.submit(hold)["id"]
        wait_for(lambda: _running(root, holder), 120, 0.1)
        from dopq.server.store import Store

        store = Store(srv.settings.db_path)
        t = time.perf_counter()
        store.add_jobs(job_rows(queued, finished, image_id(BASE_IMAGE)))
        out["insert_s"] = round(time.perf_counter() - t, 2)
        first = int(store.read("SELECT MIN(id) AS n FROM jobs WHERE state = 'queued'")[0]["n"])
        store.close()
        root.call("edit", [first], "nice", 0)  # wakes the queue thread
        wait_for(lambda: _decided(root, first), 120, 0.2)
        small = zip_it(good_job(jobs, "alice", "tiny-job", "true"), tmp / "tiny-job.zip")
        conn = {"ns_host": srv.settings.nameserver.host, "ns_port": srv.settings.nameserver.port,
                "server": srv.settings.server_name, "token": root.token,
                "submit_token": srv.client("alice").token,
                "fingerprint": shared_tls()[2]}  # the worker processes pin it too
        out["modes"], out["sweeps"] = {}, {}
        for mode in modes:
            points = []
            for n in sweep:
                print(f"api: {mode}, {n} pollers, {seconds:.0f} s", file=sys.stderr)
                r = phase(srv, conn, small, mode, n, 2, seconds, tmp, client_cores, nice,
                          profile if n == at else None)
                print(f"api:   p50 {r['poll_p50_ms']} p99 {r['poll_p99_ms']} ms, ping p99 "
                      f"{r['ping_ms']['p99']} ms, errors {r['errors']}, server "
                      f"{r['server_cpu_cores']} cores, others {r['others_cpu_cores']}",
                      file=sys.stderr)
                points.append(_point(r))
                if n == at:
                    out["modes"][mode] = r
            out["sweeps"][mode] = points
        # Nothing changes (no submitters): the server's CPU per poll when every
        # poller holds the newest version (encoded once, sent to all).
        print(f"api: quiet snapshot, {at} pollers, {seconds:.0f} s", file=sys.stderr)
        quiet = phase(srv, conn, small, "snapshot", at, 0, seconds, tmp, client_cores, nice)
        out["quiet"] = {k: quiet[k] for k in ("pollers", "polls_per_s", "poll_p50_ms",
                                              "poll_p99_ms", "errors", "server_cpu_cores",
                                              "server_cpu_ms_per_poll", "others_cpu_cores")}
        out["sweep"] = out["sweeps"].get("snapshot", [])  # bench/run.py's PNG reads this
        out["server_peak_rss_mib"] = round(srv.memory()["VmHWM"] / 2**20, 1)
        root.close()
    finally:
        srv.stop()
        cleanup_docker(prefix)
        if not os.environ.get("DOPQ_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    out["run_s"] = round(time.monotonic() - t_run, 1)
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    gui = out["modes"].get("snapshot", {})
    out["errors_total"] = sum(p["errors"] for pts in out["sweeps"].values() for p in pts)
    out["timeouts_total"] = sum(p["timeouts"] for pts in out["sweeps"].values() for p in pts)
    out["met"] = bool((gui.get("poll_p99_ms") or 1e9) < GOAL_P99_MS and out["errors_total"] == 0)
    return out


def _commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _running(c: Any, job_id: int) -> bool:
    job = c.call("job", job_id)
    if job["state"] in FINAL:
        raise RuntimeError(f"GPU holder ended {job['state']}: {job['error']}")
    return bool(job["state"] == "running")


def _decided(c: Any, job_id: int) -> bool:
    try:
        return bool(c.call("priority", job_id))
    except Exception:  # noqa: BLE001 - not in the last decision yet
        return False


# -- the picture ----------------------------------------------------------------------------
def plot(after: dict[str, Any], path: Path) -> None:
    """p99 (and p50, and the ping's p99) against pollers, one panel per mode, before and after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    before = after.get("before") or {}
    series = [("after", after, "-", "tab:blue"), ("before", before, ":", "tab:red")]
    series += [(label, data, "--", colour) for (label, data), colour in
               zip((after.get("compare") or {}).items(), ("tab:green", "tab:purple"),
                   strict=False)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    titles = {"snapshot": "GUI mode: one snapshot(since) a second",
              "views": "five-views mode: five calls a second"}
    for ax, mode in zip(axes, ("snapshot", "views"), strict=True):
        for label, data, style, colour in series:
            pts = (data.get("sweeps") or {}).get(mode)
            if not pts:
                continue
            xs = [p["pollers"] for p in pts]
            ax.plot(xs, [p["p99_ms"] for p in pts], style, marker="o", color=colour,
                    label=f"{label}: p99")
            ax.plot(xs, [p["p50_ms"] for p in pts], style, marker=".", color=colour, alpha=0.5,
                    label=f"{label}: p50")
            ax.plot(xs, [p["ping_p99_ms"] for p in pts], style, marker="x", color=colour,
                    alpha=0.35, label=f"{label}: ping p99")
            errs = [(p["pollers"], p["p99_ms"]) for p in pts if p["errors"]]
            if errs:
                ax.plot(*zip(*errs, strict=True), linestyle="", marker="X", markersize=11,
                        color="black", label=f"{label}: errors")
        if mode == "snapshot":
            ax.axhline(after["goal_p99_ms"], color="green", linestyle="--", linewidth=1,
                       label=f"goal at {after['goal_pollers']}: p99 < "
                             f"{after['goal_p99_ms']:g} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pollers (clients polling once a second)")
        ax.set_title(titles[mode], fontsize=10)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
    axes[0].set_ylabel("latency, ms")
    cores = after["cores"]
    fig.suptitle(f"DoPQ API: {after['queued']} queued, {after['finished']} finished; server on "
                 f"core(s) {cores['server']}, clients on {cores['clients']}; "
                 f"{after['seconds_per_point']:g} s per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--profile", metavar="DIR", help="sample the server with py-spy")
    p.add_argument("--size", metavar="QUEUED,FINISHED", help="jobs in the store (10000,1000)")
    p.add_argument("--seconds", type=float, help="seconds per point (20; quick: 4)")
    p.add_argument("--server-root", metavar="DIR", help="run the server from this checkout")
    p.add_argument("--before", metavar="JSON", help="an earlier run's figures, to compare")
    p.add_argument("--png", metavar="PATH", help="draw p99 against pollers")
    p.add_argument("--compare", metavar="LABEL=JSON", action="append", default=[],
                   help="another run's figures, drawn beside (e.g. a patched server)")
    p.add_argument("--plot", metavar="JSON", help="only draw --png from this run's figures")
    p.add_argument("--modes", default="snapshot,views", help="modes to run (snapshot,views)")
    p.add_argument("--pollers", metavar="N,...", help="the sweep (1,10,25,50,100)")
    args = p.parse_args(argv)
    if args.plot:
        if not args.png:
            p.error("--plot needs --png")
        plot(json.loads(Path(args.plot).read_text()), Path(args.png))
        print(f"wrote {args.png}")
        return 0
    size = tuple(int(n) for n in args.size.split(",")) if args.size else None
    result = run(args.quick, Path(args.profile) if args.profile else None,
                 size, args.seconds,  # type: ignore[arg-type]
                 Path(args.server_root).resolve() if args.server_root else None,
                 tuple(m for m in args.modes.split(",") if m in MODES),
                 tuple(int(n) for n in args.pollers.split(",")) if args.pollers else None)
    if args.before and Path(args.before).exists():
        before = json.loads(Path(args.before).read_text())
        result["before"] = {k: before.get(k) for k in (
            "server_commit", "cores", "nice", "seconds_per_point", "sweeps", "quiet",
            "errors_total",
            "timeouts_total", "met", "loadavg_at_start")}
    for item in args.compare:
        label, _, path = item.partition("=")
        other = json.loads(Path(path).read_text())
        result.setdefault("compare", {})[label] = {k: other.get(k) for k in (
            "server_code", "cores", "nice", "sweeps", "quiet", "errors_total", "met")}
    write_result(result, args.json)
    if args.png:
        plot(result, Path(args.png))
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

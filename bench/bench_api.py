"""The API under load: GUI-like pollers and submitters against a server with a long queue.

    .venv/bin/python bench/bench_api.py [--quick] [--json PATH] [--profile DIR]

The server (``python -m dopq.cli server``, a child process, so that its CPU
time and peak RSS can be read from /proc) holds 10,000 queued and 1,000
finished jobs of 200 users. Its 4 virtual GPUs are all held by one long real
job, so the queued jobs wait for resources and every scheduling decision sees
all of them. Load, for 60 s per mode:

- 50 pollers, each its own ``Client`` (one Pyro5 connection), once a second:
  mode ``views``: the five calls the GUI's views need (``running``, ``queue``,
  ``history(1000)``, ``users``, ``status``); mode ``snapshot``: the one
  ``snapshot(1000, since)`` call the GUI makes through ``SnapshotFollower``
  (the whole queue once, then only the queued jobs that changed);
- 2 submitters, each uploading a small CPU-only job once a second;
- baseline, in the same run: one client calling ``ping`` 10 times a second,
  the cost of a call that does no work, under the same load.

The pollers are spread over a few processes (the Python client itself is
GIL-bound), all on this machine, so client and server share its CPUs. A poll
that takes longer than a second is followed at once by the next one.
Reported per call: latency p50/p99, errors; per mode: the server's CPU
(cores used) and peak RSS. Goal: p99 < 100 ms and no errors. In full mode a
sweep of the snapshot mode over fewer pollers gives p99 against clients.
``--profile DIR`` samples the server with py-spy during each mode and adds
the hottest functions to the figures. ``--quick``: 1,000 queued, 100 finished,
5 pollers, 5 s; ``--size 10000,1000`` sets the queued and finished jobs. A
last phase, ``quiet``, polls snapshots with no submitters (nothing changes):
the server's CPU per poll there does not grow with the rows.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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

GOAL_P99_MS = 100.0
HISTORY = 1000  # the GUI's history_limit
VIEW_CALLS: list[tuple[str, tuple[Any, ...]]] = [
    ("running", ()), ("queue", ()), ("history", (HISTORY,)), ("users", ()), ("status", ()),
]
SNAPSHOT_CALLS: list[tuple[str, tuple[Any, ...]]] = [("snapshot", (HISTORY,))]
FINAL = ("succeeded", "failed", "cancelled")


# -- load generator (runs in worker processes) ------------------------------------------
def _worker(conn: dict[str, Any], plan: dict[str, Any], out: str) -> None:
    """Run ``plan["pollers"]`` pollers and ``plan["submitters"]`` submitters as threads."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dopq.client.remote import Client

    samples: list[tuple[str, float, float, str | None]] = []
    lock = threading.Lock()
    start, end = plan["start"], plan["end"]

    def client(token: str | None = None) -> Client:
        return Client(conn["ns_host"], conn["ns_port"], conn["server"],
                      token=token or conn["token"], fingerprint=conn["fingerprint"])

    def timed(c: Client, method: str, fn: Any) -> None:
        t0 = time.perf_counter()
        err = None
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - an error is a figure here
            err = f"{exc.__class__.__name__}: {str(exc)[:200]}"
        with lock:
            samples.append((method, time.time() - start, time.perf_counter() - t0, err))

    def loop(k: int, calls: list[tuple[str, Any]], token: str | None = None) -> None:
        c = client(token)
        time.sleep(max(0.0, start - time.time()) + random.Random(k).random())
        while time.time() < end:
            cycle = time.monotonic()
            for method, fn in calls:
                timed(c, method, lambda fn=fn, c=c: fn(c))
            time.sleep(max(0.0, min(cycle + 1.0 - time.monotonic(), end - time.time())))
        c.close()

    from dopq.client.remote import SnapshotFollower

    followers: dict[int, SnapshotFollower] = {}

    def snapshot(c: Any) -> Any:
        # As the GUI does: a full snapshot first, then only what changed.
        return followers.setdefault(id(c), SnapshotFollower(c, HISTORY)).update()

    poll_calls = [(m, (snapshot if m == "snapshot" else
                       (lambda c, m=m, a=a: c.call(m, *a)))) for m, a in plan["calls"]]
    submit_calls = [("submit", lambda c: c.submit(plan["archive"]))]
    threads = [threading.Thread(target=loop, args=(plan["seed"] + k, poll_calls))
               for k in range(plan["pollers"])]
    # Submitters are another user (alice): a user's own writes make that
    # user's next reads wait for fresh views, other users' do not.
    threads += [threading.Thread(target=loop, args=(plan["seed"] + 1000 + k, submit_calls,
                                                    conn["submit_token"]))
                for k in range(plan["submitters"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(end - time.time() + 60)
    with lock:
        Path(out).write_text(json.dumps(samples))


def _pinger(conn: dict[str, Any], end: float, samples: list[float], errors: list[str]) -> None:
    from dopq.client.remote import Client

    c = Client(conn["ns_host"], conn["ns_port"], conn["server"], token=conn["token"],
               fingerprint=conn["fingerprint"])
    while time.time() < end:
        t0 = time.perf_counter()
        try:
            c.call("ping")
            samples.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{exc.__class__.__name__}: {exc}")
        time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    c.close()


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
def phase(srv: ServerProcess, conn: dict[str, Any], archive: Path, mode: str, pollers: int,
          submitters: int, seconds: float, tmp: Path, profile: Path | None) -> dict[str, Any]:
    calls = VIEW_CALLS if mode == "views" else SNAPSHOT_CALLS
    procs = max(1, min(4, (pollers + 11) // 12))
    start = time.time() + 1.5 + 0.05 * pollers  # time for the workers to start
    end = start + seconds
    ctx = mp.get_context("spawn")
    workers, outs = [], []
    for w in range(procs):
        share = pollers // procs + (1 if w < pollers % procs else 0)
        plan = {"calls": calls, "pollers": share, "submitters": submitters if w == 0 else 0,
                "archive": str(archive), "start": start, "end": end, "seed": 100 * w}
        out = tmp / f"samples-{mode}-{pollers}-{w}.json"
        outs.append(out)
        p = ctx.Process(target=_worker, args=(conn, plan, str(out)), daemon=True)
        p.start()
        workers.append(p)
    ping: list[float] = []
    ping_err: list[str] = []
    time.sleep(max(0.0, start - time.time()))
    reset_peak(srv.pid)
    cpu0, t0 = srv.cpu(), time.monotonic()
    spy = _spy(srv.pid, seconds, tmp / f"spy-{mode}-{pollers}.txt") if profile else None
    pinger = threading.Thread(target=_pinger, args=(conn, end, ping, ping_err))
    pinger.start()
    pinger.join(seconds + 60)
    cpu1, t1 = srv.cpu(), time.monotonic()
    mem = srv.memory()
    for p in workers:
        p.join(seconds + 90)
        if p.is_alive():
            p.kill()
    samples: list[list[Any]] = []
    for out in outs:
        if out.exists():
            samples += json.loads(out.read_text())
    per: dict[str, dict[str, Any]] = {}
    for method in [m for m, _ in calls] + (["submit"] if submitters else []):
        got = [s for s in samples if s[0] == method]
        errs = [s[3] for s in got if s[3]]
        per[method] = {**summary([s[2] for s in got if not s[3]], 1000),
                       "errors": len(errs), "first_errors": sorted(set(errs))[:3]}
    polls = [s for s in samples if s[0] != "submit"]
    p99s = [v["p99"] for m, v in per.items() if m != "submit" and v["p99"] is not None]
    errors = sum(v["errors"] for v in per.values()) + len(ping_err)
    wall = t1 - t0
    result = {
        "mode": mode, "pollers": pollers, "submitters": submitters, "seconds": seconds,
        "calls": per, "ping_ms": {**summary(ping, 1000), "errors": len(ping_err)},
        "poll_p99_ms": max(p99s) if p99s else None,
        "poll_p50_ms": summary([s[2] for s in polls if not s[3]], 1000)["p50"],
        "polls_per_s": round(len(polls) / len(calls) / seconds, 2),
        "polls_wanted_per_s": pollers,
        "errors": errors,
        "server_cpu_cores": round((cpu1["server"] - cpu0["server"]) / wall, 2),
        # what one poll costs the server (submits and pings included, when any)
        "server_cpu_ms_per_poll": round(1000 * (cpu1["server"] - cpu0["server"])
                                        / max(1, len(polls) // len(calls)), 3),
        "provider_cpu_cores": round((cpu1["children"] - cpu0["children"]) / wall, 2),
        "server_peak_rss_mib": round(mem.get("VmHWM", 0) / 2**20, 1),
        "server_rss_mib": round(mem.get("VmRSS", 0) / 2**20, 1),
    }
    if spy is not None:
        spy.wait(60)
        raw = tmp / f"spy-{mode}-{pollers}.txt"
        if raw.exists():
            result["profile"] = hottest(raw)
            if profile is not None:
                profile.mkdir(parents=True, exist_ok=True)
                shutil.copy(raw, profile / raw.name)
    return result


# -- the benchmark ---------------------------------------------------------------------------
def run(quick: bool, profile: Path | None = None, size: tuple[int, int] | None = None
        ) -> dict[str, Any]:
    queued, finished = size or ((1000, 100) if quick else (10_000, 1000))
    pollers, seconds = (5, 5.0) if quick else (50, 60.0)
    sweep = [] if quick else [1, 10, 25]
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-api-"))
    cfg = bench_config(tmp, gpus={"backend": "virtual", "virtual_count": 4})
    prefix = cfg["docker"]["name_prefix"]
    srv = ServerProcess(cfg, tmp)
    out: dict[str, Any] = {"queued": queued, "finished": finished, "goal_p99_ms": GOAL_P99_MS}
    try:
        add_users(srv.settings.db_path)
        out["start_s"] = round(srv.start(), 2)
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
        out["modes"] = {}
        for mode in ("views", "snapshot"):
            print(f"api: {mode}, {pollers} pollers, {seconds:.0f} s", file=sys.stderr)
            out["modes"][mode] = phase(srv, conn, small, mode, pollers, 2, seconds, tmp, profile)
        # Nothing changes (no submitters): the server's CPU per poll when every
        # poller holds the newest version (encoded once, sent to all).
        print(f"api: quiet snapshot, {pollers} pollers, {seconds:.0f} s", file=sys.stderr)
        quiet = phase(srv, conn, small, "snapshot", pollers, 0, seconds, tmp, None)
        out["quiet"] = {k: quiet[k] for k in ("pollers", "polls_per_s", "poll_p50_ms",
                                              "poll_p99_ms", "errors", "server_cpu_cores",
                                              "server_cpu_ms_per_poll")}
        out["sweep"] = [{k: v for k, v in out["modes"]["snapshot"].items() if k != "profile"}]
        for n in sweep:
            print(f"api: sweep, snapshot, {n} pollers", file=sys.stderr)
            r = phase(srv, conn, small, "snapshot", n, 2, 15.0, tmp, None)
            out["sweep"].append(r)
        out["sweep"].sort(key=lambda r: r["pollers"])
        out["sweep"] = [{"pollers": r["pollers"], "p50_ms": r["poll_p50_ms"],
                         "p99_ms": r["poll_p99_ms"], "errors": r["errors"],
                         "server_cpu_cores": r["server_cpu_cores"]} for r in out["sweep"]]
        out["server_peak_rss_mib"] = round(srv.memory()["VmHWM"] / 2**20, 1)
        root.close()
    finally:
        srv.stop()
        cleanup_docker(prefix)
        if not os.environ.get("DOPQ_BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    modes = out["modes"]
    out["met"] = all((m["poll_p99_ms"] or 1e9) < GOAL_P99_MS and m["errors"] == 0
                     for m in modes.values())
    return out


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


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--profile", metavar="DIR", help="sample the server with py-spy")
    p.add_argument("--size", metavar="QUEUED,FINISHED", help="jobs in the store (10000,1000)")
    args = p.parse_args(argv)
    size = tuple(int(n) for n in args.size.split(",")) if args.size else None
    result = run(args.quick, Path(args.profile) if args.profile else None,
                 size)  # type: ignore[arg-type]
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

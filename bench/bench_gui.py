"""How long one refresh of the GUI takes on the GUI thread, at 10k queued / 1k finished.

The snapshots carry the GPU timeline at the server's cap (5,000 bars on 8
GPUs, the last 24 hours) and a changing utilisation per GPU, so a refresh
includes the timeline, the usage bars and the sparklines; the timeline's own
paint is also timed alone (``timeline paint``).

A refresh is what the window does with one snapshot from the ViewThread:
apply the five views to their models (diff by id, signals to the proxies and
the views) and let Qt process the resulting events (layout, repaint) until the
event queue is empty. Fetching the snapshot runs on the ViewThread and is not
counted. The snapshots are synthetic (no server): every refresh, every queued
job's waiting time changes, some jobs start, some finish, some are submitted.
It also prints what decoding one snapshot costs the ViewThread (serpent, Pyro5's
default, against JSON, which the ViewThread asks for).

    .venv/bin/python bench/bench_gui.py            # 10,000 queued, 1,000 finished
    .venv/bin/python bench/bench_gui.py --quick    # 500 / 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings, Qt  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from dopq.client.gui.pipeline import Pipeline  # noqa: E402
from dopq.server.platform import iso  # noqa: E402
from dopq.wire.views import TIMELINE_LIMIT  # noqa: E402

T0 = 1_700_000_000.0


def job(i: int, state: str, now: float, users: int) -> dict[str, Any]:
    submitted = T0 + i
    started = submitted + 60 if state not in ("queued",) else None
    finished = submitted + 3600 if state in ("succeeded", "failed", "cancelled") else None
    return {
        "id": i, "name": f"train-{i % 97}-{i}", "user": f"user{i % users:02d}", "state": state,
        "num_gpus": 1 + i % 2, "gpus": [i % 8] if state == "running" else [],
        "exit_code": (0 if state == "succeeded" else 1) if finished else None,
        "error": "exit code 1" if state == "failed" else None,
        "submitted_at": iso(submitted), "started_at": iso(started), "finished_at": iso(finished),
        "image": f"dopq/job-{i}", "container": f"c{i:08x}" if started else None,
        "time_limit": 86400, "priority": 0, "nice": 0, "held": False, "array_index": None,
        "array_parent": None, "after": [], "after_any": [], "origin": "api",
        "wait_s": round((started or now) - submitted, 3),
        "run_s": round((finished or now) - started, 3) if started else None,
    }


class Workload:
    """A queue that moves: each step `churn` jobs start, finish and arrive."""

    def __init__(self, queued: int, finished: int, running: int = 16, users: int = 40,
                 churn: int = 5) -> None:
        self.users, self.churn, self.history = users, churn, finished
        self.next_id = finished + running + 1
        self.finished = list(range(finished, 0, -1))
        self.running = list(range(finished + 1, finished + running + 1))
        self.queued = list(range(self.next_id, self.next_id + queued))
        self.next_id += queued
        self.now = T0 + self.next_id + 100

    def step(self) -> None:
        self.now += 1.0
        c = self.churn
        done, self.running = self.running[:c], self.running[c:]
        self.finished = (done[::-1] + self.finished)[: self.history]
        self.running += self.queued[:c]
        self.queued = self.queued[c:] + list(range(self.next_id, self.next_id + c))
        self.next_id += c

    def snapshot(self) -> dict[str, Any]:
        now, u = self.now, self.users
        queued = []
        for pos, i in enumerate(self.queued, 1):
            v = job(i, "queued", now, u)
            v.update(position=pos, priority_value=round(1.0 / pos, 3),
                     reason="Resources" if pos == 1 else "Priority", factors={})
            queued.append(v)
        running = []
        for i in self.running:
            v = job(i, "running", now, u)
            v.update(cpu_percent=float(i % 400), memory_bytes=(i % 64) * 2**30,
                     gpu_samples=[{"index": g, "utilization": (i * 7 + int(now)) % 100,
                                   "memory_used": 2**33, "memory_total": 2**34}
                                  for g in v["gpus"]])
            running.append(v)
        finished = [job(i, ("succeeded", "failed", "cancelled")[i % 3], now, u)
                    for i in self.finished]
        users = [{"user": f"user{k:02d}", "queued": 10_000 // u, "running": 0, "finished": 25,
                  "succeeded": 20, "failed": 5, "gpu_hours": round(k * 1.5 + now % 7, 4),
                  "weight": 1.0, "share": round(1 / u, 4), "fairshare": 0.5, "penalty": 1.0}
                 for k in range(u)]
        gpus = [{"index": g, "name": "NVIDIA H100", "uuid": f"GPU-{g}", "memory_total": 2**34,
                 "job": self.running[g] if g < len(self.running) else None,
                 "user": "user00", "external": False, "utilization": int(now) % 100,
                 "memory_used": 2**33} for g in range(8)]
        system = {"name": "bench", "version": "2.0.0", "queue_state": "running",
                  "provider_state": "running", "engine_state": "up", "started_at": iso(T0),
                  "uptime_s": now - T0, "gpu_backend": "virtual", "gpu_mode": "env",
                  "gpus": gpus, "counts": {"queued": len(queued), "running": len(running)},
                  "policy": "fairshare", "provider_restarts": 0, "queue_restarts": 0}
        return {"whoami": {"user": "admin", "role": "admin"}, "running": running,
                "queued": queued, "finished": finished, "users": users, "system": system,
                "now": now, "timeline": self.timeline(now)}

    def timeline(self, now: float, bars: int = TIMELINE_LIMIT) -> list[dict[str, Any]]:
        """The server's cap of bars: the running jobs, then short finished ones back 24 h."""
        out: list[dict[str, Any]] = [
            {"id": i, "name": f"train-{i}", "user": f"user{i % self.users:02d}",
             "state": "running", "gpus": [i % 8], "start": T0 + i, "end": None}
            for i in self.running]
        step = 86400 * 8 / bars  # back-to-back on each GPU across the day, as the server
        for k in range(bars - len(out)):  # sends them: the same until a job starts or ends
            start = T0 - (k // 8 + 1) * step
            out.append({"id": 10**6 + k, "name": f"sweep-{k}", "user": f"user{k % 7:02d}",
                        "state": "succeeded", "gpus": [k % 8], "start": start,
                        "end": start + step * 0.9})
        return out


class NoClient:
    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the benchmark applies snapshots itself")


def refresh_ms(app: QApplication, window: Pipeline, snap: dict[str, Any]) -> float:
    t = time.perf_counter()
    window.apply_snapshot(snap)
    app.processEvents()
    return (time.perf_counter() - t) * 1000


def run(queued: int, finished: int, refreshes: int) -> dict[str, float]:
    app = QApplication.instance() or QApplication([])
    assert isinstance(app, QApplication)
    tmp = tempfile.TemporaryDirectory()
    settings = QSettings(str(Path(tmp.name) / "gui.ini"), QSettings.Format.IniFormat)
    window = Pipeline(NoClient(), 1.0, None, settings=settings, start=False)
    window.resize(1600, 1000)
    window.show()
    load = Workload(queued, finished)

    def snaps(n: int) -> Iterator[dict[str, Any]]:
        """One snapshot alive at a time, as the ViewThread hands them over (a list of
        all of them would time the garbage collector walking thirty snapshots)."""
        for _ in range(n):
            snap = load.snapshot()
            load.step()
            yield snap

    results: dict[str, float] = {"first fill": refresh_ms(app, window, next(snaps(1)))}
    queued_view = window.panels["queued"].view
    queued_view.selectRow(5)
    queued_view.scrollTo(window.panels["queued"].proxy.index(5000 % max(queued, 1), 0))

    def timed(name: str, batch: Iterator[dict[str, Any]]) -> None:
        times = [refresh_ms(app, window, s) for s in batch]
        results[f"{name} median"] = statistics.median(times)
        results[f"{name} max"] = max(times)

    timed("refresh", snaps(refreshes))
    queued_view.sortByColumn(9, Qt.SortOrder.DescendingOrder)  # by time waiting
    timed("sorted by waiting", snaps(refreshes))
    queued_view.sortByColumn(-1, Qt.SortOrder.AscendingOrder)
    window.panels["queued"].filter.setText("user07")
    window.panels["finished"].filter.setText("failed")
    timed("filtered", snaps(refreshes))
    timeline = window.timeline.view
    paints = []
    for _ in range(refreshes):
        t = time.perf_counter()
        timeline.repaint()
        paints.append((time.perf_counter() - t) * 1000)
    results["timeline paint median"] = statistics.median(paints)
    window.close()
    tmp.cleanup()
    return results


def decode_ms(queued: int, finished: int) -> dict[str, float]:
    """Decoding one snapshot on the ViewThread (holds the GIL): serpent vs JSON."""
    import json

    import serpent

    snap = Workload(queued, finished).snapshot()
    out = {}
    for name, dumps, loads in (("serpent", serpent.dumps, serpent.loads),
                               ("json", lambda o: json.dumps(o).encode(), json.loads)):
        data = dumps(snap)
        t = time.perf_counter()
        loads(data)
        out[f"{name} ({len(data) / 1e6:.1f} MB)"] = (time.perf_counter() - t) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="500 queued / 100 finished")
    p.add_argument("--queued", type=int, default=10_000)
    p.add_argument("--finished", type=int, default=1_000)
    p.add_argument("--refreshes", type=int, default=10)
    a = p.parse_args(argv)
    queued, finished = (500, 100) if a.quick else (a.queued, a.finished)
    results = run(queued, finished, 3 if a.quick else a.refreshes)
    print(f"GUI-thread time per refresh, {queued} queued / {finished} finished:")
    for name, ms in results.items():
        print(f"  {name:28s} {ms:8.1f} ms")
    worst = max(v for k, v in results.items() if k != "first fill")
    print(f"worst steady refresh: {worst:.1f} ms ({'under' if worst < 200 else 'OVER'} 200 ms)")
    print("decoding the snapshot on the ViewThread (not GUI-thread time, but it holds the GIL):")
    for name, ms in decode_ms(queued, finished).items():
        print(f"  {name:28s} {ms:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

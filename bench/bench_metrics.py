"""The cost of a Prometheus scrape of a server with 10,000 queued jobs.

    .venv/bin/python bench/bench_metrics.py [--quick] [--json PATH]

A real store (SQLite in a temp dir) holds 10,000 queued and 1,000 finished jobs
of 200 users; the views the metrics read are shaped as the server's are at
that size (200 users, 4 GPUs, some shared). Measured, over loopback HTTP
(prometheus-client's own server, as ``[metrics] listen`` runs it) and in
process (``generate_latest``, no HTTP):

- ``catch_up_ms``: one read of the event log after 20,000 state changes were
  logged (each queued job started and requeued), as the metrics thread does
  every second (scrapes do not read the store);
- ``scrape_ms``: scrapes (p50, p99).

The gauges come from the shared views, so a scrape does not grow with the
queue.
``--quick``: 1,000 queued, 100 finished, 50 scrapes.
"""

from __future__ import annotations

import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from common import job_rows, machine, parser, summary, write_result
from prometheus_client import generate_latest

from dopq.core import settings
from dopq.core.jobs import JobState
from dopq.server.metrics import Metrics
from dopq.server.store import Store

GIB = 1 << 30


def views_rest(users: int) -> dict[str, Any]:
    """A views version's ``rest`` as the server holds it for ``users`` users and 4 GPUs."""
    return {
        "users": [{"user": f"user{i:03d}", "queued": 50, "running": 1 if i < 6 else 0,
                   "gpu_hours": i / 10, "fairshare": 0.5} for i in range(users)],
        "system": {
            "counts": {"queued": 10000, "running": 6, "succeeded": 850, "failed": 150},
            "gpus": [{"index": g, "memory": 80 * GIB, "utilization": 90.0,
                      "memory_used": 40 * GIB,
                      "holders": [{"job": g * 2 + k, "user": f"user{g * 2 + k:03d}",
                                   "declared": 20 * GIB if g < 2 else 0}
                                  for k in range(2 if g < 2 else 1)]} for g in range(4)],
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    queued, finished, scrapes = (1000, 100, 50) if args.quick else (10000, 1000, 300)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "dopq.sqlite3")
        ids = store.add_jobs(job_rows(queued, finished, "sha256:" + "0" * 64))
        version = SimpleNamespace(rest=views_rest(200))
        views = SimpleNamespace(cache=SimpleNamespace(_newest=lambda: version))
        workers = SimpleNamespace(queue=SimpleNamespace(engine_up=True))
        metrics = Metrics(store, views, workers)
        waiting = ids[finished:]
        for job in waiting:  # 2 logged changes each: started, queued again
            store.transition(job, JobState.RUNNING)
            store.transition(job, JobState.QUEUED)
        began = time.perf_counter()
        metrics.follow()
        catch_up = time.perf_counter() - began
        metrics.start(settings.from_dict({"metrics": {"listen": "127.0.0.1:0"}}))
        url = f"http://127.0.0.1:{metrics.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                size = len(r.read())
            http, local = [], []
            for _ in range(scrapes):
                began = time.perf_counter()
                with urllib.request.urlopen(url, timeout=60) as r:
                    r.read()
                http.append(time.perf_counter() - began)
                began = time.perf_counter()
                generate_latest(metrics.registry)
                local.append(time.perf_counter() - began)
        finally:
            metrics.stop()
            store.close()
    result = {
        "queued": queued, "finished": finished, "users": 200, "scrapes": scrapes,
        "events_caught_up": 2 * len(waiting), "catch_up_ms": round(catch_up * 1000, 1),
        "scrape_ms": summary(http, 1000.0, 2), "in_process_ms": summary(local, 1000.0, 2),
        "exposition_bytes": size, "machine": machine(),
    }
    write_result(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

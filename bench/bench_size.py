"""Size: server memory and database size with 100,000 finished jobs in the history.

    .venv/bin/python bench/bench_size.py [--quick] [--json PATH]

The history is written straight into a fresh store (rows shaped like the
Provider's, 5 events per job as a real job leaves), then the server is
started as a child process and asked for what a GUI shows (``snapshot(1000)``,
three times) and for ``history(200)``. Reported: its start-up time, RSS and
peak RSS (/proc), the latency of those calls, and the database size (with
its WAL). Baseline, in the same run: the same for an empty server.
``--quick``: 5,000 jobs.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    BASE_IMAGE,
    ServerProcess,
    add_users,
    bench_config,
    cleanup_docker,
    image_id,
    job_rows,
    parser,
    write_result,
)

MIB = 2**20


def fill(db: Path, n: int, image: str) -> float:
    """Write ``n`` finished jobs with their events; return the seconds it took."""
    from dopq.server.store import Store

    t = time.perf_counter()
    store = Store(db)
    if n:
        ids = store.add_jobs(job_rows(0, n, image))
        with store.transaction() as tx:
            rows = tx.execute("SELECT id, submitted_at, state FROM jobs").fetchall()
            events = []
            for r in rows:
                at = r["submitted_at"]
                events += [(r["id"], at + 1, "building", "unpacking"),
                           (r["id"], at + 2, "queued", "image ready"),
                           (r["id"], at + 60, "running", "gpus 0"),
                           (r["id"], at + 3600, r["state"], "exit code 0")]
            tx.executemany("INSERT INTO events (job_id, at, state, detail) VALUES (?,?,?,?)",
                           events)
        assert len(ids) == n
    store.read("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return time.perf_counter() - t


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())


def measure(tmp: Path, n: int, image: str) -> dict[str, Any]:
    cfg = bench_config(tmp)
    srv = ServerProcess(cfg, tmp)
    try:
        add_users(srv.settings.db_path)
        fill_s = fill(srv.settings.db_path, n, image)
        db_before = db_bytes(srv.settings.db_path)
        start_s = srv.start()
        root = srv.client("root")
        snap = []
        for _ in range(3):
            t = time.perf_counter()
            got = root.call("snapshot", 1000)
            snap.append(time.perf_counter() - t)
        t = time.perf_counter()
        root.call("history", 200)
        history_s = time.perf_counter() - t
        mem = srv.memory()
        root.close()
    finally:
        srv.stop()
        cleanup_docker(cfg["docker"]["name_prefix"])
    return {
        "jobs": n, "fill_s": round(fill_s, 2), "start_s": round(start_s, 2),
        "rss_mib": round(mem["VmRSS"] / MIB, 1), "peak_rss_mib": round(mem["VmHWM"] / MIB, 1),
        "db_mib": round(db_before / MIB, 2),
        "db_mib_after_run": round(db_bytes(srv.settings.db_path) / MIB, 2),
        "snapshot_ms": round(statistics.median(snap) * 1000, 1),
        "history200_ms": round(history_s * 1000, 1),
        "snapshot_finished_rows": len(got["finished"]),
    }


def run(quick: bool) -> dict[str, Any]:
    n = 5000 if quick else 100_000
    image = image_id(BASE_IMAGE)
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-size-"))
    try:
        base = measure(tmp / "empty", 0, image)
        full = measure(tmp / "full", n, image)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "jobs": n, "empty": base, "history": full,
        "rss_mib": full["rss_mib"], "db_mib": full["db_mib"],
        "rss_kib_per_job": round((full["rss_mib"] - base["rss_mib"]) * 1024 / n, 3),
        "db_bytes_per_job": round((full["db_mib"] - base["db_mib"]) * MIB / n),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    write_result(run(args.quick), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

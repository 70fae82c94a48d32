"""Intake: from a complete archive in the inbox to its build starting, and image reuse.

    .venv/bin/python bench/bench_intake.py [--quick] [--json PATH]

Each drop writes ``inbox/alice/<name>.zip.part`` and renames it to ``.zip``
(the rename time is the start); the figure is the time to the job's
``building`` event (p50 over the drops), with the server's default intake
settings (``intake.poll_interval``, ``intake.settle_seconds``). Every drop is a
new context, so each is really built; drops go one at a time (each waits for
``queued``), so no drop waits behind another's build.

Then the first folder is dropped again, and uploaded through the API: an
identical context reuses the image, so its time to ``queued`` is compared with
the first drop's (which built). Baseline in the same run: ``docker build`` of an
equivalent new context through the Docker API, against DoPQ's build phase
(``building`` -> ``queued``). ``--quick``: 3 drops.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import uuid
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
    zip_it,
)

FINAL = ("succeeded", "failed", "cancelled")


def _events(store: Any, job_id: int) -> dict[str, float]:
    """First time of each state in the job's events."""
    out: dict[str, float] = {}
    for e in store.events(job_id):
        out.setdefault(e["state"], e["at"])
    return out


def drop(inbox: Path, archive: Path, name: str) -> float:
    """Write ``name.zip.part``, then rename it: return the rename time."""
    part = inbox / f"{name}.zip.part"
    with part.open("wb") as fh:
        fh.write(archive.read_bytes())
        fh.flush()
        os.fsync(fh.fileno())
    t = time.time()
    os.replace(part, inbox / f"{name}.zip")
    return t


def wait_queued(store: Any, find: Any, timeout: float = 120.0) -> tuple[int, dict[str, float]]:
    """Wait for the job ``find()`` names to reach ``queued``; return its id and events."""

    def done() -> tuple[int, dict[str, float]] | None:
        job_id = find()
        if job_id is None:
            return None
        ev = _events(store, job_id)
        if "queued" in ev:
            return job_id, ev
        state = store.job(job_id)["state"]
        if state in FINAL:
            raise RuntimeError(f"job {job_id} ended {state}: {store.job(job_id)['error']}")
        return None

    result: tuple[int, dict[str, float]] = wait_for(done, timeout, 0.01)
    return result


def last_id(store: Any) -> int:
    return int(store.read("SELECT COALESCE(MAX(id), 0) AS n FROM jobs")[0]["n"])


def next_inbox_job(store: Any, after: int) -> Any:
    """Finds the first inbox job with an id above ``after`` (the drop's)."""

    def find() -> int | None:
        rows = store.read("SELECT id FROM jobs WHERE origin = 'inbox' AND id > ?"
                          " ORDER BY id LIMIT 1", (after,))
        return int(rows[0]["id"]) if rows else None

    return find


def docker_build(folder: Path, labels: dict[str, str] | None = None) -> float:
    """Seconds for the Docker API to build ``folder`` (image removed afterwards)."""
    import docker

    with docker.APIClient(version="auto", timeout=300) as api:
        tag = f"dopqb-baseline/{uuid.uuid4().hex[:12]}:1"
        t0 = time.perf_counter()
        for chunk in api.build(path=str(folder), tag=tag, rm=True, forcerm=True,
                               labels=labels, decode=True):
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
        took = time.perf_counter() - t0
        api.remove_image(tag, force=True)
    return took


def run(quick: bool) -> dict[str, Any]:
    from dopq.core.settings import IntakeSettings

    drops = 3 if quick else 10
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-intake-"))
    defaults = IntakeSettings()
    cfg = bench_config(tmp, intake={"poll_interval": defaults.poll_interval,
                                    "settle_seconds": defaults.settle_seconds})
    prefix = cfg["docker"]["name_prefix"]
    srv: Running | None = None
    run_tag = uuid.uuid4().hex[:6]
    try:
        srv = Running(cfg)
        store = srv.server.platform.store
        inbox = srv.settings.inbox_path / "alice"
        inbox.mkdir(parents=True, exist_ok=True)
        jobs = tmp / "jobs"
        to_building, to_received, build, to_queued = [], [], [], []
        first: dict[str, Any] = {}
        for i in range(drops):
            name = f"intake-{run_tag}-{i}"
            folder = good_job(jobs, "alice", name, f"echo {run_tag} {i}")
            archive = zip_it(folder, tmp / f"{name}.zip")
            mark = last_id(store)
            t = drop(inbox, archive, name)
            _, ev = wait_queued(store, next_inbox_job(store, mark))
            to_received.append(ev["received"] - t)
            to_building.append(ev["building"] - t)
            build.append(ev["queued"] - ev["building"])
            to_queued.append(ev["queued"] - t)
            if i == 0:
                first = {"archive": archive, "name": name, "folder": folder,
                         "to_queued": ev["queued"] - t}
        # The same folder again, through the inbox and through the API.
        mark = last_id(store)
        t = drop(inbox, first["archive"], f"{first['name']}-again")
        _, ev = wait_queued(store, next_inbox_job(store, mark))
        resub_inbox = ev["queued"] - t
        t = time.time()
        api_id = srv["alice"].submit(first["folder"])["id"]
        _, ev = wait_queued(store, lambda: api_id)
        resub_api = ev["queued"] - t
        srv.stop()
        base, labelled = [], []
        for k in range(1 if quick else 3):
            for out, labels in ((base, None), (labelled, {"dopq.bench": run_tag})):
                kind = "labels" if labels else "plain"
                folder = good_job(jobs, "alice", f"baseline-{run_tag}-{k}-{kind}",
                                  f"echo {run_tag} {k} {kind}")
                out.append(docker_build(folder, labels))
    finally:
        if srv is not None:
            srv.stop()
        cleanup_docker(prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    p50 = statistics.median(to_building)
    return {
        "drops": drops,
        "poll_interval_s": defaults.poll_interval,
        "drop_to_building_ms": summary(to_building, 1000),
        "drop_to_building_p50_ms": round(p50 * 1000, 1),
        "drop_to_received_ms": summary(to_received, 1000),
        "build_ms": summary(build, 1000),
        "drop_to_queued_ms": summary(to_queued, 1000),
        "baseline_docker_build_ms": round(statistics.median(base) * 1000, 1),
        "baseline_docker_build_labels_ms": round(statistics.median(labelled) * 1000, 1),
        "first_build_to_queued_ms": round(first["to_queued"] * 1000, 1),
        "resubmit_inbox_to_queued_ms": round(resub_inbox * 1000, 1),
        "resubmit_api_to_queued_ms": round(resub_api * 1000, 1),
        "resubmit_ratio": round(resub_inbox / first["to_queued"], 3),
        "met": resub_inbox < first["to_queued"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    write_result(run(args.quick), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Workload W driven straight through docker-py, without DoPQ (issue 17, item 3).

    .venv/bin/python bench/bench_direct.py [--json PATH]

The 16 containers of workload W (``sleep 0.5`` each, 4 at a time, on
``dopq/busybox``) with no scheduler, store or server: 4 lanes, each starting
its next container the moment it learns its last one ended. It checks an idea
of 2.3.2's closing note, that learning of an exit before Docker reports it
would bring DoPQ's ratio down. Two ways of learning, each with starts as they
come or one at a time (``-serial``):

- ``pidfd``: the container's init process is watched with a pidfd, so the
  lane knows within a millisecond of the exit (Docker's ``die`` comes some
  20 ms later on a quiet machine, after it has cleaned up the task); the next
  container is created while the last one runs;
- ``wait``: docker-py's ``wait``, Docker's own report of the exit.

Each is timed from the first create to the last exit seen and set against the
baseline of ``bench_dispatch`` (``xargs -P4 docker run --rm``) in the same run,
3 times (medians). It is not a floor: DoPQ's own ratio (``bench_dispatch``)
came out lower than all four. Starting one at a time helped these lanes;
learning of the exit sooner did not.
"""

from __future__ import annotations

import os
import select
import statistics
import threading
import time
from typing import Any

from bench_dispatch import baseline
from common import BASE_IMAGE, cleanup_docker, machine, parser, write_result

JOBS, LANES, REPS = 16, 4, 3
PREFIX = "dopqbdirect"  # cleanup_docker's label


def _drive(api: Any, how: str) -> float:
    """Seconds from the first create to the last exit, ``LANES`` lanes at a time."""
    left = list(range(JOBS))
    lock = threading.Lock()
    one_start = threading.Semaphore(1 if how.endswith("serial") else LANES)
    ends: list[float] = []

    def create() -> str:
        return str(api.create_container(
            BASE_IMAGE, ["sh", "-c", "sleep 0.5"], labels={"dopq.instance": PREFIX},
            host_config=api.create_host_config(network_mode="none"))["Id"])

    def lane() -> None:
        ready = create() if how.startswith("pidfd") else None
        while True:
            with lock:
                if not left:
                    return
                left.pop()
            cid, ready = ready or create(), None
            with one_start:
                api.start(cid)
            if how == "wait":
                api.wait(cid)
            else:
                pid = int(api.inspect_container(cid)["State"]["Pid"])
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:  # over already
                    fd = -1
                ready = create()
                if fd >= 0:
                    poll = select.poll()
                    poll.register(fd, select.POLLIN)
                    poll.poll()
                    os.close(fd)
            ends.append(time.time())

    t0 = time.time()
    threads = [threading.Thread(target=lane) for _ in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return max(ends) - t0


def run() -> dict[str, Any]:
    import docker

    api = docker.APIClient(version="auto", timeout=60)
    out: dict[str, Any] = {"jobs": JOBS, "lanes": LANES, "reps": REPS, "machine": machine()}
    rows: dict[str, list[float]] = {"pidfd": [], "pidfd-serial": [], "wait": [],
                                    "wait-serial": [], "baseline": []}
    try:
        for _ in range(REPS):
            for how in ("pidfd", "pidfd-serial", "wait", "wait-serial"):
                rows[how].append(_drive(api, how))
                cleanup_docker(PREFIX)
            rows["baseline"].append(baseline(BASE_IMAGE, JOBS))
    finally:
        cleanup_docker(PREFIX)
        api.close()
    base = statistics.median(rows["baseline"])
    for key, values in rows.items():
        out[f"{key}_runs_s"] = [round(v, 3) for v in values]
        out[f"{key}_s"] = round(statistics.median(values), 3)
        if key != "baseline":
            out[f"{key}_ratio"] = round(statistics.median(values) / base, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    write_result(run(), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

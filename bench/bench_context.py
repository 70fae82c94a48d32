"""Large contexts: a 1 GB build context (a checkpoint) through both doors against ``docker build``.

    .venv/bin/python bench/bench_context.py [--quick] [--repeat N] [--json PATH]

The folder holds ``model.ckpt`` (random bytes: incompressible, as a trained
checkpoint is), a Dockerfile ``FROM dopq/busybox`` that COPYs it, and its
``container_config.json``. Before each run a ``LABEL`` line above the COPY is
changed, so every build is new: neither DoPQ's context cache nor the engine's
layer cache saves any work, and the three do the same work in the engine.

- ``api``: ``Client.submit(folder)``, what ``dopq submit`` does (zip the folder,
  begin, send the bytes, finish), from the call until the job is ``queued`` (its
  image built). On the server's host the folder is zipped straight into the
  local upload socket (``dopq.server.localupload``), as here: no zip file, and
  ``zip_and_begin_s``/``upload_s`` split at the first piece sent;
- ``chunks``: the same with ``DOPQ_LOCAL_UPLOADS=0``, the bytes in 2 MiB TLS
  chunks, as a client on another host sends them;
- ``inbox``: the folder zipped as the CLI zips it into ``inbox/alice/x.zip.part``,
  renamed to ``x.zip`` (the start), until ``queued``; the zipping, which the
  user does before the drop, is reported beside it (``inbox_zip_s``);
- ``docker build``: ``docker build -q`` of the same folder (the CLI, with the
  classic builder, the one DoPQ drives), and docker-py's ``APIClient.build``.

The server runs as a child process with the default intake settings and the
default size limits (``limits.max_upload`` 2g, ``limits.max_unpacked`` 8g).
Memory, for the server and for its Provider child: RSS before each door, and
the peak during it (``VmHWM`` after a reset through ``clear_refs``, and
``VmRSS`` sampled every 20 ms); and the machine's data not yet on disk
(``Dirty`` + ``Writeback``), where DoPQ's extra copies of the context show.
Every step starts after ``sync`` and ``SETTLE`` seconds of quiet, so none pays
for the writeback of the one before (the inbox's zip is synced before it is
dropped, too), and the images are removed only after a run's last step. Each door runs
``--repeat`` times (3; quick: 1), interleaved with the baselines, in each run
at another place and after another step (``ORDERS``), and the medians are
reported with the load average
(other work on the machine shows in it). ``--quick``: 100 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench_intake import wait_queued  # the intake benchmark's, shared
from common import (
    BASE_IMAGE,
    ServerProcess,
    add_users,
    bench_config,
    children,
    cleanup_docker,
    machine,
    parser,
    proc_status,
    reset_peak,
    wait_for,
    write_result,
)

from dopq.core.context import zip_folder

MIB = 2**20
GOAL_RATIO = 1.2
SETTLE = 10.0  # seconds of quiet before each step
# The runs' orders: each door at another place and after another step in each of
# three runs (turning one order round would keep the API door right after
# docker build, which it did until 2.3.1: a build's aftermath fell on it).
ORDERS = (("api", "inbox", "py", "chunks", "cli"),
          ("cli", "inbox", "chunks", "api", "py"),
          ("py", "cli", "api", "chunks", "inbox"))
FINAL = ("succeeded", "failed", "cancelled")


# -- the folder ----------------------------------------------------------------------
def make_folder(parent: Path, size: int) -> Path:
    """A job folder with a ``size``-byte random checkpoint; return it."""
    folder = parent / "checkpoint-job"
    folder.mkdir(parents=True)
    with (folder / "model.ckpt").open("wb") as fh:
        left = size
        while left:
            n = min(left, 8 * MIB)
            fh.write(os.urandom(n))
            left -= n
    config = {"name": "checkpoint-job", "executor_name": "alice", "num_gpus": 0,
              "build_flag": True, "run_params": {}}
    (folder / "container_config.json").write_text(json.dumps(config, indent=2))
    return folder


def set_nonce(folder: Path, nonce: str) -> None:
    """A new LABEL above the COPY: a new context hash and no layer to reuse."""
    (folder / "Dockerfile").write_text(
        f"FROM {BASE_IMAGE}\nLABEL dopq.bench.nonce={nonce}\n"
        "COPY model.ckpt /model/model.ckpt\nCMD [\"true\"]\n"
    )


# -- memory ----------------------------------------------------------------------------
def provider_pid(server_pid: int) -> int | None:
    """The server's Provider child (a spawned process; not the resource tracker)."""
    for pid in children(server_pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


def dirty_mib() -> float:
    """Data written but not yet on disk, machine-wide (Dirty + Writeback)."""
    total = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("Dirty", "Writeback"):
                total += int(value.split()[0])
    return total / 1024


class Peaks:
    """RSS of some processes before and at most during a ``with`` block (MiB)."""

    def __init__(self, pids: dict[str, int], every: float = 0.02) -> None:
        self.pids = pids
        self.every = every
        self.before: dict[str, float] = {}
        self.sampled: dict[str, float] = {}
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self, pid: int) -> float:
        return proc_status(pid)["VmRSS"] / MIB

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.dirty = max(self.dirty, dirty_mib())
            for name, pid in self.pids.items():
                try:
                    self.sampled[name] = max(self.sampled.get(name, 0.0), self._rss(pid))
                except OSError:
                    pass

    def __enter__(self) -> Peaks:
        self.reset = {name: reset_peak(pid) for name, pid in self.pids.items()}
        self.before = {name: self._rss(pid) for name, pid in self.pids.items()}
        self.sampled = dict(self.before)
        self.dirty = dirty_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for name, pid in self.pids.items():
            hwm = proc_status(pid)["VmHWM"] / MIB if self.reset[name] else 0.0
            self.result[name] = {
                "before_mib": round(self.before[name], 1),
                "peak_mib": round(max(self.sampled[name], hwm), 1),
                "hwm_reset": self.reset[name],
            }
        self.result["dirty_peak_mib"] = round(self.dirty)


class BuildStarts:
    """When each job's build began: the Provider writes ``[dopq] building`` to its
    build log once the archive is unpacked and hashed (polled every 10 ms)."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            for log in self.jobs_dir.glob("*/build.log"):
                job_id = int(log.parent.name)
                if job_id not in self.seen and b"[dopq] building" in log.read_bytes()[:4096]:
                    self.seen[job_id] = time.time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def phases(ev: dict[str, float], starts: BuildStarts, job_id: int) -> dict[str, float]:
    """The Provider's time split: the archive checked and hashed (``unpack_s``: the
    name from when it was unpacked first), then the engine's build."""
    begun = wait_for(lambda: starts.seen.get(job_id), 5.0, 0.01)
    return {"provider_s": ev["queued"] - ev["building"], "unpack_s": begun - ev["building"],
            "build_s": ev["queued"] - begun}


# -- the doors -------------------------------------------------------------------------
def wait_ended(store: Any, job_id: int, timeout: float = 120.0) -> None:
    """The job ran (``CMD true``) and ended: nothing of it overlaps the next run."""
    wait_for(lambda: store.job(job_id)["state"] in FINAL, timeout, 0.05)


def via_api(srv: ServerProcess, store: Any, starts: BuildStarts, folder: Path,
            timeout: float) -> dict[str, Any]:
    client = srv.client("alice")
    marks: dict[str, float] = {}

    def progress(sent: int, size: int) -> None:
        marks.setdefault("first_chunk", time.time())

    t0 = time.time()
    job_id = int(client.submit(folder, progress=progress)["id"])
    finished = time.time()
    _, ev = wait_queued(store, lambda: job_id, timeout)
    client.close()
    wait_ended(store, job_id)
    return {"job": job_id, "total_s": ev["queued"] - t0,
            "zip_and_begin_s": marks["first_chunk"] - t0,
            "upload_s": finished - marks["first_chunk"], **phases(ev, starts, job_id)}


def via_inbox(srv: ServerProcess, store: Any, starts: BuildStarts, folder: Path, name: str,
              timeout: float) -> dict[str, Any]:
    inbox = srv.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / f"{name}.zip.part"
    t = time.perf_counter()
    zip_folder(folder, part)
    zip_s = time.perf_counter() - t
    os.sync()  # the user's zip is made before it is dropped
    mark = int(store.read("SELECT COALESCE(MAX(id), 0) AS n FROM jobs")[0]["n"])

    def find() -> int | None:
        rows = store.read("SELECT id FROM jobs WHERE origin = 'inbox' AND id > ?"
                          " ORDER BY id LIMIT 1", (mark,))
        return int(rows[0]["id"]) if rows else None

    t0 = time.time()
    os.replace(part, inbox / f"{name}.zip")
    job_id, ev = wait_queued(store, find, timeout)
    wait_ended(store, job_id)
    return {"job": job_id, "total_s": ev["queued"] - t0, "zip_s": zip_s,
            "to_building_s": ev["building"] - t0, **phases(ev, starts, job_id)}


def docker_cli(folder: Path, tag: str, timeout: float) -> float:
    """Seconds of ``docker build -q`` (classic builder) of ``folder`` (the image is
    removed with the run's others, ``remove_images``)."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    t = time.perf_counter()
    subprocess.run(["docker", "build", "-q", "-t", tag, str(folder)], env=env, check=True,
                   capture_output=True, timeout=timeout)
    return time.perf_counter() - t


def remove_images(prefix: str, tags: list[str]) -> None:
    """The run's images, a GB each, once all its steps are done: deleting one (the file
    system discards its blocks) slowed whichever step came next."""
    subprocess.run(["docker", "rmi", "-f", *tags], capture_output=True, timeout=300)
    cleanup_docker(prefix)
    os.sync()
    time.sleep(5)


def docker_py(folder: Path, tag: str, timeout: float) -> float:
    """Seconds of docker-py's ``APIClient.build(path=folder)`` (removed as ``docker_cli``'s)."""
    import docker

    with docker.APIClient(version="auto", timeout=int(timeout)) as api:
        t = time.perf_counter()
        for chunk in api.build(path=str(folder), tag=tag, rm=True, forcerm=True, decode=True):
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
        return time.perf_counter() - t


# -- the benchmark ---------------------------------------------------------------------
def run(quick: bool, repeat: int | None = None, size: int | None = None) -> dict[str, Any]:
    size = size or (100 * MIB if quick else 1024 * MIB)
    repeat = repeat or (1 if quick else 3)
    timeout = 120.0 + size / MIB  # generous: a second per MiB and two minutes
    tmp = Path(tempfile.mkdtemp(prefix="dopq-bench-context-"))
    from dopq.core.sections import IntakeSettings, LimitSettings

    # The default size limits and intake timing (the tests' config lowers them).
    lim, intake = LimitSettings(), IntakeSettings()
    cfg = bench_config(tmp, limits={"max_upload": lim.max_upload,
                                    "max_unpacked": lim.max_unpacked,
                                    "max_entries": lim.max_entries},
                       intake={"poll_interval": intake.poll_interval,
                               "settle_seconds": intake.settle_seconds})
    prefix = cfg["docker"]["name_prefix"]
    srv = ServerProcess(cfg, tmp / "server")
    run_tag = uuid.uuid4().hex[:8]
    out: dict[str, Any] = {"size_bytes": size, "quick": quick, "repeat": repeat,
                           "goal_ratio": GOAL_RATIO, "machine": machine()}
    runs: list[dict[str, Any]] = []
    try:
        folder = make_folder(tmp / "jobs", size)
        add_users(srv.settings.db_path)
        srv.start()
        from dopq.server.store import Store

        store = Store(srv.settings.db_path)
        ppid = provider_pid(srv.pid)
        assert ppid is not None, "no Provider process found"
        pids = {"server": srv.pid, "provider": ppid}
        starts = BuildStarts(srv.settings.state_path / "jobs")
        for k in range(repeat):
            one: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}

            def cli(k: int = k, one: dict[str, Any] = one) -> None:
                one["docker_cli_s"] = docker_cli(folder, f"dopqb-context/{run_tag}:cli{k}",
                                                 timeout)

            def api(k: int = k, one: dict[str, Any] = one) -> None:
                with Peaks(pids) as mem:
                    one["api"] = via_api(srv, store, starts, folder, timeout)
                one["api"]["memory"] = mem.result

            def chunks(k: int = k, one: dict[str, Any] = one) -> None:
                os.environ["DOPQ_LOCAL_UPLOADS"] = "0"  # as from another host
                try:
                    with Peaks(pids) as mem:
                        one["chunks"] = via_api(srv, store, starts, folder, timeout)
                    one["chunks"]["memory"] = mem.result
                finally:
                    del os.environ["DOPQ_LOCAL_UPLOADS"]

            def inbox(k: int = k, one: dict[str, Any] = one) -> None:
                with Peaks(pids) as mem:
                    one["inbox"] = via_inbox(srv, store, starts, folder,
                                             f"ckpt-{run_tag}-{k}", timeout)
                one["inbox"]["memory"] = mem.result

            def py(k: int = k, one: dict[str, Any] = one) -> None:
                one["docker_py_s"] = docker_py(folder, f"dopqb-context/{run_tag}:py{k}", timeout)

            named = {"cli": cli, "api": api, "inbox": inbox, "py": py, "chunks": chunks}
            steps = [(name, named[name]) for name in ORDERS[k % len(ORDERS)]]
            one["order"] = [name for name, _ in steps]
            for name, step in steps:
                set_nonce(folder, f"{run_tag}-{k}-{name}")
                os.sync()  # no step pays for the writeback of the one before
                time.sleep(SETTLE)  # nor for what the engine still does after a build
                step()
            remove_images(prefix, [f"dopqb-context/{run_tag}:{kind}{k}" for kind in ("cli", "py")])
            one["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            runs.append(one)
            print(f"context: run {k + 1}/{repeat}: docker build {one['docker_cli_s']:.1f} s, "
                  f"api {one['api']['total_s']:.1f} s, inbox {one['inbox']['total_s']:.1f} s, "
                  f"api in chunks {one['chunks']['total_s']:.1f} s", flush=True)
        store.close()
        starts.close()
    finally:
        srv.stop()
        remove_images(prefix, [f"dopqb-context/{run_tag}:{kind}{k}"
                               for kind in ("cli", "py") for k in range(repeat)])
        shutil.rmtree(tmp, ignore_errors=True)
    return {**out, **figures(runs), "runs": _rounded(runs)}


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs, ratios to ``docker build``, memory peaks."""

    def med(get: Any) -> float:
        return round(statistics.median(get(r) for r in runs), 2)

    base = med(lambda r: r["docker_cli_s"])
    api, inbox = med(lambda r: r["api"]["total_s"]), med(lambda r: r["inbox"]["total_s"])
    chunks = med(lambda r: r["chunks"]["total_s"])
    memory: dict[str, dict[str, float]] = {}
    for proc in ("server", "provider"):
        memory[proc] = {"before_mib": min(r[d]["memory"][proc]["before_mib"]
                                          for r in runs for d in ("api", "inbox"))}
        for door in ("api", "inbox"):
            memory[proc][f"peak_{door}_mib"] = max(r[door]["memory"][proc]["peak_mib"]
                                                   for r in runs)
        memory[proc]["growth_mib"] = round(
            max(r[d]["memory"][proc]["peak_mib"] - r[d]["memory"][proc]["before_mib"]
                for r in runs for d in ("api", "inbox")), 1)
    return {
        "docker_build_s": base,
        "docker_py_build_s": med(lambda r: r["docker_py_s"]),
        "api_s": api, "api_ratio": round(api / base, 3),
        "api_zip_and_begin_s": med(lambda r: r["api"]["zip_and_begin_s"]),
        "api_upload_s": med(lambda r: r["api"]["upload_s"]),
        "api_provider_s": med(lambda r: r["api"]["provider_s"]),
        "api_unpack_s": med(lambda r: r["api"]["unpack_s"]),
        "api_build_s": med(lambda r: r["api"]["build_s"]),
        "chunks_s": chunks, "chunks_ratio": round(chunks / base, 3),
        "chunks_upload_s": med(lambda r: r["chunks"]["upload_s"]),
        "inbox_s": inbox, "inbox_ratio": round(inbox / base, 3),
        "inbox_zip_s": med(lambda r: r["inbox"]["zip_s"]),
        "inbox_provider_s": med(lambda r: r["inbox"]["provider_s"]),
        "inbox_unpack_s": med(lambda r: r["inbox"]["unpack_s"]),
        "inbox_build_s": med(lambda r: r["inbox"]["build_s"]),
        "api_dirty_peak_mib": med(lambda r: r["api"]["memory"]["dirty_peak_mib"]),
        "inbox_dirty_peak_mib": med(lambda r: r["inbox"]["memory"]["dirty_peak_mib"]),
        "loadavg": [{"before": r["loadavg"], "after": r["loadavg_after"]} for r in runs],
        "memory": memory,
        "met": api / base <= GOAL_RATIO and inbox / base <= GOAL_RATIO,
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--repeat", type=int, help="runs of each door (3; quick: 1)")
    p.add_argument("--size-mib", type=int, help="the checkpoint's size (1024; quick: 100)")
    args = p.parse_args(argv)
    size = args.size_mib * MIB if args.size_mib else None
    write_result(run(args.quick, args.repeat, size), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

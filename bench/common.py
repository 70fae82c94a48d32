"""What the benchmarks share: servers (in-process or as a child process), timing, output.

The servers are the test suite's (``tests/conftest.py``): loopback only, their own
state directory, name server and container prefix, removed afterwards with
``cleanup_docker``. A benchmark writes its figures as one JSON object
(``--json PATH``) that ``bench/run.py`` collects.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from conftest import (  # noqa: E402
    PASSWORDS,
    Running,
    add_users,
    cleanup_docker,
    make_config,
    release_outputs,
    shared_tls,
    wait_for,
    write_toml,
)
from hostile import BASE_IMAGE, good_job, zip_it  # noqa: E402

from dopq.client.remote import Client  # noqa: E402
from dopq.core.errors import DopqError  # noqa: E402

__all__ = [
    "BASE_IMAGE", "PASSWORDS", "Running", "ServerProcess", "add_users", "bench_config",
    "cleanup_docker", "good_job", "make_config", "parser", "percentile", "shared_tls",
    "summary",
    "wait_for", "write_result", "write_toml", "zip_it",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")


def bench_config(tmp: Path, **sections: Any) -> dict[str, Any]:
    """The tests' server config under a ``dopqb`` prefix (so a leftover is easy to tell)."""
    cfg = make_config(tmp, **sections)
    prefix = "dopqb" + uuid.uuid4().hex[:8]
    cfg["server"]["name"] = prefix
    cfg["docker"]["name_prefix"] = prefix
    return cfg


# -- numbers -------------------------------------------------------------------------
def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between ranks; None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Iterable[float], scale: float = 1.0, digits: int = 1) -> dict[str, Any]:
    """n, p50, p95, p99, max of ``values`` times ``scale`` (1000: seconds to ms)."""
    xs = [v * scale for v in values]

    def r(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {"n": len(xs), "p50": r(percentile(xs, 50)), "p95": r(percentile(xs, 95)),
            "p99": r(percentile(xs, 99)), "max": r(max(xs) if xs else None)}


# -- a server in its own process -----------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ServerProcess:
    """``python -m dopq.cli server`` on a prepared state directory, as a child process."""

    def __init__(self, cfg: dict[str, Any], workdir: Path) -> None:
        from dopq.core import settings as settings_mod

        self.cfg = cfg
        self.settings = settings_mod.from_dict(cfg)
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = write_toml(cfg, workdir / "config.toml")
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.root = ROOT  # the checkout whose code runs the server (cwd: ``-m`` takes it)
        self.env: dict[str, str] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start the server and wait until root can sign in; return the seconds it took."""
        t0 = time.monotonic()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dopq.cli", "server", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.root, env=self.env,
            )
        probe = self.client()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                probe.login("root", PASSWORDS["root"], remember=False)
                return True
            except DopqError:
                return False

        wait_for(ready, timeout, 0.1)
        probe.close()
        return time.monotonic() - t0

    def client(self, user: str | None = None, token: str | None = None) -> Client:
        ns = self.settings.nameserver
        c = Client(ns.host, ns.port, self.settings.server_name, token=token or "",
                   fingerprint=shared_tls()[2])
        if user is not None:
            c.login(user, PASSWORDS[user], remember=False)
        return c

    def cpu(self) -> dict[str, float]:
        """CPU seconds of the server process and of its children (the Provider)."""
        kids = 0.0
        for kid in children(self.pid):
            try:
                kids += cpu_seconds(kid)
            except OSError:
                pass
        return {"server": cpu_seconds(self.pid), "children": kids}

    def memory(self) -> dict[str, int]:
        return proc_status(self.pid)

    def stop(self) -> None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        finally:
            release_outputs(self.settings)  # kept mounted for the jobs it left running


# -- command line and output ----------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small, fast variant")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    return p


def write_result(result: dict[str, Any], path: str | None) -> None:
    """Write the figures to ``path``, or print them when there is none."""
    text = json.dumps(result, indent=2) + "\n"
    if path:
        Path(path).write_text(text)
        print(f"wrote {path}")
    else:
        print(text, end="")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        out = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                             capture_output=True, text=True, timeout=20)
        info["docker"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["docker"] = None
    return info


# -- synthetic job rows ----------------------------------------------------------------
def job_rows(
    queued: int, finished: int, image: str, *, users: int = 200, seed: int = 1,
    now: float | None = None, held: bool = False,
) -> list[dict[str, Any]]:
    """Rows for ``Store.add_jobs``: ``finished`` ended jobs, then ``queued`` waiting ones.

    Shaped like the Provider's: a full spec, an image, a container name; 1 GPU each.
    """
    import random

    from dopq.core.spec import parse_spec

    rng = random.Random(seed)
    now = time.time() if now is None else now
    spec = parse_spec({"name": "train-model", "num_gpus": 1, "time_limit": "4h"},
                      submitter="user000", overrides=None, allowed_users=[]).to_dict()
    rows: list[dict[str, Any]] = []
    for i in range(finished):
        sub = now - 3 * 86400 + i * (2 * 86400 / max(finished, 1))
        ok = rng.random() < 0.85
        rows.append({
            "name": f"train-{i % 97}", "user": f"user{rng.randrange(users):03d}",
            "state": "succeeded" if ok else "failed", "origin": "api",
            "source": None, "spec": {**spec, "name": f"train-{i % 97}"}, "num_gpus": 1,
            "gpus": [i % 4], "time_limit": 4 * 3600.0, "image": image,
            "container": f"dopq-{i + 1}", "exit_code": 0 if ok else 1,
            "error": None if ok else "exit code 1", "submitted_at": sub,
            "queued_at": sub + 2, "started_at": sub + 60, "finished_at": sub + 3600,
        })
    for i in range(queued):
        sub = now - rng.uniform(0, 86400)
        rows.append({
            "name": f"sweep-{i % 89}", "user": f"user{rng.randrange(users):03d}",
            "state": "queued", "origin": "api", "source": None,
            "spec": {**spec, "name": f"sweep-{i % 89}"}, "num_gpus": 1,
            "time_limit": 4 * 3600.0, "image": image, "held": held,
            "priority": rng.choice((0, 0, 0, -100)), "submitted_at": sub, "queued_at": sub + 2,
        })
    return rows


def image_id(ref: str) -> str:
    import docker

    with docker.APIClient(version="auto", timeout=30) as api:
        return str(api.inspect_image(ref)["Id"])

"""Prometheus metrics: the exposition, the event-log follower, the endpoint, and Debian's
real ``prometheus`` scraping a running server and answering a query about it."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import Running, free_port, wait_for
from hostile import good_job
from prometheus_client import generate_latest

from dopq.core import settings
from dopq.core.errors import ConfigError
from dopq.core.jobs import JobState
from dopq.server.metrics import Metrics
from dopq.server.store import Store

GIB = 1 << 30
REST = {
    "users": [
        {"user": "alice", "queued": 3, "running": 1, "gpu_hours": 2.5, "fairshare": 0.25},
        {"user": "bob", "queued": 0, "running": 2, "gpu_hours": 0.0, "fairshare": 1.0},
    ],
    "system": {
        "counts": {"queued": 3, "running": 3, "succeeded": 7},
        "gpus": [
            {"index": 0, "memory": 16 * GIB, "utilization": 87.0, "memory_used": 5 * GIB,
             "holders": [{"job": 1, "user": "alice", "declared": 0}]},
            {"index": 1, "memory": 16 * GIB, "utilization": None, "holders": [
                {"job": 2, "user": "bob", "declared": 4 * GIB},
                {"job": 3, "user": "bob", "declared": 4 * GIB}]},
        ],
    },
}


def fake_views(rest: dict[str, Any] | None) -> Any:
    version = SimpleNamespace(rest=rest) if rest is not None else None
    return SimpleNamespace(cache=SimpleNamespace(_newest=lambda: version))


def exposition(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "dopq.sqlite3")
    yield s
    s.close()


def test_every_metric_of_the_issue_with_its_labels_and_shared_fractions() -> None:
    workers = SimpleNamespace(queue=SimpleNamespace(engine_up=True))
    m = Metrics(None, fake_views(REST), workers)
    m.job_finished({"user": "alice", "state": "succeeded"})
    m.job_started({"submitted_at": 100.0, "started_at": 145.0})
    m.build_done(12.0)
    m.api_call("snapshot", 0.002)
    text = exposition(m)
    for line in (
        'dopq_jobs{state="queued"} 3.0', 'dopq_jobs{state="failed"} 0.0',
        'dopq_jobs_finished_total{state="succeeded",user="alice"} 1.0',
        'dopq_queue_wait_seconds_bucket{le="60.0"} 1.0', "dopq_queue_wait_seconds_sum 45.0",
        'dopq_queued_jobs{user="alice"} 3.0', 'dopq_running_jobs{user="bob"} 2.0',
        'dopq_gpu_held{gpu="0",user="alice"} 1.0',
        'dopq_gpu_held{gpu="1",user="bob"} 0.5',  # two quarter shares of one device
        'dopq_gpu_utilization{gpu="0"} 87.0', 'dopq_gpu_memory_used_bytes{gpu="0"} 5.36870912e+09',
        'dopq_user_usage_gpu_hours{user="alice"} 2.5', 'dopq_user_fairshare{user="alice"} 0.25',
        "dopq_build_seconds_count 1.0", 'dopq_api_request_seconds_count{method="snapshot"} 1.0',
        "dopq_engine_up 1.0",
    ):
        assert line in text, line
    assert 'dopq_gpu_utilization{gpu="1"}' not in text  # NVML did not read it: left out


def test_before_the_first_view_only_the_engine_shows() -> None:
    text = exposition(Metrics(None, fake_views(None),
                              SimpleNamespace(queue=SimpleNamespace(engine_up=False))))
    assert "dopq_engine_up 0.0" in text and "dopq_jobs{" not in text


def test_state_changes_are_counted_from_the_event_log_once(store: Store) -> None:
    old = store.add_job(name="old", user="carol", origin="api", state=JobState.SUCCEEDED)
    running = store.add_job(name="r", user="bob", origin="api", state=JobState.RUNNING)
    m = Metrics(store)
    store.note_event(old, "a note on an old job")
    new = store.add_job(name="n", user="alice", origin="api", submitted_at=1000.0)
    store.transition(new, JobState.BUILDING, at=1001.0)
    store.transition(new, JobState.QUEUED, at=1031.0)
    store.transition(new, JobState.RUNNING, at=1100.0)
    store.note_event(new, "idle")  # an event in the same state: not a second start
    store.transition(new, JobState.SUCCEEDED, at=1200.0)
    store.transition(running, JobState.FAILED)
    assert m.follow() > 0 and m.follow() == 0
    text = exposition(m)
    assert 'dopq_jobs_finished_total{state="succeeded",user="alice"} 1.0' in text
    assert 'dopq_jobs_finished_total{state="failed",user="bob"} 1.0' in text
    assert 'user="carol"' not in text  # ended before the server started counting
    assert "dopq_queue_wait_seconds_count 1.0" in text
    assert "dopq_queue_wait_seconds_sum 100.0" in text
    assert "dopq_build_seconds_sum 30.0" in text


@pytest.mark.parametrize("listen", ["9400", "localhost", "127.0.0.1:http", "127.0.0.1:70000",
                                    ":9400", "http://127.0.0.1:9400", "127.0.0.1 :9400"])
def test_a_bad_listen_address_is_refused_naming_the_key(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        settings.from_dict({"metrics": {"listen": listen}})


def test_listen_forms() -> None:
    assert settings.from_dict({}).metrics_address() is None
    assert settings.from_dict({"metrics": {"listen": "[::1]:9400"}}).metrics_address() == (
        "::1", 9400)


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def test_the_endpoint_has_its_own_registry_and_shrugs_off_garbage() -> None:
    cfg = settings.from_dict({"metrics": {"listen": "127.0.0.1:0"}})
    a = Metrics(None, fake_views(REST), SimpleNamespace(queue=SimpleNamespace(engine_up=True)))
    b = Metrics(None, fake_views(None), SimpleNamespace(queue=SimpleNamespace(engine_up=False)))
    a.start(cfg)
    b.start(cfg)
    try:
        a.api_call("status", 0.1)
        with socket.create_connection(("127.0.0.1", a.port or 0), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x02\x00GARBAGE\r\n\r\n" + b"A" * 65536)
            s.recv(100)
        assert 'method="status"' in get(f"http://127.0.0.1:{a.port}/metrics")
        other = get(f"http://127.0.0.1:{b.port}/metrics")
        assert "dopq_engine_up 0.0" in other and 'method="status"' not in other
        taken = settings.from_dict({"metrics": {"listen": f"127.0.0.1:{a.port}"}})
        with pytest.raises(ConfigError, match=r"metrics\.listen: cannot listen"):
            Metrics(None).start(taken)
    finally:
        a.stop()
        b.stop()


def test_scrapes_never_read_the_store_and_the_follower_counts_on_its_own(store: Store) -> None:
    """The HTTP server runs each scrape on a new thread, and the store keeps a reader
    connection per reading thread: a scrape that read the store would leak one each."""
    job = store.add_job(name="n", user="alice", origin="api", state=JobState.QUEUED)
    m = Metrics(store, fake_views(REST), SimpleNamespace(queue=SimpleNamespace(engine_up=True)))
    m.start(settings.from_dict({"metrics": {"listen": "127.0.0.1:0"}}))
    try:
        store.transition(job, JobState.RUNNING)
        store.transition(job, JobState.SUCCEEDED)
        url = f"http://127.0.0.1:{m.port}/metrics"
        wait_for(lambda: 'state="succeeded",user="alice"} 1.0' in get(url), 10)
        readers = len(store._readers)
        for _ in range(20):
            get(url)
        assert len(store._readers) == readers <= 2  # this thread's and the follower's
    finally:
        m.stop()


# -- a real server, scraped by Debian's real Prometheus ------------------------------------
def prom_query(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    body = json.loads(get(url))
    assert body["status"] == "success"
    return list(body["data"]["result"])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], int]]:
    """Start ``prometheus`` scraping a target port; returns its own port. Killed by PID."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (scripts/prometheus.sh installs it)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: int) -> int:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: dopq\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
        with (tmp_path / "prometheus.log").open("wb") as log:  # the child keeps its own fd
            procs.append(subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
        return port

    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.mark.docker
@pytest.mark.slow
def test_prometheus_scrapes_a_running_server(
        server_factory: Callable[..., Running], jobs_dir: Path,
        prometheus: Callable[[int], int]) -> None:
    server = server_factory(metrics={"listen": "127.0.0.1:0"})
    metrics = server.server.platform.metrics
    assert metrics is not None and metrics.port
    secret = "secret-project-name"
    job = server["alice"].submit(good_job(jobs_dir, "alice", secret, "echo hi"))["id"]
    assert server.wait_job(job, 90)["state"] == "succeeded"
    url = f"http://127.0.0.1:{metrics.port}/metrics"

    def counted() -> str | None:
        text = get(url)
        return text if 'state="succeeded",user="alice"} 1.0' in text else None

    text = wait_for(counted, 10)
    assert "dopq_engine_up 1.0" in text and 'method="submit_finish"' in text
    assert secret not in text  # no job names, specs or images on this unsigned door
    port = prometheus(metrics.port)

    def answered() -> Any:
        try:
            got = prom_query(port, 'dopq_jobs_finished_total{user="alice",state="succeeded"}')
        except OSError:
            return None
        return got or None

    result = wait_for(answered, 60, 0.5)
    assert float(result[0]["value"][1]) == 1.0
    assert float(prom_query(port, "dopq_engine_up")[0]["value"][1]) == 1.0


# -- the shipped examples -------------------------------------------------------------------
DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_dashboard_asks_only_for_metrics_the_server_serves() -> None:
    import re

    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    workers = SimpleNamespace(queue=SimpleNamespace(engine_up=True))
    m = Metrics(None, fake_views(REST), workers)
    m.job_finished({"user": "alice", "state": "succeeded"})
    m.api_call("status", 0.1)
    served = set(re.findall(r"^(dopq_\w+?)(?:\{| )", exposition(m), re.M))
    used = {n for e in exprs for n in re.findall(r"\bdopq_\w+", e)}
    assert used and used <= served, used - served
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for shown in ("queue length", "wait", "gpu holders", "per user"):
        assert shown in titles


def test_the_example_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/prometheus.sh installs it)")
    out = subprocess.run([promtool, "check", "config", str(DOCS / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_the_scrape_bench_runs(tmp_path: Path) -> None:
    import sys

    out = tmp_path / "metrics.json"
    root = DOCS.parent
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_metrics.py"), "--quick",
                           "--json", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["events_caught_up"] == 2000 and r["scrape_ms"]["n"] == 50 and r["catch_up_ms"] > 0

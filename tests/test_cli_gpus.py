"""The CLI's GPU cells (issue #13): shared requests, GPU use, idle jobs, who holds a device.

No server: the listings and ``status`` are fed views shaped as the server
builds them (``dopq.wire.views``), through a stand-in for the client.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import run_cli
from fakes import AnswerClient

from dopq.client import gpuview

G = 2**30


def job(**kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": 7, "name": "train", "user": "alice", "state": "running", "num_gpus": 1,
        "gpu_memory": 0, "gpus": [0], "exit_code": None, "error": None,
        "submitted_at": None, "started_at": None, "finished_at": None, "image": None,
        "container": "c7", "time_limit": None, "priority": 0, "nice": 0, "held": False,
        "array_index": None, "array_parent": None, "after": [], "after_any": [],
        "origin": "api", "wait_s": 1.0, "run_s": 60.0, "cpu_percent": None,
        "memory_bytes": None, "gpu_samples": [], "gpu_memory_used": None,
        "gpu_utilisation": None, "idle_since": None,
    }
    row.update(kw)
    return row


@pytest.mark.parametrize(("row", "text"), [
    ({"num_gpus": 2, "gpu_memory": 0}, "2"),
    ({"num_gpus": 0}, "0"),
    ({"num_gpus": 1, "gpu_memory": 10 * G}, "1x10G"),
    ({"num_gpus": 2, "gpu_memory": 512 * 2**20}, "2x512M"),
    ({"num_gpus": 1, "gpu_memory": int(1.5 * G)}, "1x1.5G"),
])
def test_gpu_request(row: dict[str, Any], text: str) -> None:
    assert gpuview.gpu_request(row) == text


def test_gpu_use_and_idle_mark() -> None:
    shared = job(gpu_memory=4 * G, gpu_memory_used=3 * G, gpu_utilisation=42.4)
    assert gpuview.gpu_memory_used(shared) == "3G/4G"
    assert gpuview.gpu_utilisation(shared) == "42%"
    idle = job(gpu_memory_used=int(9.5 * G), gpu_utilisation=0.0,
               idle_since="2026-01-01T10:00:00.000Z")
    assert gpuview.gpu_memory_used(idle) == "9.5G"
    assert gpuview.gpu_utilisation(idle) == "0% IDLE"
    assert gpuview.gpu_memory_used(job()) == "-" and gpuview.gpu_utilisation(job()) == "-"


def test_running_listing_shows_requests_use_and_idle(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [job(id=7, gpu_memory=4 * G, gpu_memory_used=3 * G, gpu_utilisation=40.0),
            job(id=8, name="whole", num_gpus=2, gpus=[1, 2], gpu_memory_used=20 * G,
                gpu_utilisation=1.0, idle_since="2026-01-01T10:00:00.000Z")]
    monkeypatch.setattr("dopq.client.job_commands._client",
                        lambda args: AnswerClient({"running": rows}))
    code, out, _ = run_cli(capsys, "running")
    assert code == 0
    head, first, second = out.splitlines()
    assert head.split()[:7] == ["ID", "NAME", "USER", "GPUS", "ON", "GPUS", "GPU"]
    assert "GPU%" in head
    assert first.split()[:7] == ["7", "train", "alice", "1x4G", "0", "3G/4G", "40%"]
    assert second.split()[:8] == ["8", "whole", "alice", "2", "1,2", "20G", "1%", "IDLE"]


def test_status_names_holders_and_foreign_processes(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    status = {
        "name": "lab", "version": "2.0.0", "queue_state": "running", "provider_state": "running",
        "engine_state": "up", "started_at": None, "uptime_s": 5.0, "gpu_backend": "nvml",
        "gpu_mode": "nvidia", "counts": {"running": 2}, "policy": "fairshare",
        "provider_restarts": 0, "queue_restarts": 0,
        "gpus": [
            {"index": 0, "name": "A100", "uuid": "GPU-0", "memory_total": 16 * G, "job": 7,
             "user": "alice", "external": True, "utilization": 55.0, "memory": 16 * G,
             "used": 9 * G,
             "holders": [{"job": 7, "user": "alice", "declared": 4 * G, "memory": 3 * G},
                         {"job": 9, "user": "bob", "declared": 6 * G, "memory": None}],
             "foreign": [{"pid": 4242, "user": "carl", "memory": 2 * G}]},
            {"index": 1, "name": "A100", "uuid": "GPU-1", "memory_total": 16 * G, "job": 5,
             "user": "bob", "external": False, "utilization": 97.0, "memory": 16 * G,
             "used": 12 * G, "foreign": [],
             "holders": [{"job": 5, "user": "bob", "declared": 0, "memory": 12 * G}]},
            {"index": 2, "name": "A100", "uuid": "GPU-2", "memory_total": 16 * G, "job": None,
             "user": None, "external": False, "utilization": None, "memory": 16 * G,
             "used": None, "holders": [], "foreign": []},
        ],
    }
    monkeypatch.setattr("dopq.client.info_commands._client",
                        lambda args: AnswerClient({"status": status}))
    code, out, _ = run_cli(capsys, "status")
    assert code == 0
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("GPU"))
    assert lines[at].split() == ["GPU", "NAME", "MEMORY", "UTIL%", "HELD", "BY"]
    assert lines[at + 1].split() == ["0", "A100", "9G/16G", "55", "job", "7", "(alice)", "3G/4G"]
    assert lines[at + 2].split() == ["job", "9", "(bob)", "?/6G"]
    assert lines[at + 3].split() == ["pid", "4242", "(carl)", "2G", "outside", "DoPQ"]
    assert lines[at + 4].split() == ["1", "A100", "12G/16G", "97", "job", "5", "(bob)",
                                     "12G/whole"]
    assert lines[at + 5].split() == ["2", "A100", "?/16G", "-", "free"]


def test_submit_help_documents_gpu_memory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli(capsys, "submit", "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--gpu-memory SIZE" in out and "shares its GPUs with other such jobs" in out


def test_show_line_of_a_running_job() -> None:
    assert gpuview.gpu_use_line(job()) == "not sampled (yet)"
    busy = job(gpu_memory=4 * G, gpu_memory_used=3 * G, gpu_utilisation=12.0)
    assert gpuview.gpu_use_line(busy) == "3G/4G memory, 12%"
    idle = job(gpu_memory_used=G, gpu_utilisation=0.0, idle_since="2026-01-01T10:00:00.000Z")
    assert gpuview.gpu_use_line(idle) == "1G memory, 0% IDLE since 2026-01-01T10:00:00.000Z"

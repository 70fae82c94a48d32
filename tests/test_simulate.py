"""``dopq simulate``: traces, the event loop and the command line."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dopq.core.errors import DopqError, JobRejected
from dopq.core.policy import PolicyConfig
from dopq.core.simulate import TraceError, TraceJob, load_trace, main, parse_trace, simulate

TRACES = Path(__file__).resolve().parents[1] / "bench" / "traces"
CFG = PolicyConfig()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not JSON"),
        ('{"submit": 0, "user": "a", "gpus": 1}', "missing key 'duration'"),
        ('{"submit": 0, "user": "a", "gpus": -1, "duration": 5}', "gpus"),
        ('{"submit": 0, "user": "a", "gpus": 1, "duration": 0}', "duration: must be positive"),
        ('{"submit": 0, "user": "", "gpus": 1, "duration": 5}', "user"),
        ('{"submit": 0, "user": "a", "gpus": 1, "duration": 5, "gpu": 2}', "unknown key 'gpu'"),
        ('{"submit": 0, "user": "a", "gpus": 1, "duration": 5, "time_limit": "1h"}',
         "time_limit"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_lines_name_their_number(tmp_path, line, problem):
    path = write(tmp_path, '# header\n\n{"submit": 0, "user": "a", "gpus": 1, "duration": 5}\n'
                 + line + "\n")
    with pytest.raises(TraceError) as err:
        load_trace(path)
    assert err.value.line == 4
    assert problem in str(err.value) and str(path) + ":4:" in str(err.value)
    assert "\n" not in str(err.value) and isinstance(err.value, DopqError)


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="t.jsonl"):
        load_trace(tmp_path / "t.jsonl")


def test_parse_numbers_jobs_in_file_order():
    jobs = parse_trace(['{"submit": 5, "user": "a", "gpus": 0, "duration": 1}',
                        '{"submit": 1, "user": "b", "gpus": 2, "duration": 3, "priority": 7}'])
    assert jobs == [TraceJob(1, 5.0, "a", 0, 1.0), TraceJob(2, 1.0, "b", 2, 3.0, None, 7)]


def test_jobs_are_killed_at_their_time_limit():
    jobs = [TraceJob(1, 0.0, "a", 2, 100.0, 50.0), TraceJob(2, 10.0, "b", 2, 30.0)]
    result = simulate(jobs, 2, CFG)
    first, second = result.jobs
    assert (first.start, first.end, first.killed) == (0.0, 50.0, True)
    assert (second.start, second.end, second.wait) == (50.0, 80.0, 40.0)
    assert result.makespan == 80.0
    assert result.utilisation == pytest.approx((2 * 50 + 2 * 30) / (2 * 80))


def test_cpu_only_jobs_do_not_wait_for_gpus():
    jobs = [TraceJob(1, 0.0, "a", 1, 100.0), TraceJob(2, 1.0, "b", 0, 10.0)]
    assert simulate(jobs, 1, CFG).jobs[1].wait == 0.0


def test_oversized_job_is_refused():
    with pytest.raises(JobRejected, match="wants 8 GPUs"):
        simulate([TraceJob(1, 0.0, "a", 8, 1.0)], 4, CFG)


def test_shipped_traces():
    for name in ("heavy_vs_light", "big_job_vs_stream", "mixed_day", "small_and_whole",
                 "heavy_day_light_arrival"):
        path = TRACES / f"{name}.jsonl"
        assert path.stat().st_size < 200_000
        result = simulate(load_trace(path), 4, CFG)
        assert all(j.start is not None for j in result.jobs)
        assert 0 < result.utilisation <= 1 and 0 < result.jain <= 1
        assert sum(u.share for u in result.users) == pytest.approx(1)
        users = {u.user: u for u in result.users}
        if name == "heavy_vs_light":
            assert users["alice"].worst_wait < 3600 and users["bob"].worst_wait < 3600
        if name == "big_job_vs_stream":  # the reservation keeps the stream from starving it
            assert users["big"].worst_wait < 2 * 3600


def test_main_prints_a_table(capsys):
    assert main([str(TRACES / "heavy_vs_light.jsonl"), "--gpus", "8", "--half-life", "1d"]) == 0
    out = capsys.readouterr().out
    assert "312 jobs on 8 GPUs, policy fairshare, half-life 1d00h00m" in out
    assert "heavy" in out and "Jain index" in out


def test_main_json(capsys):
    argv = ["simulate", str(TRACES / "big_job_vs_stream.jsonl"), "--policy", "recency",
            "--half-life", "3600", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["policy"] == "recency" and data["half_life"] == 3600 and data["gpus"] == 4
    assert data["unstarted"] == 0
    assert {u["user"] for u in data["users"]} == {"big", "stream1", "stream2"}
    assert set(data["users"][0]) == {"user", "jobs", "gpu_hours", "share", "mean_wait",
                                     "worst_wait"}


def test_main_errors_are_one_line(tmp_path, capsys):
    path = write(tmp_path, "{oops\n")
    assert main([str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"dopq simulate: {path}:1: not JSON: " \
        "Expecting property name enclosed in double quotes"
    assert main([str(TRACES / "mixed_day.jsonl"), "--half-life", "60"]) == 2
    assert "half_life" in capsys.readouterr().err
    assert main([str(TRACES / "mixed_day.jsonl"), "--gpus", "1"]) == 2
    assert "wants 2 GPUs" in capsys.readouterr().err


def test_bench_quick_runs():
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_policy.py"
    out = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert out.splitlines()[0].split()[0] == "queued" and len(out.splitlines()) == 3


# -- sharing devices by memory ------------------------------------------------------------
G = 1 << 30


@pytest.mark.parametrize(("value", "expected"), [(4 * G, 4 * G), ('"4g"', 4 * G),
                                                  ('"512MiB"', 512 << 20)])
def test_trace_gpu_memory_is_bytes_or_a_size(value, expected):
    (job,) = parse_trace([f'{{"submit": 0, "user": "a", "gpus": 1, "duration": 5, '
                          f'"gpu_memory": {value}}}'])
    assert job.gpu_memory == expected


@pytest.mark.parametrize(("extra", "problem"), [('"gpu_memory": "lots"', "gpu_memory"),
                                                ('"gpu_memory": -1', "gpu_memory"),
                                                ('"gpus": 0, "gpu_memory": "4g"', "gpus >= 1")])
def test_bad_gpu_memory_names_its_line(extra, problem):
    line = '{"submit": 0, "user": "a", "duration": 5, ' + extra + "}"
    if '"gpus"' not in extra:
        line = line.replace("{", '{"gpus": 1, ', 1)
    with pytest.raises(TraceError, match=problem):
        parse_trace([line])


def test_three_4g_jobs_share_a_16g_device_unless_sharing_is_off():
    jobs = [TraceJob(i, 0.0, "a", 1, 100.0, gpu_memory=4 * G) for i in (1, 2, 3, 4)]
    shared = simulate(jobs, 1, CFG, gpu_memory=16 * G)
    assert [j.start for j in shared.jobs] == [0.0, 0.0, 0.0, 100.0]
    assert shared.makespan == 200.0 and shared.utilisation == pytest.approx(1.0)
    assert shared.memory_utilisation == pytest.approx(4 * 4 * 100 / (16 * 200))
    assert shared.users[0].gpu_hours == pytest.approx(4 * 0.25 * 100 / 3600)
    whole = simulate(jobs, 1, CFG, gpu_memory=16 * G, sharing=False)
    assert [j.start for j in whole.jobs] == [0.0, 100.0, 200.0, 300.0]
    assert whole.memory_utilisation == pytest.approx(0.25) and whole.utilisation == 1.0


def test_a_job_bigger_than_a_device_is_refused():
    with pytest.raises(JobRejected, match="GPU memory"):
        simulate([TraceJob(1, 0.0, "a", 1, 1.0, gpu_memory=80 * G)], 1, CFG)


def test_small_and_whole_trace_with_and_without_sharing(capsys):
    path = str(TRACES / "small_and_whole.jsonl")
    assert main([path, "--gpus", "8", "--json"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert main([path, "--gpus", "8", "--json", "--no-sharing"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert on["sharing"] is True and off["sharing"] is False and on["gpu_memory"] == 80 * G
    assert on["unstarted"] == off["unstarted"] == 0
    assert on["makespan"] < off["makespan"]
    assert on["memory_utilisation"] > off["memory_utilisation"]
    assert main([path, "--gpus", "8", "--gpu-memory", "40g"]) == 0
    assert "by memory" in capsys.readouterr().out


def test_whole_gpu_traces_report_no_memory_figures(capsys):
    assert main([str(TRACES / "mixed_day.jsonl"), "--json"]) == 0
    assert "memory_utilisation" not in json.loads(capsys.readouterr().out)


# -- preemption and demand-aware fairness ------------------------------------------------
PRE = PolicyConfig(preemption="fairshare", preempt_grace=60.0)
DAY_TRACE = TRACES / "heavy_day_light_arrival.jsonl"
# mixed_day on 8 GPUs before #14: the table's lines must stay as they were.
MIXED_DAY_8 = """\
mixed_day.jsonl: 233 jobs on 8 GPUs, policy fairshare, half-life 7d00h00m
user          jobs  GPU-hours  share  mean wait worst wait
ana             32        7.9  0.167        12s      3m52s
ben             46        9.1  0.167      3m11s     48m47s
chen            64       12.4  0.167      1m56s     55m57s
dara            18        6.5  0.167        36s      4m27s
eli             47       11.8  0.167      1m21s     20m28s
fay             26        5.7  0.167        26s      5m29s
makespan 23h34m38s, utilisation 28.3%, Jain index 0.927
"""


def test_trace_preemptible_key():
    (job,) = parse_trace(['{"submit": 0, "user": "a", "gpus": 1, "duration": 5, '
                          '"preemptible": true}'])
    assert job.preemptible is True
    with pytest.raises(TraceError, match="preemptible"):
        parse_trace(['{"submit": 0, "user": "a", "gpus": 1, "duration": 5, "preemptible": 1}'])


def two_gpus(preemptible: bool | None = True) -> list[TraceJob]:
    """A heavy 1-GPU job for 10000 s; at 5000 a light job wants both GPUs for 1000 s."""
    return [TraceJob(1, 0.0, "heavy", 1, 10000.0, preemptible=preemptible),
            TraceJob(2, 5000.0, "light", 2, 1000.0)]


def test_a_preempted_job_is_killed_after_the_grace_and_runs_again_from_scratch():
    result = simulate(two_gpus(), 2, PRE)
    heavy, light = result.jobs
    assert (light.start, light.end) == (5060.0, 6060.0)  # the grace, then the light job
    assert (heavy.start, heavy.end, heavy.restarts) == (0.0, 16060.0, 1)  # all 10000 s again
    assert result.fairness is not None and result.fairness.preemptions == 1
    assert result.fairness.lost == pytest.approx(5060 / 3600)
    users = {u.user: u for u in result.users}
    assert users["heavy"].gpu_hours == pytest.approx((5060 + 10000) / 3600)
    assert users["heavy"].mean_wait == 0.0  # waits count to the first start


def test_checkpoints_keep_the_work_before_the_last_one():
    result = simulate(two_gpus(), 2, PRE, checkpoint_every=1000.0)
    heavy = result.jobs[0]
    assert heavy.end == 6060.0 + 5000.0  # 5000 s saved at the checkpoint at 5000
    assert result.fairness is not None
    assert result.fairness.lost == pytest.approx(60 / 3600)
    with pytest.raises(JobRejected, match="checkpoint"):
        simulate(two_gpus(), 2, PRE, checkpoint_every=0.0)


def test_only_preemptible_jobs_are_preempted():
    for jobs, cfg in ((two_gpus(False), PRE), (two_gpus(None), PRE),
                      (two_gpus(False), dataclasses.replace(PRE, preemptible_default=True))):
        result = simulate(jobs, 2, cfg)
        assert result.jobs[1].start == 10000.0 and result.jobs[0].restarts == 0
    by_default = simulate(two_gpus(None), 2, dataclasses.replace(PRE, preemptible_default=True))
    assert by_default.jobs[1].start == 5060.0


def test_preemption_without_preemptible_jobs_changes_nothing():
    for name in ("heavy_vs_light", "mixed_day", "small_and_whole"):
        jobs = load_trace(TRACES / f"{name}.jsonl")
        off = simulate(jobs, 8, CFG)
        # Preemption on, but no job is preemptible: the same schedule.
        on = simulate(jobs, 8, dataclasses.replace(CFG, preemption="fairshare"))
        assert [(j.start, j.end) for j in on.jobs] == [(j.start, j.end) for j in off.jobs]
        assert on.fairness is not None and on.fairness.preemptions == 0


def test_the_table_keeps_its_lines_and_adds_the_fairness_block(capsys):
    assert main([str(TRACES / "mixed_day.jsonl"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(MIXED_DAY_8)
    block = out[len(MIXED_DAY_8):]
    assert "demand-aware fairness" in block and "first wait" in block
    assert "demand-aware Jain index" in block and "0 preemptions" in block
    assert "preemption fairshare" not in block


def test_json_has_fairness_and_preemption_keys(capsys):
    assert main([str(DAY_TRACE), "--gpus", "8", "--json"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert "preemption" not in off
    assert set(off["fairness"]) == {"jain", "lost_gpu_hours", "preemptions", "users"}
    assert set(off["fairness"]["users"][0]) == {"user", "received", "entitled", "ratio",
                                                "first_wait", "lost"}
    assert main([str(DAY_TRACE), "--gpus", "8", "--json", "--preemption", "fairshare",
                 "--min-runtime", "0", "--preempt-grace", "0", "--checkpoint-every", "1h"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert on["preemption"] == {"preemption": "fairshare", "min_runtime": 0.0,
                                "preempt_grace": 0.0, "max_preemptions": 3,
                                "preemptible_default": False, "checkpoint_every": 3600.0}
    assert main([str(DAY_TRACE), "--checkpoint-every", "soon"]) == 2
    assert "--checkpoint-every" in capsys.readouterr().err


def test_preemption_serves_the_light_user_sooner_and_checkpoints_shrink_the_loss():
    jobs = load_trace(DAY_TRACE)
    cfg = dataclasses.replace(CFG, preemption="fairshare")
    off, on = simulate(jobs, 8, CFG), simulate(jobs, 8, cfg)
    saved = simulate(jobs, 8, cfg, checkpoint_every=3600.0)
    assert off.fairness is not None and on.fairness is not None and saved.fairness is not None
    light_off, light_on = off.fairness.users[1], on.fairness.users[1]
    assert light_off.user == light_on.user == "light"
    assert light_off.first_wait is not None and light_off.first_wait > 6 * 3600
    assert light_on.first_wait is not None and light_on.first_wait <= cfg.preempt_grace
    assert on.fairness.jain > off.fairness.jain
    assert off.fairness.lost == 0 and on.fairness.preemptions > 0
    assert 0 < saved.fairness.lost < on.fairness.lost
    assert all(j.start is not None for j in on.jobs)

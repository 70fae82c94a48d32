"""The pure GPU watch: memory breaches (warn, then stop) and idle jobs."""

from __future__ import annotations

import pytest

from dopq.core import settings as settings_mod
from dopq.core.gpuwatch import (
    GIB,
    Act,
    Action,
    JobSample,
    JobWatch,
    WatchConfig,
    gib,
    observe,
    short_duration,
)

MIB = 1024**2
KILL = WatchConfig(enforcement="kill", tolerance=256 * MIB, idle_after=1800.0)
WARN = WatchConfig(enforcement="warn", tolerance=256 * MIB, idle_after=1800.0)


def run(samples: list[JobSample], declared: int, cfg: WatchConfig, every: float = 5.0
        ) -> list[list[Action]]:
    state = JobWatch()
    return [observe(7, declared, s, state, 1000.0 + i * every, cfg)
            for i, s in enumerate(samples)]


def test_breach_is_warned_then_stopped_when_it_persists() -> None:
    over = JobSample(int(14.2 * GIB), 50.0)
    steps = run([over, over, over], 10 * GIB, KILL)
    reason = "used 14.2 GiB of GPU memory, declared 10 GiB"
    assert steps[0] == [Action(Act.WARN, 7, reason)]
    assert steps[1] == [Action(Act.STOP, 7, reason)]
    assert steps[2] == []  # stopped once


def test_breach_that_goes_away_is_not_stopped_and_warns_again_later() -> None:
    over, fine = JobSample(12 * GIB, 50.0), JobSample(9 * GIB, 50.0)
    steps = run([over, fine, over, over], 10 * GIB, KILL)
    assert [[a.kind for a in s] for s in steps] == [[Act.WARN], [], [Act.WARN], [Act.STOP]]


def test_warn_only_never_stops() -> None:
    over = JobSample(12 * GIB, 50.0)
    steps = run([over] * 5, 10 * GIB, WARN)
    assert [[a.kind for a in s] for s in steps] == [[Act.WARN], [], [], [], []]


def test_tolerance() -> None:
    declared = 10 * GIB
    within = JobSample(declared + 256 * MIB, 50.0)
    beyond = JobSample(declared + 257 * MIB, 50.0)
    assert run([within, within], declared, KILL) == [[], []]
    assert [a.kind for a in run([beyond], declared, KILL)[0]] == [Act.WARN]


def test_unknown_memory_changes_nothing() -> None:
    over, unknown = JobSample(12 * GIB, 50.0), JobSample(None, 50.0)
    steps = run([over, unknown, over], 10 * GIB, KILL)
    assert [[a.kind for a in s] for s in steps] == [[Act.WARN], [], [Act.STOP]]


def test_whole_gpu_jobs_are_never_memory_enforced() -> None:
    huge = JobSample(80 * GIB, 90.0)
    assert run([huge] * 4, 0, KILL) == [[], [], [], []]


def test_idle_after_idle_after_is_marked_once() -> None:
    cfg = WatchConfig(idle_after=30 * 60)
    state = JobWatch()
    idle = JobSample(GIB, 0.0)
    assert observe(1, 0, idle, state, 0.0, cfg) == []
    assert observe(1, 0, idle, state, 1799.0, cfg) == []
    assert observe(1, 0, idle, state, 1800.0, cfg) == [
        Action(Act.IDLE, 1, "idle: GPUs at 0% for 30m")]
    assert observe(1, 0, idle, state, 3600.0, cfg) == []  # once
    assert state.idle_since == 0.0
    # working again: the mark goes, and a new idle spell is marked again
    assert observe(1, 0, JobSample(GIB, 80.0), state, 3605.0, cfg) == []
    assert state.idle_since is None and not state.idle_marked
    assert observe(1, 0, idle, state, 3610.0, cfg) == []
    assert [a.kind for a in observe(1, 0, idle, state, 3610.0 + 1800, cfg)] == [Act.IDLE]


def test_idle_threshold_and_unreported_utilisation() -> None:
    cfg = WatchConfig(idle_after=10.0, idle_utilisation=5.0)
    state = JobWatch()
    assert observe(1, 0, JobSample(None, 5.0), state, 0.0, cfg) == []
    assert observe(1, 0, JobSample(None, None), state, 20.0, cfg) == []  # says nothing
    assert [a.reason for a in observe(1, 0, JobSample(None, 4.0), state, 20.0, cfg)] == [
        "idle: GPUs at 4% for 10s"]
    busy = JobWatch()
    assert observe(1, 0, JobSample(None, 5.1), busy, 0.0, cfg) == []
    assert observe(1, 0, JobSample(None, 5.1), busy, 60.0, cfg) == []
    assert busy.idle_since is None


def test_idle_cancel_stops_the_job() -> None:
    cfg = WatchConfig(idle_after=60.0, idle_action="cancel")
    state = JobWatch()
    idle = JobSample(None, 0.0)
    observe(3, 0, idle, state, 0.0, cfg)
    got = observe(3, 0, idle, state, 61.0, cfg)
    assert got == [Action(Act.IDLE, 3, "idle: GPUs at 0% for 1m"),
                   Action(Act.STOP, 3, "idle: GPUs at 0% for 1m")]
    assert observe(3, 0, idle, state, 200.0, cfg) == []


def test_config_from_settings() -> None:
    s = settings_mod.from_dict({"gpus": {"memory_enforcement": "warn", "memory_tolerance": "1g",
                                         "idle_after": "2h", "idle_action": "cancel",
                                         "idle_utilisation": 1}})
    assert WatchConfig.of(s) == WatchConfig("warn", GIB, 7200.0, "cancel", 1.0)
    assert WatchConfig.of(settings_mod.Settings().validate()) == WatchConfig()


@pytest.mark.parametrize(("n", "text"), [(10 * GIB, "10"), (int(14.2 * GIB), "14.2"),
                                         (GIB // 2, "0.5"), (0, "0")])
def test_gib(n: int, text: str) -> None:
    assert gib(n) == text


@pytest.mark.parametrize(("s", "text"), [(1800, "30m"), (5400, "1h30m"), (7200, "2h"),
                                         (45, "45s"), (0, "0s")])
def test_short_duration(s: float, text: str) -> None:
    assert short_duration(s) == text


@pytest.mark.parametrize("reason", ["used 14.2 GiB of GPU memory, declared 10 GiB",
                                    "idle: GPUs at 0% for 30m"])
@pytest.mark.parametrize("code", [137, 143, 1, 0])
def test_a_gpu_watch_stop_fails_the_job_with_its_reason(reason: str, code: int) -> None:
    from dopq.core.exits import classify
    from dopq.core.jobs import JobState

    assert classify(reason, code, vanished=None, oom=False, in_outage=False,
                    requeue=False) == (JobState.FAILED, reason)
    assert classify("used by someone", 0, vanished=None, oom=False, in_outage=False,
                    requeue=False) == (JobState.SUCCEEDED, None)

"""container_config.json into a JobSpec: compatible with DoPQ 1.0, strict on the rest."""

from __future__ import annotations

import re
from typing import Any

import hostile
import pytest

from dopq.core.archive import ArchiveLimits, inspect_context, unpack
from dopq.core.errors import JobRejected
from dopq.core.spec import normalise_tag, parse_array, parse_spec

ORIGINAL = {"name": "3d-ae-naive", "executor_name": "ilja", "num_gpus": 1,
            "required_memory": "32g", "num_slots": 1, "build_flag": True, "run_params": {}}
# Docker's reference grammar (distribution/reference), name and tag.
DOCKER_REF = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
)


def spec(config: dict[str, Any], submitter: str | None = None,
         overrides: dict[str, Any] | None = None, allowed: tuple[str, ...] = ()) -> Any:
    return parse_spec(config, submitter=submitter, overrides=overrides, allowed_users=allowed)


def reason(config: Any, **kw: Any) -> str:
    with pytest.raises(JobRejected) as info:
        spec(config, **kw)
    text = str(info.value)
    assert "\n" not in text
    return info.value.reason


def test_original_example_is_accepted() -> None:
    job = spec(ORIGINAL, allowed=("ilja", "bob"))
    assert (job.name, job.user, job.num_gpus, job.memory) == ("3d-ae-naive", "ilja", 1, 32 * 2**30)
    assert job.build_flag is True and job.run_params == {} and job.env == {}


def test_defaults() -> None:
    job = spec({"name": "abc", "executor_name": "bob"})
    assert (job.num_gpus, job.memory, job.num_slots, job.build_flag) == (1, None, 1, True)
    assert (job.cpus, job.time_limit, job.priority, job.command) == (None, None, 0, None)


def test_null_means_default() -> None:
    job = spec({"name": "abc", "executor_name": "bob", "required_memory": None, "num_gpus": None})
    assert job.memory is None and job.num_gpus == 1


def test_new_keys() -> None:
    job = spec({"name": "abc", "executor_name": "bob", "command": ["python", "train.py"],
                "env": {"SEED": "1"}, "cpus": 2.5, "shm_size": "2g", "time_limit": "1h30m",
                "priority": -5, "num_gpus": 0})
    assert job.command == ["python", "train.py"] and job.env == {"SEED": "1"}
    assert (job.cpus, job.shm_size, job.time_limit, job.priority) == (2.5, 2 * 2**30, 5400.0, -5)


def test_user_is_lower_cased_and_checked_against_submitter_and_allow_list() -> None:
    assert spec({**ORIGINAL, "executor_name": "Ilja"}, submitter="ILJA").user == "ilja"
    assert reason(ORIGINAL, submitter="bob") == (
        "executor_name 'ilja' differs from submitting user 'bob'"
    )
    assert "not an allowed user" in reason(ORIGINAL, allowed=("bob",))
    no_user = {k: v for k, v in ORIGINAL.items() if k != "executor_name"}
    assert spec(no_user, submitter="bob").user == "bob"
    assert "executor_name: required" in reason(no_user)


@pytest.mark.parametrize("user", ["", "9lives", "a" * 33, "bad user", "k\u212a", "x/y", "ä", 7])
def test_bad_user_names(user: Any) -> None:
    assert "executor_name" in reason({**ORIGINAL, "executor_name": user})


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("name", "ab", "at least 3"),
        ("name", "x" * 129, "at most 128"),
        ("name", "bad\nname", "control"),
        ("name", 123, "expected a string"),
        ("num_gpus", "two", "num_gpus: expected an integer"),
        ("num_gpus", -1, "between"),
        ("num_gpus", 1.0, "expected an integer"),
        ("num_gpus", True, "expected an integer"),
        ("num_slots", 0, "between"),
        ("build_flag", "yes", "true or false"),
        ("required_memory", "lots", "required_memory"),
        ("required_memory", 0, "positive"),
        ("required_memory", "9" * 400, "expected a size"),
        ("shm_size", [], "shm_size"),
        ("cpus", 0, "above 0"),
        ("cpus", float("inf"), "above 0"),
        ("cpus", "2", "expected a number"),
        ("time_limit", "soon", "time_limit"),
        ("time_limit", "1" * 40 + "x", "time_limit"),  # parse_duration backtracks on this
        ("time_limit", 1e300, "positive number of seconds"),
        ("time_limit", float("nan"), "positive number of seconds"),
        ("priority", 1001, "between"),
        ("command", "", "empty"),
        ("command", [], "arguments"),
        ("command", ["ok", 3], "expected a string"),
        ("command", "a\x00b", "NUL"),
        ("command", {"a": 1}, "string or a list"),
        ("env", {"1BAD": "x"}, "not a valid variable name"),
        ("env", {"NVIDIA_VISIBLE_DEVICES": "all"}, "reserved"),
        ("env", {"dopq_token": "x"}, "reserved"),
        ("env", {"A": 1}, "expected a string"),
        ("env", "A=1", "expected an object"),
        ("run_params", [], "expected a JSON object"),
    ],
)
def test_bad_values_name_the_key(key: str, value: Any, words: str) -> None:
    text = reason({**ORIGINAL, key: value})
    assert words in text
    assert text.startswith(key) or key in text


def test_unknown_key_is_named_with_a_hint() -> None:
    assert reason({**ORIGINAL, "num_gpu": 2}) == (
        "container_config.json: unknown key 'num_gpu' (did you mean 'num_gpus'?)"
    )
    assert "unknown key 'zzz'" in reason({**ORIGINAL, "zzz": 2})


@pytest.mark.parametrize("config", [None, [], "x", 3, {1: 2}])
def test_not_an_object(config: Any) -> None:
    reason(config)


FORBIDDEN = ["privileged", "volumes", "mounts", "binds", "devices", "device_requests",
             "cap_add", "security_opt", "network", "network_mode", "pid_mode", "ipc_mode",
             "userns_mode", "uts_mode", "sysctls", "runtime", "cgroup_parent", "volumes_from",
             "extra_hosts", "dns", "oom_kill_disable", "pids_limit", "cpuset_cpus", "group_add",
             "storage_opt", "tmpfs", "ports", "auto_remove", "name", "detach", "log_config",
             "restart_policy", "gpus", "nano_cpus", "init", "whatever"]


@pytest.mark.parametrize("key", FORBIDDEN)
def test_dangerous_run_params_are_refused(key: str) -> None:
    assert reason({**ORIGINAL, "run_params": {key: True}}) == f"run_params: '{key}' is not allowed"


def test_allowed_run_params_are_kept_or_moved() -> None:
    cfg = {**ORIGINAL, "required_memory": None, "run_params": {
        "environment": ["A=1", "B=x=y"], "command": "python x.py", "shm_size": "1g",
        "mem_limit": "8g", "memswap_limit": "16g", "working_dir": "/work", "user": "1000:1000",
        "entrypoint": ["/bin/sh", "-c"], "tty": True, "stop_signal": "SIGINT",
        "labels": {"team": "vision"}, "ulimits": [{"name": "memlock", "soft": -1, "hard": -1}],
    }}
    job = spec({**cfg, "env": {"B": "env wins"}})
    assert job.env == {"A": "1", "B": "env wins"}
    assert (job.command, job.shm_size, job.memory) == ("python x.py", 2**30, 8 * 2**30)
    assert job.run_params == {
        "memswap_limit": 16 * 2**30, "working_dir": "/work", "user": "1000:1000",
        "entrypoint": ["/bin/sh", "-c"], "tty": True, "stop_signal": "SIGINT",
        "labels": {"team": "vision"}, "ulimits": [{"name": "memlock", "soft": -1, "hard": -1}],
    }


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"environment": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "reserved"),
        ({"environment": ["NOEQUALS"]}, "KEY=VALUE"),
        ({"labels": {"dopq.user": "root"}}, "reserved"),
        ({"working_dir": "relative"}, "absolute"),
        ({"user": "root; rm -rf /"}, "uid"),
        ({"tty": "yes"}, "true or false"),
        ({"stop_signal": "kill it"}, "signal"),
        ({"ulimits": [{"name": "nproc", "soft": 1, "hard": 1}]}, "not allowed"),
        ({"ulimits": [{"name": "nofile", "soft": 10, "hard": 5}]}, "soft limit"),
        ({"ulimits": {"nofile": 5}}, "list"),
        ({"mem_limit": "16g"}, "conflicts with required_memory"),
        ({"command": "other"}, "conflicts with command"),
        ({1: 2}, "not allowed"),
    ],
)
def test_bad_allowed_run_params(params: dict[Any, Any], words: str) -> None:
    assert words in reason({**ORIGINAL, "command": "python x.py", "run_params": params})


def test_same_value_in_run_params_and_top_level_is_fine() -> None:
    job = spec({**ORIGINAL, "run_params": {"mem_limit": "32g"}})
    assert job.memory == 32 * 2**30


def test_overrides_apply_last_and_are_validated() -> None:
    job = spec(ORIGINAL, overrides={
        "name": "renamed", "gpus": 2, "memory": "4g", "cpus": 3, "time_limit": "2h",
        "shm_size": "1g", "priority": 7, "command": "run", "env": ["X=1"], "after": "3, 4",
        "after_any": [5], "array": "0-3%2",
    })
    assert (job.name, job.num_gpus, job.memory, job.cpus) == ("renamed", 2, 4 * 2**30, 3.0)
    assert (job.time_limit, job.shm_size, job.priority, job.command) == (7200.0, 2**30, 7, "run")
    assert (job.env, job.after, job.after_any, job.array) == ({"X": "1"}, [3, 4], [5], [0, 2])
    assert spec(ORIGINAL, overrides={"gpus": None}).num_gpus == 1
    assert "--gpus" in reason(ORIGINAL, overrides={"gpus": -2})
    assert "--after" in reason(ORIGINAL, overrides={"after": "x"})
    assert "--env" in reason(ORIGINAL, overrides={"env": {"DOPQ_X": "1"}})
    assert "unknown override" in reason(ORIGINAL, overrides={"privileged": True})
    assert spec(ORIGINAL, overrides={"array": [3, 1, 3]}).array == [1, 3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0-9", list(range(10))), ("1,3,5", [1, 3, 5]), ("0-15%4", [0, 4, 8, 12]),
     ("0-15:5", [0, 5, 10, 15]), ("5, 1, 5", [1, 5]), ("7", [7]), ("0-9999", list(range(10000)))],
)
def test_parse_array(text: str, expected: list[int]) -> None:
    assert parse_array(text) == expected


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "5-1", "0-10000", "1,,2", "0-3%0",
                                  "0-3%", "0-999999999", "0-5000,6000-11000", "1-5:0", "\u0661"])
def test_parse_array_refuses(text: str) -> None:
    with pytest.raises(JobRejected):
        parse_array(text)


@pytest.mark.parametrize(
    ("user", "name", "expected"),
    [
        ("ilja", "3d-ae-naive", "dopq/ilja/3d-ae-naive:12"),
        ("Ilja", "My Job (v2)", "dopq/ilja/my-job-v2:12"),
        ("bob", "naïve__run--x..y._z", "dopq/bob/naive__run-x-y-z:12"),
        ("bob", "___", "dopq/bob/job:12"),
        ("bob", "日本語", "dopq/bob/job:12"),
        ("a.b", "-lead", "dopq/a.b/lead:12"),
    ],
)
def test_normalise_tag(user: str, name: str, expected: str) -> None:
    tag = normalise_tag(user, name, 12)
    assert tag == expected
    assert DOCKER_REF.fullmatch(tag)


def test_normalise_tag_caps_length_and_checks_id() -> None:
    tag = normalise_tag("u" * 40, "n" * 300, 2**62)
    assert DOCKER_REF.fullmatch(tag) and len(tag.split(":")[0]) <= 255
    for bad in (-1, True, "3", 2**64):
        with pytest.raises(JobRejected):
            normalise_tag("u", "n", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(hostile.CONFIG_CASES))
def test_config_cases_end_in_a_rejection(case: str, tmp_path: Any) -> None:
    build, words = hostile.CONFIG_CASES[case]
    with pytest.raises(JobRejected) as info:
        root = unpack(build(tmp_path), tmp_path / "dest", ArchiveLimits())
        spec(inspect_context(root).config, submitter="mallory")
    assert words in info.value.reason


def test_good_job_folder_parses(tmp_path: Any) -> None:
    job = hostile.good_job(tmp_path, "alice", "hello-job")
    root = unpack(hostile.zip_it(job), tmp_path / "dest", ArchiveLimits())
    parsed = spec(inspect_context(root).config, submitter="alice", allowed=("alice",))
    assert (parsed.user, parsed.name, parsed.num_gpus) == ("alice", "hello-job", 0)


# --- gpu_memory (issue #13): a share of each GPU instead of whole ones ---------------


def test_gpu_memory_is_bytes_per_device_and_absent_means_whole_gpus() -> None:
    assert spec(ORIGINAL).gpu_memory is None  # a DoPQ 1.0 job folder: whole GPUs
    job = spec({**ORIGINAL, "gpu_memory": "10g"})
    assert (job.num_gpus, job.gpu_memory) == (1, 10 * 2**30)
    job = spec({"name": "abc", "executor_name": "bob", "gpu_memory": "512m", "num_gpus": 2})
    assert (job.num_gpus, job.gpu_memory) == (2, 512 * 2**20)
    assert spec({**ORIGINAL, "gpu_memory": None}).gpu_memory is None


def test_gpu_memory_override_applies_last() -> None:
    job = spec({**ORIGINAL, "gpu_memory": "4g"}, overrides={"gpu_memory": "6g"})
    assert job.gpu_memory == 6 * 2**30
    assert spec(ORIGINAL, overrides={"gpu_memory": "1.5g"}).gpu_memory == int(1.5 * 2**30)


@pytest.mark.parametrize(("config", "overrides", "words"), [
    ({"gpu_memory": "lots"}, None, "gpu_memory: expected"),
    ({"gpu_memory": 0}, None, "gpu_memory: must be positive"),
    ({"gpu_memory": "0g"}, None, "gpu_memory: must be positive"),
    ({"gpu_memory": -5}, None, "gpu_memory: must not be negative"),
    ({"gpu_memory": "-5g"}, None, "gpu_memory: expected"),
    ({"gpu_memory": True}, None, "gpu_memory: expected"),
    ({"gpu_memory": "4g", "num_gpus": 0}, None, "needs num_gpus of at least 1"),
    ({"gpu_memory": "4g"}, {"gpus": 0}, "needs num_gpus of at least 1"),
    ({"num_gpus": 0}, {"gpu_memory": "4g"}, "needs num_gpus of at least 1"),
    ({}, {"gpu_memory": "0"}, "--gpu-memory: must be positive"),
])
def test_bad_gpu_memory_is_one_clear_line(config: dict[str, Any],
                                          overrides: dict[str, Any] | None, words: str) -> None:
    assert words in reason({**ORIGINAL, **config}, overrides=overrides)


def test_gpu_memory_options_alone_are_checked() -> None:
    from dopq.core.spec import check_overrides

    assert check_overrides({"gpu_memory": "2g"}).gpu_memory == 2 * 2**30
    with pytest.raises(JobRejected, match="needs num_gpus"):
        check_overrides({"gpu_memory": "2g", "gpus": 0})


# --- preemptible (issue #14): the job may be stopped and queued again ----------------


def test_preemptible_is_a_bool_and_absent_means_the_server_default() -> None:
    assert spec(ORIGINAL).preemptible is None  # the server's [policy] preemptible_default
    assert spec({**ORIGINAL, "preemptible": True}).preemptible is True
    assert spec({**ORIGINAL, "preemptible": False}).preemptible is False
    assert spec({**ORIGINAL, "preemptible": None}).preemptible is None
    assert spec(ORIGINAL, overrides={"preemptible": True}).preemptible is True
    assert spec({**ORIGINAL, "preemptible": True},
                overrides={"preemptible": False}).preemptible is False


@pytest.mark.parametrize(("config", "overrides", "words"), [
    ({"preemptible": "yes"}, None, "preemptible: expected true or false, got a string"),
    ({"preemptible": 1}, None, "preemptible: expected true or false"),
    ({}, {"preemptible": "1"}, "--preemptible: expected true or false"),
])
def test_bad_preemptible_is_one_clear_line(config: dict[str, Any],
                                           overrides: dict[str, Any] | None, words: str) -> None:
    assert words in reason({**ORIGINAL, **config}, overrides=overrides)

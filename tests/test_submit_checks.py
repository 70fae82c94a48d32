"""Mistakes answered when they are made: ``dopq submit`` refuses them, and no job exists.

The forms people write for sizes, durations and arrays; ``--after`` checked at
submit; a ``FROM`` the server cannot provide; ``.dockerignore``; the upload
progress on a terminal only.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, cli_login, run_cli, wait_for
from hostile import good_job

from dopq.core import forms
from dopq.core.archive import zip_folder
from dopq.core.dockerignore import IgnoreRules, context_files
from dopq.core.errors import JobRejected
from dopq.core.spec import check_overrides
from dopq.core.submitcheck import UploadProgress

# -- the forms people write ----------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("8g", 8 * 2**30), ("8G", 8 * 2**30), ("8GB", 8 * 2**30), ("8GiB", 8 * 2**30),
    ("8 GB", 8 * 2**30), ("512m", 512 * 2**20), ("512MB", 512 * 2**20),
    ("1.5g", 3 * 2**29), ("64MiB", 64 * 2**20), ("2048", 2048), (4096, 4096),
])
def test_sizes(text: Any, size: int) -> None:
    assert forms.parse_size(text) == size


@pytest.mark.parametrize(("text", "seconds"), [
    ("2h", 7200), ("90m", 5400), ("2 hours", 7200), ("1 hour 30 minutes", 5400),
    ("1 hour and 30 minutes", 5400), ("1h30m", 5400), ("1.5h", 5400), ("30 min", 1800),
    ("45s", 45), ("1 day", 86400), ("01:30:00", 5400), ("90:00", 5400),
    ("1-00:00:00", 86400), ("2-12", 2 * 86400 + 12 * 3600), ("1-0:30", 86400 + 1800),
    ("3600", 3600), (3600, 3600), ("  2H  ", 7200),
])
def test_durations(text: Any, seconds: float) -> None:
    assert forms.parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "indices"), [
    ("0-3", [0, 1, 2, 3]), ("0-9%2", [0, 2, 4, 6, 8]), ("0-9:2", [0, 2, 4, 6, 8]),
    ("1,3,5", [1, 3, 5]), ("0-3, 10-20:5", [0, 1, 2, 3, 10, 15, 20]), ("7", [7]),
])
def test_arrays(text: str, indices: list[int]) -> None:
    assert forms.parse_array(text) == indices


@pytest.mark.parametrize(("option", "value", "words"), [
    ("memory", "8 gigs", "expected a size like 8g"),
    ("memory", "8", "did you mean '8g'"),
    ("time_limit", "2 fortnights", "expected a duration like 2h"),
    ("time_limit", "00:90:00", "expected a duration"),
    ("time_limit", "1" * 30 + "x", "expected a duration"),
    ("array", "0..3", "(write 0-3)"),
    ("array", "0-9:2%2", "expected indices"),
    ("array", "0-3%0", "a step is at least 1"),
    ("after", "abc", "--after: expected job ids"),
])
def test_mistaken_forms_are_one_line(option: str, value: str, words: str) -> None:
    with pytest.raises(JobRejected) as info:
        check_overrides({option: value})
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_long_digit_run_is_refused_at_once() -> None:
    for text in ("1" * 60 + "x", "1h" * 40, "1:" * 30):
        with pytest.raises(JobRejected):
            forms.parse_duration(text)


# -- .dockerignore ------------------------------------------------------------------


def test_dockerignore_follows_docker() -> None:
    rules = IgnoreRules.parse(
        "# a comment\n\n*.md\n!README*.md\nREADME-secret.md\n/build/\n**/*.pyc\ntemp?\n"
        "*/tmp*\ndata/**\n!data/keep.txt\n  ./logs  \n")
    excluded = ["a.md", "README-secret.md", "build", "build/x/y", "a.pyc", "src/deep/a.pyc",
                "tempa", "sub/tmpfile", "data/x", "data/sub/y", "logs", "logs/today.txt"]
    kept = ["README.md", "README-other.md", "temp", "tempab", "sub/sub/tmpfile",
            "data/keep.txt", "src/a.py", "# a comment"]
    assert [p for p in excluded if not rules.excluded(p)] == []
    assert [p for p in kept if rules.excluded(p)] == []
    # the last matching line decides
    assert not IgnoreRules.parse("*.md\nREADME-secret.md\n!README*.md\n").excluded(
        "README-secret.md")
    assert IgnoreRules.parse("[a-c].txt\n").excluded("b.txt")
    assert not IgnoreRules.parse("[^a-c].txt\n").excluded("b.txt")
    assert IgnoreRules.parse("a\\*b\n").excluded("a*b")
    assert not IgnoreRules.parse("a\\*b\n").excluded("axb")


def test_zipping_a_folder_respects_dockerignore(jobs_dir: Path) -> None:
    folder = good_job(jobs_dir, "alice", "ignoring")
    (folder / ".dockerignore").write_text(
        "Dockerfile\n.dockerignore\ncontainer_config.json\ndata\n*.log\n!keep.log\n.git\n")
    (folder / "data").mkdir()
    (folder / "data" / "big.bin").write_bytes(b"x" * 1000)
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "objects" / "pack").write_bytes(b"y")
    (folder / "run.log").write_text("noise")
    (folder / "keep.log").write_text("kept")
    sent = [rel for rel, _, _ in context_files(folder)]
    # Dockerfile, .dockerignore and the config go whatever the file says
    assert sent == [".dockerignore", "Dockerfile", "container_config.json", "keep.log", "run.sh"]
    out = zip_folder(folder, jobs_dir / "out.zip", context_files(folder))
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == sorted(sent)


def test_a_bad_dockerignore_line_is_one_line() -> None:
    with pytest.raises(Exception, match=r"\.dockerignore line 2: '!' without a pattern"):
        IgnoreRules.parse("a\n!\n")


# -- upload progress -----------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_updating_line_on_a_terminal_only() -> None:
    term = FakeTerminal()
    show = UploadProgress(term, interval=0.0)
    for sent in (2**20, 2 * 2**20, 4 * 2**20):
        show(sent, 4 * 2**20)
    text = term.getvalue()
    assert text.count("\n") == 1 and text.endswith("(100%)\n")
    assert "\ruploading 1.0 MiB of 4.0 MiB (25%)" in text
    pipe = io.StringIO()
    UploadProgress(pipe)(10, 10)
    quiet = FakeTerminal()
    UploadProgress(quiet, quiet=True)(10, 10)
    assert pipe.getvalue() == "" and quiet.getvalue() == ""


# -- against a server ----------------------------------------------------------------


run = run_cli


@pytest.fixture
def alice_cli(server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Running:
    cli_login(server, monkeypatch, tmp_path)
    return server


def job_count(server: Running) -> int:
    rows = server.server.platform.store.read("SELECT COUNT(*) AS n FROM jobs")
    return int(rows[0]["n"])


def no_job_left(server: Running) -> bool:
    root = server["root"]
    uploads = server.settings.state_path / "uploads"
    return (job_count(server) == 0 and not root.call("queue") and not root.call("history")
            and not list(uploads.iterdir()))


def _lower_dockerfile(f: Path) -> None:
    (f / "Dockerfile").rename(f / "dockerfile")


def _config(**changes: Any) -> Any:
    def edit(f: Path) -> None:
        cfg = json.loads((f / "container_config.json").read_text())
        for key, value in changes.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (f / "container_config.json").write_text(json.dumps(cfg))
    return edit


MISTAKES: dict[str, tuple[Any, list[str], str]] = {
    "lower-case dockerfile": (_lower_dockerfile, [],
                              "found 'dockerfile': the name must be exactly 'Dockerfile'"),
    "bad json": (lambda f: (f / "container_config.json").write_text('{"name": "x",}'), [],
                 "container_config.json is not valid JSON: line 1"),
    "no name": (_config(name=None), [], "name: required"),
    "unknown key": (_config(nmae="typo"), [], "unknown key 'nmae' (did you mean 'name'?)"),
    "forbidden run_params": (_config(run_params={"privileged": True}), [],
                             "run_params: 'privileged' is not allowed"),
    "memory over the limit": (_config(required_memory="1t"), [],
                              "memory 1048576 MiB is over the limit of 64g"),
    "too many gpus": (_config(num_gpus=3), [], "asks for 3 GPUs, this server has 2"),
    "--memory over the limit": (None, ["--memory", "100GB"], "over the limit of 64g"),
    "--memory without a unit": (None, ["--memory", "8"], "did you mean '8g'"),
    "--time-limit in words": (None, ["--time-limit", "2 fortnights"], "expected a duration"),
    "--array 0..3": (None, ["--array", "0..3"], "(write 0-3)"),
    "--after nothing": (None, ["--after", "999"], "--after 999: no job 999"),
    "--after garbage": (None, ["--after", "x1"], "--after: expected job ids"),
    "FROM a registry": (lambda f: (f / "Dockerfile").write_text("FROM python:3.11\n"), [],
                        "FROM python:3.11 (Dockerfile line 1): not available on this server "
                        "(no registry access) and not an allowed base image; allowed bases: "
                        "dopq/busybox:latest, scratch"),
}


def test_each_mistake_is_refused_at_submit_and_makes_no_job(
        alice_cli: Running, capsys: Any, jobs_dir: Path) -> None:
    capsys.readouterr()
    for n, (label, (change, argv, words)) in enumerate(MISTAKES.items()):
        folder = good_job(jobs_dir, "alice", f"mistake-{n}")
        if change:
            change(folder)
        for target in (folder, zip_folder(folder, jobs_dir / f"mistake-{n}.zip")):
            code, out, err = run(capsys, "submit", str(target), *argv)
            assert code == 1, (label, out, err)
            assert words in err, (label, err)
            assert err.startswith("dopq: error: ") and err.count("\n") == 1, (label, err)
            assert "Traceback" not in err and out == ""
    assert no_job_left(alice_cli)


def test_the_server_judges_what_the_client_did_not_check(
        server: Running, jobs_dir: Path) -> None:
    """A client that skips its own checks (or lies) still gets the verdict at submit."""
    alice = server["alice"]
    cases = {
        "lower": (_lower_dockerfile, "no Dockerfile at the top of the archive (found "
                                     "'dockerfile'"),
        "json": (lambda f: (f / "container_config.json").write_text("{"), "not valid JSON"),
        "run-params": (_config(run_params={"privileged": True}), "'privileged' is not allowed"),
        "memory": (_config(required_memory="1t"), "over the limit of 64g"),
        "base": (lambda f: (f / "Dockerfile").write_text("FROM python:3.11\n"),
                 "not available on this server (no registry access)"),
        "priority": (_config(priority=5), "only an admin may submit with a priority above 0"),
    }
    for name, (change, words) in cases.items():
        folder = good_job(jobs_dir, "alice", f"server-{name}")
        change(folder)
        archive = zip_folder(folder, jobs_dir / f"{name}.zip")
        with pytest.raises(JobRejected, match=words.replace("(", r"\(").replace(")", r"\)")):
            alice.submit(archive, precheck=False)
    # the options and the config sent with submit_begin: refused before any upload
    with pytest.raises(JobRejected, match="over the limit"):
        alice.call("submit_begin", 100, {}, {"config": {"name": "big", "required_memory": "1t"}})
    with pytest.raises(JobRejected, match="asks for 5 GPUs"):
        alice.call("submit_begin", 100, {}, {"config": {"name": "gpus", "num_gpus": 5}})
    with pytest.raises(JobRejected, match="not available on this server"):
        alice.call("submit_begin", 100, {}, {"config": {"name": "base"},
                                             "dockerfile": "FROM nothing/here:1\n"})
    assert no_job_left(server)


def test_after_names_your_own_existing_jobs(alice_cli: Running, capsys: Any,
                                            jobs_dir: Path) -> None:
    capsys.readouterr()
    bobs = alice_cli["bob"].submit(good_job(jobs_dir, "bob", "bobs-job", "true"))["id"]
    before = job_count(alice_cli)
    folder = good_job(jobs_dir, "alice", "waits")
    for flag in ("--after", "--after-any"):
        code, _, err = run(capsys, "submit", str(folder), flag, str(bobs))
        assert code == 1 and f"job {bobs} belongs to bob" in err and err.count("\n") == 1
        code, _, err = run(capsys, "submit", str(folder), flag, f"{bobs + 500}")
        assert code == 1 and f"no job {bobs + 500}" in err
    assert job_count(alice_cli) == before
    code, out, err = run(capsys, "submit", str(folder), "--json")
    mine = json.loads(out)["id"]
    assert alice_cli.wait_job(mine)["state"] == "succeeded"
    code, out, err = run(capsys, "submit", str(folder), "--after", str(mine), "--json")
    assert code == 0, err
    assert alice_cli.wait_job(json.loads(out)["id"])["state"] == "succeeded"
    # an admin may make a job wait for anyone's
    job = alice_cli["root"].submit(good_job(jobs_dir, "root", "roots"), {"after": [bobs]})
    assert job["id"] > mine


def test_the_forms_people_write_are_accepted(alice_cli: Running, capsys: Any,
                                             jobs_dir: Path) -> None:
    capsys.readouterr()
    folder = good_job(jobs_dir, "alice", "forms", config={"required_memory": "512MB",
                                                          "time_limit": "1 hour 30 minutes"})
    code, out, err = run(capsys, "submit", str(folder), "--memory", "256MiB", "--time-limit",
                         "1-00:00:00", "--array", "0-3%2", "--json")
    assert code == 0, err
    first = json.loads(out)["id"]
    job = alice_cli.wait_job(first)
    assert job["state"] == "succeeded" and job["time_limit"] == 86400
    assert job["spec"]["memory"] == 256 * 2**20
    elements = wait_for(lambda: (lambda done: done if len(done) == 2 else None)(
        [j for j in alice_cli["root"].call("history") if j.get("array_parent") == first]))
    assert sorted(j["array_index"] for j in elements) == [0, 2]


def _read_all(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other end is closed
                break
            if not chunk:
                break
            data += chunk
        elif proc.poll() is not None:
            break
    return data


def test_progress_on_a_terminal_and_not_on_a_pipe(alice_cli: Running, jobs_dir: Path) -> None:
    folder = good_job(jobs_dir, "alice", "progress")
    (folder / "payload.bin").write_bytes(os.urandom(3 * 2**20))  # three chunks, no compression
    argv = [sys.executable, "-m", "dopq.cli", "submit", str(folder)]
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = _read_all(master, proc).decode()
    out, _ = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 0 and out.decode().startswith("submitted job")
    assert "\ruploading" in shown and shown.rstrip().endswith("(100%)"), repr(shown)
    piped = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    quiet = _read_all(master, proc)
    proc.communicate(timeout=60)
    os.close(master)
    assert quiet == b""

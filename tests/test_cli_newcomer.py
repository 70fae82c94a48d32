"""A newcomer's first day (issue 11, items 4, 5, 8-11) through the real CLI and server:
one-line errors, suggestions, arrays as Slurm users expect, editing one's own queued
jobs, filters, and fetching outputs, with the attacks on each new call."""

from __future__ import annotations

import getpass
import io
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORDS, Running, run_cli, wait_for, write_toml
from hostile import good_job, zip_it

from dopq import cli
from dopq.core import settings as settings_mod
from dopq.server.store import Store

FINAL = ("succeeded", "failed", "cancelled")


run = run_cli


def as_user(server: Running, monkeypatch: pytest.MonkeyPatch, user: str) -> None:
    """The CLI signed in as ``user`` (a token of their own through DOPQ_TOKEN)."""
    ns = server.settings.nameserver
    monkeypatch.setenv("DOPQ_NS_PORT", str(ns.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    token = server.server.platform.users.issue_token(user, 3600)[0]
    monkeypatch.setenv("DOPQ_TOKEN", token)


def submit(capsys: Any, folder: Path, *options: str) -> dict[str, Any]:
    code, out, err = run(capsys, "submit", str(folder), "--json", *options)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def state(server: Running, job_id: int) -> str:
    return str(server["root"].call("job", job_id)["state"])


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 1, err
    assert err.startswith("dopq: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


# -- 4, 5: mistakes answered in one line, without a server --------------------------------
def test_user_add_mistakes_are_one_line(capsys: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOPQ_CONFIG", raising=False)
    monkeypatch.setattr("dopq.core.settings.load", lambda path: settings_mod.from_dict(
        {"state_dir": str(tmp_path / "none")}))
    code, _, err = run(capsys, "user", "add", "carol")
    one_line_error(code, err, "no DoPQ server here", "--config", "--remote")

    state_dir = tmp_path / "state"
    cfg = write_toml({"state_dir": str(state_dir), "users": {"allowed": ["alice"]}},
                     tmp_path / "server.toml")
    monkeypatch.undo()
    state_dir.mkdir(mode=0o700)
    Store(settings_mod.load(str(cfg)).db_path).close()
    # A password on a pipe without --password-stdin: getpass finds no terminal.
    monkeypatch.setattr("getpass.getpass", getpass.fallback_getpass)
    monkeypatch.setattr("sys.stdin", io.StringIO("carolpass1\n"))
    code, _, err = run(capsys, "user", "add", "carol", "--config", str(cfg))
    one_line_error(code, err, "--password-stdin")
    monkeypatch.setattr("sys.stdin", io.StringIO("carolpass1\n"))
    code, out, err = run(capsys, "user", "add", "carol", "--config", str(cfg),
                         "--password-stdin")
    assert code == 0 and "user carol added" in out
    assert "warning: carol is not in users.allowed" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("alicepass1\n"))
    code, out, err = run(capsys, "user", "add", "alice", "--config", str(cfg),
                         "--password-stdin")
    assert code == 0 and err == ""


def test_mistyped_commands_and_help(capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["log", "3"])
    assert info.value.code == 2
    assert "did you mean logs?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["histroy"])
    assert "did you mean history?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["simulate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("--gpus", "--policy", "--half-life", "trace format", "duration", "time_limit"):
        assert word in out
    # An unexpected error is one line, with the hint; --debug shows the traceback.
    monkeypatch.setattr("dopq.core.settings.to_toml", lambda s: 1 / 0)
    code, _, err = run(capsys, "config", "show")
    one_line_error(code, err, "ZeroDivisionError", "--debug")
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "config", "show"])


# -- 5: login, logs --------------------------------------------------------------------
def test_login_says_which_name(server: Running, capsys: Any, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    ns = server.settings.nameserver
    monkeypatch.setenv("DOPQ_NS_PORT", str(ns.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOPQ_TOKEN", raising=False)
    monkeypatch.setenv("LOGNAME", "alice")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORDS["alice"] + "\n"))
    code, out, err = run(capsys, "login", "--password-stdin")
    assert code == 0, err
    assert "signing in as alice (from $LOGNAME; use --user NAME)" in err
    assert "as alice (user)" in out


def test_logs_of_queued_and_rejected_jobs(server: Running, capsys: Any, jobs_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(server, monkeypatch, "alice")
    first = submit(capsys, good_job(jobs_dir, "alice", "first-job", "sleep 2"))["id"]
    later = submit(capsys, good_job(jobs_dir, "alice", "later-job", "echo later-output"),
                   "--after", str(first))["id"]
    wait_for(lambda: state(server, later) == "queued", 60)
    code, out, err = run(capsys, "logs", str(later))
    assert code == 0 and out == "" and "no log until it starts" in err
    code, out, err = run(capsys, "logs", "-f", str(later))
    assert code == 0, err
    assert "waiting for it to start, then following" in err
    assert "later-output" in out
    bad = good_job(jobs_dir, "alice", "bad-job", config={"run_params": {"privileged": True}})
    rejected = submit_or_refused(capsys, bad)
    if rejected is not None:  # refused at submit by now (issue 11, item 1): nothing to show
        server.wait_job(rejected)
        code, out, _ = run(capsys, "logs", str(rejected))
        assert code == 0 and "failed before it started" in out and "privileged" in out


def submit_or_refused(capsys: Any, folder: Path) -> int | None:
    code, out, _ = run(capsys, "submit", str(folder), "--json")
    return int(json.loads(out)["id"]) if code == 0 else None


# -- 9, 10: editing one's own queued jobs; filters ----------------------------------------
def test_users_edit_their_own_queued_jobs(server: Running, capsys: Any, jobs_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(server, monkeypatch, "alice")
    sleeper = submit(capsys, good_job(jobs_dir, "alice", "sleeper", "sleep 600"))["id"]
    waiting = submit(capsys, good_job(jobs_dir, "alice", "waiting", "echo w"),
                     "--after", str(sleeper))["id"]
    wait_for(lambda: state(server, waiting) == "queued", 60)
    for argv in (["--hold"], ["--release"], ["--priority", "-5"], ["--priority", "0"],
                 ["--time-limit", "30m"], ["--nice", "10"]):
        code, out, err = run(capsys, "edit", str(waiting), *argv)
        assert code == 0, (argv, err)
    job = server["alice"].call("job", waiting)
    assert job["time_limit"] == 1800 and job["priority"] == 0 and not job["held"]
    code, _, err = run(capsys, "edit", str(waiting), "--priority", "3")
    one_line_error(code, err, "only an admin may set a priority above 0")
    code, _, err = run(capsys, "edit", str(waiting), "--time-limit", "2 fortnights")
    assert code == 1
    # An admin's hold is the admins' to release.
    server["root"].call("edit", [waiting], "hold")
    code, _, err = run(capsys, "edit", str(waiting), "--release")
    one_line_error(code, err, "held by an admin")
    server["root"].call("edit", [waiting], "release")

    # filters, as alice and as bob
    code, out, _ = run(capsys, "queue", "--me", "--json")
    assert [r["id"] for r in json.loads(out)] == [waiting]
    code, out, _ = run(capsys, "running", "--user", "alice", "--state", "running", "--json")
    assert [r["id"] for r in json.loads(out)] == [sleeper]
    code, out, _ = run(capsys, "queue", "--state", "held", "--json")
    assert json.loads(out) == []
    as_user(server, monkeypatch, "bob")
    code, out, _ = run(capsys, "queue", "--me", "--json")
    assert json.loads(out) == []
    code, out, _ = run(capsys, "queue", "--user", "alice")
    assert "waiting" in out and "bob" not in out
    # bob may not touch alice's jobs
    for argv in (["--hold"], ["--priority", "-1"], ["--time-limit", "1m"], ["--delete"]):
        code, _, err = run(capsys, "edit", str(waiting), *argv)
        one_line_error(code, err, "belongs to alice")
    assert server["root"].call("job", waiting)["held"] is False

    as_user(server, monkeypatch, "alice")
    code, out, _ = run(capsys, "cancel", str(sleeper), str(waiting))
    assert code == 0
    server.wait_job(sleeper)
    code, out, _ = run(capsys, "history", "--state", "cancelled", "--me", "--json")
    assert {r["id"] for r in json.loads(out)} == {sleeper, waiting}
    code, out, _ = run(capsys, "history", "--state", "succeeded", "--json")
    assert json.loads(out) == []


def test_a_time_limit_edit_lets_a_job_backfill(server: Running, capsys: Any,
                                               jobs_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both GPUs: one runs (1h limit), the big job waits and reserves the other; a
    small job without a time limit waits behind it until it gets one that fits."""
    as_user(server, monkeypatch, "alice")
    busy = submit(capsys, good_job(jobs_dir, "alice", "busy", "sleep 600", num_gpus=1),
                  "--time-limit", "1h")["id"]
    wait_for(lambda: state(server, busy) == "running", 60)
    big = submit(capsys, good_job(jobs_dir, "alice", "big", "sleep 1", num_gpus=2))["id"]
    wait_for(lambda: state(server, big) == "queued", 60)  # and holds the free GPU
    small = submit(capsys, good_job(jobs_dir, "alice", "small", "echo small", num_gpus=1))["id"]
    wait_for(lambda: state(server, small) == "queued", 60)
    wait_for(lambda: any(r["id"] == small and "Reserved" in (r.get("reason") or "")
                         for r in server["alice"].call("queue")), 20)
    assert state(server, small) == "queued"
    code, _, err = run(capsys, "edit", str(small), "--time-limit", "10m")
    assert code == 0, err
    assert server.wait_job(small, 60)["state"] == "succeeded"
    run(capsys, "cancel", str(busy), str(big))


# -- 8: arrays -------------------------------------------------------------------------
def test_arrays_as_slurm_users_expect(server: Running, capsys: Any, jobs_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(server, monkeypatch, "alice")
    folder = good_job(jobs_dir, "alice", "arr", 'sleep 1; echo "index=$DOPQ_ARRAY_INDEX"')
    code, out, err = run(capsys, "submit", str(folder), "--array", "0-2")
    assert code == 0, err
    head = int(out.split()[2])
    assert out.strip().endswith(f"{head}_0 {head}_1 {head}_2")
    after = submit(capsys, good_job(jobs_dir, "alice", "after-arr", "echo after"),
                   "--after", str(head))["id"]
    code, out, err = run(capsys, "wait", str(head), "--timeout", "120")
    assert code == 0, out + err
    assert [line.split()[1] for line in out.splitlines()] == [f"{head}_{i}" for i in range(3)]
    elements = server["alice"].call("array", head)
    assert [e["array_index"] for e in elements] == [0, 1, 2]
    # --after the array: started only once every element had ended
    done = server.wait_job(after)
    assert done["state"] == "succeeded"
    ends = [server["alice"].call("job", e["id"])["finished_at"] for e in elements]
    assert done["started_at"] >= max(ends)
    code, out, _ = run(capsys, "history", "--me", "--json")
    assert {f"{head}_{i}" for i in range(3)} <= {r["job"] for r in json.loads(out)}
    code, out, _ = run(capsys, "history", "--me")
    assert "INDEX" in out.splitlines()[0] and f"{head}_2" in out
    code, out, _ = run(capsys, "show", f"{head}_1", "--json")
    assert json.loads(out)["array_index"] == 1
    code, out, _ = run(capsys, "logs", f"{head}_2")
    assert "index=2" in out
    code, out, err = run(capsys, "wait", f"{head}_0", str(after), "--json")
    assert code == 0 and len(json.loads(out)) == 2

    # cancel: one element by its name, then the rest of the array by its first id
    blocker = submit(capsys, good_job(jobs_dir, "alice", "blocker", "sleep 600"))["id"]
    queued = submit(capsys, folder, "--array", "0-2", "--after", str(blocker))
    assert queued["ids"] == [f"{queued['id']}_{i}" for i in range(3)]
    second = queued["id"]
    wait_for(lambda: len(server["alice"].call("array", second)) == 3, 60)
    code, out, err = run(capsys, "cancel", f"{second}_1")
    assert code == 0 and out == f"job {second}_1: cancelled\n", err
    code, out, err = run(capsys, "cancel", str(second))
    assert code == 0, err
    assert all(e["state"] == "cancelled" for e in server["alice"].call("array", second))
    as_user(server, monkeypatch, "bob")
    code, _, err = run(capsys, "cancel", str(blocker))
    one_line_error(code, err, "belongs to alice")
    as_user(server, monkeypatch, "alice")
    run(capsys, "cancel", str(blocker))


# -- 11: outputs -----------------------------------------------------------------------
def test_outputs_fetched_through_the_api(server: Running, capsys: Any, jobs_dir: Path,
                                         tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    as_user(server, monkeypatch, "alice")
    script = ("echo result > /outdir/result.txt; mkdir -p /outdir/sub; "
              "echo deep > /outdir/sub/deep.txt; ln -s /etc/passwd /outdir/passwd; "
              "ln -s /etc /outdir/etc; ln -s .. /outdir/up; mkfifo /outdir/pipe; "
              "touch \"/outdir/$(printf 'a\\tb')\"; exit 0")
    job_id = submit(capsys, good_job(jobs_dir, "alice", "writer", script))["id"]
    assert server.wait_job(job_id)["state"] == "succeeded"
    code, out, _ = run(capsys, "show", str(job_id))
    where = Path(server.settings.state_dir) / "outputs" / "alice" / str(job_id)
    assert f"outputs: {where}" in out

    # bob may not fetch alice's outputs, nor read her fetch
    as_user(server, monkeypatch, "bob")
    code, _, err = run(capsys, "outputs", str(job_id), "--to", str(tmp_path / "bob"))
    one_line_error(code, err, "belongs to alice")
    assert not (tmp_path / "bob").exists()
    fetch = server["alice"].call("outputs_begin", job_id)
    with pytest.raises(Exception, match="not your fetch"):
        server["bob"].call("outputs_chunk", fetch["fetch"], 0)
    server["alice"].call("outputs_end", fetch["fetch"])

    as_user(server, monkeypatch, "alice")
    dest = tmp_path / "got"
    code, out, err = run(capsys, "outputs", str(job_id), "--to", str(dest))
    assert code == 0, err
    assert (dest / "result.txt").read_text() == "result\n"
    assert (dest / "sub" / "deep.txt").read_text() == "deep\n"
    names = {p.relative_to(dest).as_posix() for p in dest.rglob("*")}
    assert names == {"result.txt", "sub", "sub/deep.txt"}
    passwd = Path("/etc/passwd").read_text()
    for p in dest.rglob("*"):
        assert not p.is_symlink()
        if p.is_file():
            assert "root:" not in p.read_text() and p.read_text() != passwd
    assert "skipped passwd (symlink)" in out
    assert "control character or backslash in the name" in out  # a\tb: said, not sent
    code, _, err = run(capsys, "outputs", str(job_id), "--to", str(dest))
    one_line_error(code, err, "not empty")

    # the zip itself, as the server builds it: no link, no content from outside
    fetch = server["alice"].call("outputs_begin", job_id)
    data = b""
    while len(data) < fetch["size"]:
        data += server["alice"].call("outputs_chunk", fetch["fetch"], len(data))
    server["alice"].call("outputs_end", fetch["fetch"])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["result.txt", "sub/", "sub/deep.txt"]
        for info in zf.infolist():
            assert not stat.S_ISLNK(info.external_attr >> 16)
    assert b"root:x:0:0" not in data
    # nothing is left behind on the server
    assert not list((Path(server.settings.state_dir) / "fetch").glob("*.zip"))

    # a queued job's outputs wait for its end
    blocker = submit(capsys, good_job(jobs_dir, "alice", "block", "sleep 600"))["id"]
    wait_for(lambda: state(server, blocker) == "running", 60)
    code, _, err = run(capsys, "outputs", str(blocker))
    one_line_error(code, err, "once it has ended")
    run(capsys, "cancel", str(blocker))


# -- 4: the drop folder ------------------------------------------------------------------
def test_inbox_folders_and_misplaced_zips(server_factory: Any, capsys: Any, jobs_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    uid = os.getuid()
    server = server_factory(users={"uid_map": {"alice": uid, "bob": 54321},
                                   "allowed": ["alice", "bob", "nobodyhere"]})
    inbox = Path(server.settings.inbox_path)
    wait_for(lambda: (inbox / "alice").is_dir() and (inbox / "bob").is_dir(), 30)
    for user, owner in (("alice", uid), ("bob", 54321)):
        st = (inbox / user).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, 0o700)
    assert not (inbox / "nobodyhere").exists()
    # a zip in inbox/ itself: not taken, reported to the owner's DoPQ user
    zip_it(good_job(jobs_dir, "alice", "misplaced"), inbox / "misplaced.zip")
    as_user(server, monkeypatch, "alice")

    def reported() -> list[dict[str, Any]]:
        code, out, _ = run(capsys, "history", "--me", "--state", "failed", "--json")
        return [r for r in json.loads(out) if "inbox/ itself" in (r["error"] or "")]

    rows = wait_for(reported, 30)
    assert "drop it in inbox/alice/" in rows[0]["error"]
    assert (inbox / "misplaced.zip").exists()

"""Notifications: the messages (pure), users' targets and their authz, and real sends.

Real receivers on loopback: a JSON webhook (``http.server``) reached through
apprise's ``json://`` and an SMTP server (aiosmtpd) through ``mailto://``. The
job events come the way the server makes them: transitions in a real store,
which the notifier reads from the event log.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from dopq.client.commands import build_parser
from dopq.core import messages as msg
from dopq.core.errors import DopqError, NotAuthenticated, NotFound
from dopq.core.jobs import JobState
from dopq.core.settings import Settings
from dopq.server import authz
from dopq.server.auth import Principal, Role
from dopq.server.authz import Action
from dopq.server.notify import Notifier, Targets, apprise_send
from dopq.server.provider import job_dir
from dopq.server.store import Store

ALICE, BOB, ROOT = Principal("alice", Role.USER), Principal("bob", Role.USER), \
    Principal("root", Role.ADMIN)


# -- the messages (pure) ---------------------------------------------------------------------
def test_events_parse_and_refuse_unknown_names() -> None:
    assert msg.parse_events(None) == msg.DEFAULT_EVENTS
    assert msg.parse_events("failed, started,failed") == ("failed", "started")
    assert msg.parse_events(["idle"]) == ("idle",)
    with pytest.raises(DopqError, match="unknown notification event 'done'"):
        msg.parse_events("finished,done")


@pytest.mark.parametrize(("url", "shown"), [
    ("json://user:secret@hooks.example.com:8080/hook?token=abc", "json://hooks.example.com/…"),
    ("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ", "slack://t1jj3t3l2/…"),
    ("mailtos://me:app-password@gmail.com?to=x@y.z", "mailtos://gmail.com/…"),
    ("discord://4174216298/JHMHI8qBe7bk2ZwO5U711o3dV_js", "discord://4174216298/…"),
    ("not a url", "?://…"),
    ("json://[broken", "json://…"),
])
def test_a_masked_url_shows_scheme_and_host_only(url: str, shown: str) -> None:
    masked = msg.mask_url(url)
    assert masked == shown
    for secret in ("secret", "abc", "app-password", "JHMHI8qBe7bk2ZwO5U711o3dV_js", "TIiajk"):
        assert secret not in masked


def test_url_shape_checks() -> None:
    assert msg.check_url("  json://h/x ") == "json://h/x"
    for bad, why in (("", "empty"), ("x" * 3000, "too long"), ("json://h/\nx", "control"),
                     ("hooks.example.com", "not a notification URL")):
        with pytest.raises(DopqError, match=why):
            msg.check_url(bad)
    with pytest.raises(DopqError, match="would notify the server host itself"):
        msg.check_url("syslog://")  # the host's own log: apprise knows it, a user may not
    with pytest.raises(DopqError, match="json:// is not allowed"):
        msg.check_url("json://127.0.0.1/x", allow_schemes=["mailtos", "slack"])


@pytest.mark.parametrize(("state", "detail", "kind"), [
    ("running", "gpus 0,1", "started"), ("running", "", None),
    ("running", "idle: GPUs at 0% for 30m", "idle"),
    ("running", "7.0 GiB of GPU memory, declared 4.0", None),
    ("succeeded", "", "finished"), ("failed", "exit code 1", "failed"),
    ("cancelled", "by alice", "cancelled"), ("queued", "preempted by job 9 of bob", "preempted"),
    ("queued", "", None), ("received", "api", None),
])
def test_event_log_rows_map_to_job_events(state: str, detail: str, kind: str | None) -> None:
    assert msg.event_kind(state, detail) == kind


def test_a_job_message_says_what_how_how_long_and_the_last_lines() -> None:
    row = {"id": 12, "name": "train", "user": "alice", "state": "failed", "exit_code": 3,
           "error": "exit code 3", "submitted_at": 1000.0, "started_at": 1090.0,
           "finished_at": 1090.0 + 3725, "gpus": [0, 1]}
    title, body = msg.job_message(row, "failed", 9999.0, "gpu1", ["epoch 9", "boom"])
    assert title == "[gpu1] job 12 (train) of alice: failed"
    for part in ("state: failed, exit code 3", "reason: exit code 3", "waited: 1m30s",
                 "ran: 1h02m", "gpus: 0,1", "last 2 log lines:", "boom"):
        assert part in body
    _, queued = msg.job_message({**row, "started_at": None, "finished_at": None},
                                "cancelled", 1042.0, "gpu1")
    assert "waited: 42s (never started)" in queued and "ran:" not in queued
    assert msg.tail_lines(b"a\r\nb\n\nc\n\n", 2) == ["", "c"]
    assert msg.tail_lines(b"x" * 900, 1, width=10) == ["x" * 10]


# -- targets: the store and who may see or change them -----------------------------------------
@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(state_dir=str(tmp_path / "state"))
    s.notify.retries = 2
    return s


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    settings.state_path.mkdir(parents=True, exist_ok=True)
    st = Store(settings.db_path)
    yield st
    st.close()


def test_targets_are_their_owners_and_admins(settings: Settings, store: Store) -> None:
    targets = Targets(settings, store)
    mine = targets.add(ALICE, "json://alice:s3cret@hooks.example.com/a", "finished,failed")
    assert mine["events"] == ["finished", "failed"]
    targets.add(BOB, "json://bob:other@hooks.example.com/b")
    assert [t["url"] for t in targets.visible(ALICE)] == ["json://alice:s3cret@hooks.example.com/a"]
    assert [t["user"] for t in targets.visible(ROOT)] == ["alice", "bob"]  # admins: everyone's
    assert "s3cret" in targets.visible(ROOT)[0]["url"]  # in full: the admin may
    # Bob can neither see nor remove Alice's target; to him it does not exist.
    assert all(t["user"] == "bob" for t in targets.visible(BOB))
    with pytest.raises(NotFound, match=f"no notification target {mine['id']} of yours"):
        targets.remove(BOB, mine["id"])
    assert len(targets.visible(ROOT)) == 2
    assert targets.remove(ALICE, mine["id"]) == {"removed": mine["id"]}
    with pytest.raises(NotFound):
        targets.remove(ALICE, mine["id"])
    assert authz.refusal(BOB, Action.NOTIFY, "alice", job=3) == \
        "notification target 3 belongs to alice"
    with pytest.raises(NotAuthenticated):
        authz.require(None, Action.NOTIFY)


def test_bad_urls_and_too_many_are_refused_in_one_line(settings: Settings, store: Store) -> None:
    targets = Targets(settings, store)
    with pytest.raises(DopqError, match=r"apprise does not understand .*nosuch://host/…"):
        targets.add(ALICE, "nosuch://host/x?password=hunter2")
    with pytest.raises(DopqError, match="unknown notification event"):
        targets.add(ALICE, "json://h/x", "finished,exploded")
    for i in range(msg.MAX_TARGETS):
        targets.add(ALICE, f"json://hooks.example.com/{i}")
    with pytest.raises(DopqError, match="at most 10"):
        targets.add(ALICE, "json://hooks.example.com/one-more")
    settings.notify.allow_schemes = ["mailtos"]
    with pytest.raises(DopqError, match="not allowed on this server"):
        targets.add(BOB, "json://127.0.0.1:8080/admin")


def test_notify_is_a_cli_command() -> None:
    parser = build_parser()
    assert "notify" in parser.format_help()
    args = parser.parse_args(["notify", "add", "json://h/x", "--on", "failed,idle"])
    assert (args.action, args.arg, args.on) == ("add", "json://h/x", "failed,idle")


# -- real sends ------------------------------------------------------------------------------
class Receiver(HTTPServer):
    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.got.append(json.loads(data))
                outer.arrived.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()
    t.join(timeout=5)


def _ended_job(settings: Settings, store: Store, user: str = "alice") -> int:
    job = store.add_job(name="train", user=user, origin="api", state=JobState.QUEUED,
                        submitted_at=time.time() - 65)
    store.transition(job, JobState.RUNNING, detail="gpus 0", gpus=[0], started_at=time.time() - 5)
    folder = job_dir(settings, job)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.log").write_bytes(b"".join(b"line %d\n" % i for i in range(50)))
    store.transition(job, JobState.FAILED, detail="exit code 2", exit_code=2, error="exit code 2")
    return job


def _until(cond: Any, notifier: Notifier, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        notifier.step(wait=0.1)


def test_a_finished_job_reaches_a_json_webhook(settings: Settings, store: Store,
                                               receiver: Receiver) -> None:
    port = receiver.server_address[1]
    settings.notify.log_lines = 3
    Targets(settings, store).add(ALICE, f"json://127.0.0.1:{port}/hook", "failed")
    Targets(settings, store).add(BOB, f"json://127.0.0.1:{port}/bob", "failed")
    notifier = Notifier(settings, store)
    job = _ended_job(settings, store)
    _until(lambda: receiver.got, notifier)
    notifier.step(wait=0.2)
    assert len(receiver.got) == 1  # Alice's only: Bob's targets hear Bob's jobs
    body = receiver.got[0]["message"]
    assert receiver.got[0]["title"].endswith(f"job {job} (train) of alice: failed")
    assert "state: failed, exit code 2" in body and "waited: 1m00s" in body
    assert body.endswith("last 3 log lines:\nline 47\nline 48\nline 49")
    assert notifier.sent == 1


def test_a_mail_reaches_a_local_smtp_server(settings: Settings, store: Store) -> None:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    mails: list[Any] = []

    class Keep(Message):
        def handle_message(self, message: Any) -> None:
            mails.append(message)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    smtp = Controller(Keep(), hostname="127.0.0.1", port=port)
    smtp.start()
    try:
        url = (f"mailto://dopq@localhost:{port}?smtp=127.0.0.1&mode=insecure"
               "&from=dopq@localhost&to=alice@example.org")
        Targets(settings, store).add(ALICE, url, "failed")
        notifier = Notifier(settings, store)
        job = _ended_job(settings, store)
        _until(lambda: mails, notifier)
    finally:
        smtp.stop()
    assert f"job {job} (train) of alice: failed" in mails[0]["Subject"]
    assert mails[0]["To"] == "alice@example.org"
    texts = [p.get_payload(decode=True).decode() for p in mails[0].walk()
             if p.get_content_type() == "text/plain"]
    assert any("line 49" in t for t in texts)


def test_a_dead_receiver_is_retried_and_stops_nothing(settings: Settings, store: Store,
                                                      receiver: Receiver) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    tries: list[str] = []

    def send(url: str, title: str, body: str) -> bool:
        tries.append(url)
        return apprise_send(url, title, body)

    settings.notify.urls = [f"json://127.0.0.1:{dead}/x", f"json://127.0.0.1:"
                            f"{receiver.server_address[1]}/admin"]
    notifier = Notifier(settings, store, send=send, backoff=0.01)
    notifier.start()
    try:
        notifier.server_event("engine-down", "the Docker engine does not answer")
        assert receiver.arrived.wait(20)
        deadline = time.monotonic() + 10
        while notifier.sent < 1 and time.monotonic() < deadline:  # counted after the reply
            time.sleep(0.05)
        assert tries.count(settings.notify.urls[0]) == 3  # once and retries = 2 more
        assert notifier.failed == 1 and notifier.sent == 1 and notifier.is_alive()
        assert "engine does not answer" in receiver.got[0]["message"]
        # A send that raises is caught too; the thread goes on.
        notifier.send = lambda *a: 1 / 0  # type: ignore[assignment,misc,return-value]
        notifier.server_event("disk-low", "1 GiB free")
        deadline = time.monotonic() + 10
        while notifier.failed < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert notifier.failed == 3 and notifier.is_alive()
    finally:
        notifier.stop()
        notifier.join(timeout=10)


def test_disk_low_is_told_once(settings: Settings, store: Store) -> None:
    settings.notify.disk_low = "1000000t"  # more than any disk: low at once
    notifier = Notifier(settings, store)
    notifier.check_disk(100.0)
    notifier.check_disk(100.0 + 3600)
    assert notifier._queue.qsize() == 1
    settings.notify.disk_low = "0"
    Notifier(settings, store).check_disk(0.0)


# -- end to end: the real server, Docker and the API -------------------------------------------
@pytest.mark.docker
def test_a_real_jobs_start_and_failure_reach_its_owner_only(
        server: Any, jobs_dir: Path, receiver: Receiver, capsys: Any,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from conftest import cli_login, run_cli, wait_for
    from hostile import good_job

    port = receiver.server_address[1]
    alice, bob, root = server["alice"], server["bob"], server["root"]
    mine = alice.call("notify_add", f"json://alice:hook-secret@127.0.0.1:{port}/a",
                      ["started", "failed"])
    assert [t["id"] for t in bob.call("notify_list")] == []
    assert "hook-secret" in root.call("notify_list")[0]["url"]  # admins see them whole
    with pytest.raises(DopqError, match="no notification target"):
        bob.call("notify_remove", mine["id"])
    with pytest.raises(DopqError, match="apprise does not understand"):
        bob.call("notify_add", "nosuch://x/y")
    script = 'for i in 1 2 3 4 5; do echo "step $i"; done; exit 3'
    job = alice.submit(good_job(jobs_dir, "alice", "noisy", script))["id"]
    bob.submit(good_job(jobs_dir, "bob", "quiet", "exit 1"))  # Bob has no targets
    assert server.wait_job(job, 90)["state"] == "failed"
    wait_for(lambda: len(receiver.got) >= 2, 30)
    titles = [m["title"] for m in receiver.got]
    assert any(t.endswith(f"job {job} (noisy) of alice: started") for t in titles)
    failed = next(m["message"] for m in receiver.got if m["title"].endswith(": failed"))
    assert "state: failed, exit code 3" in failed and failed.endswith("step 4\nstep 5")
    cli_login(server, monkeypatch, tmp_path)
    code, out, _ = run_cli(capsys, "notify", "list")
    assert code == 0 and f"127.0.0.1:{port}/a" in out
    assert run_cli(capsys, "notify", "remove", str(mine["id"]))[0] == 0
    assert alice.call("notify_list") == []


def test_start_idle_and_preemption_are_heard_from_the_event_log(settings: Settings,
                                                                 store: Store) -> None:
    sent: list[tuple[str, str, str]] = []
    Targets(settings, store).add(ALICE, "json://hooks.example.com/a", "started,idle,preempted")

    def send(url: str, title: str, body: str) -> bool:
        sent.append((url, title, body))
        return True

    notifier = Notifier(settings, store, send=send)
    job = store.add_job(name="long", user="alice", origin="api", state=JobState.QUEUED,
                        submitted_at=time.time())
    job_dir(settings, job).mkdir(parents=True)
    (job_dir(settings, job) / "build.log").write_text("Step 1/2 : FROM busybox\n")
    store.transition(job, JobState.RUNNING, detail="gpus 1", gpus=[1], started_at=time.time())
    store.note_event(job, "7.0 GiB of GPU memory, declared 4.0 GiB")  # not an event of theirs
    store.note_event(job, "idle: GPUs at 0% for 30m")
    store.transition(job, JobState.QUEUED, expect=[JobState.RUNNING],
                     detail="preempted by job 9 of bob", error="preempted by job 9 of bob")
    store.transition(job, JobState.RUNNING, detail="gpus 0", gpus=[0], started_at=time.time())
    _until(lambda: len(sent) >= 4, notifier)
    assert [t.rsplit(": ", 1)[1] for _, t, _ in sent] == ["started", "idle", "preempted",
                                                          "started"]
    assert "reason: preempted by job 9 of bob" in sent[2][2]
    assert "log lines" not in sent[1][2]  # no run log yet, and the build log is not its run

"""Walls around sign-in, names and the queue limit, each tried as the attack.

- Sign-in (issue 10, item 10): failures from one address (all local users
  share 127.0.0.1) lock nobody else out; a guessed-at user is locked per
  (user, address) and, with a higher threshold, per user; an address is only
  slowed down; password hashing is capped, and a locked attempt hashes nothing.
- Names (item 12): control characters in a job name are refused at intake
  (``--name``, ``container_config.json``), a name taken from an inbox file is
  cleaned, and names already stored are escaped by the CLI and the GUI.
- The per-user queue limit (item 11, part): parallel uploads, arrays and the
  drop folder cannot get past ``policy.max_queued_per_user``.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # the GUI model test, as test_gui.py

import json  # noqa: E402
import shutil
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import Pyro5.api
import pytest
from conftest import PASSWORDS, Running, wait_for
from hostile import good_job, zip_it

from dopq.client import commands as cli
from dopq.core import settings as settings_mod
from dopq.core.errors import JobRejected, LimitExceeded, NotAuthenticated, RateLimited
from dopq.core.jobs import WAITING_STATES
from dopq.core.text import check_display_text, printable, safe_name
from dopq.server import auth
from dopq.server.api import Controller
from dopq.server.auth import Role, SignInGuard, SignInLimits, Users
from dopq.server.limits import QueueSlots, add_job_within, check_room
from dopq.server.provider import job_dir
from dopq.server.store import Store

docker = pytest.mark.docker

EVIL = "x\x1b]0;pwned\x07\x1b[2Jy"
BAD_NAMES = [EVIL, "abc\u202eevil", "abc\x9bcsi", "abc\x7fdel", "abc\u2066iso", "abc\u200bzw",
             "ab\nc", "abc\u2028sep"]


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip() and "\n" not in message and "\x1b" not in message, repr(message)
    return message


# == sign-in ================================================================================
@pytest.fixture
def users_store(tmp_path: Path) -> Iterator[Users]:
    store = Store(tmp_path / "dopq.sqlite3")
    users = Users(store)
    for name in ("alice", "bob"):
        users.add(name, PASSWORDS[name])
    users.add("root", PASSWORDS["root"], Role.ADMIN)
    yield users
    store.close()


def controller(users: Users, tmp_path: Path, **user_settings: Any) -> Controller:
    """A Controller on a stand-in platform: the store and the settings are real."""
    settings = settings_mod.from_dict({"state_dir": str(tmp_path / "state"),
                                       "users": user_settings})
    platform = types.SimpleNamespace(settings=settings, users=users, closing=False)
    return Controller(platform)  # type: ignore[arg-type]


def login_from(ctl: Controller, address: str, user: str, password: str) -> dict[str, Any]:
    Pyro5.api.current_context.client_sock_addr = (address, 40000)
    try:
        result: dict[str, Any] = ctl.login(user, password)
        return result
    finally:
        Pyro5.api.current_context.client_sock_addr = None


class HashCounter:
    """Wraps ``auth.verify_password``: how many ran, and how many at once at most."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None,
                 hold: float = 0.0) -> None:
        self.calls = 0
        self.now = 0
        self.peak = 0
        self.gate = gate
        self.hold = hold
        self._lock = threading.Lock()
        self._real = auth.verify_password
        monkeypatch.setattr(auth, "verify_password", self)

    def __call__(self, password: str, stored: str) -> bool:
        with self._lock:
            self.calls += 1
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            if self.gate is not None:
                self.gate.wait(10)
            elif self.hold:
                time.sleep(self.hold)  # stands for a slow hash; nothing is synchronised by it
            return bool(self._real(password, stored))
        finally:
            with self._lock:
                self.now -= 1


def test_an_attacker_at_127_0_0_1_locks_out_nobody_else(
    users_store: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctl = controller(users_store, tmp_path, login_attempts=5, login_user_attempts=30,
                     login_max_delay=0.05)
    hashes = HashCounter(monkeypatch)
    local = "127.0.0.1"
    # The attack: 20 failures under made-up names, then 20 at alice, from 127.0.0.1.
    for i in range(20):
        with pytest.raises(NotAuthenticated):
            login_from(ctl, local, f"ghost{i}", "guess-pw-1")
    assert hashes.calls == 20  # unknown names cost a hash as known ones do
    refused = 0
    for _ in range(20):
        try:
            login_from(ctl, local, "alice", "guess-pw-2")
        except RateLimited as exc:
            refused += 1
            assert "try again in" in one_line(exc)
        except NotAuthenticated:
            pass
    assert refused == 15  # five guesses at alice from this address, then locked
    assert hashes.calls == 25  # a locked attempt is refused before any hashing
    # bob, at the same address, signs in at once (slowed down by at most the cap).
    t0 = time.monotonic()
    assert login_from(ctl, local, "bob", PASSWORDS["bob"])["user"] == "bob"
    assert time.monotonic() - t0 < 5
    assert login_from(ctl, local, "root", PASSWORDS["root"])["role"] == "admin"
    # alice herself from 127.0.0.1: locked (the pair is under attack); from another
    # address she signs in: the user lock needs many more failures (30).
    with pytest.raises(RateLimited):
        login_from(ctl, local, "alice", PASSWORDS["alice"])
    assert login_from(ctl, "10.0.0.7", "alice", PASSWORDS["alice"])["user"] == "alice"


def test_guesses_spread_over_addresses_lock_the_user(
    users_store: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctl = controller(users_store, tmp_path, login_attempts=3, login_user_attempts=6,
                     login_max_delay=0.0)
    hashes = HashCounter(monkeypatch)
    for i in range(6):
        with pytest.raises(NotAuthenticated):
            login_from(ctl, f"10.0.1.{i}", "alice", "guess-pw")
    for address in ("10.0.2.1", "127.0.0.1"):
        with pytest.raises(RateLimited):
            login_from(ctl, address, "alice", PASSWORDS["alice"])
    assert hashes.calls == 6
    assert login_from(ctl, "10.0.1.0", "bob", PASSWORDS["bob"])["user"] == "bob"


def test_an_address_is_slowed_down_never_locked_and_waits_hold_no_lock() -> None:
    slept: list[float] = []
    limits = SignInLimits(pair_attempts=3, user_attempts=100, window=60, max_delay=2.0)
    guard = SignInGuard(limits, clock=lambda: 1000.0, sleep=slept.append)

    def wrong() -> auth.Principal:
        raise NotAuthenticated("wrong user name or password")

    for i in range(12):
        with pytest.raises(NotAuthenticated):
            guard.sign_in(f"ghost{i}", "127.0.0.1", wrong)
    assert slept == sorted(slept) and slept[-1] == 2.0  # increasing, capped
    assert len(slept) == 12 - 3
    ok = auth.Principal("bob", Role.USER)
    assert guard.sign_in("bob", "127.0.0.1", lambda: ok) == ok  # slowed, not refused
    assert guard.sign_in("bob", "10.9.9.9", lambda: ok) == ok
    assert len(slept) == 10  # another address does not wait

    # A waiting caller holds no lock: while one sleeps, others sign in.
    entered, release = threading.Event(), threading.Event()

    def blocking_sleep(_: float) -> None:
        entered.set()
        release.wait(10)

    guard2 = SignInGuard(limits, sleep=blocking_sleep)
    for i in range(4):
        with pytest.raises(NotAuthenticated):
            guard2.sign_in(f"ghost{i}", "10.0.0.1", wrong)
    entered.clear()
    slow = threading.Thread(target=lambda: guard2.sign_in("bob", "10.0.0.1", lambda: ok))
    slow.start()
    try:
        assert entered.wait(10)
        assert guard2.sign_in("alice", "10.0.0.2", lambda: ok) == ok
    finally:
        release.set()
        slow.join(10)


def test_failure_counters_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "SWEEP_KEYS", 50)
    now = [0.0]
    guard = SignInGuard(SignInLimits(window=60, max_delay=0.0), clock=lambda: now[0])

    def wrong() -> auth.Principal:
        raise NotAuthenticated("wrong user name or password")

    for i in range(200):  # made-up names from many addresses
        with pytest.raises(NotAuthenticated):
            guard.sign_in(f"ghost{i}", f"10.4.{i // 250}.{i % 250}", wrong)
    now[0] = 1000.0  # the window has passed: the next attempt sweeps
    with pytest.raises(NotAuthenticated):
        guard.sign_in("ghost", "10.5.0.1", wrong)
    assert len(guard._pairs) + len(guard._users) + len(guard._addrs) <= 3


def test_concurrent_hashing_is_capped(
    users_store: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctl = controller(users_store, tmp_path, login_concurrency=2, login_busy_wait=60.0,
                     login_max_delay=0.0)
    hashes = HashCounter(monkeypatch, hold=0.05)
    outcomes: list[str] = []
    start = threading.Barrier(12)

    def attack(i: int) -> None:
        start.wait(10)
        try:
            login_from(ctl, f"10.1.0.{i}", f"nobody{i}", "whatever-pw")
        except NotAuthenticated:
            outcomes.append("refused")

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcomes == ["refused"] * 12
    assert hashes.calls == 12 and hashes.peak <= 2


def test_a_sign_in_beyond_the_hashing_cap_gets_server_busy(
    users_store: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctl = controller(users_store, tmp_path, login_concurrency=1, login_busy_wait=0.3,
                     login_max_delay=0.0)
    gate = threading.Event()
    hashes = HashCounter(monkeypatch, gate=gate)
    first = threading.Thread(target=lambda: pytest.raises(
        NotAuthenticated, login_from, ctl, "10.2.0.1", "nobody", "pw-123456"))
    first.start()
    try:
        wait_for(lambda: hashes.now == 1, 10)
        with pytest.raises(RateLimited) as info:
            login_from(ctl, "10.2.0.2", "bob", PASSWORDS["bob"])
        assert one_line(info.value) == "server busy with other sign-ins; try again in a moment"
    finally:
        gate.set()
        first.join(10)
    assert login_from(ctl, "10.2.0.2", "bob", PASSWORDS["bob"])["user"] == "bob"


def test_parallel_guesses_cannot_overshoot_the_limit(
    users_store: Users, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctl = controller(users_store, tmp_path, login_attempts=3, login_concurrency=50,
                     login_max_delay=0.0)
    gate = threading.Event()
    hashes = HashCounter(monkeypatch, gate=gate)
    results: list[str] = []
    lock = threading.Lock()

    def guess() -> None:
        try:
            login_from(ctl, "10.3.0.1", "alice", "guess-pw")
        except RateLimited:
            with lock:
                results.append("locked")
        except NotAuthenticated:
            with lock:
                results.append("wrong")

    threads = [threading.Thread(target=guess) for _ in range(20)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) == 17, 10)  # all but three refused while three hash
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(results) == ["locked"] * 17 + ["wrong"] * 3
    assert hashes.calls == 3


# == names ==================================================================================
def test_display_text_checks_and_escapes() -> None:
    for bad in BAD_NAMES:
        with pytest.raises(JobRejected) as info:
            check_display_text(bad, "--name")
        assert "control character \\" in one_line(info.value)
        shown = printable(bad)
        assert shown.isprintable() and "\\" in shown
    assert printable(EVIL) == "x\\x1b]0;pwned\\x07\\x1b[2Jy"
    assert printable("abc\u202eevil") == "abc\\u202eevil"
    assert check_display_text("ünïcödé ok 名前") == "ünïcödé ok 名前"
    assert printable("plain") == "plain" and printable(42) == "42"
    assert safe_name("evil\x1b[2J") == "evil_[2J" and safe_name("\x07") == "_"
    assert safe_name("  ") == "job"


def job_names(store: Store) -> list[str]:
    return [r["name"] for r in store.read("SELECT name FROM jobs")]


@docker
def test_control_characters_in_a_name_are_refused_before_anything_is_stored(
    server_factory: Callable[..., Running], jobs_dir: Path,
) -> None:
    server = server_factory()
    store = server.server.platform.store
    alice = server["alice"]
    folder = good_job(jobs_dir, "alice", "fine")
    uploads = server.settings.state_path / "uploads"
    for bad in BAD_NAMES:
        with pytest.raises(JobRejected) as info:
            alice.submit(folder, {"name": bad})
        assert one_line(info.value).startswith("rejected: --name: control character")
    assert job_names(store) == [] and not list(uploads.iterdir())
    # In container_config.json: refused at submit, by the client and (without its
    # checks) by the server, in one line; nothing stored.
    viaconfig = good_job(jobs_dir, "alice", "viaconfig", config={"name": EVIL})
    for precheck in (True, False):
        with pytest.raises(JobRejected) as info:
            alice.submit(zip_it(viaconfig), precheck=precheck)
        assert one_line(info.value).startswith("rejected: name: control character \\x1b")
    assert job_names(store) == [] and not list(uploads.iterdir())
    # Dropped in the inbox: the job fails with a one-line reason, and no stored
    # name or error holds the character.
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    shutil.copy(zip_it(viaconfig), inbox / "viaconfig.zip")
    done = wait_for(lambda: (server["root"].call("history") or [None])[0], 30)
    assert done["state"] == "failed"
    assert one_line(Exception(done["error"])).startswith("rejected: name: control character \\x1b")
    rows = store.read("SELECT name, error FROM jobs")
    events = store.read("SELECT detail FROM events")
    for text in [*(r["name"] or "" for r in rows), *(r["error"] or "" for r in rows),
                 *(e["detail"] for e in events)]:
        assert printable(text) == text, repr(text)


@docker
def test_a_name_from_an_inbox_file_is_cleaned(
    server_factory: Callable[..., Running], jobs_dir: Path,
) -> None:
    server = server_factory()
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    # A config the intake refuses, so the job keeps the name made from the file name.
    folder = good_job(jobs_dir, "alice", "noname")
    config = folder / "container_config.json"
    spec = json.loads(config.read_text())
    del spec["name"]
    config.write_text(json.dumps(spec))
    shutil.copy(zip_it(folder), inbox / "evil\x1b[2J\u202e.zip")
    job = wait_for(lambda: server["root"].call("history"), 30)[0]
    assert job["state"] == "failed" and job["name"] == "evil_[2J_"


@pytest.fixture
def old_rows(server_factory: Callable[..., Running]) -> Running:
    """A server whose store holds rows written before names were checked."""
    server = server_factory(users={"logs_visible_to_all": True})
    store = server.server.platform.store
    now = time.time()
    failed = store.add_job(name=EVIL, user="alice", origin="api", state="failed",
                           error=f"build failed: {EVIL}", submitted_at=now - 5, finished_at=now)
    log_dir = job_dir(server.settings, failed)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "run.log").write_text(f"line one\n{EVIL}\tend\n")
    store.add_job(name="abc\u202eevil", user="alice", origin="api", state="queued",
                  held=True, submitted_at=now)  # held: stays in the queue
    server.server.platform._wrote(auth.Principal("alice", Role.USER))
    return server


@docker
def test_another_users_listings_never_print_raw_control_characters(
    old_rows: Running, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    server = old_rows
    ns = server.settings.nameserver
    monkeypatch.setenv("DOPQ_NS_PORT", str(ns.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setenv("DOPQ_TOKEN", server["bob"].token)
    failed_id = server["bob"].call("history")[0]["id"]
    for argv in (["history"], ["queue"], ["show", str(failed_id)], ["wait", str(failed_id)],
                 ["logs", str(failed_id)]):
        cli.main(argv)
        out = capsys.readouterr()
        text = out.out + out.err
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, argv
        assert "\\x1b" in text or "\\u202e" in text, (argv, text)
    assert cli.main(["history", "--json"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and EVIL in {r["name"] for r in json.loads(out)}  # JSON escapes


def test_gui_models_show_stored_control_characters_escaped(qtbot: Any) -> None:
    pytest.importorskip("PySide6.QtWidgets")
    from PySide6.QtCore import Qt

    from dopq.client.gui.models import FinishedModel, QueuedModel, RunningModel

    row = {"id": 1, "name": EVIL, "user": "alice", "state": "failed", "num_gpus": 0,
           "gpus": [], "exit_code": None, "error": f"build failed: {EVIL}",
           "submitted_at": None, "started_at": None, "finished_at": None, "wait_s": None,
           "run_s": None, "time_limit": None, "priority": 0, "nice": 0, "held": False,
           "array_index": None, "reason": "abc\u202eevil", "priority_value": None,
           "cpu_percent": None, "memory_bytes": None, "gpu_samples": []}
    for model_cls in (FinishedModel, QueuedModel, RunningModel):
        model = model_cls()
        model.apply([row])
        texts = [model.data(model.index(0, c), role)
                 for c in range(model.columnCount())
                 for role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole)]
        shown = [t for t in texts if isinstance(t, str)]
        assert any("\\x1b" in t for t in shown), model_cls
        for t in shown:
            assert printable(t) == t, (model_cls, t)


# == the per-user queue limit ==============================================================
@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "dopq.sqlite3")
    yield s
    s.close()


def test_reservations_give_exactly_the_limit_to_parallel_uploads(store: Store) -> None:
    slots = QueueSlots(store, 3)
    got: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(6)

    def begin(i: int) -> None:
        start.wait(10)
        try:
            slots.reserve(f"u{i}", "alice", 1)
            got.append(f"u{i}")
        except LimitExceeded as exc:
            refused.append(one_line(exc))

    threads = [threading.Thread(target=begin, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 3 and len(refused) == 3
    assert refused[0] == ("queue limit: alice may have 3 jobs waiting, 0 slots left;"
                          " a job does not fit")
    slots.reserve("bob1", "bob", 3)  # per user
    slots.release("bob1")
    for key in got:
        slots.add_job(key, {"name": "job", "user": "alice", "origin": "api"}, 1)
    assert len(slots) == 0
    with pytest.raises(LimitExceeded):
        slots.reserve("u9", "alice", 1)  # now the jobs themselves hold the slots


def test_arrays_and_the_drop_folder_count_against_the_limit(store: Store) -> None:
    slots = QueueSlots(store, 3)
    with pytest.raises(LimitExceeded) as info:
        slots.reserve("a", "alice", 20)
    assert one_line(info.value) == ("queue limit: alice may have 3 jobs waiting, 3 slots left;"
                                    " an array of 20 jobs does not fit")
    slots.reserve("a", "alice", 2)
    # An upload in flight holds its slots; a drop-folder job (the Provider's process
    # sees no reservations) takes the last one from the table...
    job_id = slots.add_job("a", {"name": "arr", "user": "alice", "origin": "api",
                                 "overrides": {"array": "0-1"}}, 2)
    add_job_within(store, 3, {"name": "drop", "user": "alice", "origin": "inbox"})
    with pytest.raises(LimitExceeded):
        add_job_within(store, 3, {"name": "drop2", "user": "alice", "origin": "inbox"})
    # ...and an array counts its elements until it is expanded.
    with store.transaction() as db:
        with pytest.raises(LimitExceeded):
            check_room(db, "alice", 3, 1)
        check_room(db, "alice", 3, 2, exclude=job_id)  # its own expansion fits
        with pytest.raises(LimitExceeded):
            check_room(db, "alice", 3, 3, exclude=job_id)
    slots.reserve("b", "bob", 1)
    slots.reserve("c", "bob", 1)
    for _ in range(2):
        add_job_within(store, 3, {"name": "drop", "user": "bob", "origin": "inbox"})
    with pytest.raises(LimitExceeded):  # the upload lost its slot to the drop: refused at finish
        slots.add_job("c", {"name": "late", "user": "bob", "origin": "api"}, 1)
    assert len(slots) == 1
    slots.release("b")
    assert len(slots) == 0
    assert QueueSlots(store, 0).add_job("x", {"name": "n", "user": "alice", "origin": "api"}, 50)


def hold_provider(server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep uploaded jobs in 'received': the Provider is not told about them."""
    monkeypatch.setattr(server.server.platform, "_send", lambda cmd: None)


def waiting(store: Store, user: str) -> int:
    return len(store.jobs(WAITING_STATES, user=user, light=True))


@docker
def test_six_parallel_uploads_against_a_limit_of_three(
    server_factory: Callable[..., Running], jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = server_factory(policy={"max_queued_per_user": 3})
    hold_provider(server, monkeypatch)
    archive = zip_it(good_job(jobs_dir, "alice", "par"))
    clients = [server.client("alice") for _ in range(6)]
    accepted: list[int] = []
    refused: list[str] = []
    start = threading.Barrier(6)

    def upload(c: Any) -> None:
        start.wait(30)
        try:
            accepted.append(c.submit(archive)["id"])
        except LimitExceeded as exc:
            refused.append(one_line(exc))

    threads = [threading.Thread(target=upload, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) == 3 and len(refused) == 3, (accepted, refused)
    assert all(r.startswith("queue limit: alice may have 3 jobs waiting") for r in refused)
    store = server.server.platform.store
    assert waiting(store, "alice") == 3
    assert len(server.server.platform.slots) == 0
    assert not list((server.settings.state_path / "uploads").iterdir())
    # bob has slots of his own.
    assert server["bob"].submit(zip_it(good_job(jobs_dir, "bob", "bobs")))["id"]


@docker
def test_an_array_beyond_the_free_slots_is_refused_whole(
    server_factory: Callable[..., Running], jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = server_factory(policy={"max_queued_per_user": 3})
    hold_provider(server, monkeypatch)
    alice = server["alice"]
    archive = zip_it(good_job(jobs_dir, "alice", "arr"))
    store = server.server.platform.store
    with pytest.raises(LimitExceeded) as info:
        alice.submit(archive, {"array": "0-19"})
    assert one_line(info.value) == ("queue limit: alice may have 3 jobs waiting, 3 slots left;"
                                    " an array of 20 jobs does not fit")
    assert waiting(store, "alice") == 0
    alice.submit(archive, {"array": "0-1"})
    with pytest.raises(LimitExceeded, match="1 slot left; an array of 2 jobs"):
        alice.submit(archive, {"array": "0,5"})
    # An upload begun holds its slot; aborted, it gives it back.
    upload = alice.call("submit_begin", archive.stat().st_size, {})
    with pytest.raises(LimitExceeded, match="0 slots left"):
        alice.submit(archive)
    alice.call("submit_abort", upload)
    alice.submit(archive)
    with pytest.raises(LimitExceeded, match="0 slots left"):
        alice.submit(archive)
    assert waiting(store, "alice") == 2  # the array's row counts two slots until expanded
    assert len(server.server.platform.slots) == 0


@docker
def test_drop_folder_zips_beyond_the_limit_are_refused(
    server_factory: Callable[..., Running], jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = server_factory(policy={"max_queued_per_user": 2})
    hold_provider(server, monkeypatch)
    alice = server["alice"]
    archive = zip_it(good_job(jobs_dir, "alice", "drop"))
    for _ in range(2):
        alice.submit(archive)
    inbox = server.settings.inbox_path / "alice"
    inbox.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        shutil.copy(archive, inbox / f"extra{i}.zip")
    history = wait_for(lambda: (lambda h: h if len(h) == 2 else None)(
        server["root"].call("history")), 30)
    for job in history:
        assert job["state"] == "failed"
        assert one_line(Exception(job["error"])).startswith(
            "rejected: queue limit: alice may have 2 jobs waiting, 0 slots left")
    assert waiting(server.server.platform.store, "alice") == 2
    rejected = server.settings.state_path / "rejected"
    assert len(list(rejected.iterdir())) == 2 and not list(inbox.iterdir())

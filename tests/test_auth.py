"""Sign-in and the admin commands: tokens, rate limits, passwords, ``dopq user``,
the drop folder owner check, batch edits, hold/release/top, clear-history,
clear-status, the audit log and shutdown.

The authorisation matrix (every method x every kind of caller) is in
``test_auth_matrix.py``; these tests follow one behaviour each, end to end.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import pwd
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import Pyro5.api
import pytest
from conftest import PASSWORDS, Running, wait_for, write_toml
from hostile import good_job, zip_it

from dopq import cli
from dopq.client.remote import Client
from dopq.core.errors import (
    Conflict,
    DopqError,
    Forbidden,
    JobRejected,
    NotAuthenticated,
    NotFound,
    RateLimited,
    ServerUnavailable,
)
from dopq.server import auth
from dopq.server.api import Controller
from dopq.server.auth import (
    Principal,
    RateLimiter,
    Role,
    Users,
    hash_password,
    verify_password,
)
from dopq.server.store import Store

docker = pytest.mark.docker


def with_token(server: Running, token: str) -> Client:
    ns = server.settings.nameserver
    return Client(ns.host, ns.port, server.settings.server_name, token=token)


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message.strip() and "\n" not in message, repr(message)
    return message


def tables(store: Store, *names: str) -> dict[str, list[tuple[Any, ...]]]:
    return {t: [tuple(r) for r in store.read(f"SELECT * FROM {t} ORDER BY rowid")]
            for t in names}


def wait_state(client: Client, job_id: int, state: str, timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = client.call("job", job_id)
        return job if job["state"] == state else None

    found: dict[str, Any] = wait_for(reached, timeout)
    return found


def queue_entry(client: Client, job_id: int) -> dict[str, Any] | None:
    return next((q for q in client.call("queue") if q["id"] == job_id), None)


# -- passwords ---------------------------------------------------------------------------
def test_passwords_are_salted_scrypt_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second  # a fresh salt each time
    for stored in (first, second):
        kind, n, r, p, salt, digest = stored.split("$")
        assert (kind, n, r, p) == ("scrypt", "16384", "8", "1")
        assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
        assert "correct horse" not in stored
        assert verify_password("correct horse", stored)
    for wrong in ("correct horsE", "correct horse ", ""):
        assert not verify_password(wrong, first)
    for broken in ("", "plain", first.replace("scrypt$", "bcrypt$"), "scrypt$x$8$1$AA==$AA==",
                   first.rsplit("$", 1)[0]):
        assert not verify_password("correct horse", broken)
    # The digests are compared with hmac.compare_digest (constant time).
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert verify_password("correct horse", first) and not verify_password("x", first)
    assert len(seen) == 2 and seen[0][0] == seen[0][1] and seen[1][0] != seen[1][1]


def test_the_store_keeps_only_password_hashes(tmp_path: Path) -> None:
    store = Store(tmp_path / "dopq.sqlite3")
    users = Users(store)
    users.add("alice", "alicepass1")
    row = users.get("alice")
    assert row is not None and row["pw_hash"].startswith("scrypt$")
    assert "alicepass1" not in row["pw_hash"]
    assert users.authenticate("ALICE", "alicepass1") == Principal("alice", Role.USER)
    for name, pw in (("alice", "alicepass2"), ("nobody", "alicepass1")):
        with pytest.raises(NotAuthenticated) as info:
            users.authenticate(name, pw)
        assert one_line(info.value) == "wrong user name or password"  # no hint who exists
    with pytest.raises(DopqError, match="too short"):
        users.add("bob", "short")
    store.close()


def test_an_unknown_user_costs_as_much_as_a_known_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "dopq.sqlite3")
    users = Users(store)
    users.add("alice", "alicepass1")
    calls: list[int] = []
    real = hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(auth.hashlib, "scrypt", counting)
    try:
        with pytest.raises(NotAuthenticated):
            users.authenticate("alice", "wrong-password")
        known = len(calls)
        calls.clear()
        with pytest.raises(NotAuthenticated):
            users.authenticate("nobody", "wrong-password")
        assert len(calls) == known
    finally:
        store.close()


# -- tokens ------------------------------------------------------------------------------
def test_a_new_password_revokes_tokens_whatever_the_name_case(tmp_path: Path) -> None:
    store = Store(tmp_path / "dopq.sqlite3")
    users = Users(store)
    users.add("alice", "alicepass1")
    token, _ = users.issue_token("alice", 3600)
    users.set_password("Alice", "alicepass2")
    assert users.authenticate("alice", "alicepass2").name == "alice"
    try:
        with pytest.raises(NotAuthenticated):
            users.principal_for(token)
    finally:
        store.close()


def test_tokens_expire_are_revocable_and_stored_hashed(tmp_path: Path) -> None:
    store = Store(tmp_path / "dopq.sqlite3")
    users = Users(store)
    users.add("alice", "alicepass1")
    users.add("bob", "bobpass12")
    token, expires = users.issue_token("alice", 60, now=1000.0)
    assert expires == 1060.0 and len(token) >= 40
    assert users.principal_for(token, now=1059.9) == Principal("alice", Role.USER)
    with pytest.raises(NotAuthenticated, match="token expired"):
        users.principal_for(token, now=1060.0)
    rows = store.read("SELECT * FROM tokens")
    assert [r["hash"] for r in rows] == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in repr([tuple(r) for r in rows])
    stale, _ = users.issue_token("alice", ttl=-1)
    with pytest.raises(NotAuthenticated, match="token expired"):
        users.principal_for(stale)
    with pytest.raises(NotAuthenticated, match="not signed in"):
        users.principal_for("")
    with pytest.raises(NotAuthenticated, match="invalid token"):
        users.principal_for("made-up-token")

    a1, a2, b1 = (users.issue_token(n, 3600)[0] for n in ("alice", "alice", "bob"))
    users.revoke(a1)
    with pytest.raises(NotAuthenticated, match="invalid token"):
        users.principal_for(a1)
    assert users.principal_for(a2).name == "alice"
    users.set_role("alice", Role.ADMIN)  # roles are read at each call, not baked in
    assert users.principal_for(a2).is_admin
    users.set_password("alice", "alicepass2")
    with pytest.raises(NotAuthenticated, match="invalid token"):
        users.principal_for(a2)
    assert users.principal_for(b1).name == "bob"
    assert users.revoke_all("bob") == 1 and users.revoke_all("bob") == 0
    with pytest.raises(NotAuthenticated, match="invalid token"):
        users.principal_for(b1)
    users.remove("bob")
    assert not store.read("SELECT 1 FROM tokens WHERE user = 'bob'")
    store.close()


@docker
def test_tokens_expire_and_are_revoked_through_the_api(
    server: Running, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    users = server.server.platform.users
    root = server["root"]
    t0 = time.time()
    result = server.client().call("login", "alice", PASSWORDS["alice"])
    ttl = server.settings.users.token_ttl
    assert t0 + ttl <= result["expires_at"] <= time.time() + ttl
    first, second = with_token(server, result["token"]), server.client("alice")
    with pytest.raises(NotAuthenticated) as info:
        with_token(server, users.issue_token("alice", ttl=-1)[0]).call("whoami")
    assert one_line(info.value) == "token expired: sign in again with 'dopq login'"

    # logout revokes the token it is called with, and only that one
    assert first.call("logout") == {"logged_out": True}
    for _ in range(2):
        with pytest.raises(NotAuthenticated, match="invalid token"):
            first.call("whoami")
    assert second.call("whoami")["user"] == "alice"

    # a new password revokes every token of that user
    assert second.call("user_passwd", "alice", "alicepass2") == {"user": "alice"}
    with pytest.raises(NotAuthenticated, match="invalid token"):
        second.call("queue")
    with pytest.raises(NotAuthenticated, match="wrong user name or password"):
        server.client().call("login", "alice", PASSWORDS["alice"])
    third = server.client()
    third.login("alice", "alicepass2", remember=False)

    # an admin revokes all tokens of a user; others keep theirs
    bob = server.client("bob")
    assert root.call("revoke_tokens", "bob") == {"revoked": 1}
    with pytest.raises(NotAuthenticated, match="invalid token"):
        bob.call("whoami")
    assert third.call("whoami")["user"] == "alice"

    # a removed user's tokens stop working
    root.call("user_add", "frank", "frankpass1")
    frank = server.client()
    frank.login("frank", "frankpass1", remember=False)
    root.call("user_remove", "frank")
    with pytest.raises(NotAuthenticated, match="invalid token"):
        frank.call("whoami")

    # `dopq logout` revokes the stored token and forgets it
    monkeypatch.setenv("DOPQ_NS_PORT", str(server.settings.nameserver.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DOPQ_TOKEN", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("bobpass12\n"))
    assert cli.main(["login", "--user", "bob", "--password-stdin"]) == 0
    token_file = tmp_path / "home" / "dopq" / "tokens.json"
    stored = json.loads(token_file.read_text())[server.settings.server_name]
    assert users.principal_for(stored).name == "bob"
    assert cli.main(["logout"]) == 0
    assert json.loads(token_file.read_text()) == {}
    with pytest.raises(NotAuthenticated, match="invalid token"):
        users.principal_for(stored)


# -- sign-in rate limits -------------------------------------------------------------------
def test_the_rate_limiter_counts_failures_in_a_sliding_window() -> None:
    limiter = RateLimiter(3, 60)
    for t in (0.0, 1.0, 2.0):
        limiter.check("user:alice", t)
        limiter.fail("user:alice", t)
    with pytest.raises(RateLimited) as info:
        limiter.check("user:alice", 3.0)
    assert one_line(info.value) == "too many failed sign-ins; try again in 58 s"
    limiter.check("user:bob", 3.0)  # keys are counted apart
    limiter.check("user:alice", 60.0)  # the first failure has left the window
    limiter.fail("user:alice", 60.0)
    with pytest.raises(RateLimited):
        limiter.check("user:alice", 60.5)
    limiter.reset("user:alice")
    limiter.check("user:alice", 60.5)


@docker
def test_failed_logins_are_rate_limited_per_user_and_address_never_per_address(
    server_factory: Callable[..., Running],
) -> None:
    server = server_factory(users={"login_attempts": 3, "login_user_attempts": 6,
                                   "login_window": 60, "login_max_delay": 0.2})
    store = server.server.platform.store
    before = tables(store, "tokens", "users", "audit")
    anon = server.client()
    # Per address, over the wire: failures under many names slow the address
    # down but lock nobody out (all local users share 127.0.0.1).
    for name in ("ghost1", "ghost2", "ghost3", "ghost4"):
        with pytest.raises(NotAuthenticated, match="wrong user name or password"):
            anon.call("login", name, "whatever-pw")
    assert tables(store, "tokens", "users", "audit") == before
    for name in ("alice", "bob"):
        assert anon.call("login", name, PASSWORDS[name])["user"] == name

    # Per (user, address) and per user: the Controller takes the address from
    # Pyro's call context; a Controller of our own is called in-process from
    # "other" hosts.
    controller = Controller(server.server.platform)

    def login_from(address: str, user: str, password: str) -> dict[str, Any]:
        Pyro5.api.current_context.client_sock_addr = (address, 40000)
        try:
            return controller.login(user, password)
        finally:
            Pyro5.api.current_context.client_sock_addr = None

    for _ in range(3):
        with pytest.raises(NotAuthenticated):
            login_from("10.0.0.1", "alice", "not-her-password")
    with pytest.raises(RateLimited) as info:
        login_from("10.0.0.1", "alice", PASSWORDS["alice"])  # that pair is locked
    assert "try again in" in one_line(info.value)
    assert login_from("10.0.0.1", "bob", PASSWORDS["bob"])["user"] == "bob"  # address is not
    for _ in range(3):
        with pytest.raises(NotAuthenticated):
            login_from("10.0.0.2", "alice", "not-her-password")
    with pytest.raises(RateLimited):  # six failures in all: the user is locked everywhere
        login_from("10.0.0.3", "alice", PASSWORDS["alice"])
    assert login_from("10.0.0.3", "bob", PASSWORDS["bob"])["user"] == "bob"


# -- dopq user ... ------------------------------------------------------------------------
def test_user_commands_act_on_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml({"state_dir": str(tmp_path / "state")}, tmp_path / "dopq.toml")

    def dopq(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = cli.main([*argv, "--config", str(config)])
        out = capsys.readouterr()
        return code, out.out, out.err

    # the password is the first line of standard input
    assert dopq("user", "add", "carol", "--password-stdin", stdin="carolpass1\nmore\n") == (
        0, "user carol added\n", "")
    assert dopq("user", "add", "dave", "--admin", "--password-stdin",
                stdin="davepass12\r\n") == (0, "user dave added (admin)\n", "")
    for argv, stdin, error in (
        (("user", "add", "Carol"), "whatever-pw\n", "user carol already exists"),
        (("user", "add", "eve"), "short\n", "password too short (at least 8 characters)"),
        (("user", "add", "bad name!"), "goodpassword\n", "bad user name"),
        (("user", "passwd"), "goodpassword\n", "user passwd needs a NAME"),
        (("user", "passwd", "nobody"), "goodpassword\n", "no user nobody"),
    ):
        code, out, err = dopq(*argv, "--password-stdin", stdin=stdin)
        assert code == 1 and out == "" and err.startswith("dopq: error: " + error), err
        assert err.count("\n") == 1

    code, out, _ = dopq("user", "list", "--json")
    listed = json.loads(out)
    assert [(u["name"], u["role"], u["share"]) for u in listed] == [
        ("carol", "user", 1.0), ("dave", "admin", 1.0)]
    assert not any("pw_hash" in u for u in listed)
    code, out, _ = dopq("user", "list")
    assert out.splitlines()[0].split() == ["USER", "ROLE", "WEIGHT"]
    assert out.splitlines()[1].split() == ["carol", "user", "1"]

    store = Store(tmp_path / "state" / "dopq.sqlite3")
    users = Users(store)
    assert users.authenticate("carol", "carolpass1").name == "carol"
    assert users.authenticate("dave", "davepass12").is_admin
    token, _ = users.issue_token("carol", 3600)
    code, out, _ = dopq("user", "passwd", "carol", "--password-stdin", stdin="carolpass2\n")
    assert code == 0 and "tokens were revoked" in out
    with pytest.raises(NotAuthenticated, match="invalid token"):
        users.principal_for(token)
    with pytest.raises(NotAuthenticated):
        users.authenticate("carol", "carolpass1")
    assert users.authenticate("carol", "carolpass2").name == "carol"

    assert dopq("user", "remove", "carol") == (0, "user carol removed\n", "")
    assert [u["name"] for u in json.loads(dopq("user", "list", "--json")[1])] == ["dave"]
    assert not store.read("SELECT 1 FROM tokens WHERE user = 'carol'")
    code, _, err = dopq("user", "remove", "carol")
    assert code == 1 and err == "dopq: error: no user carol\n"
    store.close()


@docker
def test_user_commands_work_while_the_server_runs(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = write_toml(server.cfg, tmp_path / "server.toml")

    def dopq(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return cli.main([*argv, "--config", str(config)])

    assert dopq("user", "add", "erin", "--password-stdin", stdin="erinpass1\n") == 0
    erin = server.client()
    erin.login("erin", "erinpass1", remember=False)
    assert erin.call("whoami") == {"user": "erin", "role": "user"}
    assert dopq("user", "passwd", "erin", "--password-stdin", stdin="erinpass2\n") == 0
    with pytest.raises(NotAuthenticated, match="invalid token"):
        erin.call("whoami")
    erin.login("erin", "erinpass2", remember=False)
    assert dopq("user", "remove", "erin") == 0
    with pytest.raises(NotAuthenticated, match="invalid token"):
        erin.call("whoami")
    with pytest.raises(NotAuthenticated, match="wrong user name or password"):
        server.client().call("login", "erin", "erinpass2")
    capsys.readouterr()


# -- the drop folder ----------------------------------------------------------------------
def _drop(server: Running, jobs_dir: Path, user: str, name: str, uid: int | None = None) -> Path:
    inbox = server.settings.inbox_path / user
    inbox.mkdir(parents=True, exist_ok=True)
    part = inbox / f"{name}.zip.part"
    shutil.copy(zip_it(good_job(jobs_dir, user, name)), part)
    if uid is not None:
        os.chown(part, uid, -1)
    part.rename(inbox / f"{name}.zip")
    return inbox


def _dropped_job(server: Running, name: str, states: tuple[str, ...]) -> dict[str, Any]:
    def find() -> Any:
        for j in server["root"].call("history") + server["root"].call("queue"):
            if j["name"] == name and j["state"] in states:
                return j
        return None

    job: dict[str, Any] = wait_for(find, 60)
    return job


@docker
def test_the_drop_folder_refuses_a_file_of_an_unknown_unix_user(
    server: Running, jobs_dir: Path
) -> None:
    user = "nosuchunixuser"
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    assert user not in server.settings.users.uid_map
    inbox = _drop(server, jobs_dir, user, "no-account")
    job = _dropped_job(server, "no-account", ("failed",))
    assert job["error"] == (
        f"rejected: no DoPQ user '{user}' (ask an admin: dopq user add {user})")
    server.server.platform.users.add(user, "somepass1")
    inbox = _drop(server, jobs_dir, user, "orphan")
    job = _dropped_job(server, "orphan", ("failed",))
    assert job["user"] == user and job["origin"] == "inbox"
    assert job["error"] == (
        f"rejected: no Unix user '{user}' owns inbox/{user} (set users.uid_map)")
    assert (server.settings.state_path / "rejected" / f"{job['id']}.zip").is_file()
    assert not list(inbox.iterdir())


@docker
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another uid needs root")
def test_the_drop_folder_maps_users_by_unix_name(server: Running, jobs_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    server.server.platform.users.add("nobody", "nobodypass1")
    _drop(server, jobs_dir, "nobody", "not-from-nobody", uid=os.geteuid())
    job = _dropped_job(server, "not-from-nobody", ("failed",))
    assert job["error"] == (
        f"rejected: file owner uid {os.geteuid()} is not user 'nobody' (uid {nobody})")
    _drop(server, jobs_dir, "nobody", "from-nobody", uid=nobody)
    job = _dropped_job(server, "from-nobody", ("succeeded",))
    assert job["user"] == "nobody"


# -- batch edits ---------------------------------------------------------------------------
def _blocked(server: Running, jobs_dir: Path) -> int:
    """Alice's job holding both GPUs, running, so 2-GPU jobs stay queued."""
    alice = server["alice"]
    blocker: int = alice.submit(good_job(jobs_dir, "alice", "blocker", "sleep 600",
                                         num_gpus=2))["id"]
    wait_state(alice, blocker, "running")
    return blocker


@docker
def test_a_batch_edit_racing_a_job_start_is_refused_whole(
    server: Running, jobs_dir: Path
) -> None:
    alice, root = server["alice"], server["root"]
    store = server.server.platform.store
    blocker = _blocked(server, jobs_dir)
    nxt = alice.submit(good_job(jobs_dir, "alice", "next", "sleep 600", num_gpus=2))["id"]
    then = alice.submit(good_job(jobs_dir, "alice", "then", "true", num_gpus=2),
                        {"after": [nxt]})["id"]
    wait_state(alice, nxt, "queued")
    wait_state(alice, then, "queued")
    assert {nxt, then} <= {q["id"] for q in alice.call("queue")}  # what the user saw

    # Alice keeps editing both while `nxt` starts: every edit lands whole, until
    # one is refused whole.
    outcome: dict[str, Any] = {"last": 0}

    def edit_until_refused() -> None:
        client = server.client("alice")
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline:
                value = outcome["last"] + 1
                try:
                    client.call("edit", [then, nxt], "nice", value)
                except Conflict as exc:
                    outcome["conflict"] = exc
                    return
                outcome["last"] = value
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            outcome["error"] = exc
        finally:
            client.close()

    racer = threading.Thread(target=edit_until_refused)
    racer.start()
    wait_for(lambda: outcome["last"] >= 3 or "error" in outcome)
    alice.call("cancel", blocker)
    racer.join(120)
    assert not racer.is_alive() and "error" not in outcome, outcome
    assert one_line(outcome["conflict"]) == (
        f"job {nxt} is running, no longer queued; nothing changed")
    last = outcome["last"]
    assert last >= 3
    assert alice.call("job", then)["nice"] == last
    assert alice.call("job", nxt)["nice"] == last
    assert alice.call("job", nxt)["state"] == "running"

    # Afterwards every kind of edit of the pair is refused, and nothing changes.
    before = tables(store, "jobs", "events", "audit")
    for client, action, value in ((alice, "delete", None), (alice, "priority", -5),
                                  (alice, "nice", last + 10), (root, "hold", None),
                                  (root, "top", None), (root, "priority", 50)):
        with pytest.raises(Conflict) as info:
            client.call("edit", [then, nxt], action, value)
        assert one_line(info.value).endswith("nothing changed")
    assert tables(store, "jobs", "events", "audit") == before
    assert alice.call("job", then)["state"] == "queued"


@docker
def test_a_batch_edit_is_all_or_nothing(server: Running, jobs_dir: Path) -> None:
    alice, bob, root = server["alice"], server["bob"], server["root"]
    store = server.server.platform.store
    blocker = _blocked(server, jobs_dir)
    mine = good_job(jobs_dir, "alice", "mine", "true", num_gpus=2)
    qa1, qa2 = (alice.submit(mine, {"name": n})["id"] for n in ("qa1", "qa2"))
    qb = bob.submit(good_job(jobs_dir, "bob", "theirs", "true", num_gpus=2))["id"]
    for job_id in (qa1, qa2, qb):
        wait_state(root, job_id, "queued")
    alice.call("edit", [qa2], "priority", -10)

    refusals: list[tuple[Client, list[int], str, Any, type[DopqError], str]] = [
        (alice, [qa1, qb], "priority", -5, Forbidden,
         f"job {qb} belongs to bob; nothing changed"),
        (alice, [qa1, qb], "delete", None, Forbidden,
         f"job {qb} belongs to bob; nothing changed"),
        (alice, [qa2, qa1], "priority", 5, Forbidden,
         f"only an admin may set a priority above 0 (job {qa2}); nothing changed"),
        (alice, [qa1, 999999], "nice", 5, NotFound, "no job 999999"),
        (alice, [qa1, blocker], "nice", 5, Conflict,
         f"job {blocker} is running, no longer queued; nothing changed"),
        (bob, [qb, qa1], "hold", None, Forbidden, f"job {qa1} belongs to alice; nothing changed"),
        (alice, [qa1], "top", None, Forbidden, "top needs the admin role"),
        (alice, [qa1], "time_limit", "2 fortnights", DopqError, "--time-limit"),
        (alice, [], "delete", None, DopqError, "no job ids given"),
        (alice, [qa1], "explode", None, DopqError, "unknown action 'explode'"),
        (alice, [qa1], "priority", "high", DopqError, "priority needs an integer value"),
        (root, [qa1], "priority", 5000, DopqError, "priority must be between -1000 and 1000"),
    ]
    before = tables(store, "jobs", "events", "audit")
    for client, ids, action, value, error, message in refusals:
        with pytest.raises(DopqError) as info:
            client.call("edit", ids, action, value)
        assert type(info.value) is error, (action, ids, info.value)
        assert one_line(info.value).startswith(message), info.value
        assert tables(store, "jobs", "events", "audit") == before, (action, ids)

    assert root.call("edit", [qa1, qb], "priority", 7) == {"changed": [qa1, qb],
                                                           "action": "priority"}
    assert [root.call("job", i)["priority"] for i in (qa1, qa2, qb)] == [7, -10, 7]
    alice.call("edit", [qa1, qa2], "delete")
    for job_id in (qa1, qa2):
        job = alice.call("job", job_id)
        assert (job["state"], job["error"]) == ("cancelled", "cancelled by alice")
    assert alice.call("job", qb)["state"] == "queued"


@docker
def test_users_may_lower_and_restore_but_not_raise_their_priority_above_0(
    server: Running, jobs_dir: Path
) -> None:
    alice, root = server["alice"], server["root"]
    _blocked(server, jobs_dir)
    job = alice.submit(good_job(jobs_dir, "alice", "humble", "true", num_gpus=2))["id"]
    wait_state(alice, job, "queued")
    for action, value in (("priority", -5), ("priority", -5), ("nice", 100), ("nice", 100)):
        assert alice.call("edit", [job], action, value)["changed"] == [job]
    for action, value, words in (("priority", 1, "only an admin may set a priority above 0"),
                                 ("priority", 1000, "only an admin may set a priority above 0"),
                                 ("nice", 99, "only an admin may lower nice")):
        with pytest.raises(Forbidden) as info:
            alice.call("edit", [job], action, value)
        assert one_line(info.value).startswith(words)
    view = alice.call("job", job)
    assert (view["priority"], view["nice"]) == (-5, 100)
    alice.call("edit", [job], "priority", 0)  # restored, up to 0
    assert alice.call("job", job)["priority"] == 0
    root.call("edit", [job], "priority", 20)
    root.call("edit", [job], "nice", 0)
    view = alice.call("job", job)
    assert (view["priority"], view["nice"]) == (20, 0)
    # nor at submission: a priority above 0 is an admin's
    with pytest.raises(Forbidden, match="only an admin may submit with a priority above 0"):
        alice.submit(good_job(jobs_dir, "alice", "eager", "true", num_gpus=2), {"priority": 5})
    # ... nor through container_config.json
    with pytest.raises(JobRejected, match="only an admin may submit with a priority above 0"):
        alice.submit(good_job(jobs_dir, "alice", "eager-cfg", "true", num_gpus=2,
                              config={"priority": 5}))
    boss = root.submit(good_job(jobs_dir, "root", "boss", "true", num_gpus=2),
                       {"priority": 5})["id"]
    assert wait_state(root, boss, "queued")["priority"] == 5


@docker
def test_an_admin_may_submit_for_a_user_with_a_raised_priority(
    server: Running, jobs_dir: Path
) -> None:
    root = server["root"]
    _blocked(server, jobs_dir)
    job = root.submit(good_job(jobs_dir, "alice", "boosted", "true", num_gpus=2),
                      {"user": "alice", "priority": 5})["id"]
    done = wait_for(lambda: (j := root.call("job", job))["state"] not in (
        "received", "building") and j, 60)
    assert (done["state"], done["user"], done["priority"]) == ("queued", "alice", 5), done


# -- hold, release, top -------------------------------------------------------------------
@docker
def test_hold_release_and_top_are_admin_only_and_take_effect(
    server: Running, jobs_dir: Path
) -> None:
    alice, bob, root = server["alice"], server["bob"], server["root"]
    blocker = _blocked(server, jobs_dir)
    held = alice.submit(good_job(jobs_dir, "alice", "held", "sleep 600", num_gpus=2))["id"]
    topped = alice.submit(good_job(jobs_dir, "alice", "topped", "true", num_gpus=2))["id"]
    other = bob.submit(good_job(jobs_dir, "bob", "other", "sleep 600", num_gpus=2))["id"]
    for job_id in (held, topped, other):
        wait_state(root, job_id, "queued")
    wait_for(lambda: len(alice.call("queue")) == 3)
    assert alice.call("queue")[0]["id"] != topped

    store = server.server.platform.store
    before = tables(store, "jobs", "audit")
    for client, job_id in ((alice, held), (alice, topped), (bob, other)):
        with pytest.raises(Forbidden) as info:
            client.call("edit", [job_id], "top")
        assert one_line(info.value) == "top needs the admin role"
    for action in ("hold", "release"):  # never another user's job
        with pytest.raises(Forbidden) as info:
            bob.call("edit", [held], action)
        assert one_line(info.value) == f"job {held} belongs to alice; nothing changed"
    assert tables(store, "jobs", "audit") == before
    # users hold and release their own jobs (not audited: no admin acted)
    alice.call("edit", [held], "hold")
    assert alice.call("job", held)["held"] is True
    alice.call("edit", [held], "release")
    assert alice.call("job", held)["held"] is False
    assert tables(store, "audit") == {k: v for k, v in before.items() if k == "audit"}

    root.call("edit", [topped], "top")
    wait_for(lambda: alice.call("queue")[0]["id"] == topped)
    assert alice.call("queue")[0]["position"] == 1
    root.call("edit", [held], "hold")
    assert alice.call("job", held)["held"] is True
    wait_for(lambda: (queue_entry(alice, held) or {}).get("reason") == "Held")
    with pytest.raises(Forbidden) as info:  # an admin's hold is the admins' to release
        alice.call("edit", [held], "release")
    assert "held by an admin" in one_line(info.value)

    # GPUs free up: the topped job goes first, then bob's; the held job waits
    alice.call("cancel", blocker)
    wait_state(alice, topped, "succeeded")
    wait_state(bob, other, "running")
    assert alice.call("job", topped)["started_at"] < bob.call("job", other)["started_at"]
    assert alice.call("job", held)["state"] == "queued"
    root.call("edit", [held], "release")
    assert alice.call("job", held)["held"] is False
    wait_for(lambda: (queue_entry(alice, held) or {}).get("reason") not in (None, "Held"))

    actions = [(r["actor"], r["action"]) for r in root.call("audit")]
    assert actions[:3] == [("root", "edit release"), ("root", "edit hold"), ("root", "edit top")]


# -- clear-history, clear-status ----------------------------------------------------------------
@docker
def test_clear_history_keeps_usage_and_clear_status_resets_it(
    server: Running, jobs_dir: Path
) -> None:
    alice, bob, root = server["alice"], server["bob"], server["root"]
    platform = server.server.platform
    t0 = time.time()
    a = alice.submit(good_job(jobs_dir, "alice", "a-work", "sleep 2", num_gpus=1))["id"]
    b = bob.submit(good_job(jobs_dir, "bob", "b-work", "sleep 2", num_gpus=1))["id"]
    assert server.wait_job(a)["state"] == server.wait_job(b)["state"] == "succeeded"

    def gpu_hours() -> dict[str, float]:
        return {u["user"]: u["gpu_hours"] for u in alice.call("users")}

    def raw() -> dict[str, float]:
        return platform.queue.ledger.snapshot(time.time())

    def charged() -> dict[str, float] | None:
        # The shared views lag up to half a second: wait until they show the
        # ledger's final charge, not a view built before the jobs' last charge.
        h, ledger = gpu_hours(), raw()
        final = all(h.get(u, 0) > 0 and h[u] == round(ledger.get(u, 0) / 3600.0, 4)
                    for u in ("alice", "bob"))
        return h if final else None

    hours = wait_for(charged, 10)
    usage = raw()

    assert root.call("clear_history", "alice") == {"cleared": 1}
    assert [j["id"] for j in alice.call("history")] == [b]
    assert root.call("clear_history") == {"cleared": 1}
    assert alice.call("history") == [] and bob.call("history", 50, "bob") == []
    assert root.call("snapshot")["finished"] == []
    assert gpu_hours() == hours
    assert raw() == pytest.approx(usage, rel=1e-4)
    assert alice.call("job", a)["state"] == "succeeded"  # the record stays

    assert root.call("clear_status", "alice") == {"reset": "alice"}
    after = gpu_hours()
    assert after["alice"] == 0 and after["bob"] == hours["bob"]
    assert [r["user"] for r in platform.store.load_usage()] == ["bob"]
    assert root.call("clear_status") == {"reset": "all"}
    assert set(gpu_hours().values()) == {0}
    assert platform.store.load_usage() == []

    rows = root.call("audit")[:4]
    assert [(r["actor"], r["action"], r["detail"]) for r in rows] == [
        ("root", "clear-status", "all users"), ("root", "clear-status", "alice"),
        ("root", "clear-history", "all users"), ("root", "clear-history", "alice")]
    assert all(t0 <= r["at"] <= time.time() for r in rows)


# -- the audit log --------------------------------------------------------------------------
@docker
def test_the_audit_log_records_admin_commands_for_admins_only(
    server: Running, jobs_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob, root = server["alice"], server["bob"], server["root"]
    t0 = time.time()
    long = good_job(jobs_dir, "alice", "long", "sleep 600")
    first, second = (alice.submit(long, {"name": n})["id"] for n in ("first", "second"))
    wait_state(alice, first, "running")
    wait_state(alice, second, "running")

    # refused and non-admin commands leave no trace
    for client, method, args in ((bob, "clear_history", ()), (alice, "set_share", ("alice", 5)),
                                 (bob, "cancel", (first,)), (alice, "audit", ())):
        with pytest.raises(Forbidden):
            client.call(method, *args)
    alice.call("cancel", second)

    root.call("set_share", "bob", 3)
    root.call("user_add", "carol", "carolpass1")
    root.call("user_passwd", "carol", "carolpass2")
    root.call("revoke_tokens", "carol")
    root.call("user_remove", "carol")
    root.call("cancel", first)
    rows = root.call("audit")
    assert [(r["actor"], r["action"], r["detail"]) for r in reversed(rows)] == [
        ("root", "set-share", "bob = 3.0"),
        ("root", "user add", "carol admin=False"),
        ("root", "user passwd", "carol"),
        ("root", "revoke tokens", "carol"),
        ("root", "user remove", "carol"),
        ("root", "cancel", f"job {first} of alice"),
    ]
    assert all(t0 <= r["at"] <= time.time() for r in rows)
    assert not any("carolpass" in r["detail"] for r in rows)
    assert root.call("audit", 2) == rows[:2]

    # `dopq audit` for an admin; a one-line refusal for anyone else
    monkeypatch.setenv("DOPQ_NS_PORT", str(server.settings.nameserver.port))
    monkeypatch.setenv("DOPQ_SERVER", server.settings.server_name)
    monkeypatch.setenv("DOPQ_TOKEN", root.token)
    capsys.readouterr()
    assert cli.main(["audit", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["action"] for r in shown] == [r["action"] for r in rows]
    assert all(r["at"].endswith("Z") and r["actor"] == "root" for r in shown)
    monkeypatch.setenv("DOPQ_TOKEN", alice.token)
    assert cli.main(["audit"]) == 1
    assert capsys.readouterr().err == "dopq: error: audit needs the admin role\n"


# -- logs of other users ----------------------------------------------------------------------
@docker
def test_logs_of_other_users_are_readable_only_when_configured(
    server_factory: Callable[..., Running], jobs_dir: Path
) -> None:
    server = server_factory(users={"logs_visible_to_all": True})
    job = server["alice"].submit(good_job(jobs_dir, "alice", "open", "echo open-log"))["id"]
    assert server.wait_job(job)["state"] == "succeeded"
    assert "open-log" in server["bob"].call("logs", job)["data"]


# -- shutdown --------------------------------------------------------------------------------
@docker
def test_a_connected_client_learns_the_server_is_gone(server: Running) -> None:
    alice = server["alice"]
    assert alice.call("whoami")["user"] == "alice"  # connected
    assert server["root"].call("shutdown")["shutdown"] is True
    server.server.wait()  # as serve() does
    server.stop()
    with pytest.raises(ServerUnavailable):
        alice.call("queue")

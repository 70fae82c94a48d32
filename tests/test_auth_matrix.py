"""The authorisation matrix: every Controller method x every kind of caller.

Callers: anonymous (no token), a bad token, an expired token, the owner of the
jobs (alice), another user (bob) and an admin (root). One server serves the
whole module; every cell gets fresh tokens and, when it destroys something,
fresh targets. A refused cell must raise the right ``AuthError`` subclass with
a one-line message and leave the store's tables as they were; an allowed cell
must work and, for an admin command, add exactly one audit row.

Fixture jobs, all alice's: one finished, three running (``sleep 600``) and a
pool of queued ones that wait for the first running job, so they stay queued.
``shutdown`` by the admin ends the server, so it runs last, in its own test.
"""

from __future__ import annotations

import inspect
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORDS, Running, cleanup_docker, make_config, wait_for
from hostile import good_job, zip_it

from dopq.client.remote import Client
from dopq.core import settings as settings_mod
from dopq.core.errors import DopqError, Forbidden, NotAuthenticated, ServerUnavailable
from dopq.server.api import Controller
from dopq.server.auth import Principal, Role
from dopq.server.store import Store

pytestmark = pytest.mark.docker

PRINCIPALS = ("anonymous", "bad", "expired", "other", "owner", "admin")
NAME_OF = {"owner": "alice", "other": "bob", "admin": "root"}
ALICE = Principal("alice", Role.USER)
OK = "ok"
NOT_SIGNED_IN = {
    "anonymous": "not signed in",
    "bad": "invalid token",
    "expired": "token expired",
}
SEEDED_USAGE = {"alice": 7200.0, "bob": 3600.0}


class World:
    """The module's server, its fixture jobs and helpers to make more."""

    def __init__(self, run: Running, jobs_dir: Path) -> None:
        self.run = run
        self.platform = run.server.platform
        self.store = self.platform.store
        self.users = self.platform.users
        self.zips = {
            name: zip_it(good_job(jobs_dir, "alice", name, script)).read_bytes()
            for name, script in (("waiting", "echo never"), ("sleeper", "sleep 600"),
                                 ("done", "echo finished-output"))
        }
        self.finished = self.submit("done")
        self.running = [self.submit("sleeper", name=f"running-{i}") for i in range(3)]
        self.pool = [self.submit("waiting", after=[self.running[0]]) for _ in range(6)]
        wait_for(lambda: self.state(self.finished) == "succeeded", 90)
        wait_for(lambda: "finished-output" in self.platform.logs(ALICE, self.finished)["data"])
        wait_for(lambda: all(self.state(i) == "running" for i in self.running), 90)
        wait_for(lambda: all(self.state(i) == "queued" for i in self.pool), 90)

    # -- jobs and uploads -------------------------------------------------------------
    def upload(self, kind: str = "waiting", **overrides: Any) -> str:
        """A complete upload of alice's (in the server's memory, not in the store)."""
        data = self.zips[kind]
        uid = self.platform.begin_upload(ALICE, len(data), dict(overrides))
        self.platform.upload_chunk(ALICE, uid, data)
        return uid

    def submit(self, kind: str, **overrides: Any) -> int:
        job_id: int = self.platform.finish_upload(ALICE, self.upload(kind, **overrides))["id"]
        return job_id

    def state(self, job_id: int) -> str:
        return str(self.store.job(job_id)["state"])

    def live_queued(self) -> int:
        """A queued job of alice's that cells only look at or edit in place."""
        return self.pool[0]

    def fresh_queued(self) -> int:
        """A queued job of alice's that a cell may cancel or delete."""
        if len(self.pool) < 3:
            extra = self.submit("waiting", after=[self.running[0]])
            wait_for(lambda: self.state(extra) == "queued", 60)
            self.pool.append(extra)
        return self.pool.pop()

    def new_user(self) -> str:
        name = "tmp" + uuid.uuid4().hex[:8]
        self.users.add(name, "temporary-pw", Role.USER)
        return name

    # -- callers ----------------------------------------------------------------------
    def client(self, principal: str) -> Client:
        """A client with a token of its own: cells may revoke theirs."""
        if principal == "anonymous":
            token = ""
        elif principal == "bad":
            token = secrets.token_urlsafe(32)
        elif principal == "expired":
            token = self.users.issue_token("alice", ttl=-1)[0]
        else:
            token = self.users.issue_token(NAME_OF[principal], 3600)[0]
        ns = self.run.settings.nameserver
        return Client(ns.host, ns.port, self.run.settings.server_name, token=token)

    # -- the store, compared ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Every table a call could change. Usage decays and is saved every few
        seconds, so it is kept as user -> value (compared approximately)."""
        snap: dict[str, Any] = {}
        for table in ("jobs", "events", "users", "tokens", "audit"):
            # A token's last use may change with any call, refused or not.
            cols = [c["name"] for c in self.store.read(f"PRAGMA table_info({table})")
                    if not c["name"].startswith("last_use")]
            snap[table] = [tuple(r) for r in self.store.read(
                f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid")]
        snap["usage"] = {
            r["user"]: r["value"] for r in self.store.read("SELECT user, value FROM usage")
            if r["value"] > 1e-6
        }
        return snap

    def settle(self) -> None:
        """Wait until no job is being received or built (a submit's aftermath)."""
        wait_for(lambda: not self.store.read(
            "SELECT 1 FROM jobs WHERE state IN ('received', 'building')"), 60)


def assert_same_store(before: dict[str, Any], after: dict[str, Any]) -> None:
    for table in ("jobs", "events", "users", "tokens", "audit"):
        assert after[table] == before[table], f"a refused call changed table {table}"
    assert after["usage"] == pytest.approx(before["usage"], rel=1e-3), "usage changed"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, engine: None) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("matrix")
    cfg = make_config(
        tmp,
        users={"login_attempts": 100},
        # Running CPU jobs charge nothing and usage barely decays, so a snapshot of
        # the usage table stays comparable while the fixture jobs run.
        policy={"cpu_fraction": 0.0, "half_life": 30 * 86400.0},
    )
    seed = Store(settings_mod.from_dict(cfg).db_path)
    seed.save_usage([{"user": u, "value": v, "updated_at": time.time()}
                     for u, v in SEEDED_USAGE.items()])
    seed.close()
    run = Running(cfg)
    try:
        jobs_dir = tmp / "jobs"
        jobs_dir.mkdir()
        yield World(run, jobs_dir)
    finally:
        try:
            if not run.stopped:
                for job_id in [r["id"] for r in run.server.platform.store.jobs(["running"])]:
                    run.server.platform.queue.cancel(job_id, "root")
            run.stop()
        finally:
            cleanup_docker(run.settings.docker.name_prefix)


# -- the cases -------------------------------------------------------------------------
Args = Callable[[World, str], tuple[Any, ...]]
Check = Callable[[World, Any, tuple[Any, ...], str, Client], None]


@dataclass
class Case:
    method: str
    label: str
    args: Args
    expect: dict[str, Any]  # principal -> OK or the error class
    check: Check | None = None
    audited: bool = False  # the admin's allowed call writes one audit row
    match: str | None = None  # what every refusal's message says, if not the usual

    @property
    def id(self) -> str:
        return f"{self.method}-{self.label}" if self.label else self.method


def _rule(other: Any, owner: Any, admin: Any) -> dict[str, Any]:
    return {"anonymous": NotAuthenticated, "bad": NotAuthenticated,
            "expired": NotAuthenticated, "other": other, "owner": owner, "admin": admin}


NO_TOKEN_NEEDED = {p: OK for p in PRINCIPALS}
SIGNED_IN = _rule(OK, OK, OK)
OWN_OR_ADMIN = _rule(Forbidden, OK, OK)
ADMIN_ONLY = _rule(Forbidden, Forbidden, OK)


def none(w: World, p: str) -> tuple[Any, ...]:
    return ()


def queued(w: World, p: str) -> tuple[Any, ...]:
    return (w.live_queued(),)


def consumed_if_allowed(expect: dict[str, Any]) -> Callable[[World, str], int]:
    """A queued job: a fresh one where the call is allowed to end it."""
    return lambda w, p: w.fresh_queued() if expect[p] is OK else w.live_queued()


def edit_args(action: str, delta: int | None = None, ends_job: bool = False,
              expect: dict[str, Any] = ADMIN_ONLY, low: int | None = None,
              high: int | None = None, held: int | None = None) -> Args:
    """Edit args; ``low``/``high`` bound the new value, ``held`` sets the job's hold first."""

    def args(w: World, p: str) -> tuple[Any, ...]:
        job_id = consumed_if_allowed(expect)(w, p) if ends_job else w.live_queued()
        if held is not None:
            with w.store.transaction() as db:
                db.execute("UPDATE jobs SET held = ? WHERE id = ?", (held, job_id))
        if delta is None:
            return ([job_id], action)
        value = w.store.job(job_id)[action] + delta
        value = value if low is None else max(low, value)
        value = value if high is None else min(high, value)
        return ([job_id], action, value)

    return args


def time_limit_args(w: World, p: str) -> tuple[Any, ...]:
    return ([w.live_queued()], "time_limit", "30m")


def fetch_of_alice(w: World, p: str) -> tuple[Any, ...]:
    return (w.platform.fetches.begin("alice", "alice", w.finished).id, 0)


def check_edit(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    ids, action = a[0], a[1]
    assert r == {"changed": ids, "action": action}
    row = w.store.job(ids[0])
    if action == "delete":
        assert row["state"] == "cancelled" and row["error"] == f"cancelled by {NAME_OF[p]}"
    elif action in ("priority", "nice"):
        assert row[action] == a[2]
    elif action in ("hold", "release"):
        assert row["held"] is (action == "hold")
    elif action == "time_limit":
        assert row["time_limit"] == 1800
    elif action == "top":
        assert row["top"] > 0


def check_logout(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r == {"logged_out": True}
    with pytest.raises(NotAuthenticated, match="invalid token"):
        c.call("whoami")


def check_login(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["user"] == "alice" and r["role"] == "user"
    assert r["expires_at"] > time.time() + 3600
    assert w.users.principal_for(r["token"]) == ALICE


def check_finish(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["user"] == "alice" and r["origin"] == "api"
    wait_for(lambda: w.state(r["id"]) == "queued", 60)
    w.pool.append(r["id"])


def check_cancel(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["id"] == a[0]
    wait_for(lambda: w.state(a[0]) == "cancelled", 60)
    assert w.store.job(a[0])["error"] == f"cancelled by {NAME_OF[p]}"


def check_clear_history(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["cleared"] >= 1
    assert w.finished not in [j["id"] for j in w.platform.history()]


def check_clear_status(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r == {"reset": "all"}
    assert w.snapshot()["usage"] == {}


def check_passwd(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r == {"user": a[0]}
    assert w.users.authenticate(a[0], a[1]).name == a[0]
    live = w.store.read("SELECT 1 FROM tokens WHERE user = ? AND revoked = 0", (a[0],))
    assert not live, "a new password must revoke the user's tokens"


def check_revoke(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["revoked"] >= 1
    assert not w.store.read("SELECT 1 FROM tokens WHERE user = 'alice' AND revoked = 0")


def R(check: Callable[[World, Any, tuple[Any, ...], str], bool]) -> Check:  # noqa: N802
    """A check written as one boolean expression of (world, result, args, principal)."""

    def run(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
        assert check(w, r, a, p), r

    return run


UPLOAD_SIZE = 100

CASES: list[Case] = [
    Case("ping", "", none, NO_TOKEN_NEEDED, R(lambda w, r, a, p: r["name"] ==
                                              w.run.settings.server_name)),
    Case("login", "", lambda w, p: ("alice", PASSWORDS["alice"]), NO_TOKEN_NEEDED,
         check_login),
    Case("login", "wrong-password", lambda w, p: ("alice", "not-her-password"),
         {p: NotAuthenticated for p in PRINCIPALS}, match="wrong user name or password"),
    Case("logout", "", none, SIGNED_IN, check_logout),
    Case("whoami", "", none, SIGNED_IN,
         R(lambda w, r, a, p: r["user"] == NAME_OF[p] and
           r["role"] == ("admin" if p == "admin" else "user"))),
    Case("submit_begin", "", lambda w, p: (UPLOAD_SIZE, {}), SIGNED_IN,
         R(lambda w, r, a, p: isinstance(r, str) and len(r) == 32)),
    Case("submit_begin", "as-alice", lambda w, p: (UPLOAD_SIZE, {"user": "alice"}),
         OWN_OR_ADMIN, R(lambda w, r, a, p: w.platform.uploads.pending[r].user == "alice")),
    Case("submit_chunk", "", lambda w, p: (w.platform.begin_upload(ALICE, 100, {}), b"x" * 10),
         OWN_OR_ADMIN, R(lambda w, r, a, p: r == 10)),
    Case("submit_finish", "",
         lambda w, p: (w.upload("waiting", after=[w.running[0]], name=f"finish-{p}"),),
         OWN_OR_ADMIN, check_finish),
    Case("submit_abort", "", lambda w, p: (w.upload(),), OWN_OR_ADMIN,
         R(lambda w, r, a, p: r == {"aborted": a[0]} and a[0] not in w.platform.uploads.pending)),
    Case("job", "", queued, SIGNED_IN,
         R(lambda w, r, a, p: r["id"] == a[0] and r["user"] == "alice" and r["events"])),
    Case("queue", "", none, SIGNED_IN,
         R(lambda w, r, a, p: w.live_queued() in [j["id"] for j in r])),
    Case("running", "", none, SIGNED_IN,
         R(lambda w, r, a, p: w.running[0] in [j["id"] for j in r])),
    Case("history", "", lambda w, p: (50,), SIGNED_IN, R(lambda w, r, a, p: isinstance(r, list))),
    Case("status", "", none, SIGNED_IN,
         R(lambda w, r, a, p: r["counts"]["running"] >= 1 and len(r["gpus"]) == 2)),
    Case("users", "", none, SIGNED_IN,
         R(lambda w, r, a, p: {"alice", "bob", "root"} <= {u["user"] for u in r})),
    Case("images", "", none, SIGNED_IN,
         R(lambda w, r, a, p: r["allowed_bases"] == w.run.settings.images.allowed_bases
           and all(o["job"] for o in r["own"]))),
    Case("priority", "", none, SIGNED_IN,
         R(lambda w, r, a, p: w.live_queued() in [e["id"] for e in r])),
    Case("snapshot", "", lambda w, p: (20,), SIGNED_IN,
         R(lambda w, r, a, p: r["whoami"]["user"] == NAME_OF[p] and r["running"])),
    Case("logs", "", lambda w, p: (w.finished, "run"), OWN_OR_ADMIN,
         R(lambda w, r, a, p: "finished-output" in r["data"])),
    Case("cancel", "queued", lambda w, p: (consumed_if_allowed(OWN_OR_ADMIN)(w, p),),
         OWN_OR_ADMIN, check_cancel, audited=True),
    Case("edit", "delete", edit_args("delete", ends_job=True, expect=OWN_OR_ADMIN),
         OWN_OR_ADMIN, check_edit, audited=True),
    Case("edit", "priority-lower", edit_args("priority", -1), OWN_OR_ADMIN, check_edit,
         audited=True),
    # Users lower their own priority and restore it up to 0; above 0 is the admins'.
    Case("edit", "priority-restore", edit_args("priority", +1, high=0), OWN_OR_ADMIN,
         check_edit, audited=True),
    Case("edit", "priority-above-0", edit_args("priority", +1, low=1), ADMIN_ONLY, check_edit,
         audited=True),
    Case("edit", "nice-raise", edit_args("nice", +1), OWN_OR_ADMIN, check_edit, audited=True),
    Case("edit", "nice-lower", edit_args("nice", -1), ADMIN_ONLY, check_edit, audited=True),
    # Users hold and release their own jobs; a hold an admin put on stays the admins'.
    Case("edit", "hold", edit_args("hold"), OWN_OR_ADMIN, check_edit, audited=True),
    Case("edit", "release", edit_args("release", held=1), OWN_OR_ADMIN, check_edit,
         audited=True),
    Case("edit", "release-admin-hold", edit_args("release", held=2), ADMIN_ONLY, check_edit,
         audited=True),
    Case("edit", "time-limit", time_limit_args, OWN_OR_ADMIN, check_edit, audited=True),
    Case("array", "", queued, SIGNED_IN, R(lambda w, r, a, p: r == [])),
    Case("outputs_begin", "", lambda w, p: (w.finished,), OWN_OR_ADMIN,
         R(lambda w, r, a, p: len(r["fetch"]) == 32 and r["size"] > 0), audited=True),
    Case("outputs_chunk", "", fetch_of_alice, _rule(Forbidden, OK, Forbidden),
         R(lambda w, r, a, p: r[:2] == b"PK")),
    Case("outputs_end", "", lambda w, p: fetch_of_alice(w, p)[:1], _rule(Forbidden, OK, Forbidden),
         R(lambda w, r, a, p: r == {"ended": a[0]})),
    Case("edit", "top", edit_args("top"), ADMIN_ONLY, check_edit, audited=True),
    Case("clear_history", "", none, ADMIN_ONLY, check_clear_history, audited=True),
    Case("clear_status", "", none, ADMIN_ONLY, check_clear_status, audited=True),
    Case("set_share", "", lambda w, p: ("bob", 2.0), ADMIN_ONLY,
         R(lambda w, r, a, p: w.users.get("bob")["share"] == 2.0), audited=True),
    Case("audit", "", lambda w, p: (500,), ADMIN_ONLY,
         R(lambda w, r, a, p: r and all(row["actor"] == "root" for row in r))),
    Case("user_list", "", none, SIGNED_IN,
         R(lambda w, r, a, p: {"alice", "bob", "root"} <= {u["name"] for u in r}
           and not any("pw_hash" in u for u in r))),
    Case("user_add", "", lambda w, p: ("new" + uuid.uuid4().hex[:8], "password-123"),
         ADMIN_ONLY, R(lambda w, r, a, p: w.users.get(a[0])["role"] == "user"), audited=True),
    Case("user_remove", "", lambda w, p: (w.new_user(),), ADMIN_ONLY,
         R(lambda w, r, a, p: w.users.get(a[0]) is None), audited=True),
    Case("user_passwd", "self", lambda w, p: (NAME_OF.get(p, "alice"),
                                             PASSWORDS[NAME_OF.get(p, "alice")]),
         SIGNED_IN, check_passwd, audited=True),
    Case("user_passwd", "of-alice", lambda w, p: ("alice", PASSWORDS["alice"]), OWN_OR_ADMIN,
         check_passwd, audited=True),
    Case("revoke_tokens", "", lambda w, p: ("alice",), ADMIN_ONLY, check_revoke, audited=True),
    # The admin's shutdown is test_admin_shutdown_ends_the_server, at the end.
    Case("shutdown", "", lambda w, p: (False,), ADMIN_ONLY, audited=True),
    # Ends running jobs: the owner cancels one, the admin another (the first one
    # stays, as the dependency that keeps the pool queued).
    Case("cancel", "running", lambda w, p: (w.running[1] if p == "owner" else w.running[2],),
         OWN_OR_ADMIN, check_cancel, audited=True),
]
SEPARATE = {("shutdown", "admin")}
CELLS = [
    pytest.param(case, p, id=f"{case.id}[{p}]")
    for case in CASES for p in PRINCIPALS if (case.method, p) not in SEPARATE
]


def test_the_matrix_covers_every_controller_method() -> None:
    public = {
        name for name, _ in inspect.getmembers(Controller, inspect.isfunction)
        if not name.startswith("_")
    }
    assert {c.method for c in CASES} == public
    for case in CASES:
        assert set(case.expect) == set(PRINCIPALS), case.id
    cells = {(c.values[0].method, c.values[1]) for c in CELLS}
    assert {(m, p) for m in public for p in PRINCIPALS} - cells == SEPARATE


@pytest.mark.parametrize(("case", "principal"), CELLS)
def test_cell(world: World, case: Case, principal: str) -> None:
    args = case.args(world, principal)
    client = world.client(principal)
    want = case.expect[principal]
    try:
        before = world.snapshot()
        if want is OK:
            result = client.call(case.method, *args)
            world.settle()
            if case.check is not None:
                case.check(world, result, args, principal, client)
            audit = world.snapshot()["audit"][len(before["audit"]):]
            if principal == "admin" and case.audited:
                assert [row[2] for row in audit] == ["root"], audit
            else:
                assert audit == [], "only an admin's command is audited"
            return
        with pytest.raises(DopqError) as info:
            client.call(case.method, *args)
        assert type(info.value) is want, f"{type(info.value).__name__}: {info.value}"
        message = str(info.value)
        assert message.strip() and "\n" not in message and len(message) < 200, message
        if case.match is not None:
            assert case.match in message
        elif want is NotAuthenticated:
            assert NOT_SIGNED_IN[principal] in message
        else:
            assert re.search(r"admin|belong|only|not your", message), message
        assert_same_store(before, world.snapshot())
        assert not world.platform.shutdown_requested.is_set()
    finally:
        client.close()


def test_admin_shutdown_ends_the_server(world: World) -> None:
    """Last in the module: the server is gone afterwards."""
    admin, watcher = world.client("admin"), world.client("owner")
    assert watcher.call("whoami")["user"] == "alice"
    assert admin.call("shutdown") == {"shutdown": True, "stop_running": False}
    assert world.platform.shutdown_requested.is_set()
    last = world.store.audit_log(1)[0]
    assert (last["actor"], last["action"], last["detail"]) == ("root", "shutdown",
                                                              "leave running")
    world.run.server.wait()  # as serve() does: returns once a shutdown was asked for
    world.run.stop()
    admin.close()
    watcher.close()
    # A new connection finds no server. (A connection opened before the stop is
    # test_auth.py::test_a_connected_client_learns_the_server_is_gone.)
    late = world.client("anonymous")
    with pytest.raises(ServerUnavailable) as info:
        late.call("ping")
    assert "\n" not in str(info.value)
    late.close()

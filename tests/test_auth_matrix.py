"""The authorisation rules wired end to end: a few API methods x every kind of caller.

Every method against every rule is tests/test_authz.py, a pure table; here a
selection, one or more per part that asks the rules (the API's sign-in, the
uploads, the job logs, the commands, the edits inside the store's transaction,
the output fetches, the account commands), runs through a real server.
Callers: anonymous (no token), a bad token, an expired token, the owner of the
jobs (alice), another user (bob) and an admin (root). One server serves the
whole module; every cell gets fresh tokens and, when it destroys something,
fresh targets. A refused cell must raise the right ``AuthError`` subclass with
a one-line message and leave the store's tables as they were; an allowed cell
must work and, for an admin command, add exactly one audit row.

Fixture jobs, all alice's: one finished, one running (``sleep 600``) and a
pool of queued ones that wait for the running one, so they stay queued.
``shutdown`` by the admin ends the server, so it runs last, in its own test.
"""

from __future__ import annotations

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
        self.running = [self.submit("sleeper", name=f"running-{i}") for i in range(1)]
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


def check_cancel(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["id"] == a[0]
    wait_for(lambda: w.state(a[0]) == "cancelled", 60)
    assert w.store.job(a[0])["error"] == f"cancelled by {NAME_OF[p]}"


def check_clear_history(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r["cleared"] >= 1
    assert w.finished not in [j["id"] for j in w.platform.history()]


def check_passwd(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
    assert r == {"user": a[0]}
    assert w.users.authenticate(a[0], a[1]).name == a[0]
    live = w.store.read("SELECT 1 FROM tokens WHERE user = ? AND revoked = 0", (a[0],))
    assert not live, "a new password must revoke the user's tokens"


def R(check: Callable[[World, Any, tuple[Any, ...], str], bool]) -> Check:  # noqa: N802
    """A check written as one boolean expression of (world, result, args, principal)."""

    def run(w: World, r: Any, a: tuple[Any, ...], p: str, c: Client) -> None:
        assert check(w, r, a, p), r

    return run


UPLOAD_SIZE = 100

CASES: list[Case] = [
    Case("whoami", "", none, SIGNED_IN,
         R(lambda w, r, a, p: r["user"] == NAME_OF[p] and
           r["role"] == ("admin" if p == "admin" else "user"))),
    Case("job", "", queued, SIGNED_IN,
         R(lambda w, r, a, p: r["id"] == a[0] and r["events"]
           and (r["spec"] is not None) is (p in ("owner", "admin")))),
    Case("submit_begin", "as-alice", lambda w, p: (UPLOAD_SIZE, {"user": "alice"}),
         OWN_OR_ADMIN, R(lambda w, r, a, p: w.platform.uploads.pending[r].user == "alice")),
    Case("submit_chunk", "", lambda w, p: (w.platform.begin_upload(ALICE, 100, {}), b"x" * 10),
         OWN_OR_ADMIN, R(lambda w, r, a, p: r == 10)),
    Case("logs", "", lambda w, p: (w.finished, "run"), OWN_OR_ADMIN,
         R(lambda w, r, a, p: "finished-output" in r["data"])),
    Case("cancel", "queued", lambda w, p: (consumed_if_allowed(OWN_OR_ADMIN)(w, p),),
         OWN_OR_ADMIN, check_cancel, audited=True),
    Case("edit", "priority-above-0", edit_args("priority", +1, low=1), ADMIN_ONLY, check_edit,
         audited=True),
    Case("edit", "release-admin-hold", edit_args("release", held=2), ADMIN_ONLY, check_edit,
         audited=True),
    Case("edit", "top", edit_args("top"), ADMIN_ONLY, check_edit, audited=True),
    Case("outputs_begin", "", lambda w, p: (w.finished,), OWN_OR_ADMIN,
         R(lambda w, r, a, p: len(r["fetch"]) == 32 and r["size"] > 0), audited=True),
    Case("outputs_chunk", "", fetch_of_alice, _rule(Forbidden, OK, Forbidden),
         R(lambda w, r, a, p: r[:2] == b"PK")),
    Case("clear_history", "", none, ADMIN_ONLY, check_clear_history, audited=True),
    Case("audit", "", lambda w, p: (500,), ADMIN_ONLY,
         R(lambda w, r, a, p: r and all(row["actor"] == "root" for row in r))),
    Case("user_add", "", lambda w, p: ("new" + uuid.uuid4().hex[:8], "password-123"),
         ADMIN_ONLY, R(lambda w, r, a, p: w.users.get(a[0])["role"] == "user"), audited=True),
    Case("user_passwd", "of-alice", lambda w, p: ("alice", PASSWORDS["alice"]), OWN_OR_ADMIN,
         check_passwd, audited=True),
    # The admin's shutdown is test_admin_shutdown_ends_the_server, at the end.
    Case("shutdown", "", lambda w, p: (False,), ADMIN_ONLY, audited=True),
]
SEPARATE = {("shutdown", "admin")}
CELLS = [
    pytest.param(case, p, id=f"{case.id}[{p}]")
    for case in CASES for p in PRINCIPALS if (case.method, p) not in SEPARATE
]


def test_the_cells_name_real_methods_and_every_caller() -> None:
    for case in CASES:
        assert callable(getattr(Controller, case.method, None)), case.id
        assert set(case.expect) == set(PRINCIPALS), case.id


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

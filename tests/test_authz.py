"""The authorisation matrix as a table: every API method x every kind of caller.

Pure: ``dopq.server.authz`` decides from the facts it is given, so no server,
Docker or store is needed. The list of methods comes from the ``Controller``
class itself: a new public method without a rule (``api.RULES``) or without a
row here fails ``test_every_controller_method_has_rules_and_rows``.

Callers: anonymous (no valid token: none, a bad, an expired or a revoked one;
``test_bad_expired_and_revoked_tokens_are_anonymous`` shows they all end up
as no caller), the owner of the job (alice), another user (bob), an admin.
A few cells run end to end against a real server in test_auth_matrix.py.
"""

from __future__ import annotations

import inspect
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dopq.core.errors import Forbidden, NotAuthenticated
from dopq.server import authz
from dopq.server.api import RULES, Controller
from dopq.server.auth import Principal, Role, Users
from dopq.server.authz import Action
from dopq.server.store import Store

ALICE, BOB, ROOT = Principal("alice", Role.USER), Principal("bob", Role.USER), \
    Principal("root", Role.ADMIN)
CALLERS: dict[str, Principal | None] = {"anonymous": None, "owner": ALICE, "other": BOB,
                                        "admin": ROOT}
OK = "ok"
JOB = 7


@dataclass
class Row:
    method: str
    label: str
    action: Action
    expect: dict[str, str]  # caller -> OK or the refusal's message
    owner: str | None = "alice"
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.method}-{self.label}" if self.label else self.method


def rule(other: str = OK, owner: str = OK, admin: str = OK) -> dict[str, str]:
    return {"anonymous": authz.NOT_SIGNED_IN, "other": other, "owner": owner, "admin": admin}


OPEN = {c: OK for c in CALLERS}
SIGNED_IN = rule()


def own_or_admin(message: str) -> dict[str, str]:
    return rule(other=message)


def admin_only(what: str) -> dict[str, str]:
    message = f"{what} needs the admin role"
    return rule(other=message, owner=message)


BELONGS = f"job {JOB} belongs to alice; nothing changed"
ABOVE_0 = f"only an admin may set a priority above 0 (job {JOB}); nothing changed"
LOWER_NICE = f"only an admin may lower nice (job {JOB}); nothing changed"
ADMIN_HELD = f"job {JOB} was held by an admin: only an admin may release it; nothing changed"
SUBMIT_PRIORITY = "only an admin may submit with a priority above 0"


def edit(label: str, action: Action, expect: dict[str, str], **facts: Any) -> Row:
    return Row("edit", label, action, expect, facts={"job": JOB, **facts})


READS = ("logout", "whoami", "job", "queue", "running", "history", "status", "users", "images",
         "priority", "snapshot", "array", "user_list", "upload_socket")
ROWS: list[Row] = [
    Row("ping", "", Action.PING, OPEN, owner=None),
    Row("login", "", Action.LOGIN, OPEN, owner=None),
    *(Row(m, "", Action.READ, SIGNED_IN, owner=None) for m in READS),
    # ``job`` shows every job to the signed-in; its spec (env) and image only to these.
    Row("job", "spec-and-image", Action.SEE_PRIVATE,
        own_or_admin(f"the spec and image of job {JOB} belong to alice"), facts={"job": JOB}),
    Row("submit_begin", "", Action.SUBMIT, SIGNED_IN, owner=None),
    Row("submit_begin", "as-alice", Action.SUBMIT,
        own_or_admin("cannot submit as alice: only as yourself (bob)"),
        owner=None, facts={"user": "alice"}),
    Row("submit_begin", "not-allowed", Action.SUBMIT,
        rule(other="cannot submit as alice: only as yourself (bob)",
             owner="user alice is not allowed to submit on this server",
             admin="user alice is not allowed to submit on this server"),
        owner=None, facts={"user": "alice", "allowed": ("bob",)}),
    Row("submit_begin", "priority-above-0", Action.SUBMIT,
        rule(other=SUBMIT_PRIORITY, owner=SUBMIT_PRIORITY), owner=None, facts={"priority": 1}),
    Row("submit_begin", "priority-0", Action.SUBMIT, SIGNED_IN, owner=None,
        facts={"priority": 0}),
    Row("submit_begin", "after-alices-job", Action.DEPEND,
        own_or_admin(f"--after {JOB}: job {JOB} belongs to alice; a job may wait only for "
                     "its owner's jobs"), facts={"job": JOB, "flag": "--after"}),
    Row("submit_chunk", "", Action.UPLOAD, own_or_admin("not your upload")),
    Row("submit_finish", "", Action.UPLOAD, own_or_admin("not your upload")),
    Row("submit_finish", "config-priority", Action.SUBMIT,
        rule(other=SUBMIT_PRIORITY, owner=SUBMIT_PRIORITY), owner=None, facts={"priority": 5}),
    Row("submit_abort", "", Action.UPLOAD, own_or_admin("not your upload")),
    Row("logs", "", Action.READ_LOGS, own_or_admin(f"the logs of job {JOB} belong to alice"),
        facts={"job": JOB}),
    Row("logs", "visible-to-all", Action.READ_LOGS, SIGNED_IN,
        facts={"job": JOB, "visible_to_all": True}),
    Row("cancel", "", Action.CANCEL, own_or_admin(f"cannot cancel job {JOB}: it belongs to alice"),
        facts={"job": JOB}),
    edit("delete", Action.EDIT_DELETE, own_or_admin(BELONGS)),
    edit("priority-lower", Action.EDIT_PRIORITY, own_or_admin(BELONGS), value=-1, current=0),
    edit("priority-restore", Action.EDIT_PRIORITY, own_or_admin(BELONGS), value=0, current=-3),
    edit("priority-above-0", Action.EDIT_PRIORITY, rule(other=BELONGS, owner=ABOVE_0),
         value=1, current=0),
    # A priority an admin raised may be lowered by its owner, not raised further.
    edit("priority-lower-raised", Action.EDIT_PRIORITY, own_or_admin(BELONGS), value=3, current=5),
    edit("priority-raise-raised", Action.EDIT_PRIORITY, rule(other=BELONGS, owner=ABOVE_0),
         value=6, current=5),
    edit("nice-raise", Action.EDIT_NICE, own_or_admin(BELONGS), value=1, current=0),
    edit("nice-lower", Action.EDIT_NICE, rule(other=BELONGS, owner=LOWER_NICE),
         value=-1, current=0),
    edit("hold", Action.EDIT_HOLD, own_or_admin(BELONGS)),
    edit("release", Action.EDIT_RELEASE, own_or_admin(BELONGS), held=1),
    edit("release-admin-hold", Action.EDIT_RELEASE, rule(other=BELONGS, owner=ADMIN_HELD),
         held=authz.ADMIN_HOLD),
    edit("time-limit", Action.EDIT_TIME_LIMIT, own_or_admin(BELONGS)),
    Row("edit", "top", Action.EDIT_TOP, admin_only("top"), owner=None),
    edit("top-of-alices-job", Action.EDIT_TOP, admin_only("top")),
    Row("outputs_begin", "", Action.FETCH_OUTPUTS,
        own_or_admin(f"cannot fetch the outputs of job {JOB}: it belongs to alice"),
        facts={"job": JOB}),
    # A fetch in flight is its asker's download: not even an admin reads it.
    Row("outputs_chunk", "", Action.READ_FETCH,
        rule(other="not your fetch", admin="not your fetch")),
    Row("outputs_end", "", Action.READ_FETCH,
        rule(other="not your fetch", admin="not your fetch")),
    Row("clear_history", "", Action.CLEAR_HISTORY, admin_only("clear-history"), owner=None),
    Row("clear_status", "", Action.CLEAR_STATUS, admin_only("clear-status"), owner=None),
    Row("shutdown", "", Action.SHUTDOWN, admin_only("shutdown"), owner=None),
    Row("set_share", "", Action.SET_SHARE, admin_only("set-share"), owner=None),
    Row("audit", "", Action.AUDIT, admin_only("audit"), owner=None),
    Row("user_add", "", Action.USER_ADD, admin_only("user add"), owner=None),
    Row("user_remove", "", Action.USER_REMOVE, admin_only("user remove"), owner=None),
    Row("user_passwd", "of-alice", Action.USER_PASSWD,
        own_or_admin("changing another user's password needs the admin role")),
    Row("revoke_tokens", "", Action.REVOKE_TOKENS, admin_only("revoke tokens"), owner=None),
    # One's own notification targets; an admin lists and removes anyone's.
    *(Row(m, "", Action.NOTIFY, SIGNED_IN, owner=None) for m in ("notify_add", "notify_list")),
    Row("notify_remove", "of-alice", Action.NOTIFY,
        own_or_admin(f"notification target {JOB} belongs to alice"), facts={"job": JOB}),
    # dopq report: every signed-in caller; each line is its user's and the admins'
    Row("report", "", Action.REPORT, SIGNED_IN, owner=None),
    Row("report", "alices-line", Action.REPORT,
        own_or_admin("the usage of alice is theirs and the admins' to see")),
    Row("restart_job", "", Action.RESTART,
        own_or_admin(f"cannot restart job {JOB}: it belongs to alice"), facts={"job": JOB}),
    # the copy is submitted as the original's owner, with its priority
    Row("restart_job", "priority-above-0", Action.SUBMIT,
        rule(other="cannot submit as alice: only as yourself (bob)", owner=SUBMIT_PRIORITY),
        owner=None, facts={"user": "alice", "priority": 1}),
]
CELLS = [pytest.param(row, caller, id=f"{row.id}[{caller}]") for row in ROWS for caller in CALLERS]


def public_methods() -> set[str]:
    return {name for name, _ in inspect.getmembers(Controller, inspect.isfunction)
            if not name.startswith("_")}


def test_every_controller_method_has_rules_and_rows() -> None:
    methods = public_methods()
    assert set(RULES) == methods, "every API method names the rules that guard it"
    assert {row.method for row in ROWS} == methods, "every API method has rows here"
    for row in ROWS:
        assert row.action in RULES[row.method], f"{row.id}: {row.action} is not among its rules"
        assert set(row.expect) == set(CALLERS), row.id
    # Every rule of a method is tried here, and every action guards some method.
    tried = {(row.method, row.action) for row in ROWS}
    assert {(m, a) for m, actions in RULES.items() for a in actions} == tried
    assert {a for actions in RULES.values() for a in actions} == set(Action)


@pytest.mark.parametrize(("row", "caller"), CELLS)
def test_cell(row: Row, caller: str) -> None:
    who = CALLERS[caller]
    want = row.expect[caller]
    assert authz.refusal(who, row.action, row.owner, **row.facts) == (None if want == OK else want)
    assert authz.may(who, row.action, row.owner, **row.facts) is (want == OK)
    if want == OK:
        authz.require(who, row.action, row.owner, **row.facts)
        return
    with pytest.raises(NotAuthenticated if who is None else Forbidden) as info:
        authz.require(who, row.action, row.owner, **row.facts)
    assert str(info.value) == want


def test_every_action_has_exactly_one_kind_of_rule() -> None:
    kinds = [authz.OPEN, authz.ADMIN_ONLY, authz.JOB_EDITS, set(authz.OWNER_OR_ADMIN),
             {Action.READ, Action.SUBMIT, Action.READ_FETCH}]
    assert sorted(a for kind in kinds for a in kind) == sorted(Action)


def test_user_passwd_of_oneself_is_every_signed_in_callers() -> None:
    for caller, who in CALLERS.items():
        if who is not None:
            assert authz.may(who, Action.USER_PASSWD, who.name), caller
    assert not authz.may(None, Action.USER_PASSWD, "alice")


AUDITED = {
    # action, owner -> audited for the admin (never for users: they are not audited)
    (Action.CANCEL, "root"): False, (Action.CANCEL, "alice"): True,
    (Action.FETCH_OUTPUTS, "root"): False, (Action.FETCH_OUTPUTS, "alice"): True,
    (Action.EDIT_PRIORITY, "root"): True, (Action.EDIT_DELETE, "alice"): True,
    (Action.READ, None): False, (Action.READ_FETCH, "root"): False, (Action.PING, None): False,
    **{(a, None): True for a in authz.ADMIN_ONLY},
    (Action.USER_PASSWD, "root"): True, (Action.USER_PASSWD, "alice"): True,
}


@pytest.mark.parametrize(("action", "owner"), list(AUDITED), ids=lambda v: str(v))
def test_what_goes_into_the_audit_log(action: Action, owner: str | None) -> None:
    assert authz.audited(ROOT, action, owner) is AUDITED[(action, owner)]
    for user in (ALICE, BOB):
        assert not authz.audited(user, action, owner)


def test_bad_expired_and_revoked_tokens_are_anonymous(tmp_path: Path) -> None:
    """No caller reaches the rules but through ``principal_for``; these get none."""
    store = Store(tmp_path / "db.sqlite")
    try:
        users = Users(store)
        users.add("alice", "alice-password")
        expired, _ = users.issue_token("alice", ttl=-1)
        revoked, _ = users.issue_token("alice", ttl=3600)
        users.revoke(revoked)
        for token, message in (("", "not signed in"), (secrets.token_urlsafe(32), "invalid token"),
                               (expired, "token expired"), (revoked, "invalid token")):
            with pytest.raises(NotAuthenticated, match=message):
                users.principal_for(token)
        live, _ = users.issue_token("alice", ttl=3600)
        assert users.principal_for(live) == ALICE
    finally:
        store.close()

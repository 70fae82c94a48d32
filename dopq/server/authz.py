"""Who may do what: every authorisation rule of the server, once, with no I/O.

The API finds out who calls (``Users.principal_for``); everything after that
asks this module. ``refusal`` gives the reason a call is refused (the message
the user reads) or ``None``; ``may`` is its yes/no, ``require`` raises it as
``Forbidden``. Where a refusal has always reached users as another error (the
Provider and the submit checks reject a job: ``JobRejected``), the caller
raises ``refusal``'s message as that.

The facts a rule needs are passed in (the job's owner, the value asked for,
the job's hold...), so the whole matrix is a table test (tests/test_authz.py).
Callers: ``None`` (no valid token: only ``ping`` and ``login``), a user, an
admin. An admin may do anything but read another caller's output fetch
(it is that caller's download in flight).
"""

from __future__ import annotations

from collections.abc import Collection
from enum import StrEnum
from typing import Any

from dopq.core.errors import Forbidden, NotAuthenticated
from dopq.server.auth import Principal

NOT_SIGNED_IN = "not signed in: run 'dopq login' (or set DOPQ_TOKEN)"
ADMIN_HOLD = 2  # jobs.held: an admin held another user's job; only an admin releases it


class Action(StrEnum):
    """Every guarded action. The value is the name admins read in the audit log."""

    PING = "ping"
    LOGIN = "login"
    READ = "read"  # the shared views, one's own session, the user list
    SUBMIT = "submit"  # facts: user (submit as), priority, allowed (users.allowed)
    UPLOAD = "upload"  # go on with an upload; owner: the user it submits as
    SEE_PRIVATE = "see-private"  # a job's spec (its env) and image id
    READ_LOGS = "read-logs"  # facts: visible_to_all (users.logs_visible_to_all)
    DEPEND = "depend"  # --after a job; facts: flag
    CANCEL = "cancel"
    FETCH_OUTPUTS = "outputs"
    READ_FETCH = "read-fetch"  # owner: who began the fetch
    EDIT_DELETE = "edit delete"
    EDIT_PRIORITY = "edit priority"  # facts: value, current
    EDIT_NICE = "edit nice"  # facts: value, current
    EDIT_HOLD = "edit hold"
    EDIT_RELEASE = "edit release"  # facts: held (the job's hold level)
    EDIT_TIME_LIMIT = "edit time_limit"
    EDIT_TOP = "edit top"
    CLEAR_HISTORY = "clear-history"
    CLEAR_STATUS = "clear-status"
    SHUTDOWN = "shutdown"
    SET_SHARE = "set-share"
    AUDIT = "audit"
    USER_ADD = "user add"
    USER_REMOVE = "user remove"
    USER_PASSWD = "user passwd"  # owner: the user whose password changes
    REVOKE_TOKENS = "revoke tokens"
    NOTIFY = "notify"  # one's notification targets; owner: the target's user; facts: job (its id)
    REPORT = "report"  # owner: whose usage a report line is (one's own, or an admin)
    RESTART = "restart"


OPEN = frozenset({Action.PING, Action.LOGIN})
ADMIN_ONLY = frozenset({
    Action.EDIT_TOP, Action.CLEAR_HISTORY, Action.CLEAR_STATUS, Action.SHUTDOWN,
    Action.SET_SHARE, Action.AUDIT, Action.USER_ADD, Action.USER_REMOVE, Action.REVOKE_TOKENS,
})
# What the admin-only refusal calls each action ("<what> needs the admin role").
ADMIN_WORDS = {Action.EDIT_TOP: "top"}
EDITS = {
    "delete": Action.EDIT_DELETE, "priority": Action.EDIT_PRIORITY, "nice": Action.EDIT_NICE,
    "hold": Action.EDIT_HOLD, "release": Action.EDIT_RELEASE,
    "time_limit": Action.EDIT_TIME_LIMIT, "top": Action.EDIT_TOP,
}

JOB_EDITS = frozenset(EDITS.values()) - ADMIN_ONLY  # a user's own waiting jobs
# The owner's or an admin's: what anyone else is told.
OWNER_OR_ADMIN = {
    Action.UPLOAD: "not your upload",
    Action.SEE_PRIVATE: "the spec and image of job {job} belong to {owner}",
    Action.READ_LOGS: "the logs of job {job} belong to {owner}",
    Action.DEPEND: "{flag} {job}: job {job} belongs to {owner}; a job may wait only for its"
                   " owner's jobs",
    Action.CANCEL: "cannot cancel job {job}: it belongs to {owner}",
    Action.FETCH_OUTPUTS: "cannot fetch the outputs of job {job}: it belongs to {owner}",
    Action.USER_PASSWD: "changing another user's password needs the admin role",
    Action.NOTIFY: "notification target {job} belongs to {owner}",
    Action.REPORT: "the usage of {owner} is theirs and the admins' to see",
    Action.RESTART: "cannot restart job {job}: it belongs to {owner}",
}


def _admin_only(action: Action) -> str:
    return f"{ADMIN_WORDS.get(action, action.value)} needs the admin role"


def _submit(who: Principal, facts: dict[str, Any]) -> str | None:
    user = facts.get("user") or who.name
    if user != who.name and not who.is_admin:
        return f"cannot submit as {user}: only as yourself ({who.name})"
    allowed: Collection[str] = facts.get("allowed") or ()
    if allowed and user not in allowed:
        return f"user {user} is not allowed to submit on this server"
    priority = facts.get("priority")
    if isinstance(priority, int) and priority > 0 and not who.is_admin:
        return "only an admin may submit with a priority above 0"
    return None


def _edit(who: Principal, action: Action, owner: str | None, facts: dict[str, Any]) -> str | None:
    job = facts.get("job")
    if owner != who.name and not who.is_admin:
        return f"job {job} belongs to {owner}; nothing changed"
    if who.is_admin:
        return None
    value = facts.get("value")
    if action is Action.EDIT_PRIORITY and value is not None \
            and value > max(0, facts.get("current", 0)):
        return f"only an admin may set a priority above 0 (job {job}); nothing changed"
    if action is Action.EDIT_NICE and value is not None and value < facts.get("current", 0):
        return f"only an admin may lower nice (job {job}); nothing changed"
    if action is Action.EDIT_RELEASE and facts.get("held") == ADMIN_HOLD:
        return f"job {job} was held by an admin: only an admin may release it; nothing changed"
    return None


def refusal(who: Principal | None, action: Action, owner: str | None = None,
            **facts: Any) -> str | None:
    """Why ``who`` may not do ``action`` (on something of ``owner``'s), or ``None``."""
    if action in OPEN:
        return None
    if who is None:
        return NOT_SIGNED_IN
    if action in ADMIN_ONLY:
        return None if who.is_admin else _admin_only(action)
    if action is Action.READ:
        return None
    if action is Action.SUBMIT:
        return _submit(who, facts)
    if action in JOB_EDITS:
        return _edit(who, action, owner, facts)
    if action is Action.READ_FETCH:  # a download in flight is its asker's alone
        return None if owner == who.name else "not your fetch"
    if action is Action.READ_LOGS and facts.get("visible_to_all"):
        return None
    if owner is None or owner == who.name or who.is_admin:
        return None
    return OWNER_OR_ADMIN[action].format(owner=owner, job=facts.get("job"),
                                         flag=facts.get("flag", "--after"))


def may(who: Principal | None, action: Action, owner: str | None = None, **facts: Any) -> bool:
    return refusal(who, action, owner, **facts) is None


def require(who: Principal | None, action: Action, owner: str | None = None,
            **facts: Any) -> None:
    """Raise ``Forbidden`` (``NotAuthenticated`` for no caller) unless allowed."""
    reason = refusal(who, action, owner, **facts)
    if reason is not None:
        raise (NotAuthenticated if who is None else Forbidden)(reason)


def audited(who: Principal, action: Action, owner: str | None = None) -> bool:
    """Whether the call goes into the audit log: what admins do, but their reads
    and, for cancel and outputs, acting on their own jobs."""
    if not who.is_admin or action in (OPEN | {Action.READ, Action.READ_FETCH, Action.REPORT}):
        return False
    if action in (Action.CANCEL, Action.FETCH_OUTPUTS):
        return owner is not None and owner != who.name
    return True

"""What callers may change: cancel, edit waiting jobs, the admins' commands.

Every command asks ``dopq.server.authz`` first, changes the store through its
domain methods (which write the event rows the queue thread reads), records
what admins do in the audit log, wakes the queue thread when the order may
have moved, and tells the views (``wrote``) so the caller reads its change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from dopq.core.errors import Conflict, DopqError, JobRejected
from dopq.core.jobs import FINAL_STATES
from dopq.core.settings import Settings
from dopq.core.spec import check_overrides
from dopq.server import authz, reports
from dopq.server import fetch as fetch_mod
from dopq.server.auth import Principal, Role, Users, check_username
from dopq.server.authz import ADMIN_HOLD, Action
from dopq.server.fetch import OutputFetches
from dopq.server.store import JobRow, Store
from dopq.server.supervisor import Supervisor
from dopq.server.viewbuilder import job_view

EDIT_ACTIONS = tuple(authz.EDITS)
BOUNDS = {"priority": 1000, "nice": 1_000_000}


def audit(store: Store, who: Principal, action: Action, detail: str = "",
          owner: str | None = None) -> None:
    """Record the call in the audit log if the rules say so (``authz.audited``)."""
    if authz.audited(who, action, owner):
        store.audit(who.name, action.value, detail)


def edit_value(action: str, value: Any) -> tuple[int | None, float | None]:
    """The checked value of an edit: (number for priority/nice, seconds for time_limit)."""
    if action == "time_limit":
        try:
            return None, check_overrides({"time_limit": value}).time_limit
        except JobRejected as exc:
            raise DopqError(exc.reason) from None
    if action not in BOUNDS:
        return None, None
    try:
        num = int(value)
    except (TypeError, ValueError):
        raise DopqError(f"{action} needs an integer value") from None
    bound = BOUNDS[action]
    if not -bound <= num <= bound:
        raise DopqError(f"{action} must be between -{bound} and {bound}")
    return num, None


class JobCommands:
    """The changing calls of the API, each one authorised, applied, audited."""

    def __init__(self, settings: Settings, store: Store, users: Users, workers: Supervisor,
                 fetches: OutputFetches, wrote: Callable[[Principal], None]) -> None:
        self.settings = settings
        self.store = store
        self.users = users
        self.workers = workers
        self.fetches = fetches
        self.wrote = wrote
        self.shutdown_requested = threading.Event()
        self.stop_running_on_shutdown = False

    def cancel(self, who: Principal, job_id: int) -> dict[str, Any]:
        row = self.store.job(int(job_id))
        authz.require(who, Action.CANCEL, row["user"], job=row["id"])
        audit(self.store, who, Action.CANCEL, f"job {job_id} of {row['user']}", row["user"])
        self.workers.queue.cancel(row["id"], who.name)
        self.wrote(who)
        return job_view(self.store.job(row["id"]), time.time())

    def edit_queued(self, who: Principal, ids: Iterable[int], action: str,
                    value: Any = None) -> dict[str, Any]:
        """One atomic batch edit of waiting jobs (all or nothing)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise DopqError("no job ids given")
        if action not in EDIT_ACTIONS:
            raise DopqError(f"unknown action {action!r}: use one of {', '.join(EDIT_ACTIONS)}")
        rule = authz.EDITS[action]
        if action == "top":
            authz.require(who, rule)
        num, limit = edit_value(action, value)

        def check(row: JobRow) -> None:
            current = row[action] if action in BOUNDS else None
            authz.require(who, rule, row["user"], job=row["id"], value=num, current=current,
                          held=row["held"])

        def change(row: JobRow, n: int, top: int) -> tuple[dict[str, Any], str]:
            if action == "delete":
                reason = f"cancelled by {who.name}"
                return {"state": "cancelled", "error": reason, "finished_at": now}, reason
            fields: dict[str, dict[str, Any]] = {
                "priority": {"priority": num}, "nice": {"nice": num},
                "hold": {"held": ADMIN_HOLD if who.is_admin and row["user"] != who.name else 1},
                "time_limit": {"time_limit": limit}, "release": {"held": 0},
                "top": {"top": top + len(ids) - n},
            }
            shown = num if num is not None else limit
            return fields[action], action + (f" {shown:g}" if shown is not None else "") + \
                f" by {who.name}"

        now = time.time()
        self.store.edit_jobs(ids, check, change, at=now)
        audit(self.store, who, rule, f"jobs {ids} value {value!r}")
        self.workers.queue.wake()
        self.wrote(who)
        return {"changed": ids, "action": action}

    def clear_history(self, who: Principal, user: str | None = None) -> dict[str, Any]:
        authz.require(who, Action.CLEAR_HISTORY)
        n = self.store.hide_history(check_username(user) if user else None)
        audit(self.store, who, Action.CLEAR_HISTORY, user or "all users")
        self.wrote(who)
        return {"cleared": n}

    def clear_status(self, who: Principal, user: str | None = None) -> dict[str, Any]:
        authz.require(who, Action.CLEAR_STATUS)
        name = check_username(user) if user else None
        self.workers.queue.reset_usage(name)
        audit(self.store, who, Action.CLEAR_STATUS, user or "all users")
        self.wrote(who)
        return {"reset": name or "all"}

    def request_shutdown(self, who: Principal, stop_running: bool = False) -> dict[str, Any]:
        authz.require(who, Action.SHUTDOWN)
        audit(self.store, who, Action.SHUTDOWN,
              "stop running" if stop_running else "leave running")
        self.stop_running_on_shutdown = bool(stop_running)
        self.shutdown_requested.set()
        return {"shutdown": True, "stop_running": bool(stop_running)}

    def set_share(self, who: Principal, user: str, weight: float) -> dict[str, Any]:
        authz.require(who, Action.SET_SHARE)
        self.users.set_share(user, float(weight))
        self.workers.queue.shares = self.users.shares()
        audit(self.store, who, Action.SET_SHARE, f"{user} = {weight}")
        self.wrote(who)
        self.workers.queue.wake()
        return {"user": user, "weight": float(weight)}

    def outputs_begin(self, who: Principal, job_id: int) -> dict[str, Any]:
        """Zip a finished job's ``/outdir`` for fetching in chunks (``dopq.server.fetch``)."""
        row = self.store.job(int(job_id))
        authz.require(who, Action.FETCH_OUTPUTS, row["user"], job=row["id"])
        if row["state"] not in FINAL_STATES:
            raise Conflict(f"job {row['id']} is {row['state']}: its outputs can be "
                           "fetched once it has ended")
        audit(self.store, who, Action.FETCH_OUTPUTS, f"job {row['id']} of {row['user']}",
              row["user"])
        f = self.fetches.begin(who.name, row["user"], row["id"])
        return {"fetch": f.id, "size": f.size, "files": f.files, "skipped": f.skipped,
                "chunk": fetch_mod.CHUNK}

    # -- dopq report, dopq restart (dopq.server.reports) ----------------------------------
    def report(self, who: Principal, since: str | None, until: str | None,
               by: str | None) -> dict[str, Any]:
        authz.require(who, Action.REPORT)
        return reports.usage_report(self.store, self.workers.gpu_info, who, since, until, by)

    def restart(self, who: Principal, job_id: int, overrides: Any) -> dict[str, Any]:
        new_id = reports.restart(self.settings, self.store, self.workers.runtime,
                                 self.workers.gpu_info, who, job_id, overrides)
        row = self.store.job(new_id)
        audit(self.store, who, Action.RESTART, f"job {job_id} of {row['user']} as job {new_id}",
              row["user"])
        self.workers.queue.wake()
        self.wrote(who)
        return job_view(row, time.time())

    # -- accounts (admins; a user changes their own password) -----------------------------
    def audit_log(self, who: Principal, limit: int) -> list[dict[str, Any]]:
        authz.require(who, Action.AUDIT)
        return self.store.audit_log(int(limit))

    def user_add(self, who: Principal, name: str, password: str, admin: bool) -> dict[str, Any]:
        authz.require(who, Action.USER_ADD)
        self.users.add(name, str(password), Role.ADMIN if admin else Role.USER)
        audit(self.store, who, Action.USER_ADD, f"{name} admin={bool(admin)}")
        allowed = self.settings.users.allowed
        name = check_username(name)
        return {"user": name, "allowed": not allowed or name in allowed}

    def user_remove(self, who: Principal, name: str) -> dict[str, Any]:
        authz.require(who, Action.USER_REMOVE)
        self.users.remove(name)
        audit(self.store, who, Action.USER_REMOVE, name)
        return {"removed": check_username(name)}

    def user_passwd(self, who: Principal, name: str, password: str) -> dict[str, Any]:
        authz.require(who, Action.USER_PASSWD, check_username(name))
        self.users.set_password(name, str(password))
        audit(self.store, who, Action.USER_PASSWD, name)
        return {"user": check_username(name)}

    def revoke_tokens(self, who: Principal, name: str) -> dict[str, Any]:
        authz.require(who, Action.REVOKE_TOKENS)
        n = self.users.revoke_all(check_username(name))
        audit(self.store, who, Action.REVOKE_TOKENS, name)
        return {"revoked": n}

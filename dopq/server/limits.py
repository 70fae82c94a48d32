"""The per-user queue limit (``policy.max_queued_per_user``), kept where jobs are made.

A user's *slots* are their waiting jobs (received, building, queued), an
array counting one slot per element, plus the uploads they have begun and
not finished. The limit is kept in two places:

- when an upload begins, its slots are reserved (``QueueSlots.reserve``):
  six uploads begun at once against a limit of 3 get three reservations
  and three refusals, before a byte is sent;
- inside the store transaction that creates job rows (``QueueSlots.add_job``
  for uploads, ``add_job_within`` for the drop folder, ``check_room`` when a
  built array becomes its element jobs), counted again from the table.

Transactions are ``BEGIN IMMEDIATE``, so the count and the insert cannot
interleave with another writer, in this process or the Provider's.
Reservations live in the server process: the Provider does not see them,
but its own inserts are counted in the table, so an upload that lost its
slot to a drop-folder job meanwhile is refused when it finishes.

What one job may ask for (GPUs, memory, CPUs, ...: ``check_spec_limits``) is
judged here too, at submit time (``dopq.server.intake``) and by the Provider.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from typing import Any

from dopq.core.errors import JobRejected, LimitExceeded
from dopq.core.jobs import JobState
from dopq.core.settings import Settings
from dopq.core.spec import JobSpec, check_overrides
from dopq.server.store import Store


def slots_of(state: str, overrides: Any) -> int:
    """Slots one stored job takes: an array not yet expanded counts its elements."""
    if state == JobState.QUEUED.value:
        return 1  # arrays are expanded into one row per element when queued
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides or "{}")
        except ValueError:
            return 1
    if not isinstance(overrides, dict) or not overrides.get("array"):
        return 1
    return overrides_slots({"array": overrides["array"]})


def submission_slots(overrides: dict[str, Any]) -> int:
    """Check a submission's options (``JobRejected`` names a bad one: a control
    character in ``--name``, a bad ``--array``...) and return the slots it takes."""
    return max(1, len(check_overrides(overrides).array))


def overrides_slots(overrides: dict[str, Any]) -> int:
    """Slots a submission with these options takes (``--array 0-19``: 20)."""
    if not overrides.get("array"):
        return 1
    try:
        return max(1, len(check_overrides({"array": overrides["array"]}).array))
    except JobRejected:
        return 1  # refused with its reason when it is built


def waiting_slots(db: sqlite3.Connection, user: str, exclude: int | None = None) -> int:
    """Slots ``user``'s waiting jobs take (without job ``exclude``)."""
    rows = Store.waiting_of(db, user)
    return sum(slots_of(r["state"], r["overrides"]) for r in rows if r["id"] != exclude)


def refusal(user: str, cap: int, taken: int, wanted: int) -> LimitExceeded:
    left = max(0, cap - taken)
    what = f"an array of {wanted} jobs" if wanted > 1 else "a job"
    return LimitExceeded(
        f"queue limit: {user} may have {cap} jobs waiting, {left} slot"
        f"{'' if left == 1 else 's'} left; {what} does not fit"
    )


def check_room(
    db: sqlite3.Connection, user: str, cap: int, wanted: int, *,
    reserved: int = 0, exclude: int | None = None,
) -> None:
    """Raise ``LimitExceeded`` unless ``wanted`` more slots fit (inside a transaction)."""
    if cap <= 0:
        return
    taken = waiting_slots(db, user, exclude) + reserved
    if taken + wanted > cap:
        raise refusal(user, cap, taken, wanted)


def add_job_within(store: Store, cap: int, fields: dict[str, Any], wanted: int = 1) -> int:
    """Create a job (state ``received`` unless given) if its slots fit the limit."""
    return store.add_job(room=lambda db: check_room(db, fields["user"], cap, wanted), **fields)


@dataclass
class _Reservation:
    user: str
    slots: int


class QueueSlots:
    """Reservations of uploads in flight, and job creation that honours them."""

    def __init__(self, store: Store, cap: int) -> None:
        self.store = store
        self.cap = cap
        self._held: dict[str, _Reservation] = {}
        self._lock = threading.Lock()

    def reserved(self, user: str, but: str | None = None) -> int:
        with self._lock:
            return sum(r.slots for k, r in self._held.items() if r.user == user and k != but)

    def reserve(self, key: str, user: str, slots: int) -> None:
        """Hold ``slots`` for upload ``key`` or raise ``LimitExceeded``.

        Counted in a write transaction, so no job can be created between the
        count and the reservation."""
        if self.cap <= 0:
            return
        with self.store.transaction() as db, self._lock:
            taken = waiting_slots(db, user) + sum(
                r.slots for r in self._held.values() if r.user == user)
            if taken + slots > self.cap:
                raise refusal(user, self.cap, taken, slots)
            self._held[key] = _Reservation(user, slots)

    def release(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def add_job(self, key: str, fields: dict[str, Any], slots: int) -> int:
        """Create upload ``key``'s job, checked again against the table; the
        reservation is released in the same transaction (and on refusal)."""
        def room(db: sqlite3.Connection) -> None:
            check_room(db, fields["user"], self.cap, slots,
                       reserved=self.reserved(fields["user"], but=key))
            self.release(key)  # the job's row takes its place in this transaction

        try:
            return self.store.add_job(room=room, **fields)
        finally:
            self.release(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


# -- what one job may ask for ------------------------------------------------------------
def gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_spec_limits(spec: JobSpec, settings: Settings, total_gpus: int,
                      device_memory: int = 0) -> None:
    """Refuse a spec that asks more than the machine or the admins allow.

    ``device_memory``: the largest GPU's memory in bytes (0: not known, so
    ``gpu_memory`` is not checked here; the queue still never places a share
    that does not fit).
    """
    if spec.num_gpus > total_gpus:
        raise JobRejected(f"asks for {spec.num_gpus} GPUs, this server has {total_gpus}")
    if spec.gpu_memory is not None and device_memory > 0:
        reserve = settings.bytes_of("gpus.memory_reserve")
        room = device_memory - reserve
        if spec.gpu_memory > room:
            raise JobRejected(
                f"gpu_memory {gib(spec.gpu_memory)} is more than any GPU here can share: "
                f"the largest has {gib(device_memory)}, less a reserve of {gib(reserve)}, "
                f"so at most {gib(max(room, 0))}")
    if spec.memory is not None and spec.memory > settings.bytes_of("limits.max_memory"):
        raise JobRejected(
            f"memory {spec.memory // 2**20} MiB is over the limit of {settings.limits.max_memory}"
        )
    max_cpus = settings.limits.max_cpus or float(os.cpu_count() or 1)
    if spec.cpus is not None and spec.cpus > max_cpus:
        raise JobRejected(f"cpus {spec.cpus:g} is over the limit of {max_cpus:g}")
    if spec.shm_size is not None and spec.shm_size > settings.bytes_of("limits.max_shm"):
        raise JobRejected(f"shm_size is over the limit of {settings.limits.max_shm}")
    cap = settings.max_time_limit()
    if cap is not None and spec.time_limit is not None and spec.time_limit > cap:
        raise JobRejected(f"time_limit is over the limit of {settings.limits.max_time_limit}")

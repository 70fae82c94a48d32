"""The store's job writes: each one adds the event row the queue's refresh reads.

Real SQLite in a temporary folder; no server, no Docker.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dopq.core.errors import Conflict, Forbidden, LimitExceeded, NotFound
from dopq.core.jobs import WAITING_STATES, JobState
from dopq.server.store import JobRow, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "dopq.sqlite")
    yield s
    s.close()


def queued(store: Store, user: str = "alice", **fields: Any) -> int:
    return store.add_job(name="job", user=user, origin="api", state=JobState.QUEUED, **fields)


def changed(store: Store, since: int) -> set[int]:
    return {int(r["id"]) for r in store.changed_since(since)[1]}


def test_every_job_write_is_seen_by_changed_since(store: Store) -> None:
    mark = store.last_event_id()
    a, b = queued(store), queued(store)
    assert changed(store, mark) == {a, b}
    mark = store.last_event_id()
    store.transition(a, JobState.RUNNING, expect=[JobState.QUEUED], gpus=[0])
    assert changed(store, mark) == {a}
    mark = store.last_event_id()
    store.edit_jobs([b], lambda row: None, lambda row, n, top: ({"priority": -5}, "priority -5"))
    assert changed(store, mark) == {b} and store.job(b)["priority"] == -5
    assert store.events(b)[-1]["detail"] == "priority -5"


def test_columns_the_queue_schedules_by_change_only_with_an_event(store: Store) -> None:
    job = queued(store)
    for column, value in (("priority", 3), ("held", 1), ("state", "cancelled"), ("top", 9)):
        with pytest.raises(ValueError, match=column):
            store.update_job(job, **{column: value})
    store.update_job(job, name="renamed", error="note")  # not scheduled by: no event needed
    assert store.job(job)["name"] == "renamed"


def test_a_batch_edit_is_all_or_nothing_in_the_order_given(store: Store) -> None:
    mine, theirs = queued(store), queued(store, "bob")
    ended = queued(store)
    store.transition(ended, JobState.CANCELLED)
    before = store.read("SELECT * FROM jobs ORDER BY id"), store.last_event_id()

    def only_alices(row: JobRow) -> None:
        if row["user"] != "alice":
            raise Forbidden(f"job {row['id']} belongs to {row['user']}")

    def hold(row: JobRow, n: int, top: int) -> tuple[dict[str, Any], str]:
        return {"held": 1}, "hold"

    for ids, error in (([mine, theirs], Forbidden), ([mine, 999], NotFound),
                       ([mine, ended], Conflict), ([theirs, 999], Forbidden)):
        with pytest.raises(error):
            store.edit_jobs(ids, only_alices, hold)
    assert (store.read("SELECT * FROM jobs ORDER BY id"), store.last_event_id()) == before
    with pytest.raises(Conflict, match="no longer queued; nothing changed"):
        store.edit_jobs([ended], only_alices, hold)


def test_edits_see_and_keep_an_admins_hold_level(store: Store) -> None:
    job = queued(store)
    seen: list[Any] = []
    store.edit_jobs([job], lambda row: None, lambda row, n, top: ({"held": 2}, "hold"))
    store.edit_jobs([job], lambda row: seen.append(row["held"]),
                    lambda row, n, top: ({}, "look"))
    assert seen == [2]  # the rules tell an admin's hold (2) from the owner's (1)
    assert store.job(job)["held"] is True  # views show a plain flag


def test_top_numbers_follow_the_highest_so_far(store: Store) -> None:
    a, b, c = queued(store), queued(store), queued(store)

    def top(row: JobRow, n: int, highest: int) -> tuple[dict[str, Any], str]:
        return {"top": highest + 2 - n}, "top"

    store.edit_jobs([a, b], lambda row: None, top)
    store.edit_jobs([c], lambda row: None, lambda row, n, h: ({"top": h + 1}, "top"))
    assert [store.job(j)["top"] for j in (a, b, c)] == [2, 1, 3]


def test_a_room_check_refuses_inside_the_insert_transaction(store: Store) -> None:
    def full(db: sqlite3.Connection) -> None:
        if len(Store.waiting_of(db, "alice")) >= 1:
            raise LimitExceeded("queue limit")

    store.add_job(name="first", user="alice", origin="api", room=full)
    mark = store.last_event_id()
    with pytest.raises(LimitExceeded):
        store.add_job(name="second", user="alice", origin="api", room=full)
    assert len(store.jobs(WAITING_STATES, user="alice")) == 1
    assert store.last_event_id() == mark


def test_an_array_becomes_its_elements_in_one_transaction(store: Store) -> None:
    job = store.add_job(name="arr", user="alice", origin="api", overrides={"array": "0,4,7"})
    assert not store.enqueue_array(job, {"image": "x"}, [0, 4, 7])  # not building yet
    store.transition(job, JobState.BUILDING, expect=[JobState.RECEIVED])
    mark = store.last_event_id()

    def refuse(db: sqlite3.Connection) -> None:
        raise LimitExceeded("no room")

    with pytest.raises(LimitExceeded):
        store.enqueue_array(job, {"image": "x"}, [0, 4, 7], room=refuse)
    assert store.job(job)["state"] == "building" and store.last_event_id() == mark
    assert store.enqueue_array(job, {"image": "x", "num_gpus": 1}, [0, 4, 7])
    elements = store.array_elements(job)
    assert [(r["array_index"], r["state"]) for r in elements] == [
        (0, "queued"), (4, "queued"), (7, "queued")]
    assert elements[0]["id"] == job
    assert changed(store, mark) == {r["id"] for r in elements}
    assert store.state_counts()["queued"] == 3 and store.state_counts()["failed"] == 0

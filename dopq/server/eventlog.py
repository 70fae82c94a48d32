"""Reading the store's event log from a mark on: what the metrics and the notifier follow.

Every write of a job adds an event row (``dopq.server.store``); a follower keeps
the id of the last row it handled and reads the rows after it, each with the
job's user and submit time (None for a job deleted since).
"""

from __future__ import annotations

import sqlite3

from dopq.server.store import Store

_AFTER = (
    "SELECT e.id, e.job_id, e.at, e.state, e.detail, j.user, j.submitted_at FROM events e"
    " LEFT JOIN jobs j ON j.id = e.job_id WHERE e.id > ? ORDER BY e.id LIMIT ?"
)


def events_after(store: Store, mark: int, limit: int) -> list[sqlite3.Row]:
    """Up to ``limit`` event rows with an id above ``mark``, oldest first: ``id``,
    ``job_id``, ``at``, ``state``, ``detail``, ``user``, ``submitted_at``."""
    return store.read(_AFTER, (mark, limit))

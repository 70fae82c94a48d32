"""The database's shape: the migrations, the job columns and how a job row reads.

``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1`` (kept in
``PRAGMA user_version``); a migration is only ever appended, never edited.
``JobRow`` is a job as the rest of the server sees it: list columns decoded
(``gpus``, ``after``...), flags as booleans, JSON columns as dicts.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

from dopq.core.jobs import JobState

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        user TEXT NOT NULL,
        state TEXT NOT NULL,
        origin TEXT NOT NULL DEFAULT 'api',
        source TEXT,
        overrides TEXT NOT NULL DEFAULT '{}',
        spec TEXT,
        num_gpus INTEGER NOT NULL DEFAULT 0,
        gpus TEXT NOT NULL DEFAULT '',
        time_limit REAL,
        priority INTEGER NOT NULL DEFAULT 0,
        nice INTEGER NOT NULL DEFAULT 0,
        held INTEGER NOT NULL DEFAULT 0,
        top INTEGER NOT NULL DEFAULT 0,
        after TEXT NOT NULL DEFAULT '',
        after_any TEXT NOT NULL DEFAULT '',
        array_index INTEGER,
        array_parent INTEGER,
        context_hash TEXT,
        image TEXT,
        container TEXT,
        exit_code INTEGER,
        error TEXT,
        submitted_at REAL NOT NULL,
        queued_at REAL,
        started_at REAL,
        finished_at REAL,
        hidden INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE INDEX jobs_user ON jobs(user);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL,
        at REAL NOT NULL,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_job ON events(job_id);
    CREATE TABLE usage (
        user TEXT PRIMARY KEY,
        value REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE images (
        context_hash TEXT PRIMARY KEY,
        image_id TEXT NOT NULL,
        built_at REAL NOT NULL,
        last_used REAL NOT NULL
    );
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL DEFAULT 'user',
        pw_hash TEXT NOT NULL DEFAULT '',
        share REAL NOT NULL DEFAULT 1.0,
        created_at REAL NOT NULL
    );
    CREATE TABLE tokens (
        hash TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 2: who submitted (an admin may submit for a user, with a raised priority)
    """
    ALTER TABLE jobs ADD COLUMN submitted_by TEXT
    """,
    # 3: the history is read newest first
    """
    CREATE INDEX jobs_finished ON jobs(finished_at)
    """,
    # 4: start estimates (dopq.core.eta): the first one made, and the last while it waited
    """
    ALTER TABLE jobs ADD COLUMN expected_start_first REAL;
    ALTER TABLE jobs ADD COLUMN expected_start_last REAL
    """,
    # 5: an array's elements are found by their first job (--after, cancel, wait)
    """
    CREATE INDEX jobs_array ON jobs(array_parent)
    """,
    # 6: a share of each GPU, in bytes per device (0: whole, exclusive GPUs, as before)
    """
    ALTER TABLE jobs ADD COLUMN gpu_memory INTEGER NOT NULL DEFAULT 0
    """,
    # 7: preemption: may the job be preempted, how often it was, and by which job last
    """
    ALTER TABLE jobs ADD COLUMN preemptible INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN preempted_by INTEGER
    """,
    # 8: operations: a restarted job's original (dopq restart), the mean GPU
    # utilisation NVML measured over a run (dopq report's efficiency), and the
    # users' notification targets (dopq notify; the URLs hold secrets)
    """
    ALTER TABLE jobs ADD COLUMN restarted_from INTEGER;
    ALTER TABLE jobs ADD COLUMN gpu_utilisation REAL;
    CREATE TABLE notify_targets (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user TEXT NOT NULL,
        url TEXT NOT NULL,
        events TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX notify_targets_user ON notify_targets(user)
    """,
    # 9: the node a job runs (ran) on: "local" on one host, a Slurm node's name
    """
    ALTER TABLE jobs ADD COLUMN node TEXT
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema up to ``SCHEMA_VERSION`` (inside the caller's transaction)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for i in range(version, SCHEMA_VERSION):
        for stmt in MIGRATIONS[i].split(";"):
            if stmt.strip():
                db.execute(stmt)
    if version < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

JOB_COLUMNS = (
    "id", "name", "user", "state", "origin", "source", "overrides", "spec", "num_gpus",
    "gpus", "time_limit", "priority", "nice", "held", "top", "after", "after_any",
    "array_index", "array_parent", "context_hash", "image", "container", "exit_code",
    "error", "submitted_at", "queued_at", "started_at", "finished_at", "hidden",
    "submitted_by", "expected_start_first", "expected_start_last", "gpu_memory",
    "preemptible", "restarts", "preempted_by", "restarted_from", "gpu_utilisation", "node",
)


def ids_of(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def join_ids(ids: Iterable[int]) -> str:
    return ",".join(str(int(i)) for i in ids)


class JobRow(dict[str, Any]):
    """One job as stored, with list columns decoded (``gpus``, ``after``...)."""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRow:
        d = cls(zip(row.keys(), tuple(row), strict=True))
        d["gpus"] = ids_of(d["gpus"])
        d["after"] = ids_of(d["after"])
        d["after_any"] = ids_of(d["after_any"])
        d["held"] = bool(d["held"])
        d["hidden"] = bool(d["hidden"])
        d["preemptible"] = bool(d["preemptible"])
        d["overrides"] = json.loads(d.get("overrides") or "{}")
        d["spec"] = json.loads(d["spec"]) if d.get("spec") else None
        return d


def encode(field: str, value: Any) -> Any:
    if field in ("gpus", "after", "after_any"):
        return join_ids(value)
    if field in ("overrides", "spec"):
        return None if value is None else json.dumps(value)
    if field == "held":  # 0, 1, or 2: held by an admin (dopq.server.authz.ADMIN_HOLD)
        return int(value)
    if field in ("hidden", "preemptible"):
        return int(bool(value))
    if isinstance(value, JobState):
        return value.value
    return value

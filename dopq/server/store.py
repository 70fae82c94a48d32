"""The SQLite store: every piece of DoPQ state, in one WAL database.

One writer connection guarded by a lock (writes go through
``with store.transaction() as db:``); reads use a connection per thread, which
WAL lets run beside the writer. Every state change of a job is committed, with
an ``events`` row, before anyone acts on it, so a crash at any point leaves a
state that start-up recovery can finish. The schema version lives in
``PRAGMA user_version`` and moves forward through ``MIGRATIONS``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dopq.core.errors import Conflict, NotFound
from dopq.core.jobs import FINAL_STATES, JobState

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
]

SCHEMA_VERSION = len(MIGRATIONS)

JOB_COLUMNS = (
    "id", "name", "user", "state", "origin", "source", "overrides", "spec", "num_gpus",
    "gpus", "time_limit", "priority", "nice", "held", "top", "after", "after_any",
    "array_index", "array_parent", "context_hash", "image", "container", "exit_code",
    "error", "submitted_at", "queued_at", "started_at", "finished_at", "hidden",
    "submitted_by", "expected_start_first", "expected_start_last",
)


def _ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _join(ids: Iterable[int]) -> str:
    return ",".join(str(int(i)) for i in ids)


class JobRow(dict[str, Any]):
    """One job as stored, with list columns decoded (``gpus``, ``after``...)."""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRow:
        d = cls(zip(row.keys(), tuple(row), strict=True))
        d["gpus"] = _ids(d["gpus"])
        d["after"] = _ids(d["after"])
        d["after_any"] = _ids(d["after_any"])
        d["held"] = bool(d["held"])
        d["hidden"] = bool(d["hidden"])
        d["overrides"] = json.loads(d.get("overrides") or "{}")
        d["spec"] = json.loads(d["spec"]) if d.get("spec") else None
        return d


def _encode(field: str, value: Any) -> Any:
    if field in ("gpus", "after", "after_any"):
        return _join(value)
    if field in ("overrides", "spec"):
        return None if value is None else json.dumps(value)
    if field in ("held", "hidden"):
        return int(bool(value))
    if isinstance(value, JobState):
        return value.value
    return value


class Store:
    """All DoPQ state in SQLite; safe to share between threads of one process.

    Each process (server, provider) opens its own ``Store`` on the same file.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Secrets live here (password hashes, jobs' env): the server's alone, from
        # the first byte; SQLite gives -wal and -shm the database file's mode.
        # Only a new file: closing a descriptor of an open database drops the
        # process's POSIX locks on it (SQLite's own warning).
        if not self.path.exists():
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600))
            except FileExistsError:
                pass
        self._timeout = timeout
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # one per thread that read
        self._writer = self._connect()
        self._version_db: sqlite3.Connection | None = None
        self._version_lock = threading.Lock()
        self._migrate()

    # -- connections --------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
        )
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            self._readers.append(db)
        return db

    def close(self) -> None:
        with self._write_lock:
            for db in self._readers:
                try:
                    db.close()
                except sqlite3.Error:
                    pass
            self._writer.close()
            if self._version_db is not None:
                self._version_db.close()

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), serialised."""
        with self._write_lock:
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._reader().execute(sql, params).fetchall()

    # -- jobs ---------------------------------------------------------------
    def add_job(self, **fields: Any) -> int:
        """Insert a job in state ``received`` (unless given) and return its id."""
        fields.setdefault("state", JobState.RECEIVED)
        fields.setdefault("submitted_at", time.time())
        with self.transaction() as db:
            return self._insert_job(db, fields)

    def _insert_job(self, db: sqlite3.Connection, fields: dict[str, Any]) -> int:
        cols = list(fields)
        unknown = set(cols) - set(JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        cur = db.execute(
            f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [_encode(c, fields[c]) for c in cols],
        )
        job_id = int(cur.lastrowid or 0)
        db.execute(
            "INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
            (job_id, fields["submitted_at"], str(fields["state"]), fields.get("origin", "")),
        )
        return job_id

    def add_jobs(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        with self.transaction() as db:
            return [self._insert_job(db, dict(r)) for r in rows]

    def job(self, job_id: int) -> JobRow:
        rows = self.read("SELECT * FROM jobs WHERE id = ?", (int(job_id),))
        if not rows:
            raise NotFound(f"no job {job_id}")
        return JobRow.from_row(rows[0])

    def data_version(self) -> int:
        """Changes whenever any other connection (any process) commits.

        One dedicated connection answers, so the numbers are comparable
        between threads; writes of this store count (they use another one).
        """
        with self._version_lock:
            if self._version_db is None:
                self._version_db = self._connect()
            return int(self._version_db.execute("PRAGMA data_version").fetchone()[0])

    def last_event_id(self) -> int:
        return int(self.read("SELECT COALESCE(MAX(id), 0) FROM events")[0][0])

    def changed_since(self, event_id: int) -> tuple[int, list[JobRow]]:
        """Jobs with an event after ``event_id`` (every state change or edit has one)."""
        rows = self.read("SELECT id, job_id FROM events WHERE id > ?", (event_id,))
        if not rows:
            return event_id, []
        last = max(int(r["id"]) for r in rows)
        ids = sorted({int(r["job_id"]) for r in rows})
        out: list[JobRow] = []
        for chunk in range(0, len(ids), 500):
            part = ids[chunk: chunk + 500]
            out += [JobRow.from_row(r) for r in self.read(
                f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(part))})", part)]
        return last, out

    def jobs(
        self,
        states: Iterable[JobState | str] | None = None,
        *,
        user: str | None = None,
        include_hidden: bool = True,
        order: str = "id",
        limit: int | None = None,
        desc: bool = False,
        light: bool = False,
    ) -> list[JobRow]:
        """Jobs by state/user; ``light`` leaves out the spec and overrides (faster)."""
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            st = [str(JobState(s).value) for s in states]
            where.append(f"state IN ({', '.join('?' * len(st))})")
            params.extend(st)
        if user is not None:
            where.append("user = ?")
            params.append(user)
        if not include_hidden:
            where.append("hidden = 0")
        if order not in ("id", "finished_at", "submitted_at", "started_at"):
            raise ValueError(order)
        cols = ", ".join(c for c in JOB_COLUMNS if c not in ("spec", "overrides")) \
            if light else "*"
        sql = f"SELECT {cols} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order} {'DESC' if desc else 'ASC'}, id {'DESC' if desc else 'ASC'}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [JobRow.from_row(r) for r in self.read(sql, params)]

    def transition(
        self,
        job_id: int,
        to: JobState,
        *,
        expect: Iterable[JobState] | None = None,
        detail: str = "",
        at: float | None = None,
        unless_held: bool = False,
        **fields: Any,
    ) -> JobRow:
        """Move a job to ``to`` (with ``fields``) if it is in one of ``expect``.

        Compare-and-set: raises ``Conflict`` when the job has moved on, so two
        threads (or processes) never both act on one change.
        """
        at = time.time() if at is None else at
        with self.transaction() as db:
            row = db.execute("SELECT state, held FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            current = JobState(row["state"])
            if unless_held and row["held"]:
                raise Conflict(f"job {job_id} is held")
            if expect is not None and current not in set(expect):
                raise Conflict(f"job {job_id} is {current.value}, not {_names(expect)}")
            if current in FINAL_STATES and to != current:
                raise Conflict(f"job {job_id} already ended ({current.value})")
            fields["state"] = to
            if to in FINAL_STATES:
                fields.setdefault("finished_at", at)
            self._update(db, job_id, fields)
            db.execute(
                "INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
                (job_id, at, to.value, detail),
            )
        return self.job(job_id)

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Change fields other than the state (no event row)."""
        if "state" in fields:
            raise ValueError("use transition() to change a job's state")
        with self.transaction() as db:
            self._update(db, job_id, fields)

    def _update(self, db: sqlite3.Connection, job_id: int, fields: dict[str, Any]) -> None:
        if not fields:
            return
        unknown = set(fields) - set(JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        sets = ", ".join(f"{c} = ?" for c in fields)
        db.execute(
            f"UPDATE jobs SET {sets} WHERE id = ?",
            [_encode(c, v) for c, v in fields.items()] + [job_id],
        )

    def events(self, job_id: int) -> list[dict[str, Any]]:
        rows = self.read(
            "SELECT at, state, detail FROM events WHERE job_id = ? ORDER BY id", (job_id,)
        )
        return [dict(r) for r in rows]

    def final_states(self, ids: Iterable[int]) -> dict[int, JobState]:
        ids = list(ids)
        if not ids:
            return {}
        out: dict[int, JobState] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            rows = self.read(
                f"SELECT id, state FROM jobs WHERE id IN ({', '.join('?' * len(part))})", part
            )
            for r in rows:
                st = JobState(r["state"])
                if st in FINAL_STATES:
                    out[int(r["id"])] = st
            # An array's first job stands for the whole array (``--after 23``):
            # over when every element is, succeeded only when every one did.
            elements = self.read(
                f"SELECT array_parent, state FROM jobs WHERE array_parent IN "
                f"({', '.join('?' * len(part))})", part)
            for r in elements:
                head, st = int(r["array_parent"]), JobState(r["state"])
                if st not in FINAL_STATES:
                    out.pop(head, None)
                elif head in out and out[head] is JobState.SUCCEEDED:
                    out[head] = st
        return out

    def counts_by_user(self) -> dict[str, dict[str, int]]:
        rows = self.read("SELECT user, state, COUNT(*) AS n FROM jobs GROUP BY user, state")
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["user"], {})[r["state"]] = int(r["n"])
        return out

    def hide_history(self, user: str | None = None) -> int:
        states = [s.value for s in FINAL_STATES]
        sql = f"UPDATE jobs SET hidden = 1 WHERE hidden = 0 AND state IN ({', '.join('?' * 3)})"
        params: list[Any] = list(states)
        if user is not None:
            sql += " AND user = ?"
            params.append(user)
        with self.transaction() as db:
            return db.execute(sql, params).rowcount

    # -- usage (fair-share accounting) --------------------------------------
    def load_usage(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.read("SELECT user, value, updated_at FROM usage")]

    def save_usage(self, rows: Iterable[dict[str, Any]], *, replace: bool = False) -> None:
        with self.transaction() as db:
            if replace:
                db.execute("DELETE FROM usage")
            db.executemany(
                "INSERT INTO usage (user, value, updated_at) VALUES (:user, :value, :updated_at)"
                " ON CONFLICT(user) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                list(rows),
            )

    # -- images ---------------------------------------------------------------
    def images_of(self, user: str, limit: int = -1) -> list[str]:
        """The images of ``user``'s jobs, the most recent job's first (-1: all)."""
        rows = self.read(
            "SELECT image, MAX(id) AS job FROM jobs WHERE user = ? AND image IS NOT NULL"
            " GROUP BY image ORDER BY job DESC LIMIT ?", (user, limit))
        return [str(r["image"]) for r in rows]

    def image_for(self, context_hash: str) -> str | None:
        rows = self.read("SELECT image_id FROM images WHERE context_hash = ?", (context_hash,))
        return rows[0]["image_id"] if rows else None

    def remember_image(self, context_hash: str, image_id: str, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO images (context_hash, image_id, built_at, last_used)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(context_hash) DO UPDATE SET"
                " image_id = excluded.image_id, last_used = excluded.last_used",
                (context_hash, image_id, now, now),
            )

    def touch_image(self, image_id: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE images SET last_used = ? WHERE image_id = ?", (now, image_id))

    def forget_image(self, image_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM images WHERE image_id = ?", (image_id,))

    def images(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.read("SELECT * FROM images")]

    # -- meta and audit ---------------------------------------------------------
    def owner_id(self) -> str:
        """This store's unique id, made once; labels the containers it owns."""
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
            if row is not None:
                return str(row["value"])
            value = uuid.uuid4().hex[:16]
            db.execute("INSERT INTO meta (key, value) VALUES ('owner', ?)", (value,))
            return value

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self.read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def audit(self, actor: str, action: str, detail: str = "", at: float | None = None) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO audit (at, actor, action, detail) VALUES (?, ?, ?, ?)",
                (time.time() if at is None else at, actor, action, detail),
            )

    def audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self.read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (int(limit),))
        return [dict(r) for r in rows]


def _names(states: Iterable[JobState]) -> str:
    return " or ".join(s.value for s in states)

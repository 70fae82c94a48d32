"""The SQLite store: every piece of DoPQ state, in one WAL database.

One writer connection guarded by a lock (writes go through
``with store.transaction() as db:``); reads use a connection per thread, which
WAL lets run beside the writer. Every state change of a job is committed, with
an ``events`` row, before anyone acts on it, so a crash at any point leaves a
state that start-up recovery can finish. The store is the only writer of jobs:
its methods (``add_job``, ``transition``, ``edit_jobs``, ``enqueue_array``)
add the event row the queue's incremental refresh (``changed_since``) reads,
so no caller can forget it. The schema is ``dopq.server.schema``.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dopq.core.errors import Conflict, NotFound
from dopq.core.jobs import FINAL_STATES, WAITING_STATES, JobState
from dopq.server.schema import JOB_COLUMNS, MIGRATIONS, SCHEMA_VERSION, JobRow, encode, migrate

__all__ = ["JOB_COLUMNS", "MIGRATIONS", "SCHEMA_VERSION", "JobRow", "Store"]

RoomCheck = Callable[[sqlite3.Connection], None]  # reads in the transaction, raises to refuse
WAITING = tuple(sorted(s.value for s in WAITING_STATES))
# Columns the queue schedules by: changed only with an event row.
SCHEDULED = frozenset({"state", "priority", "nice", "held", "top", "time_limit", "num_gpus",
                       "gpu_memory", "after", "after_any", "array_index", "array_parent",
                       "preemptible", "restarts"})


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
            migrate(db)

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
    def add_job(self, *, room: RoomCheck | None = None, **fields: Any) -> int:
        """Insert a job in state ``received`` (unless given) and return its id.

        ``room`` runs first in the same transaction and may refuse (the queue
        limit, ``dopq.server.limits``): no other writer can add a job between
        its count and this insert."""
        with self.transaction() as db:
            if room is not None:
                room(db)
            return self._insert_job(db, fields)

    def _insert_job(self, db: sqlite3.Connection, fields: dict[str, Any]) -> int:
        fields = {"state": JobState.RECEIVED, **fields}
        fields.setdefault("submitted_at", time.time())
        cols = list(fields)
        unknown = set(cols) - set(JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        cur = db.execute(
            f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [encode(c, fields[c]) for c in cols],
        )
        job_id = int(cur.lastrowid or 0)
        self._event(db, job_id, fields["submitted_at"], fields["state"], fields.get("origin", ""))
        return job_id

    @staticmethod
    def _event(db: sqlite3.Connection, job_id: int, at: float, state: Any, detail: str) -> None:
        """The row ``changed_since`` finds: every write of a job makes one."""
        db.execute("INSERT INTO events (job_id, at, state, detail) VALUES (?, ?, ?, ?)",
                   (job_id, at, str(state), detail))

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

    def jobs(self, states: Iterable[JobState | str] | None = None, *, user: str | None = None,
             include_hidden: bool = True, order: str = "id", limit: int | None = None,
             desc: bool = False, light: bool = False) -> list[JobRow]:
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

    def transition(self, job_id: int, to: JobState, *, expect: Iterable[JobState] | None = None,
                   detail: str = "", at: float | None = None, unless_held: bool = False,
                   **fields: Any) -> JobRow:
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
            self._event(db, job_id, at, to, detail)
        return self.job(job_id)

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Change fields the queue does not schedule by (name, error, container...).

        No event row: what the queue reads goes through ``transition``,
        ``edit_jobs`` or ``enqueue_array``, which make one."""
        scheduled = set(fields) & SCHEDULED
        if scheduled:
            raise ValueError(f"{sorted(scheduled)}: change them with transition() or edit_jobs()")
        with self.transaction() as db:
            self._update(db, job_id, fields)

    def edit_jobs(self, ids: Sequence[int], check: Callable[[JobRow], None],
                  change: Callable[[JobRow, int, int], tuple[dict[str, Any], str]],
                  at: float | None = None) -> None:
        """Edit waiting jobs, all or nothing, with an event row each.

        Each job must exist (``NotFound``), be waiting (``Conflict``) and pass
        ``check`` (which raises to refuse; it sees ``held`` as stored: 0, 1 or 2,
        an admin's hold), in the order given; then
        ``change(row, n, top)`` gives its new fields and the event's detail
        (``n``: its place in ``ids``; ``top``: the highest ``top`` so far).
        """
        at = time.time() if at is None else at
        with self.transaction() as db:
            marks = ",".join("?" * len(ids))
            rows = {}
            for r in db.execute(f"SELECT * FROM jobs WHERE id IN ({marks})", list(ids)):
                rows[r["id"]] = JobRow.from_row(r)
                rows[r["id"]]["held"] = r["held"]
            for i in ids:
                row = rows.get(i)
                if row is None:
                    raise NotFound(f"no job {i}")
                if row["state"] not in WAITING_STATES:
                    raise Conflict(f"job {i} is {row['state']}, no longer queued; nothing changed")
                check(row)
            top = int(db.execute("SELECT COALESCE(MAX(top), 0) FROM jobs").fetchone()[0])
            for n, i in enumerate(ids):
                fields, detail = change(rows[i], n, top)
                self._update(db, i, fields)
                self._event(db, i, at, fields.get("state", rows[i]["state"]), detail)

    def enqueue_array(self, job_id: int, fields: dict[str, Any], indices: Sequence[int], *,
                      room: RoomCheck | None = None, detail: str = "image ready") -> bool:
        """A built array job becomes queued element 0 (``indices[0]``) and one new
        queued job per further index, in one transaction. False (nothing done)
        when the job is no longer building (cancelled meanwhile)."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.BUILDING.value:
                return False
            if room is not None:
                room(db)
            job = JobRow.from_row(row)
            self._update(db, job_id, {**fields, "state": JobState.QUEUED,
                                      "array_index": indices[0], "array_parent": job_id})
            self._event(db, job_id, now, JobState.QUEUED, detail)
            for index in indices[1:]:
                self._insert_job(db, {
                    "name": job["name"], **fields, "user": job["user"], "origin": job["origin"],
                    "state": JobState.QUEUED, "submitted_at": job["submitted_at"],
                    "array_index": index, "array_parent": job_id,
                    "overrides": job["overrides"],
                })
        return True

    def _update(self, db: sqlite3.Connection, job_id: int, fields: dict[str, Any]) -> None:
        if not fields:
            return
        unknown = set(fields) - set(JOB_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job columns: {sorted(unknown)}")
        sets = ", ".join(f"{c} = ?" for c in fields)
        db.execute(
            f"UPDATE jobs SET {sets} WHERE id = ?",
            [encode(c, v) for c, v in fields.items()] + [job_id],
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

    def state_counts(self) -> dict[str, int]:
        """Jobs per state, every state present (zero when none)."""
        counts = {s.value: 0 for s in JobState}
        for r in self.read("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[r["state"]] = int(r["n"])
        return counts

    @staticmethod
    def waiting_of(db: sqlite3.Connection, user: str) -> list[sqlite3.Row]:
        """``user``'s waiting jobs (id, state, overrides as stored), read in the
        caller's transaction (the queue limit counts them: ``dopq.server.limits``)."""
        return db.execute(f"SELECT id, state, overrides FROM jobs WHERE user = ? AND state IN"
                          f" ({','.join('?' * len(WAITING))})", (user, *WAITING)).fetchall()

    def array_elements(self, job_id: int) -> list[sqlite3.Row]:
        """The elements of the array whose first job is ``job_id``, by index."""
        return self.read("SELECT id, array_index, state, user FROM jobs WHERE array_parent = ?"
                         " ORDER BY array_index", (int(job_id),))

    def sources(self) -> set[str]:
        """The archives jobs were made from (and not yet dropped)."""
        return {r["source"] for r in self.read("SELECT source FROM jobs WHERE source IS NOT NULL")}

    def record_estimates(self, first: Sequence[tuple[float, int]],
                         left: Sequence[tuple[float, int]]) -> None:
        """Start estimates kept for the record (``dopq.server.estimates``): ``first``
        (estimate, id) where none is kept yet, ``left`` for jobs that started."""
        with self.transaction() as db:
            db.executemany("UPDATE jobs SET expected_start_first = ? WHERE id = ?"
                           " AND expected_start_first IS NULL", first)
            db.executemany("UPDATE jobs SET expected_start_last = ? WHERE id = ?"
                           " AND started_at IS NOT NULL", left)

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

    def note_event(self, job_id: int, detail: str, at: float | None = None) -> None:
        """A job event that changes nothing else (a GPU memory warning, an idle mark)."""
        with self.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
            if row is None:
                raise NotFound(f"no job {job_id}")
            self._event(db, int(job_id), time.time() if at is None else at, row[0], detail)


def _names(states: Iterable[JobState]) -> str:
    return " or ".join(s.value for s in states)

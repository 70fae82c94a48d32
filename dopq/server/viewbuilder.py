"""What the views show: jobs as plain data, and the five shared views built from the store.

``ViewBuilder`` builds one ``Version`` (``dopq.server.views``) of the queued,
running, finished, users and system views from the store, the queue thread's
last decision and the workers' samples (``Supervisor``); the ``ViewCache``
shares it between every client. A caller who has just changed something reads
a version built after its change (``wrote``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

from dopq import __version__
from dopq.core.capacity import LOCAL, Capacity
from dopq.core.errors import DopqError, NotFound
from dopq.core.fairshare import fair_shares
from dopq.core.jobs import FINAL_STATES, WAITING_STATES, JobState
from dopq.core.settings import Settings
from dopq.server import authz
from dopq.server.auth import Principal, Users
from dopq.server.estimates import StartEstimates
from dopq.server.fetch import OutputFetches
from dopq.server.schema import ids_of
from dopq.server.store import JobRow, Store
from dopq.server.supervisor import Supervisor
from dopq.server.viewcache import SHARED, EncodedReplies
from dopq.server.views import Version, ViewCache, finished_delta, full_queue, queue_delta
from dopq.wire.protocol import ENCODED
from dopq.wire.views import TIMELINE_LIMIT, TIMELINE_WINDOW, iso

VIEW_TTL = 0.5  # seconds a shared view may be old (writes through the API show at once)
HISTORY_CACHED = 1000  # finished jobs kept in the shared views
WAITING = ", ".join(f"'{s.value}'" for s in sorted(WAITING_STATES))


def job_view(row: JobRow, now: float) -> dict[str, Any]:
    """A job as the API shows it: plain types, ISO 8601 UTC times."""
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": row["id"],
        "name": row["name"],
        "user": row["user"],
        "state": row["state"],
        "num_gpus": row["num_gpus"],
        "gpu_memory": row["gpu_memory"],
        "gpus": list(row["gpus"]),
        "exit_code": row["exit_code"],
        "error": row["error"] if row["state"] in ("failed", "cancelled") else None,
        "submitted_at": iso(row["submitted_at"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "image": None,  # image ids only in ``job`` for the owner and admins: an id reads the code
        "container": row["container"],
        "time_limit": row["time_limit"],
        "priority": row["priority"],
        "nice": row["nice"],
        "held": row["held"],
        "array_index": row["array_index"],
        "array_parent": row["array_parent"],
        "after": list(row["after"]),
        "after_any": list(row["after_any"]),
        "origin": row["origin"],
        "wait_s": round(((started or finished or now) - row["submitted_at"]), 3)
        if row["state"] != "cancelled" or started else None,
        "run_s": round((finished or now) - started, 3) if started else None,
        "preemptible": row["preemptible"],
        "restarts": row["restarts"],
        "preempted_by": row["preempted_by"],
        "restarted_from": row.get("restarted_from"),
        "node": row.get("node"),
    }


class ViewBuilder:
    """The views every client reads, built at most every ``VIEW_TTL`` and shared."""

    def __init__(self, settings: Settings, store: Store, users: Users, workers: Supervisor,
                 fetches: OutputFetches) -> None:
        self.settings = settings
        self.store = store
        self.users = users
        self.workers = workers
        self.fetches = fetches
        self.started_at = time.time()
        self.cache = ViewCache(self._build, self._key, ttl=VIEW_TTL)
        self.estimates = StartEstimates(store, iso)
        self._write_gen: dict[str, int] = {}
        self.encoded = EncodedReplies()

    # -- reads -----------------------------------------------------------------------
    def wrote(self, who: Principal) -> None:
        """``who`` changed something: build the views now, so every read after shows it."""
        generation = self.cache.invalidate()
        self._write_gen[who.name] = generation
        self.cache.current(generation)

    def view(self, who: Principal | None) -> Version:
        return self.cache.current(self._write_gen.get(who.name, 0) if who else 0)

    def snapshot(self, history_limit: int, since: int | None, who: Principal | None
                 ) -> dict[str, Any]:
        """All five views; with ``since`` (a version the client has) the queue as a delta."""
        v = self.view(who)
        now = time.time()
        limit = max(1, min(int(history_limit), HISTORY_CACHED))
        out: dict[str, Any] = {
            "version": v.number, "now": now, "running": v.rest["running"],
            "finished": v.rest["finished"][:limit], "users": v.rest["users"],
            "system": v.rest["system"], "timeline": v.rest["timeline"],
        }
        if since is None:
            out["queued"] = full_queue(v, now)
            return out
        # Encoded once per (from, to, limit) and shared by every poller: only the
        # clock travels beside the bytes (``dopq.server.viewcache``).
        old = self.cache.find(int(since)) if since else None
        del out["now"], out["finished"]

        def delta() -> dict[str, Any]:
            return {**out, "queued_delta": queue_delta(old, v),
                    "finished_delta": finished_delta(old, v), "history_limit": limit}

        key = (SHARED, old.number if old else None, v.number, limit)
        return {"now": now, ENCODED: self.encoded.get(key, delta)}

    def history(self, limit: int, user: str | None, who: Principal | None
                ) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), 100000))
        if user is None and limit <= HISTORY_CACHED:
            return list(self.view(who).rest["finished"][:limit])
        return self._history_rows(limit, user)

    def _history_rows(self, limit: int, user: str | None) -> list[dict[str, Any]]:
        now = time.time()
        rows = self.store.jobs(FINAL_STATES, user=user, include_hidden=False,
                               order="finished_at", desc=True, limit=limit, light=True)
        return [job_view(r, now) for r in rows]

    def job(self, who: Principal, job_id: int) -> dict[str, Any]:
        row = self.store.job(int(job_id))
        view = job_view(row, time.time())
        view["events"] = [
            {"at": iso(e["at"]), "state": e["state"], "detail": e["detail"]}
            for e in self.store.events(row["id"])
        ]
        # The spec holds the job's environment: only its owner and admins see it.
        private = authz.may(who, authz.Action.SEE_PRIVATE, row["user"])
        view["spec"] = row["spec"] if private else None
        view["image"] = row["image"] if private else None
        view["outputs"] = str(self.fetches.folders.path(row["user"], row["id"]))
        shown = self.estimates.shown.get(row["id"]) if row["state"] == "queued" else None
        view["expected_start"], view["reason"] = shown if shown else (None, None)
        # Start estimates kept for the record: the first made, the last while it waited.
        view["expected_start_first"] = iso(row.get("expected_start_first"))
        view["expected_start_last"] = iso(row.get("expected_start_last"))
        if row["state"] == "running":
            per_job, _ = gpu_report(self.workers)
            view.update(job_gpu_use(row, per_job.get(row["id"]), self.workers.gpu_samples))
        return view

    def images(self, who: Principal) -> dict[str, Any]:
        """What ``who`` may build from: the allowed bases and their own job images."""
        rows = self.store.read(
            "SELECT image, MAX(id) AS job, COUNT(*) AS jobs FROM jobs WHERE user = ?"
            " AND image IS NOT NULL GROUP BY image ORDER BY job DESC LIMIT 100", (who.name,))
        own = []
        for r in rows:
            try:
                present = self.workers.runtime.image_exists(r["image"])
            except DopqError:
                present = None
            own.append({"image": r["image"], "job": r["job"], "jobs": r["jobs"],
                        "present": present})
        return {"allowed_bases": list(self.settings.images.allowed_bases), "own": own,
                "build_network": self.settings.build.network,
                "build_time_limit": self.settings.build.time_limit}

    def priorities(self, job_id: int | None = None) -> list[dict[str, Any]]:
        decision = self.workers.queue.last_decision
        out = []
        for e in decision.entries if decision else []:
            if job_id is not None and e.id != int(job_id):
                continue
            out.append({"id": e.id, "position": e.position, "priority": round(e.priority, 3),
                        "reason": str(e.reason), "factors": e.factors})
        if job_id is not None and not out:
            raise NotFound(f"job {job_id} is not queued")
        return out

    # -- building a version ------------------------------------------------------------
    def _key(self) -> Any:
        queue = self.workers.queue
        return (self.store.data_version(), id(queue), queue.decision_seq,
                self.workers.stats_version, int(time.time() // 5))

    def _build(self, prev: Version | None) -> Version:
        queue = self.workers.queue
        with queue.decision_lock:
            decision, seq = queue.last_decision, queue.decision_seq
        entries = {e.id: e for e in decision.entries} if decision else {}
        rows = self.store.read(
            "SELECT id, name, user, state, num_gpus, submitted_at, time_limit, priority, nice,"
            " held, array_index, array_parent, gpu_memory, preemptible, restarts"
            f" FROM jobs WHERE state IN ({WAITING})"
        )
        shown = self.estimates.update(decision, seq, [r[0] for r in rows if r[3] == "queued"])
        old = prev.queued if prev is not None else {}
        queued: dict[int, dict[str, Any]] = {}
        for r in rows:
            jid, state, ts = r[0], r[3], r[5]
            e = entries.get(jid) if state == "queued" else None
            eta = shown.get(jid) if state == "queued" else None
            o = old.get(jid)
            row = {
                "id": jid, "name": r[1], "user": r[2], "state": state, "num_gpus": r[4],
                "gpu_memory": r[12],
                "submitted_at": o["submitted_at"] if o and o["submitted_ts"] == ts else iso(ts),
                "submitted_ts": ts, "time_limit": r[6], "priority": r[7], "nice": r[8],
                "held": bool(r[9]), "array_index": r[10], "array_parent": r[11],
                "reason": eta[1] if eta else str(e.reason) if e
                else ("Priority" if state == "queued" else "Building"),
                "priority_value": round(e.priority, 1) if e else None,
                "expected_start": eta[0] if eta else None,
                "preemptible": bool(r[13]), "restarts": r[14],
            }
            queued[jid] = o if o == row else row  # unchanged rows stay the same object
        order = [e.id for e in decision.entries if e.id in queued] if decision else []
        placed = set(order)
        order += sorted(j for j in queued if j not in placed)
        running = self.store.jobs([JobState.RUNNING], light=True)
        finished_rows = self._history_rows(HISTORY_CACHED, None)
        old_finished = prev.finished if prev is not None else {}
        finished = {}
        for row in finished_rows:
            o = old_finished.get(row["id"])
            finished[row["id"]] = o if o == row else row
        rest = {
            "running": self._running_view(running),
            "finished": [finished[r["id"]] for r in finished_rows],
            "users": self._user_stats(),
            "system": self._status(running),
            "timeline": timeline_bars(self.store, time.time()),
        }
        return Version(self.cache.next_number(), 0.0, None, queued, order, rest,
                       finished=finished, finished_order=[r["id"] for r in finished_rows])

    def _running_view(self, running: list[JobRow]) -> list[dict[str, Any]]:
        now = time.time()
        stats, samples = self.workers.stats, self.workers.gpu_samples
        per_job, _ = gpu_report(self.workers)
        out = []
        for row in running:
            v = job_view(row, now)
            s = stats.get(row["id"]) or {}
            v["cpu_percent"] = s.get("cpu")
            v["memory_bytes"] = s.get("memory")
            v["gpu_samples"] = [{"index": g, **samples.get(g, {})} for g in row["gpus"]]
            v.update(job_gpu_use(row, per_job.get(row["id"]), samples))
            out.append(v)
        return out

    def _status(self, running: list[JobRow]) -> dict[str, Any]:
        now = time.time()
        w = self.workers
        queue = w.queue
        external = queue.pool.external() if queue.is_alive() else set()
        _, reported = gpu_report(w)
        if w.backend.cluster:
            with queue.lock:
                gpus = node_device_rows(queue.scheduler.capacity, running)
        else:
            gpus = device_rows(w.gpu_info, running, w.gpu_samples, reported, external)
        return {
            "name": self.settings.server_name,
            "version": __version__,
            "queue_state": "paused" if queue.paused else (
                "running" if queue.is_alive() else "stopped"),
            "provider_state": "running" if w.provider_alive else "stopped",
            "engine_state": "up" if queue.engine_up else "down",
            "started_at": iso(self.started_at),
            "uptime_s": round(now - self.started_at, 1),
            "gpu_backend": "slurm" if w.backend.cluster else w.gpu_backend.kind,
            "gpu_mode": w.gpu_mode,
            "gpus": gpus,
            "counts": self.store.state_counts(),
            "policy": self.settings.policy.policy,
            "provider_restarts": w.provider_restarts,
            "queue_restarts": w.queue_restarts,
        }

    def _user_stats(self) -> list[dict[str, Any]]:
        now = time.time()
        counts = self.store.counts_by_user()
        weights = {**self.settings.policy.shares, **self.users.shares()}
        snap = self.workers.queue.ledger.snapshot(now)
        users = set(counts) | set(snap) | set(weights)
        active = {u for u in users
                  if counts.get(u, {}).get("queued") or counts.get(u, {}).get("running")}
        standing = fair_shares(snap, active, weights)  # the policy's own numbers
        out = []
        for u in sorted(users):
            c = counts.get(u, {})
            mine = standing.get(u.lower())
            out.append({
                "user": u,
                "queued": sum(c.get(s, 0) for s in WAITING_STATES),
                "running": c.get("running", 0),
                "finished": sum(c.get(s, 0) for s in FINAL_STATES),
                "succeeded": c.get("succeeded", 0),
                "failed": c.get("failed", 0),
                "gpu_hours": round(snap.get(u, 0.0) / 3600.0, 4),
                "weight": weights.get(u, 1.0),
                "share": round(mine.share, 4) if mine else 0.0,
                "fairshare": round(mine.factor, 4) if mine else 1.0,
                "penalty": round(mine.penalty, 4) if mine else None,
            })
        return out


def timeline_bars(store: Store, now: float) -> list[dict[str, Any]]:
    """The GPU timeline (``TimelineBar``): jobs on GPUs running now or ended in the window.

    One indexed query (``jobs_finished``, ``jobs_state``), newest starts
    first, capped: a day of short jobs must not make every snapshot heavy.
    Hidden jobs (``clear-history``) are left out, as in the history.
    """
    finals = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
    rows = store.read(
        "SELECT id, name, user, state, gpus, started_at, finished_at FROM jobs"
        " WHERE started_at IS NOT NULL AND gpus != '' AND hidden = 0"
        f" AND (state = 'running' OR (state IN ({finals}) AND finished_at >= ?))"
        " ORDER BY started_at DESC LIMIT ?", (now - TIMELINE_WINDOW, TIMELINE_LIMIT))
    return [{"id": r[0], "name": r[1], "user": r[2], "state": r[3], "gpus": ids_of(r[4]),
             "start": r[5], "end": r[6] if r[3] != "running" else None} for r in rows]


# -- GPU use: the sampler's report, read defensively -------------------------------------
def gpu_report(workers: Any) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The sampler's last report: per running job, and per device index.

    ``workers.gpu_report()`` (the supervisor's sampler) gives ``{"jobs": {id:
    {...}}, "devices": [{...}]}`` or the pair; a supervisor without one, or one
    that has not sampled yet, gives nothing, and the views fall back on what
    the store and the plain GPU samples say.
    """
    report = getattr(workers, "gpu_report", None)
    try:
        got = report() if callable(report) else None
    except Exception:  # noqa: BLE001 - a view must not fail for a sampler's mistake
        got = None
    if isinstance(got, Mapping):
        jobs, devices = got.get("jobs"), got.get("devices")
    elif isinstance(got, tuple | list) and len(got) == 2:
        jobs, devices = got
    else:
        return {}, {}
    if isinstance(devices, Mapping):
        devices = list(devices.values())
    return (
        {int(k): dict(v) for k, v in (jobs or {}).items() if isinstance(v, Mapping)},
        {int(d["index"]): dict(d) for d in devices or () if isinstance(d, Mapping)
         and "index" in d},
    )


def job_gpu_use(row: JobRow, reported: Mapping[str, Any] | None,
                samples: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """A running job's GPU memory in use, utilisation (percent) and idle mark.

    Without the sampler's per-job figures a whole-GPU job is what its devices
    show (they are its alone); a shared job's part of a device is not known.
    """
    if reported is not None:
        return {"gpu_memory_used": reported.get("gpu_memory_used"),
                "gpu_utilisation": reported.get("gpu_utilisation"),
                "idle_since": iso(reported.get("idle_since"))}
    used: int | None = None
    util: float | None = None
    if row["gpus"] and not row["gpu_memory"]:
        mine = [samples.get(g, {}) for g in row["gpus"]]
        mem = [m for m in (s.get("memory_used") for s in mine) if isinstance(m, int)]
        pct = [p for p in (s.get("utilization") for s in mine) if isinstance(p, int | float)]
        used = sum(mem) if len(mem) == len(mine) else None
        util = round(sum(pct) / len(pct), 1) if len(pct) == len(mine) else None
    return {"gpu_memory_used": used, "gpu_utilisation": util, "idle_since": None}


def device_rows(infos: Iterable[Any], running: list[JobRow],
                samples: Mapping[int, Mapping[str, Any]],
                reported: Mapping[int, Mapping[str, Any]],
                external: AbstractSet[int]) -> list[dict[str, Any]]:
    """The status view's GPUs: each device, who holds how much of it, foreign processes.

    ``holders`` are the running jobs on the device (from the store, so never
    a sample behind), each with ``declared`` (its share in bytes; 0: the whole
    device) and ``memory`` (what the sampler saw it use there; None: not
    sampled). ``job``/``user`` name the first holder, as before sharing.
    """
    on: dict[int, list[dict[str, Any]]] = {}
    for row in running:
        for g in row["gpus"]:
            on.setdefault(g, []).append({"job": row["id"], "user": row["user"],
                                         "declared": row["gpu_memory"], "memory": None})
    devices = [(g.index, g.name, g.uuid, g.memory_total) for g in infos]
    known = {d[0] for d in devices}
    devices += [(i, str(r.get("name") or ""), str(r.get("uuid") or ""), r.get("memory"))
                for i, r in sorted(reported.items()) if i not in known]  # e.g. a MIG slice
    out = []
    for index, name, uuid, memory_total in devices:
        rep = reported.get(index, {})
        sample = samples.get(index, {})
        used_by = {h.get("job"): h.get("memory") for h in rep.get("holders") or ()
                   if isinstance(h, Mapping)}
        holders = [{**h, "memory": used_by.get(h["job"])} for h in on.get(index, [])]
        first = holders[0] if holders else None
        out.append({
            "index": index, "name": name, "uuid": rep.get("uuid") or uuid,
            "memory_total": memory_total,
            "job": first["job"] if first else None, "user": first["user"] if first else None,
            "external": index in external or bool(rep.get("foreign")),
            **{k: v for k, v in sample.items() if k != "memory_total"},
            "memory": rep.get("memory", memory_total),
            "used": rep.get("used", sample.get("memory_used")),
            "holders": holders,
            "foreign": [dict(f) for f in rep.get("foreign") or () if isinstance(f, Mapping)],
        })
    return out


def node_device_rows(capacity: Capacity, running: list[JobRow]) -> list[dict[str, Any]]:
    """The status view's GPUs on a cluster: every node's devices as the scheduler
    counts them (``index`` runs over the cluster, ``node`` and ``node_index`` say
    where); ``external``: down, drained, or held by the cluster's other jobs."""
    out: list[dict[str, Any]] = []
    for name in sorted(capacity.nodes):
        pool = capacity.nodes[name].pool
        for i in sorted(pool.total):
            holders = [{"job": r["id"], "user": r["user"], "declared": r["gpu_memory"],
                        "memory": None} for r in running
                       if (r.get("node") or LOCAL) == name and i in r["gpus"]]
            out.append({
                "index": len(out), "node": name, "node_index": i, "name": f"{name} GPU {i}",
                "uuid": "", "memory_total": pool.memory(i) or None,
                "job": holders[0]["job"] if holders else None,
                "user": holders[0]["user"] if holders else None,
                "external": i in pool.external(), "memory": pool.memory(i) or None,
                "used": None, "holders": holders, "foreign": [],
            })
    return out

"""The server's side of start estimates: when to compute them, and what to keep.

:func:`dopq.core.eta.estimate` is pure; this is the thin part around it that the
view builder calls. It runs the estimate at most once per ``min_interval``
after the queue's decision changed (sooner when a queued job has none yet, so
that ``dopq submit`` then ``dopq queue`` shows one), and every ``max_age``
regardless; reads the users' typical run times (median of their last 20
finished runs) from the store once a minute; and records in the store, per
job, the first estimate made and the last one made while it still waited
(``expected_start_first`` / ``expected_start_last``), so the error of both can
be read off finished jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from dopq.core.eta import STARTING, Estimate, RunTimes, estimate, typical_run_times
from dopq.core.policy import Decision
from dopq.server.store import Store


class StartEstimates:
    def __init__(
        self, store: Store, fmt: Callable[[float | None], str | None],
        default_run: float | None = None, min_interval: float = 1.0, max_age: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.fmt = fmt
        self.default_run = default_run
        self.min_interval = min_interval
        self.max_age = max_age
        self.clock = clock
        self.current: dict[int, Estimate] = {}
        # What the views show: job -> (expected start as ISO text or None, reason).
        self.shown: dict[int, tuple[str | None, str]] = {}
        self._seq: int | None = None
        self._at = -1e18
        self._typical: dict[str, float] = {}
        self._typical_at = -1e18
        self._first_done: set[int] = set()
        self._waiting: dict[int, float] = {}  # last estimate of each job while it waited

    def update(self, decision: Decision | None, seq: int,
               queued: Collection[int]) -> dict[int, tuple[str | None, str]]:
        """Expected start (ISO) and reason per job, from ``decision`` (number ``seq``)."""
        now = self.clock()
        if decision is None or decision.inputs is None:
            return self.shown
        changed = seq != self._seq
        missing = changed and any(j not in self.current for j in queued)
        if not (missing or (changed and now - self._at >= self.min_interval)
                or now - self._at >= self.max_age):
            return self.shown
        state, _, cfg = decision.inputs
        est = estimate(state, now, cfg, RunTimes(self.typical(now), self.default_run),
                       decision=decision, entries=decision.entries)
        self._record(est)
        old = self.shown
        shown = {}
        for jid, e in est.items():
            o = old.get(jid)
            text = o[0] if o is not None and self.current[jid].start == e.start \
                else self.fmt(e.start)
            shown[jid] = (text, e.reason)
        self.current, self.shown, self._seq, self._at = est, shown, seq, now
        return shown

    def typical(self, now: float) -> dict[str, float]:
        if now - self._typical_at >= 60.0:
            rows = self.store.read(
                "SELECT user, finished_at - started_at FROM jobs"
                " WHERE state IN ('succeeded', 'failed') AND started_at IS NOT NULL"
                " AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT 2000")
            self._typical = typical_run_times([(r[0], float(r[1])) for r in rows])
            self._typical_at = now
        return self._typical

    def _record(self, est: dict[int, Estimate]) -> None:
        first = [(e.start, jid) for jid, e in est.items()
                 if e.start is not None and jid not in self._first_done]
        self._first_done.intersection_update(est)
        self._first_done.update(jid for _, jid in first)
        left = [(self._waiting.pop(jid), jid) for jid in list(self._waiting) if jid not in est]
        for jid, e in est.items():
            if e.start is not None and e.reason != STARTING:
                self._waiting[jid] = e.start
        if not first and not left:
            return
        self.store.record_estimates(first, left)

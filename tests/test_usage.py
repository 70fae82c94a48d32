"""The decayed usage ledger."""

from __future__ import annotations

import math

import pytest

from dopq.core.policy import RunningJob
from dopq.core.usage import UsageLedger, charge, charge_rates, decay

DAY = 86400.0
WEEK = 7 * DAY


def test_decay_halves_per_half_life():
    assert decay(8.0, WEEK, WEEK) == pytest.approx(4.0)
    assert decay(8.0, 0.0, WEEK) == 8.0


def test_charge_is_gpus_times_dt_for_short_steps():
    assert charge(2.0, 60.0, WEEK) == pytest.approx(120.0, rel=1e-4)
    # a GPU held for ever converges to rate * T / ln 2
    assert charge(1.0, 1000 * WEEK, WEEK) == pytest.approx(WEEK / math.log(2))


def test_advance_charges_what_ran_since_last_time():
    ledger = UsageLedger(WEEK)
    ledger.advance(0.0, {})
    ledger.advance(3600.0, {"Ana": 1.0, "ben": 0.1})
    # an hour at 1 GPU, every second decayed to the end of the hour
    exact = WEEK / math.log(2) * (1 - 2 ** (-3600 / WEEK))
    assert exact == pytest.approx(3600.0, rel=5e-3)
    assert ledger.value("ana", 3600.0) == pytest.approx(exact)
    assert ledger.value("BEN", 3600.0) == pytest.approx(exact / 10)
    # value() decays without charging or changing the ledger
    assert ledger.value("ana", 3600.0 + WEEK) == pytest.approx(exact / 2)
    assert ledger.value("ana", 3600.0) == pytest.approx(exact)
    assert ledger.total(3600.0) == pytest.approx(exact * 1.1)
    assert ledger.snapshot(3600.0).keys() == {"ana", "ben"}


def test_first_advance_charges_nothing_and_clock_steps_back_harmlessly():
    ledger = UsageLedger(WEEK)
    ledger.advance(100.0, {"ana": 4.0})
    assert ledger.value("ana", 100.0) == 0.0
    ledger.advance(200.0, {"ana": 1.0})
    ledger.advance(150.0, {"ana": 1.0})  # clock stepped back: no time passed
    assert ledger.value("ana", 200.0) == pytest.approx(100.0, rel=1e-4)
    assert ledger.updated_at == 200.0


def test_idle_users_are_forgotten_eventually():
    ledger = UsageLedger(3600.0)
    ledger.advance(0.0, {})
    ledger.advance(10.0, {"ana": 1.0})
    ledger.advance(3600.0 * 100, {})
    assert "ana" not in ledger and len(ledger) == 0


def test_reset_and_rows_round_trip():
    ledger = UsageLedger(WEEK)
    ledger.advance(0.0, {})
    ledger.advance(100.0, {"ana": 1.0, "ben": 2.0})
    rows = ledger.to_rows()
    assert [r["user"] for r in rows] == ["ana", "ben"]
    copy = UsageLedger.from_rows(rows, WEEK)
    assert copy.snapshot(500.0) == pytest.approx(ledger.snapshot(500.0))
    assert copy.updated_at == 100.0
    copy.reset("ANA")
    assert "ana" not in copy and "ben" in copy
    copy.reset()
    assert copy.to_rows() == []


def test_rows_with_the_same_user_are_merged():
    rows = [{"user": "Ana", "value": 100.0, "updated_at": 0.0},
            {"user": "ana", "value": 100.0, "updated_at": WEEK}]
    assert UsageLedger(WEEK, rows).value("ana", WEEK) == pytest.approx(150.0)


def test_charge_rates():
    jobs = [RunningJob(1, "Ana", 2, (0, 1), 0.0), RunningJob(2, "ana", 0, (), 0.0),
            RunningJob(3, "ben", 0, (), 0.0)]
    assert charge_rates(jobs, 0.1) == pytest.approx({"ana": 2.1, "ben": 0.1})


def test_half_life_must_be_positive():
    with pytest.raises(ValueError):
        UsageLedger(0)

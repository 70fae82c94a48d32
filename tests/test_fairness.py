"""Demand-aware fairness: water-filling and entitlements worked by hand."""

from __future__ import annotations

import pytest

from dopq.core.fairness import Claim, Run, entitlements, fairness, jain, water_fill
from dopq.core.policy import PolicyConfig
from dopq.core.simulate import TraceJob, simulate


def test_enough_for_everyone_gives_each_their_demand():
    assert water_fill(8, {"a": 2, "b": 3}, {}) == {"a": 2, "b": 3}


def test_equal_weights_split_evenly_when_all_want_more():
    assert water_fill(8, {"a": 8, "b": 8}, {}) == {"a": 4, "b": 4}


def test_a_capped_user_leaves_the_rest_to_the_others():
    # a wants 1 (under the even 8/3), so b and c share the other 7.
    got = water_fill(8, {"a": 1, "b": 8, "c": 8}, {})
    assert got == pytest.approx({"a": 1, "b": 3.5, "c": 3.5})


def test_weights_split_in_proportion_and_cap_at_demand():
    assert water_fill(8, {"a": 8, "b": 8}, {"a": 3, "b": 1}) == pytest.approx({"a": 6, "b": 2})
    # a's weight would give it 6, it wants 4: b gets the other 4.
    assert water_fill(8, {"a": 4, "b": 8}, {"a": 3, "b": 1}) == pytest.approx({"a": 4, "b": 4})


def test_fractions_of_shared_devices():
    # Three jobs at a quarter of a device each beside a user wanting both GPUs.
    got = water_fill(2, {"small": 0.75, "big": 2}, {})
    assert got == pytest.approx({"small": 0.75, "big": 1.25})


def test_users_without_demand_get_nothing():
    assert water_fill(4, {"a": 0, "b": 6}, {}) == {"a": 0, "b": 4}


def test_entitlement_integrates_over_changes_of_demand():
    # 4 GPUs. a wants 4 from 0 to 100; b wants 1 from 50 to 80.
    # 0-50: a 4. 50-80: b 1, a 3. 80-100: a 4.
    claims = [Claim("a", 4, 0, 100), Claim("b", 1, 50, 80)]
    got = entitlements(claims, 4, {}, end=100)
    assert got == pytest.approx({"a": 4 * 50 + 3 * 30 + 4 * 20, "b": 30})


def test_an_unended_claim_lasts_to_the_end():
    got = entitlements([Claim("a", 2, 10, None)], 4, {}, end=40)
    assert got == pytest.approx({"a": 60})


def test_jain():
    assert jain([1, 1, 1]) == 1.0
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([]) == 1.0


def test_report_ratios_lost_work_and_first_waits():
    claims = [Claim("a", 4, 0, 100), Claim("b", 1, 50, 80)]
    # a held all four GPUs throughout; b got nothing; a lost 10 s on 4 GPUs.
    runs = [Run("a", 4, 0, 100, lost=10)]
    report = fairness(claims, runs, 4, {}, 100, {"a": 0.0, "b": None}, {"a": "Ann"},
                      preemptions=1)
    by = {u.user: u for u in report.users}
    assert by["Ann"].ratio == pytest.approx(400 / 370) and by["b"].ratio == 0.0
    assert by["Ann"].lost == pytest.approx(40 / 3600) and report.lost == by["Ann"].lost
    assert by["b"].first_wait is None and by["Ann"].first_wait == 0.0
    assert report.jain == pytest.approx(0.5)
    assert report.to_dict()["preemptions"] == 1


def test_simulated_report_counts_idle_users_as_not_entitled():
    # One user alone on the machine for a while, another later: both got what
    # they could have had (a plain GPU-hours index would call this unfair).
    jobs = [TraceJob(1, 0.0, "a", 2, 1000.0), TraceJob(2, 1000.0, "b", 2, 100.0)]
    result = simulate(jobs, 2, PolicyConfig())
    assert result.jain < 0.7
    assert result.fairness is not None and result.fairness.jain == pytest.approx(1.0)
    assert [u.first_wait for u in result.fairness.users] == [0.0, 0.0]

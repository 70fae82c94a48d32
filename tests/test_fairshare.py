"""One policy configuration, validated at load; one share and F for policy and view."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dopq.core import settings as settings_mod
from dopq.core.errors import ConfigError
from dopq.core.fairshare import PolicyConfig, fair_shares, fairshare_factors


@pytest.mark.parametrize("key", ["w_fairshare", "w_age", "w_job", "max_age", "half_life",
                                 "cpu_fraction"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1.0])
def test_settings_refuse_bad_policy_numbers_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        settings_mod.from_dict({"policy": {key: value}})
    assert err.value.key == f"policy.{key}"


def test_a_toml_file_with_nan_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "dopq.toml"
    path.write_text("[policy]\nw_age = nan\n")
    with pytest.raises(ConfigError, match=r"policy\.w_age: must be a finite number"):
        settings_mod.load(path)


@pytest.mark.parametrize("data, key", [
    ({"max_gpus_per_user": -1}, "policy.max_gpus_per_user"),
    ({"policy": "lottery"}, "policy.policy"),
    ({"shares": {"ana": 0.0}}, "policy.shares.ana"),
    ({"shares": {"ana": math.nan}}, "policy.shares.ana"),
])
def test_other_bad_policy_values_are_refused(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_mod.from_dict({"policy": data})
    assert err.value.key == key


def test_the_settings_policy_is_the_policys_config() -> None:
    s = settings_mod.from_dict({"policy": {"max_running_per_user": 2, "shares": {"ana": 2}}})
    assert isinstance(s.policy, PolicyConfig)
    assert s.policy.max_running_per_user == 2 and s.policy.weight("ANA") == 2.0
    assert settings_mod.Settings().policy.max_gpus_per_user == 0  # 0: no limit, everywhere


def test_an_inactive_user_with_tiny_usage_has_f_near_one_in_both() -> None:
    # The users view once showed F = 0 here while the policy used about 1.
    usage = {"ana": 1e6, "bob": 1e-3}
    standing = fair_shares(usage, active={"ana"}, weights={})
    assert standing["bob"].factor == pytest.approx(1.0, abs=1e-6)
    assert standing["bob"].share == 1.0  # against the active users' weights
    assert fairshare_factors(usage, {"ana"}, {}) == {u: s.factor for u, s in standing.items()}


def test_share_and_penalty_at_the_entitled_share() -> None:
    standing = fair_shares({"ana": 50.0, "bob": 50.0}, {"ana", "bob"}, {"ANA": 1.0})
    assert standing["ana"].share == 0.5 and standing["ana"].penalty == pytest.approx(1.0)
    assert standing["ana"].factor == pytest.approx(0.5)
    assert fair_shares({}, (), {}) == {}
